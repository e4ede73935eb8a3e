"""Grouped expert kernels of the SMoE layer, and their autograd functions (pure torch).

Tokens are sorted by expert (:func:`sort_slots`) and every expert projection is one
grouped matmul over all experts (:func:`grouped_linear`, with frozen weights plus each
expert's LoRA in :func:`lora_grouped_linear`), so compute scales with K_c and no
Python loop over experts sits inside autograd. Used by
:class:`ubsmoe.core.smoe.SMoELayer` (DESIGN.md section 3).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@torch.compiler.disable
def _grouped_mm_eager(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm`` outside any compiled graph (its fake-tensor rule accepts only bfloat16)."""
    return F.grouped_mm(a, b, offs=offsets)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm``; under ``torch.compile`` and not bfloat16, run eagerly (a graph break).

    The CPU runs ``grouped_mm`` in float32, but its meta function (what dynamo traces
    with) rejects anything but bfloat16, so a float32 model's grouped matmuls stay
    eager inside a compiled layer (``train.compile``).
    """
    if a.dtype != torch.bfloat16 and torch.compiler.is_compiling():
        return _grouped_mm_eager(a, b, offsets)
    return F.grouped_mm(a, b, offs=offsets)


def grouped_linear(x: torch.Tensor, weight_t: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-group matmul ``x[rows of group e] @ weight_t[e]``.

    Args:
        x: ``[num_rows, in_features]``, rows sorted by group.
        weight_t: ``[num_groups, in_features, out_features]`` (transposed weights;
            a transposed view is fine).
        offsets: ``[num_groups]`` int32 cumulative row counts (end of each group).

    Returns:
        ``[num_rows, out_features]`` in ``x``'s dtype. A group without rows owns no
        output row, so an empty expert cannot put anything into the output (its
        weight-gradient block is the one that needs care: :func:`grouped_weight_grad`).
    """
    return _grouped_mm(x, weight_t, offsets)


