"""FlexLoRA: weighted full-update averaging with SVD redistribution to each client's rank.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", NeurIPS 2024 (arXiv 2402.11505). DESIGN.md section 5: per LoRA
module (per expert for a per-expert LoRA)

    dW = sum_c p_c s_c B_c A_c = U diag(S) V^T,
    a client of rank r gets  A = V_r^T,  B = U_r diag(S_r) / s_r,

with p_c the data-size weights and s = alpha / rank. The SVD is computed in factored
form (stack the clients' factors, QR both stacks, SVD the small core;
:func:`~ubsmoe.methods.flexlora.flexlora_aggregate`), so dW is never materialised.

The server keeps the rank-r_max redistribution (``A = V_{r_max}^T``,
``B = U_{r_max} diag(S) / s_{r_max}``) as its global adapters; a client of rank
r <= r_max receives its first r components rescaled to its own scale
(:meth:`RankMethod.client_adapters`), which is exactly ``A = V_r^T,
B = U_r diag(S_r) / s_r``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ubsmoe.core.lora import check_scale, check_svd, factored_svd, factors_from_svd, stack_lora
from ubsmoe.methods.aggregation import ClientUpdate, data_weights
from ubsmoe.methods.rank_base import (
    LoRAPair,
    LoRARankConfig,
    RankMethod,
    client_factors,
    map_experts,
    pair_rank,
)
from ubsmoe.methods.registry import register_method


@dataclass
class FlexLoRAConfig(LoRARankConfig):
    """FlexLoRA hyperparameters: the client ranks and alpha (see :class:`LoRARankConfig`)."""

    section = "flexlora"


@register_method("flexlora")
class FlexLoRA(RankMethod):
    """Rank r_c per budget; average s_c B_c A_c, factored SVD, redistribute to each rank."""

    config_class = FlexLoRAConfig
    privacy_refusal = ("FlexLoRA merges data-size-weighted full-rank products B_c A_c and "
                       "re-factorises them by SVD, outside the clipped update space")

    def aggregate(self, global_adapters: dict[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Global rank-r_max factors of ``sum_c p_c s_c B_c A_c`` per LoRA module.

        Returns:
            The global adapters: per module ``A = V_{r_g}^T``, ``B = U_{r_g} diag(S) / s_g``
            with r_g the global adapters' rank (zero-padded past the update's rank);
            non-LoRA tensors: FedAvg.

        Raises:
            ValueError: no updates.
        """
        pairs, out = self._others(global_adapters, updates)
        p = data_weights(updates)  # [C]
        for pair in pairs:
            r_g = pair_rank(global_adapters, pair)
            As, Bs, ranks = client_factors(updates, pair)
            scales = [self.scale(r) for r in ranks]
            w = self.module_weights(pair, updates, p)  # [C], or [E, C] per expert

            def agg(*factors, r_g=r_g, scales=scales, w=w):
                """One module (one expert): the clients' A's then B's -> global (A, B)."""
                n = len(scales)
                [(A, B)] = flexlora_aggregate(list(factors[:n]), list(factors[n:]), scales, w,
                                              [r_g], [self.scale(r_g)])
                return A, B

            if w.dim() == 1:
                A, B = map_experts(agg, *As, *Bs)
            else:  # per-expert client weights: one FlexLoRA step per expert e with w[e]
                parts = [agg(*(t[e] for t in (*As, *Bs)), w=w[e]) for e in range(w.shape[0])]
                A, B = (torch.stack(x) for x in zip(*parts, strict=True))
            out[pair.a] = A.to(global_adapters[pair.a].dtype)
            out[pair.b] = B.to(global_adapters[pair.b].dtype)
        return out

    def module_weights(self, pair: LoRAPair, updates: Sequence[ClientUpdate],
                       p: torch.Tensor) -> torch.Tensor:
        """The client weights of one LoRA module in ``sum_c w_c s_c B_c A_c``.

        FlexLoRA weights every module by the data sizes p_c; a subclass may return
        per-expert weights ``[E, C]`` for a per-expert module (``a3smoe_flexlora``).

        Args:
            pair: the module's factor names.
            updates: the round's C client updates.
            p: ``[C]`` data-size weights p_c (sum 1).

        Returns:
            ``[C]`` (the same weights for every expert) or ``[E, C]``.
        """
        return p


def flexlora_redistribute(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexLoRA: a client's rank-r factors from the SVD of the aggregated update.

    ::

        A = Vh[:r, :]                       (= V_r^T)
        B = U[:, :r] diag(S[:r]) / s
        => s * B @ A = U_r diag(S_r) V_r^T  (best rank-r approximation, Eckart-Young)

    If ``r > q`` (fewer singular triplets than the requested rank) the factors are
    zero-padded to rank ``r``; the product is then the full update.

    Args:
        U: ``[out_features, q]`` left singular vectors.
        S: ``[q]`` singular values, descending.
        Vh: ``[q, in_features]`` right singular vectors (transposed).
        rank: client rank ``r >= 1``.
        scale: the client's LoRA scale ``s = alpha / r`` (finite, non-zero).

    Returns:
        ``(A[rank, in_features], B[out_features, rank])``, new tensors in the dtype of
        ``U``/``S``/``Vh``.

    Raises:
        ValueError: inconsistent SVD shapes, ``rank < 1`` or an invalid ``scale``.
    """
    check_svd(U, S, Vh, "flexlora_redistribute")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"flexlora_redistribute: rank must be an int >= 1, got {rank!r}")
    check_scale(scale, "flexlora_redistribute")
    return factors_from_svd(U, S, Vh, rank, scale)


def flexlora_aggregate(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    weights: Sequence[float] | torch.Tensor,
    ranks: Sequence[int],
    scale_for_rank: Callable[[int], float] | Sequence[float],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FlexLoRA server step for one module: aggregate, SVD once, redistribute.

    ::

        dW = sum_c p_c s_c B_c A_c = B_st @ A_st          (stack_lora, never formed)
        dW = U diag(S) Vh                                  (factored_svd)
        for each requested rank r with scale s_r:
            A_r = Vh[:r],  B_r = U[:, :r] diag(S[:r]) / s_r   (flexlora_redistribute)

    Args:
        As: per client, ``[r_c, in_features]``.
        Bs: per client, ``[out_features, r_c]``.
        scales: per client, the LoRA scale ``s_c``.
        weights: per client, ``p_c`` (used as given, see :func:`stack_lora`).
        ranks: the ranks to produce (typically the distinct client ranks).
        scale_for_rank: the LoRA scale of a rank-r adapter, either a callable
            ``rank -> scale`` (e.g. ``lambda r: alpha / r``) or a sequence aligned
            with ``ranks``.

    Returns:
        One ``(A[r, in_features], B[out_features, r])`` pair per entry of ``ranks``,
        in the same order.

    Raises:
        ValueError: invalid client lists (see :func:`stack_lora`), an invalid rank or
            scale, or a scale sequence whose length differs from ``ranks``.
    """
    if callable(scale_for_rank):
        rank_scales = [float(scale_for_rank(r)) for r in ranks]
    else:
        rank_scales = [float(s) for s in scale_for_rank]
        if len(rank_scales) != len(ranks):
            raise ValueError(
                f"flexlora_aggregate: got {len(rank_scales)} scales for {len(ranks)} ranks"
            )
    A_st, B_st = stack_lora(As, Bs, scales, weights)
    U, S, Vh = factored_svd(B_st, A_st)
    return [flexlora_redistribute(U, S, Vh, r, s) for r, s in zip(ranks, rank_scales)]
