"""HetLoRA: heterogeneous-rank LoRA with truncation, self-pruning and sparsity weighting.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024 (arXiv 2401.06432). DESIGN.md section 5:

- distribution: a client of rank r_c gets the global rank-r_max factors truncated to
  r_c (:meth:`RankMethod.client_adapters`, in the effective space ``s B A``);
- local loss: the task loss plus the rank self-pruning regulariser
  ``lambda * ||B[:, k:]||_F * ||A[k:, :]||_F``, ``k = floor(gamma r_c)``, summed over
  every LoRA module (and every expert of a per-expert LoRA); it carries gradient
  into the trailing rank components;
- aggregation: each client's factors are brought to the global scale
  (``B_c * s_c / s_g``), zero-padded to r_max and averaged with sparsity weights
  ``S_c / sum S``, ``S_c = ||s_c B_c A_c||_F`` computed from the Gram matrices
  (never the dense product); uniform weights if every S_c = 0. A and B are averaged
  separately, as in the paper.

The client's rank stays its budget level's rank across rounds: the paper's optional
rank reduction after pruning is not applied (the regulariser is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ubsmoe.core.lora import FLOOR_EPS, check_clients, check_pair, lora_frobenius_norm
from ubsmoe.methods.aggregation import ClientUpdate
from ubsmoe.methods.rank_base import (
    LoRARankConfig,
    RankMethod,
    client_factors,
    lora_pairs,
    map_experts,
    pair_rank,
)
from ubsmoe.methods.registry import register_method


@dataclass
class HetLoRAConfig(LoRARankConfig):
    """HetLoRA hyperparameters (ranks and alpha: see :class:`LoRARankConfig`).

    Attributes:
        gamma: kept fraction of the rank in the self-pruning regulariser; the tail
            ``[floor(gamma r), r)`` is penalised. In ``(0, 1]`` (1: no tail, no penalty).
        reg_lambda: coefficient lambda of the regulariser, ``>= 0`` (0: off): the
            penalty ``lambda * ||B[:, floor(gamma r):]|| * ||A[floor(gamma r):]||`` on
            every LoRA module.
    """

    section = "hetlora"

    gamma: float = 0.99
    reg_lambda: float = 1e-3

    def _check_extra(self) -> list[str]:
        errors = []
        if not (isinstance(self.gamma, (int, float)) and 0.0 < self.gamma <= 1.0):
            errors.append(f"hetlora.gamma: got {self.gamma!r}, expected a number in (0, 1]")
        if not (isinstance(self.reg_lambda, (int, float)) and math.isfinite(self.reg_lambda)
                and self.reg_lambda >= 0):
            errors.append(f"hetlora.reg_lambda: got {self.reg_lambda!r}, expected a number >= 0")
        return errors


@register_method("hetlora")
class HetLoRA(RankMethod):
    """Rank r_c per budget; truncated distribution, self-pruning loss, sparsity-weighted padding."""

    config_class = HetLoRAConfig
    privacy_refusal = ("HetLoRA weights each client by S_c = ||s_c B_c A_c||_F of its own update, "
                       "so one client's share of the mean is unbounded")

    def extra_loss(self, model: nn.Module, top_k: int) -> torch.Tensor | None:
        """Rank self-pruning regulariser summed over the model's trainable LoRA modules.

        Per module ``lambda * ||B[:, k:]||_F * ||A[k:, :]||_F`` with
        ``k = floor(gamma r)`` (:func:`~ubsmoe.methods.hetlora.hetlora_regularizer`);
        a per-expert LoRA adds one term per expert. Attached to the graph.

        Returns:
            Scalar tensor, or None when ``reg_lambda = 0`` or the model has no LoRA.
        """
        if self.config.reg_lambda == 0:
            return None
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        pairs, _ = lora_pairs(list(params))
        gamma, coef = self.config.gamma, self.config.reg_lambda
        terms = []
        for pair in pairs:
            A, B = params[pair.a], params[pair.b]
            if A.dim() == 3:  # [E, r, in] / [E, out, r]: one penalty per expert
                per_expert = torch.vmap(lambda a, b: hetlora_regularizer(a, b, gamma, coef))(A, B)
                terms.append(per_expert.sum())
            else:
                terms.append(hetlora_regularizer(A, B, gamma, coef))
        return torch.stack(terms).sum() if terms else None

    def aggregate(self, global_adapters: dict[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Zero-pad to the global rank and average with weights S_c / sum S, per module.

        Each client's B is first rescaled to the global scale (``B_c s_c / s_g``), so
        the padded factors share one scale; ``S_c`` (and so the weights) is computed
        per LoRA module (per expert for a per-expert LoRA). Non-LoRA tensors: FedAvg.

        Raises:
            ValueError: no updates, or a client's rank exceeds the global rank.
        """
        pairs, out = self._others(global_adapters, updates)
        for pair in pairs:
            r_g = pair_rank(global_adapters, pair)
            s_g = self.scale(r_g)
            As, Bs, ranks = client_factors(updates, pair)
            Bs = [B * (self.scale(r) / s_g) for B, r in zip(Bs, ranks, strict=True)]
            scales = [s_g] * len(updates)  # ||s_g B'_c A_c|| = ||s_c B_c A_c|| = S_c

            def agg(*factors, r_g=r_g, scales=scales):
                """One module (one expert): the clients' A's then B's -> global (A, B)."""
                n = len(scales)
                return hetlora_aggregate(list(factors[:n]), list(factors[n:]), scales, r_g)

            A, B = map_experts(agg, *As, *Bs)
            out[pair.a] = A.to(global_adapters[pair.a].dtype)
            out[pair.b] = B.to(global_adapters[pair.b].dtype)
        return out


