"""Naive heterogeneous SMoE: each client activates K_c experts, the server runs FedAvg.

The baseline that exposes the two failure modes UB-SMoE (ICML 2026, arXiv
2605.16690) fixes: expert utilization imbalance and zero gradients for experts a
low-budget client never activates (DESIGN.md section 1).
"""

from __future__ import annotations

from ubsmoe.methods.base import Method
from ubsmoe.methods.registry import register_method


@register_method("smoe")
class HeterogeneousSMoE(Method):
    """Per-client K_c from its budget, p_c-weighted FedAvg of all adapters."""

    privacy_modes = ("central", "local")
