"""Suite ``model_step``: one local training step per compute budget, whole model.

For each model config (the ``tiny`` preset and a larger OLMoE-shaped config) it
times :func:`~ubsmoe.fl.train.local_train` on one batch (forward, loss, backward,
gradient clipping, Adam step: exactly a client's step) at

- SMoE budgets K = 1, 2, 4, 8 (one model, LoRA rank 20 as the paper's SMoE
  methods, K switched with :func:`~ubsmoe.models.set_top_k` before each step);
- LoRA-rank budgets r = 12, 16, 24, 40 at the native top-8 (one model per rank,
  ``model.lora_rank = r``), as the heterogeneous-rank baselines run;

- UB-SMoE at K = 1 with PG in update space, once per PG rule (``pg_universal_k1``,
  ``pg_probe_k1``): the probe rule's extra cost (``pg_probe`` field: probe slots run
  in the step and their analytic FLOPs) next to the universal rule's;

all ten cases interleaved in one process. Next to each time it puts the FLOPs of
the same step from ``FlopCounterMode`` (grouped matmuls and CPU attention included,
see :func:`~ubsmoe.metrics.flops.register_flop_formulas`) and the analytic FLOPs of
:func:`~ubsmoe.metrics.flops.training_flops_per_token` for the same shapes. The
contrast the paper draws: lowering K saves a large share of the step, lowering the
rank almost nothing.

Inputs are random token ids (no tokenizer needed; the ``tiny`` preset's vocabulary
size is its configured ``vocab_size``), every token labelled, no padding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ubsmoe.bench.harness import (
    BenchOptions,
    device_sync,
    interleaved_timings,
    ratio_stats,
    register_suite,
    summarize,
)
from ubsmoe.config import ModelConfig, TinyModelConfig, TrainConfig
from ubsmoe.fl.train import local_train
from ubsmoe.methods import get_method_class
from ubsmoe.methods.ubsmoe import UBSMoEConfig
from ubsmoe.metrics.flops import (
    pg_probe_flops_per_slot,
    register_flop_formulas,
    training_flops_per_token,
)
from ubsmoe.metrics.model_shape import ModelShape
from ubsmoe.models import set_top_k, smoe_layers
from ubsmoe.models.build import prepare_model, random_olmoe
from ubsmoe.models.devices import resolve_dtype
from ubsmoe.models.presets import MEDIUM

SMOE_KS = [1, 2, 4, 8]
LORA_RANKS = [12, 16, 24, 40]
SMOE_RANK = 20
PG_PROBE_TOKENS = 4  # the ubsmoe.pg_probe_tokens default


@dataclass(frozen=True)
class StepConfig:
    """One benchmarked model and batch.

    Attributes:
        name: label in the report.
        sizes: the OLMoE-architecture sizes (built like the ``tiny`` preset).
        batch_size: examples per step.
        seq_len: tokens per example.
    """

    name: str
    sizes: TinyModelConfig
    batch_size: int = 16
    seq_len: int = 128


TINY = StepConfig("tiny", TinyModelConfig())
# The `medium` model preset (ubsmoe.models.presets.MEDIUM): OLMoE-1B-7B's routing
# (64 experts, top-8), expert intermediate = hidden / 2 and head width 128 as in
# OLMoE, at hidden 512 and 4 layers; vocabulary 4096 keeps the LM head's share of the
# training FLOPs at K = 8 (10%) near OLMoE-1B-7B's (8%). About 0.09 TFLOP per step.
OLMOE_MEDIUM = StepConfig("olmoe_medium", MEDIUM, batch_size=8, seq_len=128)
QUICK = StepConfig("tiny_quick", TinyModelConfig(hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=16,
                                                 num_experts=16, num_experts_per_tok=8,
                                                 vocab_size=256),
                   batch_size=2, seq_len=16)


@dataclass
class _Case:
    model: torch.nn.Module
    top_k: int
    lora_rank: int
    method: Any = field(repr=False)


def _build(step_cfg: StepConfig, lora_rank: int, seed: int, device: str | torch.device = "cpu",
           dtype: str = "float32") -> torch.nn.Module:
    """The patched model (attention LoRA + expert LoRA at ``lora_rank``), random weights.

    Created directly on ``device`` in ``dtype`` (``model.dtype`` values) by
    :func:`~ubsmoe.models.build.random_olmoe`: no CPU copy of a large model first.
    """
    device = torch.device(device)
    cfg = ModelConfig(name="tiny", lora_rank=lora_rank, dtype=dtype, tiny=step_cfg.sizes)
    model = random_olmoe(cfg, step_cfg.sizes.vocab_size, pad_token_id=0, eos_token_id=1, seed=seed,
                         device=device, dtype=resolve_dtype(dtype, device))
    with torch.device(device):
        return prepare_model(model, cfg, seed)


def _batch(step_cfg: StepConfig, seed: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random token ids, all labelled, no padding: ``[batch, seq]`` each, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, step_cfg.sizes.vocab_size, (step_cfg.batch_size, step_cfg.seq_len), generator=g)
    ids = ids.to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _shape(step_cfg: StepConfig) -> ModelShape:
    t = step_cfg.sizes
    return ModelShape(name=step_cfg.name, model_type="olmoe", hidden_size=t.hidden_size,
                      num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
                      num_kv_heads=t.num_attention_heads,
                      head_dim=t.hidden_size // t.num_attention_heads, vocab_size=t.vocab_size,
                      tie_word_embeddings=False, intermediate_size=t.intermediate_size,
                      num_experts=t.num_experts, top_k=t.num_experts_per_tok, qk_norm=True)


def step_benchmark(step_cfg: StepConfig, repeats: int, warmup: int, seed: int = 0,
                   ks: list[int] | None = None, ranks: list[int] | None = None,
                   device: str | torch.device = "cpu", dtype: str = "float32",
                   train_cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Time a local training step per K and per LoRA rank on one model config.

    Args:
        step_cfg: model sizes and batch.
        repeats, warmup: timed and untimed steps per case.
        seed: model, LoRA and batch seed.
        ks: SMoE budgets (default 1, 2, 4, 8; the largest is the reference).
        ranks: LoRA ranks at native top-k (default 12, 16, 24, 40; the largest is the
            reference).
        device: where the models are built and trained; on CUDA every timed step
            is bracketed by ``torch.cuda.synchronize``. All five models (one SMoE
            model, one per rank) are alive at once: about 5 x the model's bytes.
        dtype: frozen weights' dtype (``float32``, ``bfloat16``, ``float16``).
        train_cfg: lr, clipping, ``adapter_dtype`` and ``compile`` of the steps
            (default :class:`~ubsmoe.config.TrainConfig`).

    Returns:
        JSON-ready dict: ``config``, ``tokens_per_step``, ``cases`` (per case: K,
        rank, timing summary, measured and analytic FLOPs per step), ``smoe`` and
        ``lora_rank`` (per budget: time ratio and FLOP ratio to the largest budget,
        and the saving ``1 - ratio``).
    """
    ks = sorted(ks or SMOE_KS)
    ranks = sorted(ranks or LORA_RANKS)
    k_max = step_cfg.sizes.num_experts_per_tok
    train_cfg = train_cfg or TrainConfig()
    batch = _batch(step_cfg, seed, device)
    tokens = step_cfg.batch_size * step_cfg.seq_len
    smoe_method = get_method_class("smoe")()
    rank_method = get_method_class("fedit")()
    cases: dict[str, _Case] = {}
    smoe_model = _build(step_cfg, SMOE_RANK, seed, device, dtype)
    for k in ks:
        cases[f"smoe_k{k}"] = _Case(smoe_model, k, SMOE_RANK, smoe_method)
    for r in ranks:
        cases[f"lora_r{r}"] = _Case(_build(step_cfg, r, seed, device, dtype), k_max, r, rank_method)
    k_low = ks[0]
    for rule in ("universal", "probe"):
        method = get_method_class("ubsmoe")(UBSMoEConfig(pg_rule=rule, pg_probe_tokens=PG_PROBE_TOKENS))
        model = _build(step_cfg, SMOE_RANK, seed, device, dtype)
        method.prepare_model(model)
        cases[f"pg_{rule}_k{k_low}"] = _Case(model, k_low, SMOE_RANK, method)

    def runner(case: _Case):
        """A callable running one local training step of ``case``."""

        def run() -> None:
            """Set K, then one local_train step on the batch."""
            set_top_k(case.model, case.top_k)
            local_train(case.model, [batch], case.method, train_cfg, case.top_k)

        return run

    runs = {name: runner(case) for name, case in cases.items()}
    register_flop_formulas()
    measured, probe_slots = {}, {}
    for name, run in runs.items():
        with FlopCounterMode(display=False) as counter:
            run()
        measured[name] = int(counter.get_total_flops())
        probe_slots[name] = sum(m.batch_probe_slots for m in smoe_layers(cases[name].model))
    times = interleaved_timings(runs, repeats, warmup, sync=device_sync(device))
    shape = _shape(step_cfg)
    out_cases = {}
    for name, case in cases.items():
        analytic = training_flops_per_token(shape, case.top_k, case.lora_rank, step_cfg.seq_len)
        out_cases[name] = {
            "top_k": case.top_k, "lora_rank": case.lora_rank, **summarize(times[name]),
            "flops_measured": measured[name],
            "flops_analytic": analytic["total"] * tokens,
            "flops_analytic_terms": {k: v * tokens for k, v in analytic.items() if k != "total"},
        }
        if name.startswith("pg_"):
            out_cases[name]["pg_probe"] = {
                "tokens_per_expert": PG_PROBE_TOKENS if "probe" in name else 0,
                "slots": probe_slots[name],
                "flops_analytic": probe_slots[name] * pg_probe_flops_per_slot(shape, case.lora_rank),
            }

    def contrast(names: list[str]) -> dict[str, Any]:
        """Time and FLOP ratios of each case to the last (largest) budget."""
        ref = names[-1]
        rows = {}
        for name in names:
            t = ratio_stats(times[name], times[ref])
            f = measured[name] / measured[ref]
            rows[name] = {"time_ratio": t, "flops_ratio": f,
                          "time_saving": 1.0 - t["of_medians"], "flops_saving": 1.0 - f}
        return {"reference_case": ref, "budgets": rows}

    return {
        "config": {"name": step_cfg.name, "sizes": asdict(step_cfg.sizes),
                   "batch_size": step_cfg.batch_size, "seq_len": step_cfg.seq_len,
                   "smoe_lora_rank": SMOE_RANK, "attention_lora": True, "dtype": dtype,
                   "device": str(device),
                   "lr": train_cfg.lr, "max_grad_norm": train_cfg.max_grad_norm,
                   "adapter_dtype": train_cfg.adapter_dtype, "compile": train_cfg.compile},
        "tokens_per_step": tokens,
        "timing": {"repeats": repeats, "warmup": warmup,
                   "unit": "seconds per local_train step on one batch",
                   "order": "interleaved, alternating direction per repeat"},
        "cases": out_cases,
        "smoe": contrast([f"smoe_k{k}" for k in ks]),
        "lora_rank": contrast([f"lora_r{r}" for r in ranks]),
        "pg_rules": contrast([f"pg_universal_k{k_low}", f"pg_probe_k{k_low}"]),
    }