def hetlora_weights(norms: torch.Tensor) -> torch.Tensor:
    """HetLoRA sparsity weights ``w_c = S_c / sum_k S_k``.

    Args:
        norms: ``[num_clients]`` non-negative update norms ``S_c = ||s_c B_c A_c||_F``
            (see :func:`lora_frobenius_norm`).

    Returns:
        ``[num_clients]`` weights summing to 1, in the dtype of ``norms`` (float64 for
        integer input); uniform ``1 / num_clients`` if every ``S_c`` is 0.

    Raises:
        ValueError: ``norms`` is not 1-D, is empty, or holds a negative or non-finite
            value.
    """
    if norms.ndim != 1 or norms.numel() == 0:
        raise ValueError(f"hetlora_weights: norms must be a non-empty 1-D tensor, got shape "
                         f"{tuple(norms.shape)}")
    if not norms.is_floating_point():
        norms = norms.to(torch.float64)
    if not bool(torch.isfinite(norms).all()) or bool((norms < 0).any()):
        raise ValueError(f"hetlora_weights: norms must be finite and >= 0, got {norms.tolist()}")
    total = norms.sum()
    if total == 0:
        return torch.full_like(norms, 1.0 / norms.numel())
    return norms / total


def hetlora_regularizer(
    A: torch.Tensor, B: torch.Tensor, gamma: float, coef: float
) -> torch.Tensor:
    """HetLoRA rank self-pruning penalty on the tail rank components.

    With ``k = floor(gamma * r)``::

        L_prune = coef * ||B[:, k:]||_F * ||A[k:, :]||_F

    It pushes the trailing ``r - k`` rank components towards zero so a client can
    drop them. ``gamma = 1`` gives an empty tail and a zero penalty. ``floor`` uses a
    1e-9 tolerance so that e.g. ``gamma = 0.29, r = 100`` gives ``k = 29``. Call it
    inside the training graph: it is differentiable in ``A`` and ``B`` (the tail
    receives the gradient; the head ``[:k]`` gets exactly zero).

    Args:
        A: ``[r, in_features]`` trainable down-projection.
        B: ``[out_features, r]`` trainable up-projection.
        gamma: kept fraction, in ``(0, 1]``.
        coef: penalty coefficient (lambda), ``>= 0``.

    Returns:
        0-dim tensor in the promoted dtype of ``A`` and ``B``, attached to the graph.

    Raises:
        ValueError: shapes are inconsistent, ``gamma`` is not in ``(0, 1]`` or ``coef``
            is negative.
    """
    check_pair(A, B, "hetlora_regularizer")
    if not 0.0 < float(gamma) <= 1.0:
        raise ValueError(f"hetlora_regularizer: gamma must be in (0, 1], got {gamma!r}")
    if not float(coef) >= 0.0:
        raise ValueError(f"hetlora_regularizer: coef must be >= 0, got {coef!r}")
    r = A.shape[0]
    k = min(r, math.floor(float(gamma) * r + FLOOR_EPS))
    b_tail = torch.linalg.vector_norm(B[:, k:])  # over [out, r - k]
    a_tail = torch.linalg.vector_norm(A[k:, :])  # over [r - k, in]
    return float(coef) * b_tail * a_tail


