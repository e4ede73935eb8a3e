"""FLOPs: counting them in PyTorch, and an analytic calculator per compute budget.

**Counting.** PyTorch's :class:`~torch.utils.flop_counter.FlopCounterMode` has no
formula for ``aten._grouped_mm`` (the op behind ``torch.nn.functional.grouped_mm``),
so expert compute would count as zero. :func:`register_grouped_mm_flops` adds one:
a grouped matmul of ``[rows, k] x [groups, k, n]`` costs ``2 * rows * k * n`` FLOPs
(each row is multiplied by exactly one group's matrix); the backward pass is itself
made of grouped matmuls and is counted by the same formula.
:func:`register_flop_formulas` also adds the CPU flash-attention kernels
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward), which
PyTorch counts on GPU but not on CPU, with PyTorch's own SDPA formulas.

**Calculator.** :func:`budget_table` gives activated parameters and training FLOPs
per token for each compute budget of a model described by its Hugging Face config
(:func:`ubsmoe.metrics.model_shape.load_model_shape`: shipped OLMoE-1B-7B / OLMo-1B
configs, a local ``config.json`` or, online, any hub name). Conventions (per token,
one training step = forward + backward):

- a matmul with a weight of ``p`` parameters costs ``2p`` forward;
- a *frozen* weight's backward computes only the input gradient: ``2p`` more
  (its weight gradient is never formed), so ``4p`` in all. The first layer's
  q/k/v projections are counted too, although autograd skips their input gradient
  (the embedding output needs none): an over-count below 1%;
- a *trained* LoRA pair ``A: r x in``, ``B: out x r`` costs ``2r(in+out)`` forward
  and ``4r(in+out)`` backward (input and weight gradients): ``6r(in+out)``;
- attention scores: ``QK^T`` and ``softmax(.)V`` over a full ``seq_len x seq_len``
  score matrix (no causal halving; this is what SDPA kernels and FlopCounterMode
  count): ``4 * seq_len * num_heads * head_dim`` forward per token and layer, twice
  that backward;
- router: an ``[E, H]`` matmul, frozen (``4 E H``) or, with ``model.router_trainable``
  (the default), trained (``6 E H``: its weight gradient is formed); experts: K of
  them per token;
  LM head: a frozen ``[V, H]`` matmul (also when tied to the embedding);
- not counted: embedding lookup (0 FLOPs; its parameters are activated though),
  norms, activations, softmax, residual adds, the loss, the optimizer step (per
  step, LoRA-sized) — all O(H) per token.

PG probe (``ubsmoe.pg_rule=probe``): per step and SMoE layer, each inactive
expert runs on ``pg_probe_tokens`` tokens, forward and backward, on detached inputs
(:func:`pg_probe_flops_per_slot` per (token, expert) slot). At most ``M - K``
experts of a layer are inactive in a step (each token uses K), so
:func:`budget_table` reports the bound ``L (M - K) n_probe slot / tokens_per_step``
per token.

LoRA experts on a dense model (``model.lora_experts = M``, beyond the papers;
:func:`ubsmoe.metrics.model_shape.with_lora_experts`): the M experts share the one
frozen MLP, so a token runs that MLP once per selected expert: K MLP passes (``K * 3HI`` weights, ``4``
or ``2`` FLOPs each), K expert LoRA pairs and the ``[M, H]`` router. Parameters
count the MLP once (it is stored once); the activated parameters do not grow
with K, the FLOPs do. All LoRA parameters (every expert):
``lora_params_per_token(s, r, M)``.

With ``frozen_backward=False`` the frozen model is counted forward only (its
matmuls and attention scores; LoRA keeps its full ``6r(in+out)``): the "2N + 6P"
shorthand some papers use. Activated parameters: every parameter except the
experts a token does not use (embedding and, if untied, LM head included) — the
convention behind OLMoE-1B-7B's "1.3B active of 6.9B".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import (
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from ubsmoe.budgets import top_k_for_budget
from ubsmoe.metrics.model_shape import ModelShape

_REGISTERED: set[str] = set()

# --------------------------------------------------------------------------- counting


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    if len(a_shape) == 2 and len(b_shape) == 3:  # [rows, k] x [G, k, n] -> [rows, n]
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # [m, rows] x [rows, n] -> [G, m, n] (weight grad)
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:  # [G, m, k] x [k, cols] -> [m, cols], groups along cols
        return 2 * b_shape[1] * a_shape[1] * a_shape[2]
    # 3D x 3D: batched matmul per group
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def register_grouped_mm_flops() -> None:
    """Teach ``FlopCounterMode`` the cost of ``aten._grouped_mm`` (idempotent)."""
    if "grouped_mm" in _REGISTERED:
        return
    register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flop)
    _REGISTERED.add("grouped_mm")


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args,
                            out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def register_flop_formulas() -> None:
    """Register grouped-matmul, in-place ``addmm_`` and CPU flash-attention FLOP formulas (idempotent).

    The attention formulas are PyTorch's own ``sdpa_flop_count`` (QK^T and AV over
    the full score matrix) and ``sdpa_backward_flop_count``. ``addmm_`` (the in-place
    form ``train.fused_ops`` accumulates LoRA products with) counts as ``addmm``
    (PyTorch registers only the out-of-place one).
    """
    register_grouped_mm_flops()
    if "cpu_sdpa" in _REGISTERED:
        return
    ops = torch.ops.aten
    register_flop_formula(ops.addmm_)(
        lambda self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs: 2 * a_shape[0] * a_shape[1] * b_shape[1])
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        register_flop_formula(ops._scaled_dot_product_flash_attention_for_cpu)(_cpu_sdpa_flop)
        register_flop_formula(ops._scaled_dot_product_flash_attention_for_cpu_backward)(
            _cpu_sdpa_backward_flop)
    _REGISTERED.add("cpu_sdpa")


# --------------------------------------------------------------------------- calculator

LORA_TARGETS = ("all", "attention", "mlp")


def _attention_weights(s: ModelShape) -> int:
    """Parameters of one layer's q/k/v/o projection weights (biases excluded)."""
    q_out = s.num_heads * s.head_dim
    kv_out = s.num_kv_heads * s.head_dim
    return s.hidden_size * (q_out + 2 * kv_out) + q_out * s.hidden_size


