"""A3SMoE: activation-aware aggregation of expert parameters.

Tran et al., "Revisiting Sparse Mixture of Experts for Resource-adaptive Federated
Fine-tuning Foundation Models", ICLR 2025 workshop. DESIGN.md section 5: clients run
their own K_c; expert i's LoRA in layer l is aggregated with

    u_{c,i} = p_c * (f_{c,i} / K_c) ** gamma,   f_{c,i} = a_{c,i} / n_c,
    w_{c,i} = u_{c,i} / sum_c u_{c,i},

keeping the previous expert when no participant routed a token to it; all other
parameters (attention LoRA) use FedAvg.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ubsmoe.methods.base import (
    ClientUpdate,
    Method,
    data_weights,
    expert_layer_of,
    fedavg,
    register_method,
)


@dataclass
class A3SMoEConfig:
    """A3SMoE hyperparameters.

    Attributes:
        gamma: exponent on the normalised activation frequency (0 gives FedAvg).
    """

    gamma: float = 4.0

    def __post_init__(self) -> None:
        from ubsmoe.config import ConfigError

        if not self.gamma >= 0:
            raise ConfigError(f"a3smoe.gamma: got {self.gamma!r}, expected a number >= 0")


def a3smoe_expert_weights(updates: Sequence[ClientUpdate], gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert aggregation weights w_{c,i} of A3SMoE.

    Args:
        updates: the round's client updates (C of them), each with
            ``expert_counts [L, E]``, ``token_counts [L]`` and ``top_k``.
        gamma: exponent on f_{c,i} / K_c.

    Returns:
        ``(weights [C, L, E] float64, used [L, E] bool)``: weights normalised over
        clients for every expert any participant used; ``used`` is False where no
        participant routed a token to the expert (its weights are all 0).
    """
    p = data_weights(updates)  # [C]
    counts = torch.stack([u.expert_counts.to(torch.float64) for u in updates])  # [C, L, E]
    tokens = torch.stack([u.token_counts.to(torch.float64) for u in updates])  # [C, L]
    k = torch.tensor([float(u.top_k) for u in updates], dtype=torch.float64)  # [C]
    freq = counts / tokens.clamp_min(1.0).unsqueeze(-1)  # f_{c,i}: [C, L, E]
    u = p[:, None, None] * (freq / k[:, None, None]).pow(gamma)  # [C, L, E]
    used = counts.sum(0) > 0  # [L, E]
    total = u.sum(0)  # [L, E]
    weights = torch.where(total > 0, u / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return weights, used


@register_method("a3smoe")
class A3SMoE(Method):
    """Heterogeneous K_c; experts aggregated by activation frequency, the rest FedAvg."""

    config_class = A3SMoEConfig

    def aggregate(self, global_adapters: dict[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """A3SMoE aggregation; see the module docstring for the equation.

        Raises:
            ValueError: no updates.
        """
        if not updates:
            raise ValueError("aggregate: no client updates")
        layer_of = expert_layer_of(list(global_adapters))
        others = [n for n in global_adapters if n not in layer_of]
        out = fedavg(updates, others)
        weights, used = a3smoe_expert_weights(updates, self.config.gamma)  # [C, L, E], [L, E]
        for name, layer in layer_of.items():
            w = weights[:, layer, :]  # [C, E]
            acc = torch.zeros_like(global_adapters[name], dtype=torch.float64)  # [E, ...]
            for c, upd in enumerate(updates):
                shape = (-1,) + (1,) * (acc.dim() - 1)
                acc += w[c].view(shape) * upd.adapters[name].to(torch.float64)
            keep = ~used[layer]  # [E] experts no participant used
            acc[keep] = global_adapters[name][keep].to(torch.float64)
            out[name] = acc.to(global_adapters[name].dtype)
        return out
