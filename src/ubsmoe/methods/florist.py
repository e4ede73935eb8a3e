"""FLoRIST: FLoRA's stacking with a factored SVD and an energy threshold on the global rank.

Ramesh and Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate
Federated Fine-Tuning of Large Language Models", arXiv 2506.09199. DESIGN.md
section 5: each round follows FLoRA (fresh client LoRA at rank r_c, merge into the
base weights; :mod:`ubsmoe.methods.flora`), but per LoRA module (per expert for a
per-expert LoRA) the server

    stacks  B_st A_st = sum_c p_c s_c B_c A_c            (never formed densely)
    SVDs it in factored form  = U diag(S) V^T            (two QRs and a small SVD)
    keeps   k = min{k : sum_{i<=k} S_i^2 / sum S^2 >= tau}
    sends   A = V_k^T,  B = U_k diag(S_k)                (the same for every client)

and every model merges ``B A`` into its base. A zero update (every S_i = 0, e.g. no
client moved B off zero) has k = 0 and leaves the module unchanged. In a per-expert
LoRA each expert gets its own k; the experts' factors are zero-padded to the
largest k (the padding adds nothing to ``B A``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ubsmoe.core.lora import (
    check_scale,
    energy_rank,
    factored_svd,
    factors_from_svd,
    pad_lora,
    stack_lora,
)
from ubsmoe.methods.aggregation import ClientUpdate
from ubsmoe.methods.flora import FLoRA
from ubsmoe.methods.rank_base import LoRAPair, LoRARankConfig, client_factors
from ubsmoe.methods.registry import register_method


@dataclass
class FLoRISTConfig(LoRARankConfig):
    """FLoRIST hyperparameters (ranks and alpha: see :class:`LoRARankConfig`).

    Attributes:
        tau: energy threshold in ``(0, 1]`` choosing the global rank per module
            (1 keeps every non-zero singular value: FLoRA's exact update).
    """

    section = "florist"

    tau: float = 0.9

    def _check_extra(self) -> list[str]:
        if not (isinstance(self.tau, (int, float)) and 0.0 < self.tau <= 1.0):
            return [f"florist.tau: got {self.tau!r}, expected a number in (0, 1]"]
        return []


@register_method("florist")
class FLoRIST(FLoRA):
    """Rank r_c per budget; FLoRA's stack thresholded to energy tau by a factored SVD."""

    config_class = FLoRISTConfig
    privacy_refusal = ("FLoRIST stacks each client's factors (as FLoRA) before its SVD "
                       "thresholding, so no noised sum hides one client")

    def merge_factors(self, pair: LoRAPair, updates: Sequence[ClientUpdate],
                      weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rank-k factors of the stacked update, k chosen by the energy threshold.

        Returns:
            ``(A [.., k, in], B [.., out, k])`` with ``B A`` the rank-k part of
            ``sum_c p_c s_c B_c A_c`` (k per expert, zero-padded to the largest), or
            None when the module's update is zero.
        """
        As, Bs, ranks = client_factors(updates, pair)
        scales = [self.scale(r) for r in ranks]
        tau = self.config.tau
        if As[0].dim() == 2:
            A, B, k = florist_aggregate(As, Bs, scales, weights, tau, 1.0)
            return (A, B) if k > 0 else None
        per_expert = [florist_aggregate([A[e] for A in As], [B[e] for B in Bs], scales, weights,
                                        tau, 1.0) for e in range(As[0].shape[0])]
        k_max = max(k for _, _, k in per_expert)
        if k_max == 0:
            return None
        padded = [pad_lora(A, B, k_max) for A, B, _ in per_expert]
        return torch.stack([a for a, _ in padded]), torch.stack([b for _, b in padded])


def florist_aggregate(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    weights: Sequence[float] | torch.Tensor,
    tau: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """FLoRIST server step for one module: stack, factored SVD, energy threshold.

    ::

        dW = sum_c p_c s_c B_c A_c = B_st @ A_st = U diag(S) Vh   (never formed)
        k  = energy_rank(S, tau)
        A  = Vh[:k],  B = U[:, :k] diag(S[:k]) / s     =>  s * B @ A = rank-k part of dW

    Every client receives the same rank-k factors. Only ``B`` depends on ``scale``;
    if the scale is meant to depend on k (``alpha / k``), multiply ``B`` by
    ``scale / new_scale`` afterwards.

    Zero-update guard: if ``dW = 0`` (all singular values exactly 0, e.g. every B_c
    is still zero) the result is ``k = 0`` with zero-rank factors ``A[0, in]`` and
    ``B[out, 0]``, whose product is the zero matrix (``merge_into_weight`` then
    leaves W unchanged). The caller must not build a rank-0 PEFT adapter from them:
    skip the update, or use ``pad_lora(A, B, 1)`` for rank-1 zeros.

    Args:
        As: per client, ``[r_c, in_features]``.
        Bs: per client, ``[out_features, r_c]``.
        scales: per client, the LoRA scale ``s_c``.
        weights: per client, ``p_c`` (used as given, see :func:`stack_lora`).
        tau: energy threshold in ``(0, 1]`` (FLoRIST default 0.9).
        scale: the LoRA scale ``s`` the returned factors are meant for (e.g.
            ``alpha / k``; finite, non-zero).

    Returns:
        ``(A[k, in_features], B[out_features, k], k)``.

    Raises:
        ValueError: invalid client lists, ``tau`` or ``scale``.
    """
    if not 0.0 < float(tau) <= 1.0:
        raise ValueError(f"florist_aggregate: tau must be in (0, 1], got {tau!r}")
    check_scale(scale, "florist_aggregate")
    A_st, B_st = stack_lora(As, Bs, scales, weights)
    U, S, Vh = factored_svd(B_st, A_st)
    k = energy_rank(S, tau)
    A, B = factors_from_svd(U, S, Vh, k, scale)
    return A, B, k
