"""Homogeneous LoRA / FedIT: every client at the model's native top-k, FedAvg.

FedIT: Zhang et al., "Towards Building the Federated GPT: Federated Instruction
Tuning", ICASSP 2024 (arXiv 2305.05644). Budgets do not enter training by default:
all clients train with K = K_max and the same LoRA rank (``train.top_k=budget``
trains each at its K_c instead). Each budget level is evaluated at its own K_j
(``eval.top_k``), as in the papers' tables.
"""

from __future__ import annotations

from ubsmoe.methods.base import Method
from ubsmoe.methods.registry import register_method


@register_method("fedit")
class FedIT(Method):
    """Homogeneous LoRA: K = K_max for every client by default, p_c-weighted FedAvg."""

    own_train_top_k = "native"
    train_top_k_modes = ("auto", "budget", "native")
    needs_moe = False
    privacy_modes = ("central", "local")