def hetlora_aggregate(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    rank_max: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HetLoRA server aggregation: zero-pad to ``rank_max`` and sparsity-weight.

    For clients c with factors ``A_c [r_c, in]``, ``B_c [out, r_c]`` and scales
    ``s_c``::

        S_c = ||s_c B_c A_c||_F                 (lora_frobenius_norm, no dense matrix)
        w_c = S_c / sum_k S_k                   (hetlora_weights; uniform if all 0)
        A   = sum_c w_c * pad(A_c, rank_max)    (zero rows r_c..rank_max-1)
        B   = sum_c w_c * pad(B_c, rank_max)    (zero columns r_c..rank_max-1)

    A and B are averaged separately, as in the paper, so ``B @ A`` is NOT the
    weighted mean of the clients' products (cross terms ``w_c w_k B_c A_k`` appear).
    The scales enter only through the weights ``S_c``; the returned factors are raw
    (unscaled), and the caller applies the global scale it uses for rank
    ``rank_max``. Client data sizes are not part of the weight (the paper's rule);
    the caller may fold them in by pre-scaling if desired. Accumulation is in
    float64, the result is cast to the dtype of client 0's factors.

    Args:
        As: per client, ``[r_c, in_features]``.
        Bs: per client, ``[out_features, r_c]``.
        scales: per client, the LoRA scale ``s_c = alpha / r_c``.
        rank_max: global rank, ``>= max_c r_c``.

    Returns:
        ``(A[rank_max, in_features], B[out_features, rank_max])``.

    Raises:
        ValueError: empty or mismatched lists, inconsistent shapes, or
            ``rank_max < max_c r_c``.
    """
    check_clients(As, Bs, scales, "hetlora_aggregate")
    r_hi = max(A.shape[0] for A in As)
    if isinstance(rank_max, bool) or not isinstance(rank_max, int) or rank_max < max(r_hi, 1):
        raise ValueError(
            f"hetlora_aggregate: rank_max must be an int >= the largest client rank "
            f"{r_hi}, got {rank_max!r}"
        )
    norms = torch.stack(
        [lora_frobenius_norm(A, B, s).to(torch.float64) for A, B, s in zip(As, Bs, scales)]
    )  # [C]
    w = hetlora_weights(norms)  # [C] float64
    out_dtype = As[0].dtype
    A_acc = torch.zeros(rank_max, As[0].shape[1], dtype=torch.float64, device=As[0].device)
    B_acc = torch.zeros(Bs[0].shape[0], rank_max, dtype=torch.float64, device=Bs[0].device)
    for wc, A, B in zip(w.tolist(), As, Bs):
        r = A.shape[0]
        A_acc[:r] += wc * A.to(torch.float64)
        B_acc[:, :r] += wc * B.to(torch.float64)
    return A_acc.to(out_dtype), B_acc.to(out_dtype)
