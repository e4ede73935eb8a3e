"""The resource-adaptive sparse-MoE layer (DESIGN.md section 3).

UB-SMoE: "Universally Balanced Sparse Mixture-of-Experts for Resource-Adaptive
Federated Fine-Tuning of Foundation Models" (ICML 2026, arXiv 2605.16690).

:class:`SMoELayer` replaces a host model's sparse-MoE block (OLMoE's
``OlmoeSparseMoeBlock`` first) and keeps its frozen router and expert weights.
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
        ``[num_rows, out_features]`` in ``x``'s dtype.
    """
    return F.grouped_mm(x, weight_t, offs=offsets)


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

    def delta(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """LoRA output ``scale * (x @ A_e^T) @ B_e^T`` for rows grouped by expert.

        Args:
            x: ``[num_rows, in_features]`` sorted by expert.
            offsets: ``[num_experts]`` int32 cumulative row counts.

        Returns:
            ``[num_rows, out_features]``.
        """
        h = grouped_linear(x, self.A.transpose(1, 2), offsets)  # [rows, rank]
        return grouped_linear(h, self.B.transpose(1, 2), offsets) * self.scale  # [rows, out]


class SMoELayer(nn.Module):
    """Sparse-MoE block with per-client top-K_c routing, per-expert LoRA and counters.

    Follows the host model's conventions: SwiGLU experts ``down(act(gate(x)) * up(x))``
    with fused ``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (the
    transformers >= 5 layout), router ``W_r`` ``[E, H]``, softmax in float32, gate
    weights = raw softmax probabilities (OLMoE) or renormalised over the selected
    experts (``norm_topk_prob``, Mixtral/Qwen).

    Attributes:
        top_k: K_c, experts activated per token (set per client with :meth:`set_top_k`).
        expert_counts: ``[E]`` float64 buffer, tokens routed to each expert (a_i)
            since the last :meth:`reset_stats`.
        token_count: ``[]`` float64 buffer, tokens processed (n) since then.
        router_prob_sum: ``[E]`` float32, sum over tokens of router probabilities
            in the last forward (for PG's pi; PG only uses ratios of pi).
        batch_expert_counts: ``[E]`` int64, tokens routed to each expert in the last
            forward (PG's active set A = experts with a count > 0).
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
    """

    def __init__(self, router_weight: torch.Tensor, gate_up_proj: torch.Tensor,
                 down_proj: torch.Tensor, act_fn: nn.Module, top_k: int,
                 norm_topk_prob: bool, lora_rank: int, lora_alpha: float) -> None:
        super().__init__()
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
        # Frozen host weights, kept as parameters so state_dict names stay familiar.
        self.router_weight = nn.Parameter(router_weight.detach(), requires_grad=False)
        self.gate_up_proj = nn.Parameter(gate_up_proj.detach(), requires_grad=False)
        self.down_proj = nn.Parameter(down_proj.detach(), requires_grad=False)
        self.act_fn = act_fn
        dtype = gate_up_proj.dtype
        self.gate_up_lora = ExpertLoRA(num_experts, hidden, 2 * self.intermediate_size,
                                       lora_rank, lora_alpha, dtype)
        self.down_lora = ExpertLoRA(num_experts, self.intermediate_size, hidden,
                                    lora_rank, lora_alpha, dtype)
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("token_count", torch.zeros((), dtype=torch.float64), persistent=False)
        self.router_prob_sum: torch.Tensor | None = None
        self.batch_expert_counts: torch.Tensor | None = None
        self.phi = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
        self.dmr_candidates = 0
        self.keep_router_logits = False
        self.router_logits_out: torch.Tensor | None = None
        self.force_on: torch.Tensor | None = None
        # Optional [num_tokens] bool mask of real (non-padding) tokens for the next
        # forward; set by `routing_mask`. Masked-out tokens are not routed at all.
        self.token_mask: torch.Tensor | None = None

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

    def reset_stats(self) -> None:
        """Zero the utilization counters a_i and n."""
        self.expert_counts.zero_()
        self.token_count.zero_()

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router affinities ``s = W_r x``: ``[num_tokens, hidden] -> [num_tokens, E]``."""
        return F.linear(x, self.router_weight)

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
        if self.keep_router_logits:
            self.router_logits_out = logits
        phi = self.phi if self.dmr_candidates else None
        return dmr_route(logits, phi, self.top_k, max(self.dmr_candidates, 1), self.norm_topk_prob)

    def experts_forward(self, x: torch.Tensor, top_weights: torch.Tensor,
                        top_index: torch.Tensor) -> torch.Tensor:
        """Run each token through its selected experts, grouped by expert.

        Args:
            x: ``[num_tokens, hidden]``.
            top_weights: ``[num_tokens, K]`` gate weights.
            top_index: ``[num_tokens, K]`` selected experts.

        Returns:
            ``[num_tokens, hidden]``: sum over the K selected experts of
            gate weight * (frozen expert + LoRA)(x).
        """
        num_tokens, k = top_index.shape
        flat_expert = top_index.reshape(-1)  # [N*K], slot t*K + j = token t's j-th choice
        order = torch.argsort(flat_expert, stable=True)  # [N*K], slots sorted by expert
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)  # [N*K]
        counts = torch.bincount(flat_expert, minlength=self.num_experts)  # [E]
        offsets = torch.cumsum(counts, 0).to(torch.int32)  # [E]
        # Gather through a permutation (unique indices) and sum the K copies on the way
        # back: unlike x[token_of_slot] / index_add, both directions are bitwise
        # deterministic under any thread count.
        x_slots = x.unsqueeze(1).expand(num_tokens, k, x.shape[-1]).reshape(num_tokens * k, -1)
        xs = x_slots[order]  # [N*K, H] rows sorted by expert
        gate_up = grouped_linear(xs, self.gate_up_proj.transpose(1, 2), offsets)  # [N*K, 2I]
        gate_up = gate_up + self.gate_up_lora.delta(xs, offsets)
        gate, up = gate_up.chunk(2, dim=-1)  # [N*K, I] each
        h = self.act_fn(gate) * up  # [N*K, I]
        out = grouped_linear(h, self.down_proj.transpose(1, 2), offsets)  # [N*K, H]
        out = out + self.down_lora.delta(h, offsets)
        out = out[inverse].view(num_tokens, k, -1)  # [N, K, H] back in slot order
        weighted = out * top_weights.unsqueeze(-1)  # [N, K, H]
        return weighted.sum(dim=1).to(x.dtype)  # [N, H]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[batch, seq, hidden] -> [batch, seq, hidden]``."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)  # [N, H]
        mask = self.token_mask
        if mask is not None and mask.numel() == x.shape[0] and not bool(mask.all()):
            keep = mask.nonzero().squeeze(-1)  # [N_real]
            y = torch.zeros_like(x)
            y = y.index_copy(0, keep, self._route_and_run(x[keep]))
        else:
            y = self._route_and_run(x)
        return y.reshape(shape)

    def _route_and_run(self, x: torch.Tensor) -> torch.Tensor:
        probs, top_weights, top_index = self.route(x)
        with torch.no_grad():
            counts = torch.bincount(top_index.reshape(-1), minlength=self.num_experts)  # [E]
            self.batch_expert_counts = counts
            self.expert_counts += counts.to(torch.float64)
            self.token_count += x.shape[0]
        self.router_prob_sum = probs.detach().sum(0)
        y = self.experts_forward(x, top_weights, top_index)
        if self.force_on is not None and bool(self.force_on.any()):
            forced = self.force_on.nonzero().squeeze(-1)  # [F]
            index = forced.unsqueeze(0).expand(x.shape[0], -1)  # [N, F]
            extra = self.experts_forward(x, probs[:, forced].to(x.dtype), index)  # [N, H]
            y = y + (extra - extra.detach())  # zero value, the forced experts' gradient
        return y
