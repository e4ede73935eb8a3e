"""The resource-adaptive sparse-MoE layer (DESIGN.md section 3).

UB-SMoE: "Universally Balanced Sparse Mixture-of-Experts for Resource-Adaptive
Federated Fine-Tuning of Foundation Models" (ICML 2026, arXiv 2605.16690).

:class:`SMoELayer` replaces a host model's sparse-MoE block (OLMoE's
``OlmoeSparseMoeBlock`` first) and keeps its frozen expert weights and its router
(trainable on request, :meth:`SMoELayer.set_router_trainable`). It also serves as
a mixture of LoRA experts on a dense MLP (``model.lora_experts``), whose experts'
frozen weights are stride-0 views of the one MLP
(:func:`ubsmoe.models.loading.patch_lora_experts`); nothing here copies them.
Per token it routes to the top-K_c experts (K_c set per client), runs each selected
expert's frozen weights plus its own LoRA on the tokens routed to it only, and
records expert utilization. With DMR enabled (:meth:`SMoELayer.enable_dmr`, UB-SMoE)
the router logits of each token's N_p candidates are shifted by the layer's
modulation ``phi`` before the softmax (DESIGN.md section 4.1). Tokens are sorted by expert and every projection is one
grouped matmul over all experts, so compute scales with K_c: no expert ever runs on
tokens it was not chosen for, and no Python loop over experts sits inside autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.routing import dmr_route


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
    return F.grouped_mm(x, weight_t, offs=offsets)


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
    grad = F.grouped_mm(grad_out.t(), inp, offs=offsets)  # [E, out, in]
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
        counts: ``[num_experts]`` int64 slots per expert (``bincount`` of the
            selected experts, taken from ``offsets``: ``bincount`` synchronises with
            the host on CUDA).
    """

    order: torch.Tensor
    token: torch.Tensor
    inverse: torch.Tensor
    offsets: torch.Tensor
    counts: torch.Tensor


