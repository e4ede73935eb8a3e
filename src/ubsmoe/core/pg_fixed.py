"""Fixed-shape PG: the pseudo-gradient rules with masks, no host read, no ``nonzero`` (issue 24).

The rules of :mod:`ubsmoe.core.pseudo_grad` (DESIGN.md section 4.2) gather the active
and inactive experts' rows with ``nonzero`` and boolean-mask indexing and read the
number of active experts back to the host. On a GPU each of these is a
synchronisation, and the number of operations grows with the number of layers that
have inactive experts, so a K = 1 step launched more operations than a K = 8 step.

Here the same rules run on whole ``[num_experts, ...]`` tensors with the active set
as a mask: every layer runs the same operations whatever K_c and whichever experts
are active, and nothing is read back. The results equal the indexed rules up to
floating-point summation order (the pi-weighted mean sums over all experts with
weight 0 for the inactive ones); active rows come back bitwise unchanged, and the
edge cases (no expert active, every expert active) leave the signal as the indexed
rules do, selected on the device.

Used by :class:`ubsmoe.methods.ubsmoe.UBSMoE` for ``pg_space=update`` with the two
built-in rules; a custom rule without :func:`fill_fixed` support keeps the indexed path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ubsmoe.core.pseudo_grad import (
    ProbePseudoGradient,
    PseudoGradient,
    UniversalPseudoGradient,
    pg_scale,
)

TINY = torch.finfo(torch.float32).tiny


def supports_fixed(pg: PseudoGradient) -> bool:
    """Whether :func:`fill_fixed` implements ``pg`` (the two built-in rules)."""
    return isinstance(pg, (UniversalPseudoGradient, ProbePseudoGradient))


def _universal_rows(grads: Mapping[str, torch.Tensor], pi: torch.Tensor, act: torch.Tensor,
                    rho: float) -> dict[str, torch.Tensor]:
    """Per name, ``[E, D]`` float32 universal pseudo-rows ``rho (pi_i / mean_A pi) G`` for every expert.

    Args:
        grads: name -> ``[E, ...]`` signal.
        pi: ``[E]`` float32 router probabilities.
        act: ``[E]`` float32 mask, 1 for active experts.
        rho: rho_c.
    """
    pi_act = pi * act  # [E], 0 on inactive experts
    total = pi_act.sum()
    w = pi_act / total.clamp_min(TINY)  # [E], pi_j / sum_A pi on A, 0 elsewhere
    mean = total / act.sum().clamp_min(1.0)
    coef = (pi * (rho / mean.clamp_min(TINY))).unsqueeze(-1)  # [E, 1]
    return {name: coef * (w @ g.detach().to(torch.float32).flatten(1)) for name, g in grads.items()}


def fill_fixed(pg: PseudoGradient, grads: Mapping[str, torch.Tensor], router_prob: torch.Tensor,
               active: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """``pg(grads, router_prob, active, top_k)`` with masks: fixed shapes, no host read.

    :class:`~ubsmoe.core.pseudo_grad.UniversalPseudoGradient`: inactive row i becomes
    ``rho_c (pi_i / mean_{j in A} pi_j) sum_{j in A} (pi_j / sum_A pi) g_j``;
    :class:`~ubsmoe.core.pseudo_grad.ProbePseudoGradient`: inactive row i keeps its own
    direction h_i at the universal row's norm (0 where h_i = 0). Active rows, and
    every row when no expert or every expert is active (no direction to borrow,
    nothing to fill), come back unchanged; with no expert active the probe rule zeroes
    the inactive rows, as the indexed rule does.

    Args:
        pg: one of the two built-in rules (:func:`supports_fixed`).
        grads: name -> ``[E, ...]`` signal (gradients or, in update space, changes).
        router_prob: ``[E]`` router probabilities pi (any positive multiple).
        active: ``[E]`` bool, experts with >= 1 token in the batch.
        top_k: K_c in ``[1, E]``.

    Returns:
        Name -> ``[E, ...]`` new signal, each in its input's dtype.

    Raises:
        ValueError: ``pg`` is not a built-in rule, or ``top_k`` outside ``[1, E]``.
    """
    if not supports_fixed(pg):
        raise ValueError(f"pg: got {pg!r}, expected UniversalPseudoGradient or ProbePseudoGradient")
    num_experts = active.shape[0]
    rho = pg_scale(pg.lambda_pg, num_experts, top_k)
    pi = router_prob.detach().to(torch.float32)  # [E]
    act = active.to(torch.float32)  # [E]
    n_active = act.sum()
    all_active = n_active == num_experts  # [] bool on the device
    none_active = n_active == 0
    universal = _universal_rows(grads, pi, act, rho)  # name -> [E, D]
    out = {}
    for name, g in grads.items():
        flat = g.detach().flatten(1)  # [E, D]
        pseudo = universal[name]  # [E, D] float32
        if isinstance(pg, ProbePseudoGradient):
            own = flat.to(torch.float32)
            target = pseudo.norm(dim=1) * (~none_active)  # [E], 0 with no expert active
            norm = own.norm(dim=1)  # [E]
            coef = torch.where(norm > 0, target / norm.clamp_min(TINY), 0.0)  # [E]
            pseudo = coef.unsqueeze(-1) * own
            keep = active.unsqueeze(-1) | all_active  # [E, 1]
        else:
            keep = active.unsqueeze(-1) | all_active | none_active  # [E, 1]
        out[name] = torch.where(keep, flat, pseudo.to(g.dtype)).view(g.shape)
    return out


@dataclass
class FixedSnapshot:
    """Update-space PG's state of one layer between backward and the step, full-size.

    Attributes:
        router_prob: ``[E]`` batch router probabilities pi.
        active: ``[E]`` bool, experts with >= 1 token in the batch.
        before: name -> ``[E, ...]`` every expert's rows before the step.
        own: name -> ``[E, ...]`` minus the gradient of the inactive rows (the
            probe's gradient; zeros without a probe), 0 on active rows.
    """

    router_prob: torch.Tensor
    active: torch.Tensor
    before: dict[str, torch.Tensor]
    own: dict[str, torch.Tensor]


@torch.no_grad()
def snapshot_fixed(layer_params: Mapping[str, torch.nn.Parameter], router_prob: torch.Tensor,
                   active: torch.Tensor) -> FixedSnapshot:
    """:func:`~ubsmoe.core.pg_apply.snapshot_before_step` with masks: call after backward.

    Keeps every row of each parameter and minus the inactive rows' gradient, and
    zeroes those rows of ``.grad`` (so clipping and the optimizer see only the
    experts that ran), unless no expert is active (then ``.grad`` is left as is, as
    the indexed function does). Fixed work per layer, no host read.

    Args:
        layer_params: name -> ``[E, ...]`` per-expert LoRA parameter of one layer.
        router_prob: ``[E]`` router probabilities pi.
        active: ``[E]`` bool.

    Returns:
        The :class:`FixedSnapshot` (always; the rule decides on the device whether
        anything moves).
    """
    none_active = ~active.any()
    inactive = ~active & ~none_active  # [E], rows whose gradient moves out
    keep = (~inactive).to(torch.float32)  # [E]
    before, own = {}, {}
    for name, p in layer_params.items():
        before[name] = p.detach().clone()  # [E, ...]
        shape = (-1,) + (1,) * (p.dim() - 1)
        if p.grad is None:
            own[name] = torch.zeros_like(p)
        else:
            own[name] = p.grad * (keep - 1.0).view(shape).to(p.grad.dtype)  # -grad on inactive rows
            p.grad.mul_(keep.view(shape).to(p.grad.dtype))
    return FixedSnapshot(router_prob.detach().clone(), active.clone(), before, own)


@torch.no_grad()
def apply_fixed(layer_params: Mapping[str, torch.nn.Parameter], snapshot: FixedSnapshot,
                top_k: int, pg: PseudoGradient) -> None:
    """:func:`~ubsmoe.core.pg_apply.apply_pseudo_updates` with masks: call after the step.

    delta_j = row after the step - row before for active experts, the snapshot's own
    direction for inactive ones; each inactive row moves by the rule's row on top of
    the optimizer's change. Nothing moves when every expert or none is active.

    Args:
        layer_params: the mapping given to :func:`snapshot_fixed`.
        snapshot: its result.
        top_k: K_c in ``[1, E]``.
        pg: a built-in rule (:func:`supports_fixed`).

    Raises:
        ValueError: as :func:`fill_fixed`.
    """
    active = snapshot.active
    n_active = active.sum()
    # rows that move: inactive, and some expert active (else no change to borrow)
    moves = (~active & (n_active > 0)).to(torch.float32)  # [E]
    deltas = {}
    for name, p in layer_params.items():
        shape = (-1,) + (1,) * (p.dim() - 1)
        mask = active.view(shape)
        deltas[name] = torch.where(mask, p.detach() - snapshot.before[name], snapshot.own[name])
    new = fill_fixed(pg, deltas, snapshot.router_prob, active, top_k)
    for name, p in layer_params.items():
        shape = (-1,) + (1,) * (p.dim() - 1)
        p.add_(new[name].to(p.dtype) * moves.view(shape).to(p.dtype))