def _layer_small_params(s: ModelShape) -> int:
    """One layer's biases and norm weights (no FLOPs counted for them)."""
    q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    n = 0
    if s.attention_bias:
        n += q_out + 2 * kv_out + s.hidden_size
    if s.qk_norm:
        n += q_out + kv_out
    if s.head_qk_norm:
        n += 2 * s.head_dim
    if s.qkv_bias:
        n += q_out + 2 * kv_out
    if s.norm_weights:
        n += 2 * s.hidden_size
    return n


def param_counts(s: ModelShape, top_k: int | None = None) -> dict[str, int]:
    """Parameters by part, with ``top_k`` experts per layer (None: all of them).

    Args:
        s: model sizes.
        top_k: experts counted per MoE layer (ignored for a dense model, and for LoRA
            experts: they share one MLP, counted once whatever K; their router
            ``[M, H]`` is counted).

    Returns:
        ``{"embedding", "lm_head", "attention", "router", "mlp", "norms_and_biases",
        "total"}`` (``lm_head`` is 0 when tied).
    """
    h, L = s.hidden_size, s.num_layers
    mlp_one = 3 * h * s.intermediate_size  # SwiGLU: gate, up, down
    if s.is_moe:
        k = s.num_experts if top_k is None else top_k
        # A shared expert (and its sigmoid gate [1, H]) runs for every token.
        mlp = L * (k * mlp_one + (3 * h * s.shared_expert_size + h if s.shared_expert_size else 0))
        router = L * s.num_experts * h
    else:  # dense; LoRA experts share this one MLP
        mlp, router = L * mlp_one, L * s.lora_experts * h
    counts = {
        "embedding": s.vocab_size * h,
        "lm_head": 0 if s.tie_word_embeddings else s.vocab_size * h,
        "attention": L * _attention_weights(s),
        "router": router,
        "mlp": mlp,
        "norms_and_biases": L * _layer_small_params(s) + (h if s.norm_weights else 0),
    }
    counts["total"] = sum(counts.values())
    return counts


