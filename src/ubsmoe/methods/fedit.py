"""Homogeneous LoRA / FedIT: every client at the model's native top-k, FedAvg.

FedIT: Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning", ICASSP 2024 (arXiv 2305.05644). Budgets are ignored: all clients train and
are evaluated with K = K_max and the same LoRA rank.
"""

from __future__ import annotations

from ubsmoe.methods.base import Method, register_method


@register_method("fedit")
class FedIT(Method):
    """Homogeneous LoRA: K = K_max for every client, p_c-weighted FedAvg."""

    def client_top_k(self, k_c: int, k_max: int) -> int:
        """Every client runs the native top-k regardless of its budget."""
        return k_max
