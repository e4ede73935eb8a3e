"""The resource-adaptive sparse-MoE layer (DESIGN.md section 3).

UB-SMoE: "Universally Balanced Sparse Mixture-of-Experts for Resource-Adaptive
Federated Fine-Tuning of Foundation Models" (ICML 2026, arXiv 2605.16690).

:class:`SMoELayer` replaces a host model's sparse-MoE block (OLMoE's
``OlmoeSparseMoeBlock`` first) and keeps its frozen expert weights and its router
(trainable on request, :meth:`SMoELayer.set_router_trainable`). It also serves as
a mixture of LoRA experts on a dense MLP (``model.lora_experts``), whose experts'
frozen weights are stride-0 views of the one MLP
(:func:`ubsmoe.models.patching.patch_lora_experts`); nothing here copies them.
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

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.core.grouped import (
    CombineSlots,
    GatherSlots,
    SlotRouting,
    SortRows,
    lora_grouped_linear,
    sort_slots,
    weighted_glu,
)
from ubsmoe.core.routing import dmr_route


class ExpertLoRA(nn.Module):
    """LoRA factors of every expert for one projection (PEFT shapes, per expert).

    ``A``: ``[num_experts, rank, in_features]`` (Kaiming-uniform, as PEFT),
    ``B``: ``[num_experts, out_features, rank]`` (zeros), scale ``alpha / rank``.
    Expert i's update is ``scale * B[i] @ A[i]``.

    ``padded``: None, or ``(A' [E, r', in], B' [E, out, r'])`` rank-padded buffers
    that ``A`` and ``B`` are views of (set by
    :class:`ubsmoe.models.precision.AdapterMasters`): the grouped matmuls then use
    them as they are instead of padding the factors on every call. ``prescaled``:
    those buffers hold ``scale * A`` (not ``A``), so the layer multiplies by nothing,
    and the gradient it forms for ``A`` is that of ``scale * A`` (the masters scale it
    back; :class:`~ubsmoe.models.precision.AdapterMasters`).
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
        self.padded: tuple[torch.Tensor, torch.Tensor] | None = None
        self.prescaled = False
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
        batch_expert_counts: ``[E]`` int32, tokens routed to each expert in the last
            forward, or in the current optimizer step's micro-batches while
            :attr:`accumulate_step_stats` is set (PG's active set A = experts with
            a count > 0).
        accumulate_step_stats: add each forward's ``router_prob_sum`` and
            ``batch_expert_counts`` to the previous ones instead of replacing them
            (set by :func:`ubsmoe.models.runtime.step_stats` for one optimizer step
            of gradient accumulation).
        recomputing: the current forward is an activation-checkpointing
            recomputation in the backward pass (set by
            :func:`ubsmoe.models.runtime.set_activation_checkpointing`): it records
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
        self.register_buffer("_token_total", torch.zeros((), dtype=torch.float64), persistent=False)
        self._pending_tokens = 0  # tokens of forwards not yet added to _token_total (host int)
        self._pending_probs: list[torch.Tensor] = []  # [N, E] probs not yet summed into _prob_sum
        self._prob_sum: torch.Tensor | None = None
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

    @property
    def token_count(self) -> torch.Tensor:
        """``[]`` float64 buffer, tokens processed (n) since the last :meth:`reset_stats`.

        A forward adds its token count on the host; the buffer takes the sum when read
        (one operation per read, none per forward).
        """
        if self._pending_tokens:
            self._token_total += self._pending_tokens
            self._pending_tokens = 0
        return self._token_total

    @property
    def router_prob_sum(self) -> torch.Tensor | None:
        """``[E]`` float32 sum over tokens of the router probabilities (see the class attributes).

        Summed when read from the forwards' probabilities (kept by reference), so a
        method that never reads it (every method but UB-SMoE's PG) costs nothing.
        """
        if self._pending_probs:
            for probs in self._pending_probs:
                part = probs.sum(0)  # [E]
                self._prob_sum = part if self._prob_sum is None else self._prob_sum + part
            self._pending_probs = []
        return self._prob_sum

    @router_prob_sum.setter
    def router_prob_sum(self, value: torch.Tensor | None) -> None:
        """Replace the sum (``[E]`` float32, or None to clear it) and drop the unsummed forwards."""
        self._prob_sum, self._pending_probs = value, []

    def reset_stats(self) -> None:
        """Zero the utilization counters a_i and n."""
        self.expert_counts.zero_()
        self._pending_tokens = 0
        self._token_total.zero_()

    @torch.no_grad()
    def _record_stats(self, probs: torch.Tensor, counts: torch.Tensor) -> None:
        """Count one forward's routing: a_i and n, and PG's per-batch (or per-step) stats.

        Args:
            probs: ``[num_tokens, E]`` float32 router probabilities (detached).
            counts: ``[E]`` tokens routed to each expert in this forward.
        """
        self.expert_counts += counts  # int32 into float64, in place (no cast op)
        self._pending_tokens += probs.shape[0]
        if self.accumulate_step_stats and self.batch_expert_counts is not None:
            self.batch_expert_counts = self.batch_expert_counts + counts
            self._pending_probs.append(probs)  # summed when router_prob_sum is read
        else:
            self.batch_expert_counts = counts
            self.router_prob_sum = None
            self._pending_probs = [probs]

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router affinities ``s = W_r x``: ``[num_tokens, hidden] -> [num_tokens, E]``.

        In the router's dtype (float32 for a trainable router on a lower-precision
        model: ``x`` is upcast; the host dtype otherwise, as the host model computes).
        """
        return F.linear(x.to(self.router_weight.dtype), self.router_weight)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-K_c routing, DMR-modulated when enabled (DESIGN.md section 3, steps 1-3).

        Delegates to :func:`ubsmoe.core.routing.dmr_route` with ``phi`` when DMR is on
        and with no modulation otherwise (then identical to the host model's router).

        Args:
            x: ``[num_tokens, hidden]``.

        Returns:
            ``(probs [num_tokens, E] float32, top_weights [num_tokens, K_c] in the router's
            dtype (float32 for a trainable router: the experts multiply their bfloat16
            activations by it in place, without a cast), top_index [num_tokens, K_c] int64)``.
        """
        logits = self.router_logits(x)  # [N, E]
        if self.keep_router_logits and not self.recomputing:
            self.router_logits_out = logits
        phi = self.phi if self.dmr_candidates else None
        probs, top_weights, top_index = dmr_route(logits, phi, self.top_k, max(self.dmr_candidates, 1),
                                                  self.norm_topk_prob)
        return probs, top_weights, top_index

    def experts_forward(self, x: torch.Tensor, top_weights: torch.Tensor,
                        top_index: torch.Tensor, routing: SlotRouting | None = None) -> torch.Tensor:
        """Run each token through its selected experts, grouped by expert.

        Args:
            x: ``[num_tokens, hidden]``.
            top_weights: ``[num_tokens, K]`` gate weights (``x``'s dtype or float32).
            top_index: ``[num_tokens, K]`` selected experts.
            routing: ``sort_slots(top_index, num_experts)`` when the caller has it.

        Returns:
            ``[num_tokens, hidden]``: sum over the K selected experts of
            gate weight * (frozen expert + LoRA)(x).
        """
        if routing is None:
            routing = sort_slots(top_index, self.num_experts)
        weights = SortRows.apply(top_weights.reshape(-1), routing.order, routing.inverse).unsqueeze(-1)  # [S, 1]
        xs = GatherSlots.apply(x, routing.token, routing.inverse)  # [S, H] rows sorted by expert
        empty = routing.counts == 0  # [E] experts without rows, shared by both projections
        gate_up = lora_grouped_linear(xs, self.gate_up_proj, self.gate_up_lora, routing.offsets,
                                      empty)  # [S, 2I]
        h = weighted_glu(gate_up, weights, self.act_fn)  # [S, I], gate weight folded in
        out = lora_grouped_linear(h, self.down_proj, self.down_lora, routing.offsets, empty)  # [S, H]
        return CombineSlots.apply(out, routing.token, routing.inverse).to(x.dtype)  # [N, H]

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