@register_suite("model_step")
def model_step_suite(options: BenchOptions) -> dict[str, Any]:
    """The ``model_step`` suite: the tiny preset and ``olmoe_medium`` (quick: one tiny config)."""
    configs = [QUICK] if options.quick else [TINY, OLMOE_MEDIUM]
    models = {}
    for step_cfg in configs:
        # The heavier config gets fewer repeats to keep the default run under ten minutes.
        default_repeats = 7 if step_cfg.sizes.hidden_size <= 64 else 4
        models[step_cfg.name] = step_benchmark(step_cfg, options.n_repeats(default_repeats),
                                               options.n_warmup(1), options.seed)
    summary = {}
    for name, res in models.items():
        smoe, rank = res["smoe"], res["lora_rank"]
        lo_k, lo_r = next(iter(smoe["budgets"])), next(iter(rank["budgets"]))
        summary[name] = {
            f"{lo_k}_vs_{smoe['reference_case']}": {
                "time_saving": smoe["budgets"][lo_k]["time_saving"],
                "flops_saving": smoe["budgets"][lo_k]["flops_saving"]},
            f"{lo_r}_vs_{rank['reference_case']}": {
                "time_saving": rank["budgets"][lo_r]["time_saving"],
                "flops_saving": rank["budgets"][lo_r]["flops_saving"]},
            "median_s": {c: v["median_s"] for c, v in res["cases"].items()},
        }
        pg = res["pg_rules"]
        probe, universal = pg["reference_case"], next(iter(pg["budgets"]))
        summary[name]["pg_probe_vs_universal"] = {
            "flops_ratio": 1.0 / pg["budgets"][universal]["flops_ratio"],
            "time_ratio": 1.0 / pg["budgets"][universal]["time_ratio"]["of_medians"],
            "probe_slots": res["cases"][probe]["pg_probe"]["slots"],
        }
    return {
        "description": ("local training step (forward, loss, backward, clip, Adam) per SMoE "
                        "budget K and per LoRA rank at native top-k, and UB-SMoE at the lowest K "
                        "per PG rule, with FlopCounterMode and analytic FLOPs"),
        "models": models,
        "summary": summary,
    }