def lora_params_per_token(s: ModelShape, rank: int, top_k: int, targets: str = "all") -> dict[str, int]:
    """LoRA parameters a token passes through (``r(in + out)`` per adapted matrix).

    Attention: q, k, v, o (PEFT, one pair each). MLP: a MoE model's experts follow
    this package's :class:`~ubsmoe.core.smoe.ExpertLoRA` (one pair on the fused
    ``gate_up`` ``[2I, H]`` and one on ``down`` ``[H, I]``), for the ``top_k``
    experts a token uses; a dense MLP follows PEFT (gate, up, down separately), unless
    it has LoRA experts (``s.lora_experts``): then ``top_k`` expert pairs as for a MoE
    model (``top_k = M``: every expert's LoRA, the trainable total).

    Raises:
        ValueError: ``targets`` not in ``LORA_TARGETS`` or ``rank < 1``.
    """
    if targets not in LORA_TARGETS:
        raise ValueError(f"lora_targets: got {targets!r}, expected one of {', '.join(LORA_TARGETS)}")
    if rank < 1:
        raise ValueError(f"lora_rank: got {rank}, expected an integer >= 1")
    h, i, L = s.hidden_size, s.intermediate_size, s.num_layers
    q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    attention = L * rank * ((h + q_out) + 2 * (h + kv_out) + (q_out + h))
    if s.routed:
        mlp = L * top_k * rank * ((h + 2 * i) + (i + h))
        # A shared expert gets PEFT LoRA on its gate, up and down projections.
        mlp += L * rank * 3 * (h + s.shared_expert_size) if s.shared_expert_size else 0
    else:
        mlp = L * rank * 3 * (h + i)
    return {"attention": attention if targets in ("all", "attention") else 0,
            "mlp": mlp if targets in ("all", "mlp") else 0}


def training_flops_per_token(s: ModelShape, top_k: int, lora_rank: int, seq_len: int,
                             lora_targets: str = "all", frozen_backward: bool = True,
                             router_trainable: bool = True) -> dict[str, int]:
    """Training FLOPs per token by term (conventions in the module docstring).

    Args:
        s: model sizes.
        top_k: experts per token (ignored for a dense model). With LoRA experts
            each of the K runs the shared frozen MLP: the ``mlp`` term is K MLP passes.
        lora_rank: r of every LoRA pair.
        seq_len: sequence length for the attention scores.
        lora_targets: ``all``, ``attention`` or ``mlp`` (experts for a MoE model).
        frozen_backward: count the input-gradient pass of frozen weights and the
            attention-score backward (True), or the frozen model forward only.
        router_trainable: the router is trained (``model.router_trainable``): 6 FLOPs
            per router parameter like LoRA, else frozen (4, or 2 forward only).

    Returns:
        ``{"attention_proj", "attention_scores", "router", "mlp", "lm_head", "lora",
        "total"}`` in FLOPs per token.

    Raises:
        ValueError: ``top_k`` outside ``[1, num_experts]`` for a MoE model,
            ``seq_len < 1``, or a bad LoRA setting.
    """
    if s.routed and not 1 <= top_k <= s.num_routed:
        raise ValueError(f"top_k: got {top_k}, expected an integer in [1, {s.num_routed}]")
    if seq_len < 1:
        raise ValueError(f"seq_len: got {seq_len}, expected an integer >= 1")
    frozen = 4 if frozen_backward else 2  # FLOPs per frozen weight per token
    p = param_counts(s, top_k)
    scores_fwd = s.num_layers * 4 * seq_len * s.num_heads * s.head_dim
    lora = lora_params_per_token(s, lora_rank, top_k, lora_targets)
    terms = {
        "attention_proj": frozen * p["attention"],
        "attention_scores": scores_fwd * (3 if frozen_backward else 1),
        "router": (6 if router_trainable else frozen) * p["router"],
        "mlp": frozen * p["mlp"] * (top_k if s.lora_experts else 1),  # LoRA experts: K MLP passes
        "lm_head": frozen * s.vocab_size * s.hidden_size,
        "lora": 6 * (lora["attention"] + lora["mlp"]),
    }
    terms["total"] = sum(terms.values())
    return terms


