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
    Aggregator,
    ClientUpdate,
    FedAvgAggregator,
    Method,
    expert_layer_of,
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


def a3smoe_expert_scores(update: ClientUpdate, gamma: float) -> torch.Tensor:
    """One client's unnormalised A3SMoE weights, ``n_c * (f_{c,i} / K_c) ** gamma``.

    Proportional to u_{c,i} = p_c (f_{c,i} / K_c)^gamma (p_c = n_c / sum n): the
    per-expert normalisation cancels the common factor 1 / sum n, so a server can
    fold clients in one at a time.

    Args:
        update: a client update with ``expert_counts [L, E]``, ``token_counts [L]``,
            ``top_k`` and ``num_examples``.
        gamma: exponent >= 0 (``0 ** 0 = 1``: gamma = 0 weights by n_c alone).

    Returns:
        ``[L, E]`` float64 scores.
    """
    counts = update.expert_counts.to(torch.float64)  # [L, E]
    tokens = update.token_counts.to(torch.float64).clamp_min(1.0)  # [L]
    freq = counts / tokens.unsqueeze(-1)  # f_{c,i}: [L, E]
    return float(update.num_examples) * (freq / float(update.top_k)).pow(gamma)


def a3smoe_expert_weights(updates: Sequence[ClientUpdate], gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert aggregation weights w_{c,i} of A3SMoE, all clients at once.

    Args:
        updates: the round's client updates (C of them), each with
            ``expert_counts [L, E]``, ``token_counts [L]`` and ``top_k``.
        gamma: exponent on f_{c,i} / K_c.

    Returns:
        ``(weights [C, L, E] float64, used [L, E] bool)``: weights normalised over
        clients for every expert any participant used; ``used`` is False where no
        participant routed a token to the expert (its weights are all 0).
    """
    u = torch.stack([a3smoe_expert_scores(up, gamma) for up in updates])  # [C, L, E]
    used = torch.stack([up.expert_counts for up in updates]).sum(0) > 0  # [L, E]
    total = u.sum(0)  # [L, E]
    weights = torch.where(total > 0, u / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return weights, used


class A3SMoEAggregator(Aggregator):
    """Incremental A3SMoE: per-expert running sums of ``u_{c,i} x_{c,i}`` and ``u_{c,i}``.

    Memory: one float64 copy of the adapters plus ``[L, E]`` totals, whatever the
    number of clients.

    Args:
        global_adapters: the adapters sent this round (the previous global value of
            an expert no participant used is kept).
        gamma: exponent >= 0.
    """

    def __init__(self, global_adapters: dict[str, torch.Tensor], gamma: float) -> None:
        self.global_adapters = global_adapters
        self.gamma = gamma
        self.layer_of = expert_layer_of(list(global_adapters))
        self.others = FedAvgAggregator([n for n in global_adapters if n not in self.layer_of])
        self.sums: dict[str, torch.Tensor] = {}
        self.score_total: torch.Tensor | None = None  # [L, E]
        self.used: torch.Tensor | None = None  # [L, E]

    def add(self, update: ClientUpdate) -> None:
        """Fold in one client: FedAvg for non-expert tensors, A3SMoE weights for experts."""
        self.others.add(update)
        scores = a3smoe_expert_scores(update, self.gamma)  # [L, E]
        used = update.expert_counts > 0  # [L, E]
        self.score_total = scores if self.score_total is None else self.score_total + scores
        self.used = used if self.used is None else self.used | used
        for name, layer in self.layer_of.items():
            x = update.adapters[name].to(torch.float64)  # [E, ...]
            w = scores[layer].view((-1,) + (1,) * (x.dim() - 1))  # [E, 1, ...]
            if name in self.sums:
                self.sums[name].add_(w * x)
            else:
                self.sums[name] = w * x

    def result(self) -> dict[str, torch.Tensor]:
        """The aggregated adapters (see the module docstring).

        Raises:
            ValueError: nothing was added.
        """
        out = self.others.result()
        for name, layer in self.layer_of.items():
            prev = self.global_adapters[name]
            total = self.score_total[layer]  # [E]
            keep = ~self.used[layer] | (total <= 0)  # [E] experts no participant used
            shape = (-1,) + (1,) * (prev.dim() - 1)
            acc = self.sums[name] / torch.where(keep, 1.0, total).view(shape)
            acc[keep] = prev[keep].to(torch.float64)
            out[name] = acc.to(prev.dtype)
        return out


@register_method("a3smoe")
class A3SMoE(Method):
    """Heterogeneous K_c; experts aggregated by activation frequency, the rest FedAvg."""

    config_class = A3SMoEConfig

    def aggregator(self, global_adapters: dict[str, torch.Tensor]) -> Aggregator:
        """An incremental :class:`A3SMoEAggregator` (see the module docstring)."""
        return A3SMoEAggregator(global_adapters, self.config.gamma)
