"""HetLoRA: heterogeneous-rank LoRA with truncation, rank self-pruning and sparsity weighting.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024 (arXiv 2401.06432). DESIGN.md section 5:

- distribution: a client of current rank r_c gets the global rank-r_max factors
  truncated to r_c, ``A[:r_c]``, ``B[:, :r_c]`` (:meth:`RankMethod.client_adapters`);
  r_c starts at its budget level's rank and only shrinks (self-pruning);
- local loss: the task loss plus the rank self-pruning regulariser
  ``lambda * ||B[:, k:]||_F * ||A[k:, :]||_F``, ``k = floor(gamma r_c)``, summed over
  every LoRA module (and every expert of a per-expert LoRA); it carries gradient
  into the trailing rank components;
- self-pruning: after local training, if the client's tail measure
  ``T = sum_modules ||B[:, k:]||_F ||A[k:, :]||_F`` is smaller than the tail of the
  adapters it started the round from, the client drops the tail: it sends
  ``A[:k]``, ``B[:, :k]`` and trains at rank k from the next round on;
- aggregation: the sent factors are zero-padded to r_max and averaged with one
  sparsity weight per client ``w_c = S_c / sum S``,
  ``S_c = sqrt(sum_modules ||s_c B_c A_c||_F^2)`` (the norm of the client's whole
  update over all its LoRA modules, from Gram matrices, never the dense product);
  uniform if every S_c = 0. A and B are averaged separately, as in the paper.

Choices the paper leaves open (also on the docs page "Heterogeneous-rank baselines"):

- the pruning test "the tail got smaller" compares with the tail of the adapters the
  client received this round (the previous round's global tail at its rank); in
  round 1 that tail is zero (B = 0), so no client prunes in its first round;
- pruning is decided on the server from the client's upload and the adapters it was
  sent (a deterministic function of both, so it equals a client-side decision and
  needs no protocol change); a client's rank is one number for all its modules (the
  regulariser's sum), drops by one step ``r -> floor(gamma r)`` per round at most,
  never below 1, and never rises again (a budget level's rank caps it); the
  per-client ranks are method state, checkpointed with the server state;
- the sparsity weight is one per client over all its modules (the paper's S_k of
  "the LoRA modules"); ``hetlora.weighting=module`` gives one weight per module (and
  per expert), the previous implementation; client data sizes do not enter;
- zero-padding does not rescale B: with the rank-independent scale
  (``model.lora_scale_rule``, default) every rank has the same scale. Under
  ``fixed_alpha`` the factors are brought to the global scale (``B s_c / s_g``, and
  ``B s_r / s_k`` when pruning), so the padded average is in one effective space.

``hetlora.prune=never``, ``hetlora.weighting=module`` and
``model.lora_scale_rule=fixed_alpha`` together reproduce the previous implementation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ubsmoe.core.lora import FLOOR_EPS, check_clients, check_pair, lora_frobenius_norm
from ubsmoe.methods.aggregation import ClientUpdate
from ubsmoe.methods.rank_base import (
    LoRAPair,
    LoRARankConfig,
    RankMethod,
    client_factors,
    lora_pairs,
    map_experts,
    pair_rank,
)
from ubsmoe.methods.registry import register_method

PRUNE_RULES = ("decrease", "never")
WEIGHTINGS = ("client", "module")


@dataclass
class HetLoRAConfig(LoRARankConfig):
    """HetLoRA hyperparameters (ranks and alpha: see :class:`LoRARankConfig`).

    Attributes:
        gamma: kept fraction of the rank in the self-pruning regulariser; the tail
            ``[floor(gamma r), r)`` is penalised and, when it shrinks, pruned. In
            ``(0, 1]`` (1: no tail, no penalty, no pruning).
        reg_lambda: coefficient lambda of the regulariser, ``>= 0`` (0: off): the
            penalty ``lambda * ||B[:, floor(gamma r):]|| * ||A[floor(gamma r):]||`` on
            every LoRA module.
        prune: rank self-pruning: ``decrease`` (default; a client whose tail
            measure after local training is below that of the adapters it received
            sends rank ``floor(gamma r)`` and keeps that rank from the next round on)
            or ``never`` (every client keeps its level's rank).
        weighting: sparsity weights: ``client`` (default; one weight per client,
            ``S_c`` over all its LoRA modules) or ``module`` (one per module and
            expert, the previous implementation).
    """

    section = "hetlora"

    gamma: float = 0.99
    reg_lambda: float = 1e-3
    prune: str = "decrease"
    weighting: str = "client"

    def _check_extra(self) -> list[str]:
        errors = []
        if not (isinstance(self.gamma, (int, float)) and 0.0 < self.gamma <= 1.0):
            errors.append(f"hetlora.gamma: got {self.gamma!r}, expected a number in (0, 1]")
        if not (isinstance(self.reg_lambda, (int, float)) and math.isfinite(self.reg_lambda)
                and self.reg_lambda >= 0):
            errors.append(f"hetlora.reg_lambda: got {self.reg_lambda!r}, expected a number >= 0")
        if self.prune not in PRUNE_RULES:
            errors.append(f"hetlora.prune: got {self.prune!r}, expected one of {', '.join(PRUNE_RULES)}")
        if self.weighting not in WEIGHTINGS:
            errors.append(f"hetlora.weighting: got {self.weighting!r}, expected one of "
                          f"{', '.join(WEIGHTINGS)}")
        return errors


def kept_rank(rank: int, gamma: float) -> int:
    """``k = floor(gamma r)`` with a 1e-9 tolerance (``gamma = 0.29, r = 100`` gives 29), at most r."""
    return min(rank, math.floor(float(gamma) * rank + FLOOR_EPS))


@register_method("hetlora")
class HetLoRA(RankMethod):
    """Rank r_c per budget, self-pruned; truncated distribution, sparsity-weighted zero padding."""

    config_class = HetLoRAConfig
    privacy_refusal = ("HetLoRA weights each client by S_c = ||s_c B_c A_c||_F of its own update, "
                       "so one client's share of the mean is unbounded")

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._ranks: dict[int, int] = {}  # client id -> its self-pruned rank (absent: its level's)

    def current_lora(self, client_id: int, rank: int, alpha: float) -> tuple[int, float]:
        """The client's self-pruned rank (at most its level's ``rank``) and that rank's alpha."""
        r = min(rank, self._ranks.get(int(client_id), rank))
        return (rank, alpha) if r == rank else (r, self.lora_alpha(r, float(self.config.alpha)))

    def client_ranks(self) -> dict[int, int]:
        """Client id -> self-pruned rank, for the clients that pruned so far."""
        return dict(self._ranks)

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
        terms = [tail_measure(params, pair, self.config.gamma, self.config.reg_lambda) for pair in pairs]
        return torch.stack(terms).sum() if terms else None

    def prune_update(self, global_adapters: dict[str, torch.Tensor], pairs: Sequence[LoRAPair],
                     update: ClientUpdate) -> dict[str, torch.Tensor]:
        """The factors the client sends after rank self-pruning, recording its new rank.

        With ``r`` the update's rank and ``k = floor(gamma r)``: if ``1 <= k < r`` and
        ``T(update) < T(sent)``, ``T = sum_modules ||B[..., k:]||_F ||A[..., k:, :]||_F``
        (per expert for a per-expert LoRA) and "sent" the global adapters truncated to
        r, every module is cut to rank k (``B`` times ``s_r / s_k``: 1 under the
        rank-independent scale) and the client's rank becomes k. Otherwise the
        update's factors are returned unchanged.

        Returns:
            name -> tensor, the update's adapters at rank r or k.
        """
        if self.config.prune == "never" or not pairs:
            return update.adapters
        r = pair_rank(update.adapters, pairs[0])
        k = kept_rank(r, self.config.gamma)
        if not 1 <= k < r:
            return update.adapters
        start = self.client_adapters(global_adapters, r, seed=0)
        with torch.no_grad():
            t_end = sum(float(tail_measure(update.adapters, p, self.config.gamma, 1.0)) for p in pairs)
            t_start = sum(float(tail_measure(start, p, self.config.gamma, 1.0)) for p in pairs)
        if not t_end < t_start:
            return update.adapters
        self._ranks[int(update.client_id)] = k
        ratio = self.scale(r) / self.scale(k)
        out = dict(update.adapters)
        for p in pairs:
            A, B = update.adapters[p.a], update.adapters[p.b]
            out[p.a] = A[..., :k, :].clone()
            out[p.b] = B[..., :k].clone() if ratio == 1.0 else B[..., :k] * ratio
        return out

    def aggregate(self, global_adapters: dict[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Self-prune, zero-pad to the global rank and average with the sparsity weights.

        Each client's upload first goes through :meth:`prune_update`. Weights: one per
        client, ``S_c / sum S`` with ``S_c`` the norm of its whole update
        (:func:`client_update_norm`), or (``weighting=module``) one per module and
        expert. Under ``fixed_alpha`` each B is brought to the global scale
        (``B_c s_c / s_g``) first; under the rank-independent scale B is not rescaled.
        Non-LoRA tensors: FedAvg.

        Raises:
            ValueError: no updates, or a client's rank exceeds the global rank.
        """
        pairs, out = self._others(global_adapters, updates)
        sent = [dataclasses.replace(u, adapters=self.prune_update(global_adapters, pairs, u))
                for u in updates]
        w = None
        if self.config.weighting == "client" and pairs:
            norms = [client_update_norm(u.adapters, pairs, self.scale(pair_rank(u.adapters, pairs[0])))
                     for u in sent]
            w = hetlora_weights(torch.stack(norms))  # [C] float64
        for pair in pairs:
            r_g = pair_rank(global_adapters, pair)
            s_g = self.scale(r_g)
            As, Bs, ranks = client_factors(sent, pair)
            Bs = [B if self.scale(r) == s_g else B * (self.scale(r) / s_g)
                  for B, r in zip(Bs, ranks, strict=True)]
            if w is not None:
                A, B = pad_average(As, Bs, w, r_g)
            else:
                scales = [s_g] * len(sent)  # ||s_g B'_c A_c|| = ||s_c B_c A_c|| = S_c

                def agg(*factors, r_g=r_g, scales=scales):
                    """One module (one expert): the clients' A's then B's -> global (A, B)."""
                    n = len(scales)
                    return hetlora_aggregate(list(factors[:n]), list(factors[n:]), scales, r_g)

                A, B = map_experts(agg, *As, *Bs)
            out[pair.a] = A.to(global_adapters[pair.a].dtype)
            out[pair.b] = B.to(global_adapters[pair.b].dtype)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"client_ranks": {client id: self-pruned rank}}`` (checkpointed with the server state)."""
        return {"client_ranks": dict(self._ranks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the self-pruned ranks from :meth:`state_dict` (an empty dict clears them)."""
        self._ranks = {int(c): int(r) for c, r in state.get("client_ranks", {}).items()}


def tail_measure(adapters: dict[str, torch.Tensor], pair: LoRAPair, gamma: float,
                 coef: float) -> torch.Tensor:
    """``coef * ||B[:, k:]||_F ||A[k:, :]||_F`` of one module, summed over experts.

    The module's regulariser term (:func:`hetlora_regularizer`, one term per expert of
    a per-expert LoRA ``[E, r, in]`` / ``[E, out, r]``); with ``coef = 1`` the tail
    measure T of the pruning test. Differentiable.

    Returns:
        0-dim tensor.
    """
    A, B = adapters[pair.a], adapters[pair.b]
    if A.dim() == 3:
        return torch.vmap(lambda a, b: hetlora_regularizer(a, b, gamma, coef))(A, B).sum()
    return hetlora_regularizer(A, B, gamma, coef)


def client_update_norm(adapters: dict[str, torch.Tensor], pairs: Sequence[LoRAPair],
                       scale: float) -> torch.Tensor:
    """HetLoRA's per-client sparsity ``S_c = sqrt(sum_modules ||s B A||_F^2)``.

    The Frobenius norm of the client's whole update (every LoRA module, every expert
    of a per-expert LoRA), each term from Gram matrices (:func:`lora_frobenius_norm`).

    Args:
        adapters: the client's factors, A ``[.., r, in]`` / B ``[.., out, r]``.
        pairs: its LoRA modules.
        scale: its LoRA scale s_c.

    Returns:
        0-dim float64 tensor ``S_c >= 0``.
    """
    total = torch.zeros((), dtype=torch.float64)
    for pair in pairs:
        norms = map_experts(lambda a, b: lora_frobenius_norm(a, b, scale).to(torch.float64),
                            adapters[pair.a], adapters[pair.b])
        total = total + (norms ** 2).sum()
    return total.sqrt()


def pad_average(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor],
                weights: torch.Tensor, rank_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = sum_c w_c pad(A_c)``, ``B = sum_c w_c pad(B_c)``: zero-padding to ``rank_max``, no rescaling.

    Args:
        As: per client, ``[.., r_c, in]`` (any leading dims, e.g. ``[E]``, equal across clients).
        Bs: per client, ``[.., out, r_c]``.
        weights: ``[C]`` weights (e.g. :func:`hetlora_weights`).
        rank_max: global rank ``>= max_c r_c``.

    Returns:
        ``(A [.., rank_max, in], B [.., out, rank_max])`` in float64.

    Raises:
        ValueError: a client's rank exceeds ``rank_max`` or the counts differ.
    """
    if not len(As) == len(Bs) == len(weights):
        raise ValueError(f"pad_average: {len(As)} A, {len(Bs)} B and {len(weights)} weights")
    if max(A.shape[-2] for A in As) > rank_max:
        raise ValueError(f"pad_average: a client's rank exceeds rank_max={rank_max}")
    A_acc = torch.zeros(*As[0].shape[:-2], rank_max, As[0].shape[-1], dtype=torch.float64)
    B_acc = torch.zeros(*Bs[0].shape[:-1], rank_max, dtype=torch.float64)
    for wc, A, B in zip(weights.tolist(), As, Bs, strict=True):
        r = A.shape[-2]
        A_acc[..., :r, :] += wc * A.to(torch.float64)
        B_acc[..., :r] += wc * B.to(torch.float64)
    return A_acc, B_acc


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
    k = kept_rank(A.shape[0], gamma)
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
    A, B = pad_average(As, Bs, hetlora_weights(norms), rank_max)  # float64
    return A.to(As[0].dtype), B.to(As[0].dtype)
