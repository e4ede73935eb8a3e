"""Pseudo-gradients for inactive experts, PG (DESIGN.md section 4.2; notation in section 2).

UB-SMoE: "Universally Balanced Sparse Mixture-of-Experts for Resource-Adaptive
Federated Fine-Tuning of Foundation Models" (ICML 2026, arXiv 2605.16690).

Top-K routing is not differentiable: an expert that receives no token in a batch
gets no gradient, and a client with a small K_c leaves most experts without any
signal. A PG rule fills the inactive experts' rows from the router probabilities and
the active experts' signal, scaled by a client-sparsity factor that grows as K_c
shrinks. Two rules sit behind the small :class:`PseudoGradient` interface:

* :class:`UniversalPseudoGradient`, the paper's published description: every
  inactive expert gets the pi-weighted mean of the active experts' signal;
* :class:`ProbePseudoGradient`: each inactive expert's own true gradient on the few
  tokens where its router probability is highest (computed by the SMoE layer's probe,
  ``SMoELayer.probe_tokens``, at extra FLOPs), rescaled to the universal rule's norm.

A rule can act in two spaces (``ubsmoe.pg_space``):

* ``update`` (default): after the optimizer step,
  :func:`ubsmoe.core.pg_apply.apply_pseudo_updates` moves each inactive expert by the
  rule applied to the step's actual parameter changes (snapshot taken by
  :func:`ubsmoe.core.pg_apply.snapshot_before_step` after backward). Adam divides each
  gradient by its own running RMS, so a scale put on a gradient is lost; in the space
  of updates lambda_pg and rho_c set how far an inactive expert moves relative to
  what the optimizer did to the active experts, and PG never enters gradient
  clipping;
* ``gradient`` (the earlier rule, for comparison):
  :func:`ubsmoe.core.pg_apply.apply_pseudo_gradients` writes the rule's output into
  ``.grad`` before clipping and the step.

Pure PyTorch; nothing here knows about Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = [
    "ProbePseudoGradient",
    "PseudoGradient",
    "UniversalPseudoGradient",
    "pg_cosine_alignment",
    "pg_scale",
]


def _check_top_k(top_k: int, num_experts: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: got {top_k!r}, expected an integer in [1, {num_experts}]")


def pg_scale(lambda_pg: float, num_experts: int, top_k: int) -> float:
    """Client-sparsity factor ``rho_c = lambda_pg * M / K_c``.

    Larger for weaker clients (smaller K_c), whose batches leave more experts idle.

    Args:
        lambda_pg: lambda_pg >= 0.
        num_experts: M >= 1, experts per SMoE layer.
        top_k: K_c in ``[1, M]``.

    Returns:
        rho_c as a Python float.

    Raises:
        ValueError: ``lambda_pg`` negative or not finite, ``num_experts`` < 1, or
            ``top_k`` outside ``[1, num_experts]``.
    """
    if isinstance(lambda_pg, bool) or not isinstance(lambda_pg, (int, float)) or not (
            math.isfinite(lambda_pg) and lambda_pg >= 0):
        raise ValueError(f"lambda_pg: got {lambda_pg!r}, expected a finite number >= 0")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts: got {num_experts!r}, expected an integer >= 1")
    _check_top_k(top_k, num_experts)
    return float(lambda_pg) * num_experts / top_k


def _check_layer_inputs(grads: Mapping[str, torch.Tensor], router_prob: torch.Tensor,
                        active: torch.Tensor) -> int:
    """Validate a rule's inputs and return ``num_experts`` (see :class:`PseudoGradient`)."""
    if router_prob.dim() != 1:
        raise ValueError(
            f"router_prob: got shape {tuple(router_prob.shape)}, expected [num_experts]"
        )
    num_experts = router_prob.shape[0]
    if active.shape != (num_experts,) or active.dtype != torch.bool:
        raise ValueError(
            f"active: got shape {tuple(active.shape)} dtype {active.dtype}, expected "
            f"[num_experts] = [{num_experts}] torch.bool"
        )
    for name, g in grads.items():
        if not isinstance(g, torch.Tensor) or g.dim() < 1 or g.shape[0] != num_experts:
            shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(
                f"grads[{name!r}]: got {shape}, expected a tensor [num_experts = "
                f"{num_experts}, ...]"
            )
    return num_experts


