"""ubsmoe: UB-SMoE (ICML 2026, arXiv 2605.16690) and its baselines for resource-adaptive
federated fine-tuning of sparse Mixture-of-Experts foundation models."""

__version__ = "0.1.0"

_LAZY = {"load_run": "ubsmoe.finished_run", "save_base_model": "ubsmoe.finished_run", "evaluate_run": "ubsmoe.finished_run"}


def __getattr__(name: str):
    """``ubsmoe.load_run`` / ``save_base_model`` / ``evaluate_run`` (:mod:`ubsmoe.finished_run`), imported on first use.

    Raises:
        AttributeError: any other name.
    """
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ubsmoe' has no attribute {name!r}")