def sort_slots(top_index: torch.Tensor, num_experts: int) -> SlotRouting:
    """Sort the ``num_tokens * K`` routing slots by expert.

    Offsets come from ``searchsorted`` on the sorted expert ids: no histogram, no
    host synchronisation, no float64.

    Args:
        top_index: ``[num_tokens, K]`` int64 selected experts.
        num_experts: E, the number of groups.

    Returns:
        The :class:`SlotRouting` of the batch.
    """
    num_tokens, k = top_index.shape
    flat = top_index.reshape(-1)  # [S], slot t*K + j
    sorted_expert, order = torch.sort(flat, stable=True)  # [S], [S]
    positions = torch.arange(order.numel(), device=order.device)  # [S]
    inverse = torch.empty_like(order).scatter_(0, order, positions)  # [S]
    bounds = torch.arange(1, num_experts + 1, device=flat.device, dtype=sorted_expert.dtype)  # [E]
    offsets = torch.searchsorted(sorted_expert, bounds, out_int32=True)  # [E] #slots with expert < e+1
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).long()  # [E]
    return SlotRouting(order, order // k, inverse.view(num_tokens, k), offsets, counts)


class _GatherSlots(torch.autograd.Function):
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
        grad_x = F.embedding_bag(inverse, grad_xs.contiguous(), mode="sum")  # [N, H]
        return grad_x, None, None


class _CombineSlots(torch.autograd.Function):
    """``y[t] = sum_j ys[inverse[t, j]]``: sum each token's K expert outputs.

    Forward is one ``embedding_bag`` (no ``[S, H]`` intermediate, fixed order per
    token, deterministic); backward hands each slot its token's gradient row.
    """

    @staticmethod
    def forward(ctx, ys: torch.Tensor, token: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """``[S, H] -> [N, H]``: each token's K expert outputs summed."""
        ctx.save_for_backward(token)
        return F.embedding_bag(inverse, ys, mode="sum")  # [N, H]

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
                empty: torch.Tensor | None = None) -> torch.Tensor:
        """``x [S, in] -> [S, out]``; saves x and the ``[S, r']`` LoRA activation."""
        rank = lora_a.shape[1]
        ctx.factor_dtypes = (lora_a.dtype, lora_b.dtype)
        lora_a, lora_b = _pad_rank(lora_a, lora_b, x.dtype)  # [E, r', in], [E, out, r']
        h = grouped_linear(x, lora_a.transpose(1, 2), offsets)  # [S, r']
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
        grad_b = None
        if need_b:
            grad_b = grouped_weight_grad(grad_y, h, offsets, empty)  # [E, out, r'], 0 for empty experts
            grad_b = _unpad_grad(grad_b, rank, 2, dtype_b)
        grad_h = grad_h * ctx.scale  # gradient of the unscaled x A^T
        grad_a = None
        if need_a:
            grad_a = grouped_weight_grad(grad_h, x, offsets, empty)  # [E, r', in], 0 for empty experts
            grad_a = _unpad_grad(grad_a, rank, 1, dtype_a)
        grad_x = None
        if need_x:
            grad_x = grouped_linear(grad_y, weight, offsets)  # [S, in]
            grad_x.add_(grouped_linear(grad_h, lora_a, offsets))
        return grad_x, None, grad_a, grad_b, None, None, None


def lora_grouped_linear(x: torch.Tensor, weight: torch.Tensor, lora: ExpertLoRA,
                        offsets: torch.Tensor, empty: torch.Tensor | None = None) -> torch.Tensor:
    """Frozen expert projection plus its LoRA on rows grouped by expert.

    Args:
        x: ``[S, in_features]`` rows sorted by expert.
        weight: ``[E, out_features, in_features]`` frozen expert weights (HF layout).
        lora: the projection's :class:`ExpertLoRA` (``A [E, r, in]``, ``B [E, out, r]``).
        offsets: ``[E]`` int32 cumulative row counts.
        empty: ``[E]`` bool, experts without rows (None: derived from ``offsets``).

    Returns:
        ``[S, out_features]``: ``x W_e^T + scale * (x A_e^T) B_e^T`` per row of expert e.
        The factors (float32 parameters) are cast to ``x``'s dtype for the grouped
        matmuls (a no-op in float32); their gradients flow back in float32.
    """
    return _LoRAGroupedLinear.apply(x, weight, lora.A, lora.B, lora.scale, offsets, empty)


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
            grad_w = torch.linalg.vecdot(grad_act, act).unsqueeze(-1)  # [S, 1]
        grad_act.mul_(weights)
        grad_gate_up = torch.empty_like(gate_up)  # [S, 2I]
        torch.ops.aten.silu_backward.grad_input(grad_act, gate, grad_input=grad_gate_up[:, :inter])
        torch.mul(grad_h, weights, out=grad_gate_up[:, inter:]).mul_(act)
        return grad_gate_up, grad_w


def weighted_glu(gate_up: torch.Tensor, weights: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """Gated expert activation with the gate weight folded in: ``act(gate) * up * w``.

    Args:
        gate_up: ``[S, 2I]``, the fused gate and up projections (gate first, HF layout).
        weights: ``[S, 1]`` gate weight of each row.
        act_fn: the activation; SiLU takes a fused path, anything else plain autograd.

    Returns:
        ``[S, I]``.
    """
    if isinstance(act_fn, nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        return _WeightedSwiGLU.apply(gate_up, weights)
    gate, up = gate_up.chunk(2, dim=-1)  # [S, I] each
    return act_fn(gate) * (up * weights)


class ExpertLoRA(nn.Module):
    """LoRA factors of every expert for one projection (PEFT shapes, per expert).

    ``A``: ``[num_experts, rank, in_features]`` (Kaiming-uniform, as PEFT),
    ``B``: ``[num_experts, out_features, rank]`` (zeros), scale ``alpha / rank``.
    Expert i's update is ``scale * B[i] @ A[i]``.
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, rank: int,
                 alpha: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank: got {rank}, expected an integer >= 1")
        self.rank = rank
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(num_experts, rank, in_features, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(num_experts, out_features, rank, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PEFT's default init: A ~ Kaiming-uniform(a=sqrt(5)) per expert, B = 0."""
        for i in range(self.A.shape[0]):
            nn.init.kaiming_uniform_(self.A.data[i], a=math.sqrt(5))
        nn.init.zeros_(self.B)


@dataclass(frozen=True)
class TokenMask:
    """The real (non-padding) tokens of one forward, resolved once for every SMoE layer.

    Attributes:
        num_tokens: N, the flattened ``batch * seq`` tokens the mask covers.
        index: ``[N_real]`` positions of the real tokens, or None when all N are real.
    """

    num_tokens: int
    index: torch.Tensor | None

    @classmethod
    def from_attention_mask(cls, attention_mask: torch.Tensor) -> TokenMask:
        """Resolve a ``[batch, seq]`` attention mask (1 = real token).

        The ``all``/``nonzero`` reads synchronise with the device once here, per
        forward, instead of once per SMoE layer.
        """
        flat = attention_mask.reshape(-1).bool()  # [N]
        index = None if bool(flat.all()) else flat.nonzero().squeeze(-1)  # [N_real]
        return cls(flat.numel(), index)


class SMoELayer(nn.Module):
    """Sparse-MoE block with per-client top-K_c routing, per-expert LoRA and counters.

    Follows the host model's conventions (:mod:`ubsmoe.models.families`): SwiGLU experts ``down(act(gate(x)) * up(x))``
    with fused ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (the
    transformers >= 5 layout), router ``W_r`` ``[E, H]`` (frozen unless
    :meth:`set_router_trainable`), softmax in float32, gate
    weights = raw softmax probabilities (OLMoE) or renormalised over the selected
    experts (``norm_topk_prob``: Mixtral always, Qwen per config). A Qwen2-MoE
    shared expert ``shared_expert`` (a host dense MLP, ``[N, H] -> [N, H]``) runs on
    every token and is added as ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``
    (gate ``[1, H]``), exactly as the host block does.

    Attributes:
        top_k: K_c, experts activated per token (set per client with :meth:`set_top_k`).
        expert_counts: ``[E]`` float64 buffer, tokens routed to each expert (a_i)
            since the last :meth:`reset_stats`.
        token_count: ``[]`` float64 buffer, tokens processed (n) since then.
        router_prob_sum: ``[E]`` float32, sum over tokens of router probabilities
            in the last forward, or over every forward of the current optimizer
            step while :attr:`accumulate_step_stats` is set (for PG's pi; PG only
            uses ratios of pi).
        batch_expert_counts: ``[E]`` int64, tokens routed to each expert in the last
            forward, or in the current optimizer step's micro-batches while
            :attr:`accumulate_step_stats` is set (PG's active set A = experts with
            a count > 0).
        accumulate_step_stats: add each forward's ``router_prob_sum`` and
            ``batch_expert_counts`` to the previous ones instead of replacing them
            (set by :func:`ubsmoe.models.loading.step_stats` for one optimizer step
            of gradient accumulation).
        recomputing: the current forward is an activation-checkpointing
            recomputation in the backward pass (set by
            :func:`ubsmoe.models.loading.set_activation_checkpointing`): it records
            no statistics and keeps no router logits, so nothing is counted twice.
        phi: ``[E]`` float32 DMR modulation (parameter; zeros and frozen unless
            :meth:`enable_dmr` was called).
        dmr_candidates: N_p, the candidates per token DMR modulates (0: DMR off).
        keep_router_logits: keep the last forward's router logits, with their
            graph, in :attr:`router_logits_out` (for SMoE-LLB's auxiliary loss).
        router_logits_out: ``[num_tokens, E]`` router logits of the last forward
            (real tokens only) when :attr:`keep_router_logits` is set, else None.
        force_on: ``[E]`` bool or None. Experts set here are added for every token
            at their gate weight with a zero-valued contribution: the forward value
            is unchanged but their LoRA receives the gradient it would get if
            forced on (the PG-alignment probe, DESIGN.md section 4.2).
        probe_tokens: PG probe (``pg_rule=probe``, DESIGN.md section 4.2): when > 0
            and autograd is recording, every expert without a token in the forward
            also runs, with a zero-valued contribution at its gate weight, on the
            ``probe_tokens`` tokens where its router probability is highest, on
            detached inputs; backward then leaves in its LoRA ``.grad`` rows its true
            gradient on those tokens and changes no other gradient. 0: off.
        batch_probe_slots: (token, expert) pairs the probe ran in the last forward.
    """

    def __init__(self, router_weight: torch.Tensor, gate_up_proj: torch.Tensor,
                 down_proj: torch.Tensor, act_fn: nn.Module, top_k: int,
                 norm_topk_prob: bool, lora_rank: int, lora_alpha: float,
                 shared_expert: nn.Module | None = None,
                 shared_expert_gate: nn.Module | None = None) -> None:
        super().__init__()
        if (shared_expert is None) != (shared_expert_gate is None):
            raise ValueError("shared_expert and shared_expert_gate: give both or neither")
        num_experts, hidden = router_weight.shape
        if gate_up_proj.shape[0] != num_experts or down_proj.shape[0] != num_experts:
            raise ValueError(
                f"expert weights: router has {num_experts} experts, gate_up_proj "
                f"{tuple(gate_up_proj.shape)}, down_proj {tuple(down_proj.shape)}"
            )
        self.num_experts = num_experts
        self.hidden_size = hidden
        self.intermediate_size = down_proj.shape[2]
        self.max_top_k = top_k
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        # Host weights, kept as parameters so state_dict names stay familiar; all frozen
        # here (the router may be made trainable with set_router_trainable).
        self.router_weight = nn.Parameter(router_weight.detach(), requires_grad=False)
        self.gate_up_proj = nn.Parameter(gate_up_proj.detach(), requires_grad=False)
        self.down_proj = nn.Parameter(down_proj.detach(), requires_grad=False)
        self.act_fn = act_fn
        # Qwen2-MoE's shared expert (a dense MLP every token runs, PEFT LoRA on its
        # projections) and its sigmoid gate [1, H], both the host's modules.
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        # LoRA factors stay float32 under a bfloat16/float16 base (Adam updates of ~lr
        # would round away in 8 mantissa bits); cast to the activations' dtype per call.
        dtype = torch.promote_types(gate_up_proj.dtype, torch.float32)
        self.gate_up_lora = ExpertLoRA(num_experts, hidden, 2 * self.intermediate_size,
                                       lora_rank, lora_alpha, dtype)
        self.down_lora = ExpertLoRA(num_experts, self.intermediate_size, hidden,
                                    lora_rank, lora_alpha, dtype)
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("token_count", torch.zeros((), dtype=torch.float64), persistent=False)
        self.router_prob_sum: torch.Tensor | None = None
        self.batch_expert_counts: torch.Tensor | None = None
        self.accumulate_step_stats = False
        self.recomputing = False
        self.phi = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
        self.dmr_candidates = 0
        self.keep_router_logits = False
        self.router_logits_out: torch.Tensor | None = None
        self.force_on: torch.Tensor | None = None
        self.probe_tokens = 0
        self.batch_probe_slots = 0
        # Real (non-padding) tokens of the next forward, set by `routing_mask`;
        # padding tokens are not routed at all.
        self.token_mask: TokenMask | None = None

    def set_top_k(self, k: int) -> None:
        """Set K_c, the experts activated per token.

        Raises:
            ValueError: ``k`` outside ``[1, num_experts]``.
        """
        if not 1 <= k <= self.num_experts:
            raise ValueError(f"top_k: got {k}, expected an integer in [1, {self.num_experts}]")
        self.top_k = int(k)

    def enable_dmr(self, num_candidates: int = 2) -> None:
        """Turn on Dynamic Modulated Routing and make ``phi`` a trainable adapter tensor.

        ``phi`` then travels with the LoRA parameters (``adapter_state``), is
        aggregated by the server and, unless the method drops its gradient, is
        learned locally (DESIGN.md section 4.1).

        Raises:
            ValueError: ``num_candidates`` outside ``[1, num_experts]``.
        """
        if not 1 <= num_candidates <= self.num_experts:
            raise ValueError(
                f"num_candidates: got {num_candidates}, expected an integer in [1, {self.num_experts}]"
            )
        self.dmr_candidates = int(num_candidates)
        self.phi.requires_grad_(True)

    def set_router_trainable(self, trainable: bool) -> None:
        """Train the router ``W_r`` ``[E, H]`` (True) or keep it frozen (False).

        A trainable router becomes an adapter tensor (``adapter_state``): it is
        uploaded, aggregated by p_c-weighted mean and exported with the LoRA
        (DESIGN.md section 3). It is kept in float32 whatever the host dtype: Adam's
        steps (about lr = 1.5e-4 per coordinate) are below bfloat16's resolution for
        router weights of magnitude >= 0.04 (8-bit mantissa), so a bfloat16 router
        would round most updates away. The logits are then computed in float32
        (:meth:`router_logits`). Freezing keeps the current values and dtype.
        """
        if trainable and self.router_weight.dtype != torch.float32:
            self.router_weight = nn.Parameter(self.router_weight.detach().float(), requires_grad=True)
        self.router_weight.requires_grad_(bool(trainable))

    def reset_stats(self) -> None:
        """Zero the utilization counters a_i and n."""
        self.expert_counts.zero_()
        self.token_count.zero_()

    @torch.no_grad()
    def _record_stats(self, probs: torch.Tensor, counts: torch.Tensor) -> None:
        """Count one forward's routing: a_i and n, and PG's per-batch (or per-step) stats.

        Args:
            probs: ``[num_tokens, E]`` float32 router probabilities (detached).
            counts: ``[E]`` tokens routed to each expert in this forward.
        """
        self.expert_counts += counts.to(torch.float64)
        self.token_count += probs.shape[0]
        prob_sum = probs.sum(0)  # [E]
        if self.accumulate_step_stats and self.batch_expert_counts is not None:
            self.batch_expert_counts = self.batch_expert_counts + counts
            self.router_prob_sum = self.router_prob_sum + prob_sum
        else:
            self.batch_expert_counts = counts
            self.router_prob_sum = prob_sum

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router affinities ``s = W_r x``: ``[num_tokens, hidden] -> [num_tokens, E]``.

        In the router's dtype (float32 for a trainable router on a lower-precision
        model: ``x`` is upcast; the host dtype otherwise, as the host model computes).
        """
        return F.linear(x.to(self.router_weight.dtype), self.router_weight)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-K_c routing, DMR-modulated when enabled (DESIGN.md section 3, steps 1-3).

        Delegates to :func:`ubsmoe.routing.dmr_route` with ``phi`` when DMR is on
        and with no modulation otherwise (then identical to the host model's router).

        Args:
            x: ``[num_tokens, hidden]``.

        Returns:
            ``(probs [num_tokens, E] float32, top_weights [num_tokens, K_c] in x's dtype,
            top_index [num_tokens, K_c] int64)``.
        """
        logits = self.router_logits(x)  # [N, E]
        if self.keep_router_logits and not self.recomputing:
            self.router_logits_out = logits
        phi = self.phi if self.dmr_candidates else None
        probs, top_weights, top_index = dmr_route(logits, phi, self.top_k, max(self.dmr_candidates, 1),
                                                  self.norm_topk_prob)
        return probs, top_weights.to(x.dtype), top_index

    def experts_forward(self, x: torch.Tensor, top_weights: torch.Tensor,
                        top_index: torch.Tensor, routing: SlotRouting | None = None) -> torch.Tensor:
        """Run each token through its selected experts, grouped by expert.

        Args:
            x: ``[num_tokens, hidden]``.
            top_weights: ``[num_tokens, K]`` gate weights.
            top_index: ``[num_tokens, K]`` selected experts.
            routing: ``sort_slots(top_index, num_experts)`` when the caller has it.

        Returns:
            ``[num_tokens, hidden]``: sum over the K selected experts of
            gate weight * (frozen expert + LoRA)(x).
        """
        if routing is None:
            routing = sort_slots(top_index, self.num_experts)
        weights = top_weights.reshape(-1).index_select(0, routing.order).unsqueeze(-1)  # [S, 1]
        xs = _GatherSlots.apply(x, routing.token, routing.inverse)  # [S, H] rows sorted by expert
        empty = routing.counts == 0  # [E] experts without rows, shared by both projections
        gate_up = lora_grouped_linear(xs, self.gate_up_proj, self.gate_up_lora, routing.offsets,
                                      empty)  # [S, 2I]
        h = weighted_glu(gate_up, weights, self.act_fn)  # [S, I], gate weight folded in
        out = lora_grouped_linear(h, self.down_proj, self.down_lora, routing.offsets, empty)  # [S, H]
        return _CombineSlots.apply(out, routing.token, routing.inverse).to(x.dtype)  # [N, H]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, hidden] -> [batch, seq, hidden]``."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)  # [N, H]
        mask = self.token_mask
        # A mask for another token count (e.g. one decoding step with a KV cache) does not apply.
        keep = mask.index if mask is not None and mask.num_tokens == x.shape[0] else None
        if keep is not None:
            y = torch.zeros_like(x)
            y = y.index_copy(0, keep, self._route_and_run(x.index_select(0, keep)))
        else:
            y = self._route_and_run(x)
        if self.shared_expert is not None:  # Qwen2-MoE: + sigmoid(g(x)) * shared(x), every token
            y = y + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y.reshape(shape)

    def _route_and_run(self, x: torch.Tensor) -> torch.Tensor:
        probs, top_weights, top_index = self.route(x)
        routing = sort_slots(top_index, self.num_experts)
        counts = routing.counts  # [E] tokens per expert in this forward (no host sync)
        if not self.recomputing:
            self._record_stats(probs.detach(), counts)
        y = self.experts_forward(x, top_weights, top_index, routing)
        if self.force_on is not None and bool(self.force_on.any()):
            forced = self.force_on.nonzero().squeeze(-1)  # [F]
            index = forced.unsqueeze(0).expand(x.shape[0], -1)  # [N, F]
            extra = self.experts_forward(x, probs[:, forced].to(x.dtype), index)  # [N, H]
            y = y + (extra - extra.detach())  # zero value, the forced experts' gradient
        self.batch_probe_slots = 0
        if self.probe_tokens > 0 and torch.is_grad_enabled():
            y = y + self._probe_inactive(x, probs, counts)
        return y

    def _probe_inactive(self, x: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Zero-valued ``[num_tokens, hidden]`` term giving inactive experts their probe gradient.

        Each expert i with ``counts[i] == 0`` runs on its ``probe_tokens`` tokens of
        highest ``probs[:, i]`` at gate weight ``probs[t, i]``; inputs and gate weights
        are detached, so only the inactive experts' LoRA receives gradient.
        """
        inactive = (counts == 0).nonzero().squeeze(-1)  # [I]
        n = min(self.probe_tokens, x.shape[0])
        if inactive.numel() == 0 or n == 0:
            return torch.zeros_like(x)
        token = probs[:, inactive].topk(n, dim=0).indices.t().reshape(-1)  # [I*n], expert-major
        expert = inactive.repeat_interleave(n)  # [I*n]
        weights = probs[token, expert].detach().to(x.dtype).unsqueeze(-1)  # [I*n, 1]
        out = self.experts_forward(x.detach().index_select(0, token), weights,
                                   expert.unsqueeze(-1))  # [I*n, H]
        self.batch_probe_slots = int(token.numel())
        return torch.zeros_like(x).index_add(0, token, out - out.detach())  # [N, H], all zeros