@runtime_checkable
class PseudoGradient(Protocol):
    """Interface of a pseudo-gradient rule for the experts of one SMoE layer.

    A rule maps the layer's per-expert LoRA signal (the gradients, or in update space
    the step's parameter changes) to a new full signal in which the inactive experts'
    rows are filled; the active experts' rows must come back unchanged. The inactive
    rows of the input hold that expert's own signal in the same space (zeros, unless
    the layer's probe computed a gradient for it: then the gradient, or its negation
    in update space, a descent direction). Any callable with this signature works;
    a rule that needs the layer's probe says so with an integer attribute
    ``probe_tokens`` > 0 (tokens per inactive expert).
    """

    def __call__(self, grads: Mapping[str, torch.Tensor], router_prob: torch.Tensor,
                 active: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
        """Fill the inactive experts' gradients of one SMoE layer.

        Args:
            grads: per-expert LoRA tensor name (e.g. ``"gate_up.A"``) -> its gradient
                (or parameter change) ``[num_experts, ...]``; rows of experts without
                tokens hold their own signal (see above; zeros without a probe).
            router_prob: ``[num_experts]`` batch-mean router probability pi (float).
            active: ``[num_experts]`` bool, True for experts that received at least
                one token in the batch.
            top_k: K_c the client runs at.

        Returns:
            Name -> new gradient ``[num_experts, ...]`` (same names, shapes, dtypes).
        """
        ...


class UniversalPseudoGradient(PseudoGradient):
    """PG following the paper's published description (DESIGN.md section 4.2).

    With A the active experts (>= 1 token in the batch), I the others, g_j the true
    gradient of expert j (per tensor) and pi the batch-mean router probability:

        G   = sum_{j in A} (pi_j / sum_{k in A} pi_k) * g_j      (universal direction)
        g_i = rho_c * (pi_i / mean_{j in A} pi_j) * G             for i in I
        rho_c = lambda_pg * M / K_c                               (:func:`pg_scale`)

    Only ratios of pi enter, so any positive multiple of the batch-mean
    probabilities (e.g. their per-batch sum) gives the same result. G is accumulated
    in float32 and cast back to the gradient's dtype.

    Args:
        lambda_pg: lambda_pg >= 0 (0 writes zero pseudo-gradients).

    Raises:
        ValueError: ``lambda_pg`` negative or not finite.
    """

    probe_tokens = 0  # needs no probe

    def __init__(self, lambda_pg: float) -> None:
        pg_scale(lambda_pg, 1, 1)  # validates lambda_pg
        self.lambda_pg = float(lambda_pg)

    def __repr__(self) -> str:
        return f"UniversalPseudoGradient(lambda_pg={self.lambda_pg})"

    def __call__(self, grads: Mapping[str, torch.Tensor], router_prob: torch.Tensor,
                 active: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
        """Return gradients with the inactive experts' rows set to ``g_i`` above.

        Active rows are returned bitwise unchanged. If no expert is active (no
        direction to borrow) or every expert is active (nothing to fill), ``grads``
        is returned unchanged (a new dict holding the same tensors). The input
        tensors are never modified.

        Args:
            grads: name -> gradient ``[num_experts, ...]`` (see :class:`PseudoGradient`).
            router_prob: ``[num_experts]`` batch-mean router probabilities pi >= 0.
            active: ``[num_experts]`` bool mask of active experts.
            top_k: K_c in ``[1, num_experts]``.

        Returns:
            Name -> new gradient ``[num_experts, ...]``, same dtype and device.

        Raises:
            ValueError: ``router_prob`` or ``active`` not ``[num_experts]``, ``active``
                not bool, a gradient whose first dimension is not ``num_experts``, or
                ``top_k`` outside ``[1, num_experts]``.
        """
        num_experts = _check_layer_inputs(grads, router_prob, active)
        rho = pg_scale(self.lambda_pg, num_experts, top_k)
        out = dict(grads)
        n_active = int(active.sum())
        if n_active == 0 or n_active == num_experts:
            return out
        act_idx = active.nonzero().squeeze(-1)  # [|A|]
        inact_idx = (~active).nonzero().squeeze(-1)  # [|I|]
        pi = router_prob.detach().to(torch.float32)  # [E]
        pi_act = pi[act_idx]  # [|A|]
        total = pi_act.sum()
        # pi_act / total; a zero total (all active probabilities underflowed) leaves
        # no direction, and the clamp turns it into G = 0 instead of NaN.
        w = pi_act / total.clamp_min(torch.finfo(torch.float32).tiny)  # [|A|]
        mean = total / n_active
        coef = rho * pi[inact_idx] / mean.clamp_min(torch.finfo(torch.float32).tiny)  # [|I|]
        for name, g in grads.items():
            g_act = g.detach()[act_idx].to(torch.float32).flatten(1)  # [|A|, D]
            direction = w @ g_act  # [D]
            pseudo = coef.unsqueeze(-1) * direction  # [|I|, D]
            new = g.detach().clone()  # [E, ...]
            new[inact_idx] = pseudo.reshape((-1, *g.shape[1:])).to(g.dtype)
            out[name] = new
        return out


class ProbePseudoGradient(PseudoGradient):
    """PG from each inactive expert's own gradient on its highest-probability tokens.

    The second rule behind :class:`PseudoGradient` (DESIGN.md section 4.2): the SMoE
    layer's probe (``SMoELayer.probe_tokens = probe_tokens``) runs every inactive
    expert i, with a zero-valued contribution at its gate weight, on the
    ``probe_tokens`` tokens of the batch where its router probability p_{t,i} is
    highest, so backward leaves in i's rows the true gradient h_i it would get if
    forced on for those tokens (the PG-alignment diagnostic's reference restricted to
    a few tokens, so it can align). Per LoRA tensor, the rule keeps h_i's direction
    and takes the universal rule's norm (:class:`UniversalPseudoGradient`):

        g_i = ||rho_c * (pi_i / mean_{j in A} pi_j) * G|| * h_i / ||h_i||   for i in I

    so the two rules differ only in direction. A tensor whose h_i is zero (e.g. the
    A factor while B = 0) gets zero. Extra cost per step and SMoE layer: |I| *
    ``probe_tokens`` expert-token passes, forward and backward without the input
    gradient of the first projection (:func:`ubsmoe.metrics.flops.pg_probe_flops_per_slot`).

    Args:
        lambda_pg: lambda_pg >= 0 (0 writes zero pseudo-gradients).
        probe_tokens: tokens per inactive expert, >= 1.

    Raises:
        ValueError: ``lambda_pg`` negative or not finite, or ``probe_tokens`` < 1.
    """

    def __init__(self, lambda_pg: float, probe_tokens: int) -> None:
        if isinstance(probe_tokens, bool) or not isinstance(probe_tokens, int) or probe_tokens < 1:
            raise ValueError(f"probe_tokens: got {probe_tokens!r}, expected an integer >= 1")
        self.universal = UniversalPseudoGradient(lambda_pg)
        self.lambda_pg = self.universal.lambda_pg
        self.probe_tokens = probe_tokens

    def __repr__(self) -> str:
        return f"ProbePseudoGradient(lambda_pg={self.lambda_pg}, probe_tokens={self.probe_tokens})"

    def __call__(self, grads: Mapping[str, torch.Tensor], router_prob: torch.Tensor,
                 active: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
        """Return the signal with each inactive row rescaled to the universal rule's norm.

        Active rows are returned bitwise unchanged; every expert active returns the
        input unchanged; no expert active (no norm to borrow) zeroes the inactive
        rows. The input tensors are never modified.

        Args:
            grads: name -> signal ``[num_experts, ...]``; inactive rows hold the
                probe's gradient (or its negation in update space).
            router_prob: ``[num_experts]`` batch-mean router probabilities pi >= 0.
            active: ``[num_experts]`` bool mask of active experts.
            top_k: K_c in ``[1, num_experts]``.

        Returns:
            Name -> new signal ``[num_experts, ...]``, same dtype and device.

        Raises:
            ValueError: as :class:`UniversalPseudoGradient`.
        """
        num_experts = _check_layer_inputs(grads, router_prob, active)
        pg_scale(self.lambda_pg, num_experts, top_k)  # validates top_k
        n_active = int(active.sum())
        if n_active == num_experts:
            return dict(grads)
        universal = self.universal(grads, router_prob, active, top_k)
        inact_idx = (~active).nonzero().squeeze(-1)  # [|I|]
        out = {}
        for name, g in grads.items():
            own = g.detach()[inact_idx].to(torch.float32).flatten(1)  # [|I|, D]
            if n_active == 0:
                target = torch.zeros(own.shape[0], dtype=torch.float32, device=own.device)  # [|I|]
            else:
                target = universal[name].detach()[inact_idx].to(torch.float32).flatten(1).norm(dim=1)
            norm = own.norm(dim=1)  # [|I|]
            coef = torch.where(norm > 0, target / norm.clamp_min(torch.finfo(torch.float32).tiny),
                               0.0)  # [|I|]
            new = g.detach().clone()  # [E, ...]
            new[inact_idx] = (coef.unsqueeze(-1) * own).reshape((-1, *g.shape[1:])).to(g.dtype)
            out[name] = new
        return out


def pg_cosine_alignment(pseudo: torch.Tensor, true: torch.Tensor,
                        inactive: torch.Tensor) -> torch.Tensor:
    """Per inactive expert, cosine similarity of pseudo- and true gradient (paper §6.3.4).

    Implements ``cos_i = <vec(pseudo_i), vec(true_i)> / (||pseudo_i|| ||true_i||)`` for
    each inactive expert i, where ``true`` is the gradient from a dense backward with
    the expert forced on at its gate weight. To score several LoRA tensors together,
    concatenate them per expert first (``torch.cat([t.flatten(1) for t in ...], 1)``).
    A zero vector gives cosine 0 (:func:`torch.nn.functional.cosine_similarity`'s
    eps clamp).

    Args:
        pseudo: ``[num_experts, ...]`` gradients with pseudo-gradient rows.
        true: ``[num_experts, ...]`` true gradients, same shape.
        inactive: ``[num_experts]`` bool, the experts to score.

    Returns:
        ``[n_inactive]`` float32 cosine similarities, in expert order.

    Raises:
        ValueError: shapes differ or ``inactive`` is not a ``[num_experts]`` bool mask.
    """
    if pseudo.shape != true.shape or pseudo.dim() < 1:
        raise ValueError(
            f"pseudo, true: got shapes {tuple(pseudo.shape)}, {tuple(true.shape)}, "
            "expected the same shape [num_experts, ...]"
        )
    if inactive.shape != (pseudo.shape[0],) or inactive.dtype != torch.bool:
        raise ValueError(
            f"inactive: got shape {tuple(inactive.shape)} dtype {inactive.dtype}, "
            f"expected [num_experts] = [{pseudo.shape[0]}] torch.bool"
        )
    idx = inactive.nonzero().squeeze(-1)  # [n_inactive]
    a = pseudo.detach()[idx].to(torch.float32).flatten(1)  # [n_inactive, D]
    b = true.detach()[idx].to(torch.float32).flatten(1)  # [n_inactive, D]
    return F.cosine_similarity(a, b, dim=-1)  # [n_inactive]