def pg_probe_flops_per_slot(s: ModelShape, lora_rank: int) -> int:
    """FLOPs of one PG-probe slot: one inactive expert on one token, forward + backward.

    The probe (``SMoELayer.probe_tokens``, DESIGN.md section 4.2) runs the expert on
    a detached input, so the backward forms the LoRA weight gradients and the input
    gradient of ``down`` (to reach ``gate_up``'s LoRA) but no input gradient of
    ``gate_up``. With H = hidden, I = expert intermediate, r = LoRA rank:

    - frozen: ``gate_up`` ``[2I, H]`` forward ``4IH``; ``down`` ``[H, I]`` forward and
      input gradient ``4IH``: ``8IH``;
    - LoRA ``gate_up`` (in H, out 2I): ``6r(H + 2I) - 2rH`` (no ``A`` input gradient);
      LoRA ``down`` (in I, out H): ``6r(I + H)``.

    Matches ``FlopCounterMode`` on the layer (tests/metrics/test_flops.py).

    Raises:
        ValueError: a dense model or ``lora_rank < 1``.
    """
    if not s.routed:
        raise ValueError(f"model: {s.name} is dense; the PG probe needs an MoE model or LoRA experts")
    if lora_rank < 1:
        raise ValueError(f"lora_rank: got {lora_rank}, expected an integer >= 1")
    h, i, r = s.hidden_size, s.intermediate_size, lora_rank
    return 8 * i * h + 6 * r * (h + 2 * i) - 2 * r * h + 6 * r * (i + h)


@dataclass(frozen=True)
class Budget:
    """One compute budget: a level beta and what it runs at.

    Attributes:
        beta: the budget level (``fl.budgets`` entry).
        top_k: experts per token (the native top-k for a rank budget or a dense model).
        lora_rank: LoRA rank.
    """

    beta: float
    top_k: int
    lora_rank: int


def default_budgets(s: ModelShape, betas: list[float], ranks: list[int] | None,
                    lora_rank: int) -> list[Budget]:
    """Budgets per level: K = clamp(floor(K_max beta), 1, K_max) or one rank per level.

    Args:
        s: model sizes.
        betas: budget levels in (0, 1], increasing.
        ranks: LoRA rank per level (rank budgets, at native top-k), or None for
            K budgets on a MoE model (all at ``lora_rank``).
        lora_rank: the LoRA rank of K budgets.

    Raises:
        ValueError: a dense model without ranks, or ``ranks`` and ``betas`` of
            different lengths.
    """
    if ranks is None:
        if not s.routed:
            raise ValueError(f"ranks: {s.name} is a dense model; give LoRA ranks per budget level")
        return [Budget(b, top_k_for_budget(b, s.top_k), lora_rank) for b in betas]
    if len(ranks) != len(betas):
        raise ValueError(f"ranks: got {len(ranks)} ranks for {len(betas)} budget levels {betas}")
    return [Budget(b, s.top_k, r) for b, r in zip(betas, ranks, strict=True)]


