"""Applying a pseudo-gradient rule to one SMoE layer's parameters (DESIGN.md section 4.2).

The rules themselves (:class:`ubsmoe.core.pseudo_grad.PseudoGradient` and its two
implementations) live in :mod:`ubsmoe.core.pseudo_grad`; this module runs a rule on
one layer's per-expert LoRA parameters, in either space of ``ubsmoe.pg_space``:

* ``update``: :func:`snapshot_before_step` after backward, then
  :func:`apply_pseudo_updates` after the optimizer step;
* ``gradient``: :func:`apply_pseudo_gradients` after backward, before clipping.

Pure PyTorch; nothing here knows about Flower.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ubsmoe.core.pseudo_grad import PseudoGradient

__all__ = [
    "UpdateSnapshot",
    "apply_pseudo_gradients",
    "apply_pseudo_updates",
    "snapshot_before_step",
]


@dataclass
class UpdateSnapshot:
    """What update-space PG keeps of one SMoE layer between backward and the step.

    Attributes:
        router_prob: ``[num_experts]`` batch router probabilities pi (any positive
            multiple of the batch mean).
        active: ``[num_experts]`` bool, experts with >= 1 token in the batch.
        before: name -> ``[n_active, ...]`` the active experts' rows before the step.
        own: name -> ``[n_inactive, ...]`` the inactive experts' own descent
            direction: minus the gradient their rows of ``.grad`` held (the probe's
            gradient; zeros without a probe).
    """

    router_prob: torch.Tensor
    active: torch.Tensor
    before: dict[str, torch.Tensor]
    own: dict[str, torch.Tensor]


@torch.no_grad()
def snapshot_before_step(layer_params: Mapping[str, torch.nn.Parameter],
                         router_prob: torch.Tensor, active: torch.Tensor) -> UpdateSnapshot | None:
    """Prepare update-space PG for one layer: call after backward, before clipping.

    Copies the active experts' rows (to measure their change in the step) and moves
    the inactive experts' rows of ``.grad`` out of the gradient (zeroing them), so
    that neither clipping nor the optimizer sees anything but the real gradients of
    the experts that ran.

    Args:
        layer_params: name -> per-expert LoRA parameter ``[num_experts, ...]`` of one
            layer (e.g. ``"gate_up.A"`` -> ``[num_experts, rank, in_features]``).
        router_prob: ``[num_experts]`` batch router probabilities pi.
        active: ``[num_experts]`` bool, experts with >= 1 token in the batch.

    Returns:
        The :class:`UpdateSnapshot`, or None when there is nothing to fill (every
        expert active, or none: no change to borrow).

    Raises:
        ValueError: ``active`` is not a ``[num_experts]`` bool mask.
    """
    params = dict(layer_params)
    num_experts = router_prob.shape[0] if router_prob.dim() == 1 else -1
    if active.shape != (num_experts,) or active.dtype != torch.bool:
        raise ValueError(
            f"active: got shape {tuple(active.shape)} dtype {active.dtype}, expected "
            f"router_prob's [num_experts] torch.bool"
        )
    n_active = int(active.sum())
    if n_active in (0, num_experts):
        return None
    act_idx = active.nonzero().squeeze(-1)  # [|A|]
    inact_idx = (~active).nonzero().squeeze(-1)  # [|I|]
    before, own = {}, {}
    for name, p in params.items():
        before[name] = p.detach()[act_idx].clone()  # [|A|, ...]
        if p.grad is None:
            own[name] = torch.zeros((len(inact_idx), *p.shape[1:]), dtype=p.dtype, device=p.device)
        else:
            own[name] = -p.grad[inact_idx]  # [|I|, ...], a copy
            p.grad[inact_idx] = 0.0
    return UpdateSnapshot(router_prob.detach().clone(), active.clone(), before, own)


@torch.no_grad()
def apply_pseudo_updates(layer_params: Mapping[str, torch.nn.Parameter], snapshot: UpdateSnapshot,
                         top_k: int, pg: PseudoGradient) -> None:
    """Move one layer's inactive experts by ``pg`` applied to the step's changes.

    Call right after the optimizer step. Per LoRA tensor, delta_j = (row after the
    step) - (row before) for each active expert j, the optimizer's actual change;
    ``pg`` maps these (inactive rows: the snapshot's own descent direction) to
    inactive rows u_i, and each inactive row moves by u_i *on top of* whatever the
    optimizer did to it. For the universal rule:

        u_i = rho_c * (pi_i / mean_{j in A} pi_j) * sum_{j in A} (pi_j / sum_A pi) * delta_j

    (DESIGN.md 4.2). The optimizer's own change of an inactive row is Adam's momentum
    from that expert's real gradients of earlier steps (exactly zero for an expert
    inactive in every step so far), that expert's own information, so it is kept, not
    replaced; the PG move is not fed back into the optimizer's state.

    Args:
        layer_params: the same name -> parameter mapping given to
            :func:`snapshot_before_step`.
        snapshot: its result.
        top_k: K_c in ``[1, num_experts]``.
        pg: the rule.

    Raises:
        ValueError: as raised by ``pg``, or a rule that returns another shape.
    """
    active = snapshot.active
    act_idx = active.nonzero().squeeze(-1)  # [|A|]
    inact_idx = (~active).nonzero().squeeze(-1)  # [|I|]
    deltas = {}
    for name, p in layer_params.items():
        delta = torch.empty_like(p)  # [E, ...]
        delta[act_idx] = p.detach()[act_idx] - snapshot.before[name]
        delta[inact_idx] = snapshot.own[name]
        deltas[name] = delta
    new = pg(deltas, snapshot.router_prob, active, top_k)
    for name, p in layer_params.items():
        u = new[name]
        if u.shape != p.shape:
            raise ValueError(
                f"pseudo-update {name!r}: got shape {tuple(u.shape)}, expected {tuple(p.shape)}"
            )
        p[inact_idx] = p[inact_idx] + u[inact_idx].to(p.dtype)


@torch.no_grad()
def apply_pseudo_gradients(layer_params: Mapping[str, torch.nn.Parameter],
                           router_prob: torch.Tensor, active: torch.Tensor, top_k: int,
                           pg: PseudoGradient) -> None:
    """Run ``pg`` on one SMoE layer and write the result into each ``.grad`` in place.

    The gradient-space rule (``ubsmoe.pg_space=gradient``): call after backward and
    before clipping / the optimizer step. The pseudo-gradients then enter the clipping
    norm, and Adam divides them by their own running RMS, so their scale is lost
    (use :func:`apply_pseudo_updates` for PG whose strength is its settings'). A parameter whose
    ``.grad`` is ``None`` (no expert of the layer received a token, or the tensor did
    not enter the graph) is treated as an all-zero gradient and gets a new ``.grad``.

    Args:
        layer_params: name -> per-expert LoRA parameter of one layer, e.g.
            ``"gate_up.A"`` -> :class:`ubsmoe.core.smoe.ExpertLoRA` ``A``
            ``[num_experts, rank, in_features]``.
        router_prob: ``[num_experts]`` batch-mean router probabilities pi.
        active: ``[num_experts]`` bool, experts with >= 1 token in the batch.
        top_k: K_c in ``[1, num_experts]``.
        pg: the pseudo-gradient rule.

    Raises:
        ValueError: as raised by ``pg`` (bad shapes, ``top_k`` out of range), or a
            rule that returns a gradient of another shape than its parameter.
    """
    grads = {
        name: p.grad if p.grad is not None else torch.zeros_like(p)
        for name, p in layer_params.items()
    }
    new = pg(grads, router_prob, active, top_k)
    for name, p in layer_params.items():
        g = new[name]
        if g.shape != p.shape:
            raise ValueError(
                f"pseudo-gradient {name!r}: got shape {tuple(g.shape)}, expected "
                f"{tuple(p.shape)}"
            )
        if p.grad is None:
            p.grad = g.to(device=p.device, dtype=p.dtype)
        elif g is not p.grad:
            p.grad.copy_(g)
