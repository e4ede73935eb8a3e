"""Universal Pseudo-Gradient, PG (DESIGN.md section 4.2; notation in section 2).

UB-SMoE: "Universally Balanced Sparse Mixture-of-Experts for Resource-Adaptive
Federated Fine-Tuning of Foundation Models" (ICML 2026, arXiv 2605.16690).

Top-K routing is not differentiable: an expert that receives no token in a batch
gets no gradient, and a client with a small K_c leaves most experts without any
signal. After backward in every local step, PG writes a pseudo-gradient into each
inactive expert's LoRA ``.grad``, built from the router probabilities and the active
experts' real gradients and scaled by a client-sparsity factor that grows as K_c
shrinks, so that the optimizer treats it like a real gradient.

The paper's exact PG equation was not available; :class:`UniversalPseudoGradient`
follows its published description (DESIGN.md 4.2). PG sits behind the small
:class:`PseudoGradient` interface so that a variant can be swapped in.

Pure PyTorch; nothing here knows about Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = [
    "PseudoGradient",
    "UniversalPseudoGradient",
    "apply_pseudo_gradients",
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


@runtime_checkable
class PseudoGradient(Protocol):
    """Interface of a pseudo-gradient rule for the experts of one SMoE layer.

    A rule maps the layer's true per-expert LoRA gradients to new full gradients in
    which the inactive experts' rows are filled; the active experts' rows must come
    back unchanged. Any callable with this signature works.
    """

    def __call__(self, grads: Mapping[str, torch.Tensor], router_prob: torch.Tensor,
                 active: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
        """Fill the inactive experts' gradients of one SMoE layer.

        Args:
            grads: per-expert LoRA tensor name (e.g. ``"gate_up.A"``) -> its gradient
                ``[num_experts, ...]``; rows of experts without tokens hold zeros.
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


@torch.no_grad()
def apply_pseudo_gradients(layer_params: Mapping[str, torch.nn.Parameter],
                           router_prob: torch.Tensor, active: torch.Tensor, top_k: int,
                           pg: PseudoGradient) -> None:
    """Run ``pg`` on one SMoE layer and write the result into each ``.grad`` in place.

    Call after backward and before clipping / the optimizer step. A parameter whose
    ``.grad`` is ``None`` (no expert of the layer received a token, or the tensor did
    not enter the graph) is treated as an all-zero gradient and gets a new ``.grad``.

    Args:
        layer_params: name -> per-expert LoRA parameter of one layer, e.g.
            ``"gate_up.A"`` -> :class:`ubsmoe.models.smoe.ExpertLoRA` ``A``
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