def budget_table(s: ModelShape, budgets: list[Budget], seq_len: int = 256,
                 lora_targets: str = "all", frozen_backward: bool = True,
                 pg_probe_tokens: int = 0, tokens_per_step: int | None = None,
                 router_trainable: bool = True) -> dict[str, Any]:
    """Activated parameters and training FLOPs per token for each budget.

    Args:
        s: model sizes.
        budgets: from :func:`default_budgets`, lowest first.
        seq_len: sequence length of the attention-score term.
        lora_targets: where LoRA sits (``LORA_TARGETS``).
        frozen_backward, router_trainable: see :func:`training_flops_per_token`.
        pg_probe_tokens: tokens per inactive expert of the PG probe
            (``ubsmoe.pg_probe_tokens`` with ``pg_rule=probe``); 0: no probe row.
        tokens_per_step: tokens in one local step (batch x sequence), to spread the
            probe's per-step cost over tokens; None: ``16 * seq_len`` (batch 16).

    Returns:
        JSON-ready dict: ``model`` (the shape), ``total_params``, ``settings``,
        ``rows`` (per budget: beta, K, rank, activated params, FLOPs per token by
        term, both as ratios to the largest budget; with a probe also ``pg_probe``:
        FLOPs per slot, the bound ``max_inactive = M - K``, the per-token bound
        ``max_flops_per_token`` and its share of the step ``max_share``) and
        ``lowest_vs_highest`` (FLOP ratio, FLOP reduction ``1 - ratio``,
        activated-parameter ratio; without the probe).

    Raises:
        ValueError: no budgets, a bad setting (see the functions above), a negative
            ``pg_probe_tokens``, a probe on a dense model, or ``tokens_per_step < 1``.
    """
    if not budgets:
        raise ValueError("budgets: expected at least one budget level")
    if pg_probe_tokens < 0:
        raise ValueError(f"pg_probe_tokens: got {pg_probe_tokens}, expected an integer >= 0")
    tokens_per_step = 16 * seq_len if tokens_per_step is None else tokens_per_step
    if tokens_per_step < 1:
        raise ValueError(f"tokens_per_step: got {tokens_per_step}, expected an integer >= 1")
    rows = []
    for b in budgets:
        active = param_counts(s, b.top_k)["total"]
        lora = lora_params_per_token(s, b.lora_rank, b.top_k, lora_targets)
        rows.append({
            "beta": b.beta, "top_k": b.top_k if s.routed else None, "lora_rank": b.lora_rank,
            "activated_params": active,
            "lora_params_per_token": lora["attention"] + lora["mlp"],
            "flops_per_token": training_flops_per_token(s, b.top_k, b.lora_rank, seq_len,
                                                        lora_targets, frozen_backward,
                                                        router_trainable),
        })
    if pg_probe_tokens:
        for b, row in zip(budgets, rows, strict=True):
            slot = pg_probe_flops_per_slot(s, b.lora_rank)
            max_inactive = s.num_routed - b.top_k
            extra = s.num_layers * max_inactive * pg_probe_tokens * slot / tokens_per_step
            row["pg_probe"] = {"flops_per_slot": slot, "max_inactive": max_inactive,
                               "max_flops_per_token": extra,
                               "max_share": extra / row["flops_per_token"]["total"]}
    top = rows[-1]
    for row in rows:
        row["flops_ratio_to_highest"] = row["flops_per_token"]["total"] / top["flops_per_token"]["total"]
        row["params_ratio_to_highest"] = row["activated_params"] / top["activated_params"]
    low = rows[0]
    return {
        "model": asdict(s),
        "total_params": param_counts(s)["total"],
        "settings": {"seq_len": seq_len, "lora_targets": lora_targets,
                     "frozen_backward": frozen_backward, "router_trainable": router_trainable,
                     "pg_probe_tokens": pg_probe_tokens, "tokens_per_step": tokens_per_step},
        "rows": rows,
        "lowest_vs_highest": {
            "flops_ratio": low["flops_ratio_to_highest"],
            "flops_reduction": 1.0 - low["flops_ratio_to_highest"],
            "activated_params_ratio": low["params_ratio_to_highest"],
        },
    }