def grouped_weight_grad(grad_out: torch.Tensor, inp: torch.Tensor, offsets: torch.Tensor,
                        empty: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group weight gradient ``grad_out[rows of e]^T @ inp[rows of e]``, exactly 0 for empty groups.

    ``grouped_mm`` with offsets along the reduction dimension writes one
    ``[out, in]`` block per group; a group without rows is a sum over nothing,
    but CUDA does not promise to write its block (an uninitialised, possibly NaN,
    block has been reported upstream) and only CPU returns zeros. The blocks of
    groups with a count of 0 are therefore overwritten with zeros by a mask built
    on the device from ``offsets`` (``masked_fill``, so NaN cannot survive as it
    would a multiplication by 0): no host synchronisation.

    Args:
        grad_out: ``[num_rows, out_features]``, rows sorted by group.
        inp: ``[num_rows, in_features]``, the same rows.
        offsets: ``[num_groups]`` int32 cumulative row counts (end of each group).
        empty: ``[num_groups]`` bool, groups without rows (``counts == 0``) when the
            caller has it (one layer's projections share it); None: from ``offsets``.

    Returns:
        ``[num_groups, out_features, in_features]``; block e is
        ``sum over rows r of group e of grad_out[r]^T inp[r]`` and 0 where group e
        has no row.
    """
    grad = _grouped_mm(grad_out.t(), inp, offsets)  # [E, out, in]
    if empty is None:
        empty = torch.diff(offsets, prepend=offsets.new_zeros(1)) == 0  # [E] groups without rows
    return grad.masked_fill_(empty[:, None, None], 0)


class SlotRouting(NamedTuple):
    """Where each (token, choice) slot goes once slots are sorted by expert.

    A slot is ``t * K + j``: token ``t``'s ``j``-th selected expert. With
    ``S = num_tokens * K`` slots:

    Attributes:
        order: ``[S]`` int64, the slot at each sorted position (sorted by expert,
            stable, so slots of one expert keep token order).
        token: ``[S]`` int64, the token of each sorted position (``order // K``).
        inverse: ``[num_tokens, K]`` int64, the sorted position of each slot.
        offsets: ``[num_experts]`` int32, end of each expert's rows among the sorted
            positions (cumulative counts, the ``offs`` of ``grouped_mm``).
        counts: ``[num_experts]`` int32 slots per expert (``bincount`` of the
            selected experts, taken from ``offsets``: ``bincount`` synchronises with
            the host on CUDA).
    """

    order: torch.Tensor
    token: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor


_ARANGES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def cached_arange(n: int, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """``arange(n)`` ``[n]`` as a view of a cached, growing range (no operation per call once it is long enough).

    Read-only: the view shares the cache.
    """
    key = (torch.device(device), dtype)
    cached = _ARANGES.get(key)
    if cached is None or cached.numel() < n:
        size = max(n, 2 * (0 if cached is None else cached.numel()), 64)
        cached = _ARANGES[key] = torch.arange(size, device=device, dtype=dtype)
    return cached[:n]


_BAG_OFFSETS: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _bag_offsets(num_tokens: int, k: int, device: torch.device) -> torch.Tensor:
    """``arange(0, num_tokens * k, k)``: where each token's K slots start (cached per shape)."""
    key = (num_tokens, k, torch.device(device))
    offsets = _BAG_OFFSETS.get(key)
    if offsets is None:
        if len(_BAG_OFFSETS) >= 16:  # a few shapes in a run; keep the cache small
            _BAG_OFFSETS.clear()
        offsets = _BAG_OFFSETS[key] = torch.arange(0, num_tokens * k, k, device=device)
    return offsets


def _sum_bags(inverse: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j rows[inverse[t, j]]``: ``inverse [N, K]``, ``rows [S, H]`` -> ``[N, H]``.

    One ``embedding_bag`` with cached bag offsets (``F.embedding_bag`` on a 2-D input
    would build them with an ``arange`` on every call).
    """
    num_tokens, k = inverse.shape
    return F.embedding_bag(inverse.reshape(-1), rows, _bag_offsets(num_tokens, k, inverse.device), mode="sum")


class SortRows(torch.autograd.Function):
    """``v[order]`` for a vector of slots, with the backward as a gather through ``inverse``.

    ``order`` is a permutation, so the gradient of ``v[order]`` is ``g[inverse]``: one
    ``index_select`` instead of the zero-fill and scatter-add (``index_add``) that
    autograd's ``index_select`` backward launches.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """``values [S] -> [S]`` in sorted order."""
        ctx.save_for_backward(inverse)
        return values.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        """``[S] -> [S]`` back in slot order."""
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse.reshape(-1)), None, None


def sort_slots(top_index: torch.Tensor, num_experts: int) -> SlotRouting:
    """Sort the ``num_tokens * K`` routing slots by expert.

    Offsets come from ``searchsorted`` on the sorted expert ids: no histogram, no
    host synchronisation, no float64. The ranges it needs (slot positions, expert
    bounds) are views of a cached ``arange``, so a call launches five operations
    (sort, the inverse permutation's allocation and scatter, searchsorted, one
    subtraction for the counts) plus the token division when K > 1.

    Args:
        top_index: ``[num_tokens, K]`` int64 selected experts.
        num_experts: E, the number of groups.

    Returns:
        The :class:`SlotRouting` of the batch.
    """
    num_tokens, k = top_index.shape
    flat = top_index.reshape(-1)  # [S], slot t*K + j
    sorted_expert, order = torch.sort(flat, stable=True)  # [S], [S]
    positions = cached_arange(order.numel(), order.device)  # [S]
    inverse = torch.empty_like(order).scatter_(0, order, positions)  # [S]
    bounds = cached_arange(num_experts + 1, flat.device, sorted_expert.dtype)  # [E + 1]: 0, 1, ..., E
    edges = torch.searchsorted(sorted_expert, bounds, out_int32=True)  # [E + 1] #slots with expert < e
    offsets = edges[1:]  # [E] end of each expert's rows (edges[0] = 0)
    counts = offsets - edges[:-1]  # [E] int32
    token = order // k if k > 1 else order
    return SlotRouting(order, token, inverse.view(num_tokens, k), offsets, counts)


class GatherSlots(torch.autograd.Function):
    """``xs = x[token]``: copy each token's row once per selected expert, in sorted order.

    The backward sums a token's K row gradients with ``embedding_bag`` over
    ``inverse`` (one pass, a fixed summation order per token): bitwise deterministic
    on any thread count, unlike the scatter-add (``index_put`` with accumulation)
    that plain indexing would use.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, token: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """``[N, H] -> [S, H]``: row ``token[i]`` of ``x`` at sorted position i."""
        ctx.save_for_backward(inverse)
        return x.index_select(0, token)  # [S, H]

    @staticmethod
    def backward(ctx, grad_xs: torch.Tensor):
        """``[S, H] -> [N, H]``: each token's K row gradients summed."""
        (inverse,) = ctx.saved_tensors
        grad_x = _sum_bags(inverse, grad_xs.contiguous())  # [N, H]
        return grad_x, None, None


class CombineSlots(torch.autograd.Function):
    """``y[t] = sum_j ys[inverse[t, j]]``: sum each token's K expert outputs.

    Forward is one ``embedding_bag`` (no ``[S, H]`` intermediate, fixed order per
    token, deterministic); backward hands each slot its token's gradient row.
    """

    @staticmethod
    def forward(ctx, ys: torch.Tensor, token: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """``[S, H] -> [N, H]``: each token's K expert outputs summed."""
        ctx.save_for_backward(token)
        return _sum_bags(inverse, ys)  # [N, H]

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        """``[N, H] -> [S, H]``: each sorted position gets its token's gradient row."""
        (token,) = ctx.saved_tensors
        return grad_y.index_select(0, token), None, None  # [S, H]


def _pad_rank(lora_a: torch.Tensor, lora_b: torch.Tensor,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cast ``A [E, r, in]``, ``B [E, out, r]`` to ``dtype`` with the rank zero-padded to 16-byte rows.

    ``grouped_mm`` needs every non-unit stride to be a multiple of 16 bytes, and the
    ``[S, r]`` LoRA activation has row stride r: rank 20 in bfloat16 (40 bytes) would
    be rejected. The padded rows of A and columns of B are zero, so the product is
    unchanged; the gradients are sliced back to rank r. Cast and padding are one
    copy into a zeroed buffer (the values are those of ``F.pad(A.to(dtype))``).
    """
    dtype = lora_a.dtype if dtype is None else dtype
    align = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    num_experts, rank, in_features = lora_a.shape
    pad = -rank % align
    if pad == 0:
        return lora_a.to(dtype), lora_b.to(dtype)
    a = lora_a.new_zeros((num_experts, rank + pad, in_features), dtype=dtype)
    b = lora_b.new_zeros((num_experts, lora_b.shape[1], rank + pad), dtype=dtype)
    a[:, :rank].copy_(lora_a)
    b[..., :rank].copy_(lora_b)
    return a, b


def _unpad_grad(grad: torch.Tensor, rank: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The rank-``rank`` part of a padded factor's gradient, contiguous, in ``dtype``."""
    if grad.shape[dim] != rank:
        grad = grad.narrow(dim, 0, rank)
    return grad.to(dtype) if grad.dtype != dtype else grad.contiguous()


class _LoRAGroupedLinear(torch.autograd.Function):
    """``y = x W_e^T + s (x A_e^T) B_e^T`` for the rows of each expert e; ``W`` frozen.

    One autograd node per projection with a hand-written backward: no gradient is
    ever formed for the frozen ``W`` (only the input gradient ``gy W_e``), the LoRA
    output is added in place instead of through an extra autograd add, and only
    ``x`` and the ``[S, r]`` LoRA activation are saved. Every matmul is a
    ``grouped_mm`` over the sorted rows, so all compute scales with the routed rows.
    The factors come in their own (float32) dtype and are cast to ``x``'s inside
    (with the rank padding), their gradients cast back: no extra autograd nodes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scale: float, offsets: torch.Tensor,
                empty: torch.Tensor | None = None,
                padded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``x [S, in] -> [S, out]``; saves x and the ``[S, r']`` LoRA activation.

        ``padded``: rank-padded buffers in ``x``'s dtype that ``lora_a``/``lora_b``
        are views of (used as they are: no cast, no padding).
        """
        rank = lora_a.shape[1]
        ctx.factor_dtypes = (lora_a.dtype, lora_b.dtype)
        if padded is None:
            lora_a, lora_b = _pad_rank(lora_a, lora_b, x.dtype)  # [E, r', in], [E, out, r']
        else:
            lora_a, lora_b = padded
        h = grouped_linear(x, lora_a.transpose(1, 2), offsets)  # [S, r']
        if scale != 1.0:  # 1.0: A comes scaled (ExpertLoRA.prescaled)
            h = h * scale  # scale the narrow [S, r'] activation, not the [S, out] output
        y = grouped_linear(x, weight.transpose(1, 2), offsets)  # [S, out]
        y.add_(grouped_linear(h, lora_b.transpose(1, 2), offsets))
        ctx.save_for_backward(x, weight, lora_a, lora_b, h, offsets, empty)
        ctx.scale = scale
        ctx.rank = rank
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        """Input, LoRA A and LoRA B gradients (none for the frozen weight).

        An expert that got no row gets LoRA gradients of exactly 0 on every
        backend (:func:`grouped_weight_grad`).
        """
        x, weight, lora_a, lora_b, h, offsets, empty = ctx.saved_tensors
        dtype_a, dtype_b = ctx.factor_dtypes
        need_x, _, need_a, need_b = ctx.needs_input_grad[:4]
        rank = ctx.rank
        grad_y = grad_y.contiguous()
        grad_h = grouped_linear(grad_y, lora_b, offsets)  # [S, r'], gradient of scaled h
        # Factors already in the compute dtype: the weight gradients are formed at rank r
        # directly from the narrowed activations (no slice copy); else at r' and unpadded.
        narrow = rank if (dtype_a == dtype_b == x.dtype and h.shape[1] != rank) else None
        grad_b = None
        if need_b:
            if narrow is not None:
                grad_b = grouped_weight_grad(grad_y, h[:, :narrow], offsets, empty)  # [E, out, r]
            else:
                grad_b = grouped_weight_grad(grad_y, h, offsets, empty)  # [E, out, r'], 0 for empty experts
                grad_b = _unpad_grad(grad_b, rank, 2, dtype_b)
        if ctx.scale != 1.0:
            grad_h = grad_h * ctx.scale  # gradient of the unscaled x A^T
        grad_a = None
        if need_a:
            if narrow is not None:
                grad_a = grouped_weight_grad(grad_h[:, :narrow], x, offsets, empty)  # [E, r, in]
            else:
                grad_a = grouped_weight_grad(grad_h, x, offsets, empty)  # [E, r', in], 0 for empty experts
                grad_a = _unpad_grad(grad_a, rank, 1, dtype_a)
        grad_x = None
        if need_x:
            grad_x = grouped_linear(grad_y, weight, offsets)  # [S, in]
            grad_x.add_(grouped_linear(grad_h, lora_a, offsets))
        return grad_x, None, grad_a, grad_b, None, None, None, None


def lora_grouped_linear(x: torch.Tensor, weight: torch.Tensor, lora: nn.Module,
                        offsets: torch.Tensor, empty: torch.Tensor | None = None) -> torch.Tensor:
    """Frozen expert projection plus its LoRA on rows grouped by expert.

    Args:
        x: ``[S, in_features]`` rows sorted by expert.
        weight: ``[E, out_features, in_features]`` frozen expert weights (HF layout).
        lora: the projection's :class:`~ubsmoe.core.smoe.ExpertLoRA` (``A [E, r, in]``, ``B [E, out, r]``).
        offsets: ``[E]`` int32 cumulative row counts.
        empty: ``[E]`` bool, experts without rows (None: derived from ``offsets``).

    Returns:
        ``[S, out_features]``: ``x W_e^T + scale * (x A_e^T) B_e^T`` per row of expert e.
        The factors (float32 parameters) are cast to ``x``'s dtype for the grouped
        matmuls (a no-op in float32); their gradients flow back in float32. When the
        factors are views of ``lora.padded`` in ``x``'s dtype
        (:class:`~ubsmoe.models.precision.AdapterMasters`), those buffers are used as
        they are: no cast and no rank padding per call.
    """
    padded = getattr(lora, "padded", None)
    if padded is not None and not (padded[0].dtype == x.dtype and lora.A.dtype == x.dtype
                                   and lora.A.data_ptr() == padded[0].data_ptr()
                                   and lora.B.data_ptr() == padded[1].data_ptr()):
        padded = None  # stale (the factors were replaced or moved back to their masters)
    # Prescaled buffers hold scale * A: nothing to multiply (the gradient formed is that of scale * A).
    scale = 1.0 if padded is not None and getattr(lora, "prescaled", False) else lora.scale
    return _LoRAGroupedLinear.apply(x, weight, lora.A, lora.B, scale, offsets, empty, padded)


class _WeightedSwiGLU(torch.autograd.Function):
    """``h = silu(gate) * up * w`` with ``[gate | up] = gate_up`` (w: gate weight per row).

    Folding the router's gate weight into the ``[S, I]`` activation is exact (the
    down projection is linear) and cheaper than weighting the ``[S, H]`` output.
    The backward writes both halves of the gradient into one ``[S, 2I]`` buffer
    (no concatenation); ``silu(gate)`` is saved rather than recomputed.
    """

    @staticmethod
    def forward(ctx, gate_up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``gate_up [S, 2I], weights [S, 1] -> h [S, I]``."""
        inter = gate_up.shape[-1] // 2
        act = F.silu(gate_up[:, :inter])  # [S, I]
        h = act * gate_up[:, inter:]  # [S, I]
        h.mul_(weights)
        ctx.save_for_backward(gate_up, weights, act)
        return h

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        """Gradients of ``gate_up`` ``[S, 2I]`` and of ``weights`` ``[S, 1]``."""
        gate_up, weights, act = ctx.saved_tensors
        inter = gate_up.shape[-1] // 2
        gate, up = gate_up[:, :inter], gate_up[:, inter:]  # [S, I] each
        grad_act = grad_h * up  # [S, I], d/d(silu(gate)) before the weight
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(grad_act.unsqueeze(1), act.unsqueeze(2)).view(-1, 1)  # [S, 1], row dots
        grad_act.mul_(weights)
        grad_gate_up = torch.empty_like(gate_up)  # [S, 2I]
        torch.ops.aten.silu_backward.grad_input(grad_act, gate, grad_input=grad_gate_up[:, :inter])
        torch.mul(grad_h, weights, out=grad_gate_up[:, inter:]).mul_(act)
        return grad_gate_up, grad_w


def weighted_glu(gate_up: torch.Tensor, weights: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """Gated expert activation with the gate weight folded in: ``act(gate) * up * w``.

    Args:
        gate_up: ``[S, 2I]``, the fused gate and up projections (gate first, HF layout).
        weights: ``[S, 1]`` gate weight of each row (``gate_up``'s dtype or float32: the
            product is taken in float32 and stored in ``gate_up``'s dtype).
        act_fn: the activation; SiLU takes a fused path, anything else plain autograd.

    Returns:
        ``[S, I]``.
    """
    if isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        return _WeightedSwiGLU.apply(gate_up, weights)
    gate, up = gate_up.chunk(2, dim=-1)  # [S, I] each
    return act_fn(gate) * (up * weights.to(up.dtype))
