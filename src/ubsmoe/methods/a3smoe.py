"""A3SMoE: activation-aware aggregation of expert parameters.

Tran et al., "Revisiting Sparse Mixture of Experts for Resource-adaptive Federated
Fine-tuning Foundation Models", ICLR 2025 workshop. DESIGN.md section 5: clients run
their own K_c; expert i's LoRA in layer l is aggregated with

    u_{c,i} = p_c * (f_{c,i} / K_c) ** gamma,   f_{c,i} = a_{c,i} / n_c,
    w_{c,i} = u_{c,i} / sum_c u_{c,i},

keeping the previous expert when no participant routed a token to it; all other
parameters (attention LoRA) use FedAvg. This weight is FLAME's (Le et al., arXiv
2506.16600, the journal version of A3SMoE: ``(a / S)^t |D|``), ``a3smoe.weighting=flame``,
the default. The workshop paper's Eq. 7 as printed divides by K_c once more,

    u_{c,i} = p_c * (p_{i,c} / K_c) ** gamma,   p_{i,c} = a_{c,i} / sum_j a_{c,j},

where ``sum_j a_{c,j} = n_c K_c`` (every token picks K_c experts), so that
``p_{i,c} / K_c = f_{c,i} / K_c**2``: ``a3smoe.weighting=literal``. The two agree
when every client has the same K_c (a common factor cancels per expert) and differ
otherwise: ``literal`` down-weights high-K clients by an extra ``K_c**-gamma``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ubsmoe.errors import ConfigError

A3SMOE_WEIGHTINGS = ("flame", "literal")

import torch

from ubsmoe.methods.aggregation import Aggregator, ClientUpdate, FedAvgAggregator
from ubsmoe.methods.base import Method, expert_layer_of
from ubsmoe.methods.registry import register_method


@dataclass
class A3SMoEConfig:
    """A3SMoE hyperparameters.

    Attributes:
        gamma: exponent on the normalised activation frequency (0 gives FedAvg).
        weighting: A3SMoE's per-expert weight: ``flame`` (the default; the weight of
            FLAME, arXiv 2506.16600, the journal version of A3SMoE,
            ``u_{c,i} = p_c (a_{c,i} / (n_c K_c))**gamma``) or ``literal`` (the
            workshop paper's Eq. 7 as printed, ``p_c (p_{i,c} / K_c)**gamma`` with
            ``p_{i,c} = a_{c,i} / sum_j a_{c,j} = a_{c,i} / (n_c K_c)``, i.e. one more
            division by K_c, which down-weights high-K clients by ``K_c**-gamma``);
            equal when every client has the same K_c; see the module docstring.
    """

    gamma: float = 4.0
    weighting: str = "flame"

    def __post_init__(self) -> None:

        errors = []
        if not self.gamma >= 0:
            errors.append(f"a3smoe.gamma: got {self.gamma!r}, expected a number >= 0")
        if self.weighting not in A3SMOE_WEIGHTINGS:
            errors.append(f"a3smoe.weighting: got {self.weighting!r}, expected one of "
                          f"{', '.join(A3SMOE_WEIGHTINGS)}")
        if errors:
            raise ConfigError("\n".join(errors))


def a3smoe_expert_scores(update: ClientUpdate, gamma: float, weighting: str = "flame") -> torch.Tensor:
    """One client's unnormalised A3SMoE weights (the module docstring's u_{c,i} times sum n).

    ``flame``: ``n_c * (f_{c,i} / K_c) ** gamma`` with ``f_{c,i} = a_{c,i} / n_c``
    (FLAME, arXiv 2506.16600). ``literal``: ``n_c * (p_{i,c} / K_c) ** gamma`` with
    ``p_{i,c} = a_{c,i} / sum_j a_{c,j}`` over the layer's experts (A3SMoE workshop
    paper, Eq. 7). Both are proportional to u_{c,i} (p_c = n_c / sum n): the
    per-expert normalisation cancels the common factor 1 / sum n, so a server can
    fold clients in one at a time.

    Args:
        update: a client update with ``expert_counts [L, E]``, ``token_counts [L]``,
            ``top_k`` and ``num_examples``.
        gamma: exponent >= 0 (``0 ** 0 = 1``: gamma = 0 weights by n_c alone).
        weighting: ``flame`` or ``literal``.

    Returns:
        ``[L, E]`` float64 scores.

    Raises:
        ValueError: an unknown ``weighting``.
    """
    counts = update.expert_counts.to(torch.float64)  # [L, E]
    if weighting == "flame":
        norm = update.token_counts.to(torch.float64).clamp_min(1.0)  # n_c: [L]
    elif weighting == "literal":
        norm = counts.sum(-1).clamp_min(1.0)  # sum_j a_{c,j}: [L]
    else:
        raise ValueError(f"a3smoe weighting: got {weighting!r}, expected one of "
                         f"{', '.join(A3SMOE_WEIGHTINGS)}")
    # f_{c,i} or p_{i,c}: [L, E]; clamped at 0 for local DP's noisy histograms
    # (post-processing; a no-op for counts, which are never negative).
    freq = (counts / norm.unsqueeze(-1)).clamp_min(0.0)
    return float(update.num_examples) * (freq / float(update.top_k)).pow(gamma)


def a3smoe_expert_weights(updates: Sequence[ClientUpdate], gamma: float, weighting: str = "flame"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert aggregation weights w_{c,i} of A3SMoE, all clients at once.

    Args:
        updates: the round's client updates (C of them), each with
            ``expert_counts [L, E]``, ``token_counts [L]`` and ``top_k``.
        gamma: exponent on the normalised frequency.
        weighting: ``flame`` or ``literal`` (:func:`a3smoe_expert_scores`).

    Returns:
        ``(weights [C, L, E] float64, used [L, E] bool)``: weights normalised over
        clients for every expert any participant used; ``used`` is False where no
        participant routed a token to the expert (its weights are all 0).

    Raises:
        ValueError: an unknown ``weighting``.
    """
    u = torch.stack([a3smoe_expert_scores(up, gamma, weighting) for up in updates])  # [C, L, E]
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
        weighting: ``flame`` or ``literal`` (:func:`a3smoe_expert_scores`).
        robust: None (weighted mean) or ``(rule, trim_fraction)`` for the non-expert
            tensors (``fl.aggregation``, see :class:`FedAvgAggregator`).
    """

    def __init__(self, global_adapters: dict[str, torch.Tensor], gamma: float,
                 weighting: str = "flame", robust: tuple[str, float] | None = None) -> None:
        self.global_adapters = global_adapters
        self.gamma = gamma
        self.weighting = weighting
        self.layer_of = expert_layer_of(list(global_adapters))
        self.others = FedAvgAggregator([n for n in global_adapters if n not in self.layer_of], robust)
        self.sums: dict[str, torch.Tensor] = {}
        self.score_total: torch.Tensor | None = None  # [L, E]
        self.used: torch.Tensor | None = None  # [L, E]

    def add(self, update: ClientUpdate) -> None:
        """Fold in one client: FedAvg for non-expert tensors, A3SMoE weights for experts."""
        self.others.add(update)
        scores = a3smoe_expert_scores(update, self.gamma, self.weighting)  # [L, E]
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
    privacy_modes = ("local",)
    privacy_refusal = ("A3SMoE weights each expert by each client's own counts, which central DP "
                       "never releases per client")
    uses_counts = True

    def aggregator(self, global_adapters: dict[str, torch.Tensor]) -> Aggregator:
        """An incremental :class:`A3SMoEAggregator` (see the module docstring)."""
        return A3SMoEAggregator(global_adapters, self.config.gamma, self.config.weighting, self.robust)
