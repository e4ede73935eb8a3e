"""ubsmoe: UB-SMoE (ICML 2026, arXiv 2605.16690) and its baselines for resource-adaptive
federated fine-tuning of sparse Mixture-of-Experts foundation models."""

__version__ = "0.1.0"
