"""One prepared check on a CUDA machine: a JSON report in about five minutes (issue 10 item 7).

Usage (see benchmarks/README_gpu.md)::

    python benchmarks/gpu_check.py --data DIR --out report.json [--parts layer,step] [--quick]
    python benchmarks/gpu_check.py --make-data-subset SRC DST --per-task 64

Parts, in this order (``--parts`` picks some); each runs in a try block, records its
wall time, its peak GPU memory (``torch.cuda.max_memory_allocated``, reset before the
part) and any error with its traceback, and the whole report is rewritten atomically
after every part, so a timeout still leaves the finished parts:

- ``layer``: :class:`~ubsmoe.core.smoe.SMoELayer` against transformers' ``grouped_mm``
  experts + PEFT LoRA at OLMoE-1B-7B's layer shape (bfloat16, K = 1 and 8, forward +
  backward) through :func:`ubsmoe.bench.layer.layer_benchmark`.
- ``zero_grad``: a batch routed so that most experts get no token; their LoRA
  gradients must be exactly 0 and every gradient finite (the freed blocks the
  gradients may reuse are filled with NaN first, so uninitialised memory shows).
- ``step``: one local step (forward, loss, backward, clip, Adam) of a random-weight
  OLMoE-1B-7B at K = 1, 2, 4, 8 and at LoRA ranks 12/16/24/40, time ratios next to
  FLOP ratios, through :func:`ubsmoe.bench.model_step.step_benchmark`.
- ``round``: one UB-SMoE round, 4 clients x 4 local steps, through the library's
  :class:`~ubsmoe.fl.server.Server` and :class:`~ubsmoe.fl.client_runtime.ClientRuntime` in this
  process, then evaluation at every budget level under both protocols.
- ``dispatch`` (issue 24): the launch counts of one local step on this device
  (:func:`ubsmoe.bench.dispatch.dispatch_counts`; OLMoE-1B-7B's shape at 2 layers,
  K = 1 and 8, ``smoe``/``ubsmoe``, float32 adapters, ``train.adapter_dtype=compute``, and
  that with ``train.fused_ops``).
- ``fast_step`` (issue 24): the ``step`` part's model at K = 1 and 8 with
  ``train.adapter_dtype=compute``: eager, eager with ``train.fused_ops``, and with
  ``train.compile`` (one compile per K, untimed), K1/K8 time ratio against the FLOP ratio.
- ``eval``: evaluation throughput of the full-size server model per protocol, budget
  level and ``eval.batch_size`` (at most 128 test records per task), and the minutes
  the paper's evaluation of one method (full test sets, four budgets, two protocols)
  would take at those rates (target: 10).

The GPU machine has no ``flwr``, ``flwr_datasets``, ``datasets`` or ``ray``, and this
script imports none of them: the round's client partition is a seeded IID split made
here (``partition_clients`` uses Flower Datasets). ``--quick`` runs the same code on
tiny shapes, on the CPU by default (tests/bench/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

SCHEMA = "ubsmoe-gpu-check/1"
OLMOE = "allenai/OLMoE-1B-7B-0924"
BLOCKED = ("flwr", "flwr_datasets", "datasets", "ray")  # absent on the GPU machine
TARGETS = {"layer_speedup_k1": 2.0, "layer_speedup_k8": 1.3, "step_k1_time_over_flop_ratio": 1.15}


@dataclass(frozen=True)
class Check:
    """Settings shared by the parts.

    Attributes:
        device: where everything runs.
        dtype: frozen weights' dtype name (``bfloat16`` on the GPU).
        quick: tiny shapes and one or two repeats (tests), not a measurement.
        data: LLM-Adapters commonsense folder (for ``round``).
        round_model: ``full`` (OLMoE-1B-7B sizes) or ``medium`` (the bench's
            ``olmoe_medium`` sizes) for the round; ignored with ``quick``.
        seed: seed of every weight, input and batch.
    """

    device: torch.device
    dtype: str
    quick: bool
    data: str
    round_model: str
    seed: int


def olmoe_sizes():
    """OLMoE-1B-7B's sizes (shipped config) as a :class:`~ubsmoe.config.TinyModelConfig`."""
    from ubsmoe.config import TinyModelConfig
    from ubsmoe.models.presets import shipped_config

    c = shipped_config(OLMOE)
    return TinyModelConfig(
        hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
        num_experts=c["num_experts"], num_experts_per_tok=c["num_experts_per_tok"],
        vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"])


def layer_shape(quick: bool):
    """One OLMoE-1B-7B MoE block on 4096 tokens, LoRA rank 20 (quick: the bench's tiny shape)."""
    from ubsmoe.bench.layer import QUICK_SHAPE, LayerShape

    if quick:
        return QUICK_SHAPE
    s = olmoe_sizes()
    return LayerShape(hidden=s.hidden_size, intermediate=s.intermediate_size,
                      num_experts=s.num_experts, num_tokens=4096, lora_rank=20, lora_alpha=16.0)


# ----- parts ------------------------------------------------------------------------
def part_layer(check: Check) -> dict[str, Any]:
    """SMoE layer vs HF grouped_mm + PEFT, K = 1 and 8, forward + backward (bfloat16)."""
    from ubsmoe.bench.layer import layer_benchmark, layer_summary

    result = layer_benchmark(layer_shape(check.quick), ["bfloat16"], [1, 8],
                             repeats=2 if check.quick else 20, warmup=1 if check.quick else 3,
                             seed=check.seed, device=check.device)
    s = layer_summary(result)["bfloat16"]
    summary = {
        "median_ms": {case: 1e3 * t for case, t in s["median_s"].items()},
        "speedup_k1": s["speedup_k1"], "speedup_k8": s["speedup_k8"],
        "k1_over_k8": s["k1_over_k8"], "flop_ratio_k1_over_k8": s["flop_ratio_k1_over_k8"],
        "max_abs_diff": result["dtypes"]["bfloat16"]["max_abs_diff"],
        "targets_met": {"speedup_k1": s["speedup_k1"] >= TARGETS["layer_speedup_k1"],
                        "speedup_k8": s["speedup_k8"] >= TARGETS["layer_speedup_k8"]},
    }
    return {"benchmark": result, "summary": summary}


def _skewed_layer(check: Check, top_k: int, used: int):
    """An SMoE layer whose router never picks experts ``used..E-1`` for the batch made here.

    Router rows of those experts are ``-10 v`` and every token is ``8 v + noise`` for the
    unit vector ``v``, so their logits are about -80 while the others' are O(1).

    Returns:
        ``(layer, x [1, N, H] requiring grad, grad_out [1, N, H])``.
    """
    from torch import nn

    from ubsmoe.core.smoe import SMoELayer

    shape, dtype = layer_shape(check.quick), getattr(torch, check.dtype)
    E, H, inter, N = shape.num_experts, shape.hidden, shape.intermediate, shape.num_tokens
    g = torch.Generator().manual_seed(check.seed)
    v = torch.ones(H) / H ** 0.5  # [H]
    router = torch.randn(E, H, generator=g) * 0.02  # [E, H]
    router[used:] = -10.0 * v
    x = (torch.randn(1, N, H, generator=g) + 8.0 * v).to(check.device, dtype).requires_grad_(True)
    grad_out = torch.randn(1, N, H, generator=g).to(check.device, dtype)
    weights = [router, torch.randn(E, 2 * inter, H, generator=g) * 0.02,
               torch.randn(E, H, inter, generator=g) * 0.02]
    with torch.random.fork_rng(), torch.device(check.device):
        torch.manual_seed(check.seed)
        layer = SMoELayer(*(w.to(check.device, dtype) for w in weights), act_fn=nn.SiLU(),
                          top_k=top_k, norm_topk_prob=False, lora_rank=shape.lora_rank,
                          lora_alpha=shape.lora_alpha)
        with torch.no_grad():  # B != 0, so A's gradient is not trivially zero
            layer.gate_up_lora.B.normal_(0.0, 0.02)
            layer.down_lora.B.normal_(0.0, 0.02)
    return layer, x, grad_out


def part_zero_grad(check: Check) -> dict[str, Any]:
    """Experts without tokens get exactly zero LoRA gradient; every gradient is finite."""
    E = layer_shape(check.quick).num_experts
    used, trials = max(8, E // 4), 3  # K = 8 must find 8 routable experts
    per_k: dict[str, Any] = {}
    for k in (1, 8):
        layer, x, grad_out = _skewed_layer(check, k, used)
        params = {f"{proj}.{part}": getattr(getattr(layer, proj), part)
                  for proj in ("gate_up_lora", "down_lora") for part in ("A", "B")}
        dtype = getattr(torch, check.dtype)
        pad = -layer.gate_up_lora.rank % (16 // dtype.itemsize)  # as smoe._pad_rank
        sizes = [p.shape for p in params.values()]  # the gradients, and grouped_mm's outputs
        sizes += [(p.shape[0], p.shape[1] + pad, p.shape[2]) if n.endswith("A")  # at padded rank
                  else (p.shape[0], p.shape[1], p.shape[2] + pad) for n, p in params.items()]
        rows = []
        for _ in range(trials):
            # Freed NaN blocks of the gradients' sizes: a gradient the kernel leaves
            # unwritten would read back as NaN instead of a lucky zero.
            poison = [torch.full(size, float("nan"), dtype=dtype, device=check.device)
                      for size in sizes for _ in range(2)]
            del poison
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(grad_out)
            empty = (layer.batch_expert_counts == 0).cpu()  # [E]
            row = {"empty_experts": int(empty.sum()),
                   "forced_empty_are_empty": bool(empty[used:].all()),
                   "input_grad_finite": bool(torch.isfinite(x.grad).all())}
            for name, p in params.items():
                grad = p.grad.detach().float().cpu()  # [E, ...]
                per_expert = grad.flatten(1).abs().amax(1)  # [E]
                row[name] = {"finite": bool(torch.isfinite(grad).all()),
                             "max_abs_on_empty": float(per_expert[empty].max()) if empty.any() else 0.0,
                             "used_all_nonzero": bool((per_expert[~empty] > 0).all())}
            row["ok"] = (row["forced_empty_are_empty"] and row["input_grad_finite"]
                         and all(row[n]["finite"] and row[n]["max_abs_on_empty"] == 0.0
                                 and row[n]["used_all_nonzero"] for n in params))
            rows.append(row)
        per_k[f"k{k}"] = rows
    ok = all(r["ok"] for rows in per_k.values() for r in rows)
    return {"num_experts": E, "routable_experts": used, "trials": trials, "dtype": check.dtype,
            "cases": per_k, "summary": {"ok": ok, "empty_experts": {k: rows[0]["empty_experts"]
                                                                   for k, rows in per_k.items()}}}


def part_step(check: Check) -> dict[str, Any]:
    """One local step of random OLMoE-1B-7B per K and per LoRA rank; time vs FLOP ratios."""
    from ubsmoe.bench.model_step import QUICK, StepConfig, step_benchmark

    step_cfg = QUICK if check.quick else StepConfig("olmoe_1b_7b", olmoe_sizes(), batch_size=8,
                                                    seq_len=256)
    res = step_benchmark(step_cfg, repeats=1 if check.quick else 5, warmup=0 if check.quick else 1,
                         seed=check.seed, device=check.device, dtype=check.dtype)
    cases = res["cases"]

    def rows(names: list[str], contrast: dict[str, Any]) -> dict[str, Any]:
        """Median ms, time ratio and measured / analytic FLOP ratios to the last case."""
        ref = cases[names[-1]]
        return {n: {"median_ms": 1e3 * cases[n]["median_s"],
                    "time_ratio": contrast["budgets"][n]["time_ratio"]["of_medians"],
                    "flop_ratio_measured": contrast["budgets"][n]["flops_ratio"],
                    "flop_ratio_analytic": cases[n]["flops_analytic"] / ref["flops_analytic"]}
                for n in names}

    ks = rows([n for n in cases if n.startswith("smoe_")], res["smoe"])
    ranks = rows([n for n in cases if n.startswith("lora_")], res["lora_rank"])
    k1 = ks["smoe_k1"]
    excess = k1["time_ratio"] / k1["flop_ratio_analytic"]
    summary = {"smoe": ks, "lora_rank": ranks, "k1_time_over_flop_ratio": excess,
               "target_met": excess <= TARGETS["step_k1_time_over_flop_ratio"]}
    return {"benchmark": res, "summary": summary}


def part_dispatch(check: Check) -> dict[str, Any]:
    """Non-view ATen operations (launches) of one local step on this device (issue 24).

    OLMoE-1B-7B's shape at 2 layers (tiny with ``quick``), K = 1 and 8, ``smoe`` and
    ``ubsmoe``, the frozen weights' dtype with float32 adapters, with
    ``train.adapter_dtype=compute`` and with ``train.fused_ops`` on top; ``full_depth_ops``
    estimates the 16 layers. On CUDA
    fused Adam and SDPA break down as they launch, so this is the CPU count's check.
    """
    from ubsmoe.bench.dispatch import OLMOE_1B_7B_2L, OLMOE_1B_7B_LAYERS, dispatch_counts
    from ubsmoe.bench.model_step import QUICK

    step_cfg = QUICK if check.quick else OLMOE_1B_7B_2L
    dtypes = [check.dtype] + ([f"{check.dtype}_compute", f"{check.dtype}_compute_fused"]
                              if check.dtype != "float32" else [f"{check.dtype}_fused"])
    res = dispatch_counts(step_cfg, check.seed, ks=[1, 8], dtypes=dtypes, methods=["smoe", "ubsmoe"],
                          full_depth=None if check.quick else OLMOE_1B_7B_LAYERS, device=str(check.device))
    keys = ("ops", "optimizer_ops", "masters_ops", "method_ops", "total_ops", "full_depth_ops")
    summary = {d: {m: {k: {key: c.get(key) for key in keys} for k, c in per_k.items()}
                   for m, per_k in per_m.items()} for d, per_m in res["models"].items()}
    k1_le_k8 = all(per_k["1"]["total_ops"] <= per_k["8"]["total_ops"]
                   for per_m in res["models"].values() for per_k in per_m.values())
    return {"counts": res, "summary": {"ops": summary, "k1_total_le_k8": k1_le_k8}}


def part_fast_step(check: Check) -> dict[str, Any]:
    """Local step per K with ``train.adapter_dtype=compute``: eager, ``train.fused_ops``, ``train.compile`` (issue 24).

    Same model and batch as ``step``; compile costs one compilation per K (untimed
    warm-up). Reports per variant the median ms and K1/K8 time ratio against the FLOP
    ratio (target: within 1.15x, and the compiled step's time per K).
    """
    from ubsmoe.bench.model_step import QUICK, StepConfig, step_benchmark
    from ubsmoe.config import TrainConfig

    step_cfg = QUICK if check.quick else StepConfig("olmoe_1b_7b", olmoe_sizes(), batch_size=8,
                                                    seq_len=256)
    adapters = "compute" if check.dtype != "float32" else "float32"
    out, summary = {}, {}
    for name, compiled, fused in (("eager", False, False), ("fused", False, True), ("compiled", True, False)):
        cfg = TrainConfig(adapter_dtype=adapters, compile=compiled, fused_ops=fused)
        try:
            res = step_benchmark(step_cfg, repeats=1 if check.quick else 5, warmup=1 if compiled else
                                 (0 if check.quick else 1), seed=check.seed, device=check.device,
                                 dtype=check.dtype, ks=[1, 8], ranks=[16, 40], train_cfg=cfg)
        except Exception as e:  # noqa: BLE001  (e.g. compile unsupported here: the other variant still counts)
            out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            summary[name] = {"error": out[name]["error"]}
            continue
        cases = res["cases"]
        k1 = res["smoe"]["budgets"]["smoe_k1"]
        flop = cases["smoe_k1"]["flops_analytic"] / cases["smoe_k8"]["flops_analytic"]
        out[name] = res
        summary[name] = {"median_ms": {k: 1e3 * cases[k]["median_s"] for k in ("smoe_k1", "smoe_k8")},
                         "k1_k8_time_ratio": k1["time_ratio"]["of_medians"], "flop_ratio": flop,
                         "k1_time_over_flop_ratio": k1["time_ratio"]["of_medians"] / flop}
    if any("error" in v for v in out.values()) and all("error" in v for v in out.values()):
        raise RuntimeError(f"fast_step: every variant failed: {summary}")
    return {"adapter_dtype": adapters, "benchmark": out, "summary": summary}


def iid_setup(cfg):
    """Data, tokenizer and a seeded IID client split, as ``shared_setup`` without Flower Datasets.

    The training records are permuted with ``numpy.random.default_rng(seed)`` and cut
    into ``fl.num_clients`` near-equal contiguous shards (``numpy.array_split``).
    """
    import numpy as np

    from ubsmoe.data.commonsense import load_commonsense
    from ubsmoe.data.prompts import format_prompt
    from ubsmoe.fl.client_runtime import SharedSetup
    from ubsmoe.models.tokenizer import cache_dir, train_tokenizer

    data = load_commonsense(cfg.data, cfg.train.seed)
    texts = [format_prompt(r) + r["output"] for r in data.train]
    tokenizer = train_tokenizer(texts, cfg.model.tiny.vocab_size, cache_dir(cfg.model))
    order = np.random.default_rng(cfg.train.seed).permutation(len(data.train))
    parts = [sorted(p.tolist()) for p in np.array_split(order, cfg.fl.num_clients)]
    return SharedSetup(data=data, tokenizer=tokenizer, partitions=parts)


def run_config(check: Check, sizes, tmp: str, overrides: list[str]):
    """A one-round UB-SMoE config on ``check``'s data, device and dtype with model sizes ``sizes``.

    Both protocols are evaluated, the PG diagnostic probe is off (the parts time
    training and evaluation, not the diagnostic), the tokenizer is cached under ``tmp``;
    ``overrides`` come last.
    """
    from ubsmoe.config import load_config

    return load_config(overrides=[
        "method=ubsmoe", f"data.path={check.data}", "data.train_examples=0", "fl.rounds=1",
        "eval.protocols=[generation,loglik]", "eval.pg_probe_examples=0",
        f"model.dtype={check.dtype}", f"model.device={check.device}", f"model.tokenizer_cache={tmp}/cache",
        *(f"model.tiny.{k}={v}" for k, v in asdict(sizes).items()), *overrides])


def part_round(check: Check) -> dict[str, Any]:
    """One UB-SMoE round (4 clients x 4 steps; quick: 2 x 1) and the evaluation at every budget."""
    from ubsmoe.bench.model_step import OLMOE_MEDIUM
    from ubsmoe.config import TinyModelConfig
    from ubsmoe.fl.client_runtime import ClientRuntime
    from ubsmoe.fl.server import Server
    from ubsmoe.io import read_jsonl

    if check.quick:  # three tasks only: a few seconds on a busy CPU
        choice, sizes = "quick", replace(TinyModelConfig(), vocab_size=512)
        clients, steps, batch, n_eval, new_tokens, max_len = 2, 1, 2, 2, 2, 128
        tasks = ["data.tasks=[boolq,piqa,ARC-Easy]"]
    else:
        choice = check.round_model
        sizes = olmoe_sizes() if choice == "full" else OLMOE_MEDIUM.sizes
        clients, steps, batch, n_eval, new_tokens, max_len = 4, 4, 8, 16, 8, 256
        tasks = []
    with tempfile.TemporaryDirectory(prefix="ubsmoe-gpu-check-") as tmp:
        cfg = run_config(check, sizes, tmp, [
            f"data.max_length={max_len}", f"fl.num_clients={clients}",
            f"train.batch_size={batch}", f"train.max_local_steps={steps}",
            f"eval.examples_per_task={n_eval}", f"eval.max_new_tokens={new_tokens}",
            "eval.batch_size=16", *tasks])
        start = time.perf_counter()
        setup = iid_setup(cfg)
        setup_s = time.perf_counter() - start
        server = Server(cfg, Path(tmp) / "run", setup)  # both models built on model.device
        runtime = ClientRuntime(cfg, setup)
        build_s = time.perf_counter() - start - setup_s
        # Adapters, replies and batches cross as CPU tensors, as Flower delivers them; the
        # library moves them to and from model.device.
        start = time.perf_counter()
        updates = [runtime.train_round(**server.client_task(c, 1)) for c in server.sample_clients(1)]
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        record = server.end_round(1, updates)  # aggregation, diagnostics, evaluation, checkpoint
        end_s = time.perf_counter() - start
        eval_s = next(r["eval_s"] for r in read_jsonl(Path(tmp) / "run" / "metrics.jsonl")
                      if r["type"] == "timing")
    rows = [{k: r[k] for k in ("budget", "top_k", "lora_rank", "protocol", "average", "n")}
            for r in server.last_eval]
    evaluations = len({(r["top_k"], r["lora_rank"]) for r in rows})
    scored = evaluations * sum(rows[0]["n"].values())  # each example under both protocols
    examples = sum(min(c["examples"], int(c["steps"]) * batch) for c in record["clients"])  # trained
    tokens = sum(c["tokens"] for c in record["clients"])
    round_s = train_s + end_s - eval_s
    n_params = sum(p.numel() for p in runtime.model.parameters())
    return {
        "model": {"choice": choice, "sizes": asdict(sizes), "vocab_size": len(setup.tokenizer),
                  "parameters": n_params, "dtype": check.dtype, "device": str(check.device)},
        "setting": {"method": "ubsmoe", "clients": clients, "local_steps": steps, "batch_size": batch,
                    "max_length": max_len, "eval_examples_per_task": n_eval,
                    "max_new_tokens": new_tokens, "partition": "seeded IID split (iid_setup)",
                    "placement": "models on model.device; batches, adapters and replies "
                                 "cross as CPU tensors"},
        "setup_s": setup_s, "build_s": build_s,
        "clients": record["clients"], "train_loss": record["loss"],
        "summary": {"round_s": round_s, "train_s": train_s, "aggregate_s": record["aggregate_s"],
                    "train_examples_per_s": examples / train_s, "train_tokens_per_s": tokens / train_s,
                    "eval_s": eval_s, "eval_examples": scored, "eval_examples_per_s": scored / eval_s,
                    "eval_rows": rows},
    }


# LLM-Adapters' commonsense test sets (examples), the paper's full evaluation: 22,419.
TEST_SET_SIZES = {"boolq": 3270, "piqa": 1838, "social_i_qa": 1954, "hellaswag": 10042,
                  "winogrande": 1267, "ARC-Easy": 2376, "ARC-Challenge": 1172, "openbookqa": 500}


def part_eval(check: Check) -> dict[str, Any]:
    """Evaluation throughput of the full-size server model; minutes per method projected.

    The server of a UB-SMoE run (random OLMoE-1B-7B, bfloat16) scores the test records
    of ``--data`` (at most 128 per task) with :func:`ubsmoe.eval.commonsense.evaluate_task`
    one protocol at a time, as :meth:`Server.evaluate_one` does: first every budget level
    at ``eval.batch_size`` 64, then K = 8 at batch sizes 128 and 16, then K = 8
    log-likelihood with one sequence per candidate (``share_prefix=False``, the earlier
    path). A case starts only while the part has run for less than 120 s (quick: no
    limit); later ones are listed in ``skipped``. Generation runs
    ``eval.max_new_tokens`` = 16 (the paper-scale setting): random weights never write an
    answer label, so no row stops early and generation is timed at its worst case.

    The projection is the paper's evaluation of one method: every budget level, both
    protocols, the full test sets (:data:`TEST_SET_SIZES`), each task at its measured
    rate at batch size 64; a task absent from ``--data`` (HellaSwag is not shipped) at
    the rate of all measured tasks together, named in ``rate_of_all_tasks_for``.
    """
    from ubsmoe.config import TinyModelConfig
    from ubsmoe.data.commonsense import answer_choices
    from ubsmoe.data.prompts import format_prompt
    from ubsmoe.eval.commonsense import evaluate_task
    from ubsmoe.eval.loglik import choice_logprobs
    from ubsmoe.fl.server import Server

    if check.quick:
        sizes, per_task, new_tokens, budget_s = replace(TinyModelConfig(), vocab_size=512), 4, 2, None
        main_batch, other_batches, tasks = 2, (4, 1), ["data.tasks=[boolq,piqa,ARC-Easy]"]
    else:
        sizes, per_task, new_tokens, budget_s = olmoe_sizes(), 128, 16, 120.0
        main_batch, other_batches, tasks = 64, (128, 16), []
    sync = torch.cuda.synchronize if check.device.type == "cuda" else (lambda *a: None)
    cases: list[dict[str, Any]] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ubsmoe-gpu-check-") as tmp:
        cfg = run_config(check, sizes, tmp, [f"eval.examples_per_task={per_task}",
                                             f"eval.max_new_tokens={new_tokens}", *tasks])
        start = time.perf_counter()
        server = Server(cfg, Path(tmp) / "run", iid_setup(cfg))
        build_s = time.perf_counter() - start
        tests = server.test_sets
        model, tokenizer = server.model, server.tokenizer
        levels = list(range(len(cfg.fl.budgets)))[::-1]  # K = 8 first
        level_k = list(server.level_top_k().values())
        plan = [(main_batch, level, p, True) for level in levels for p in ("generation", "loglik")]
        plan += [(b, levels[0], p, True) for b in other_batches for p in ("generation", "loglik")]
        plan += [(main_batch, levels[0], "loglik", False)]
        first = next(iter(tests))  # warm-up: kernels, allocator and caches, not timed
        evaluate_task(model, tokenizer, first, tests[first][:2], ["generation", "loglik"], 2, 2)
        begin = time.perf_counter()
        for batch, level, protocol, share in plan:
            name = f"b{batch}_k{level_k[level]}_{protocol}" + ("" if share else "_separate")
            if budget_s is not None and time.perf_counter() - begin > budget_s:
                skipped.append(name)
                continue
            beta, k, rank = server.set_level(level, 1)
            per_task_s: dict[str, float] = {}
            for task, records in tests.items():
                sync()
                t0 = time.perf_counter()
                if share:
                    evaluate_task(model, tokenizer, task, records, [protocol], batch, new_tokens)
                else:
                    choice_logprobs(model, tokenizer, [format_prompt(r) for r in records],
                                    [answer_choices(task, r) for r in records], batch,
                                    share_prefix=False)
                sync()
                per_task_s[task] = time.perf_counter() - t0
            n = {task: len(records) for task, records in tests.items()}
            total_s = sum(per_task_s.values())
            cases.append({"name": name, "batch_size": batch, "budget": beta, "top_k": k,
                          "lora_rank": rank, "protocol": protocol, "share_prefix": share,
                          "examples": n, "seconds": per_task_s, "total_s": total_s,
                          "examples_per_s": sum(n.values()) / total_s})
    main = [c for c in cases if c["batch_size"] == main_batch and c["share_prefix"]]
    measured = {(c["top_k"], c["protocol"]) for c in main}
    summary: dict[str, Any] = {
        "examples_per_s": {c["name"]: c["examples_per_s"] for c in cases},
        "batch_size": main_batch, "max_new_tokens": new_tokens, "skipped": skipped,
        "generation_stops_early": False,
    }
    if len(measured) == 2 * len(levels):
        minutes, absent = 0.0, sorted(set(TEST_SET_SIZES) - set(tests))
        for c in main:
            rate_all = c["examples_per_s"]
            for task, size in TEST_SET_SIZES.items():
                rate = c["examples"][task] / c["seconds"][task] if task in c["seconds"] else rate_all
                minutes += size / rate / 60.0
        summary.update(projected_minutes_per_method=minutes, target_minutes=10.0,
                       target_met=minutes <= 10.0, rate_of_all_tasks_for=absent,
                       test_examples=sum(TEST_SET_SIZES.values()))
    ref = {c["name"]: c for c in cases}
    shared = ref.get(f"b{main_batch}_k{level_k[levels[0]]}_loglik")
    separate = ref.get(f"b{main_batch}_k{level_k[levels[0]]}_loglik_separate")
    if shared and separate:
        summary["loglik_shared_prefix_speedup"] = separate["total_s"] / shared["total_s"]
    return {"model": {"sizes": asdict(sizes), "dtype": check.dtype, "device": str(check.device),
                      "vocab_size": len(tokenizer)},
            "build_s": build_s, "examples_per_task": per_task, "cases": cases, "summary": summary}

PARTS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "layer": part_layer, "zero_grad": part_zero_grad, "step": part_step, "round": part_round,
    "eval": part_eval, "dispatch": part_dispatch, "fast_step": part_fast_step}


# ----- running, report ----------------------------------------------------------------
def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device name and CUDA details (JSON-ready)."""
    import peft
    import transformers

    env = {"python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__, "cuda_version": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "device": str(device),
           "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, device_memory_mib=props.total_memory / 2**20,
                   capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def run_part(name: str, check: Check) -> dict[str, Any]:
    """Run one part: result or error + traceback, wall time and peak GPU memory (MiB)."""
    cuda = check.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(check.device)
        torch.cuda.reset_peak_memory_stats(check.device)
    start = time.perf_counter()
    entry: dict[str, Any] = {"status": "ok", "error": None, "traceback": None}
    try:
        entry.update(PARTS[name](check))
        if cuda:
            torch.cuda.synchronize(check.device)
    except Exception as e:  # noqa: BLE001  (recorded; the next part still runs)
        entry.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
    entry["wall_s"] = time.perf_counter() - start
    entry["peak_gpu_memory_mib"] = None
    gc.collect()
    if cuda:
        try:  # a broken CUDA context raises here too: keep the part's own error
            entry["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated(check.device) / 2**20
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            entry["peak_gpu_memory_error"] = f"{type(e).__name__}: {e}"
    return entry


def make_data_subset(src: str | Path, dst: str | Path, per_task: int, seed: int = 0) -> dict[str, Any]:
    """Copy at most ``per_task`` train and ``per_task`` test records of every task folder.

    LLM-Adapters layout (``<task>/train.json``, ``<task>/test.json``); a seeded sample
    in file order, written compactly (atomic writes); ``DATA_LICENSE`` and ``README.md``
    are copied along.

    Args:
        src: the full commonsense folder.
        dst: the new folder (created).
        per_task: records kept per task and split, >= 1.
        seed: sample seed.

    Returns:
        ``{task: {split: records}}`` and ``bytes``, the subset's total size.

    Raises:
        ValueError: ``per_task < 1`` or ``src`` holds no task folder.
    """
    import numpy as np

    from ubsmoe.io import atomic_write_text

    src, dst = Path(src), Path(dst)
    if per_task < 1:
        raise ValueError(f"--per-task: got {per_task}, expected an integer >= 1")
    counts: dict[str, Any] = {}
    for file in sorted(src.glob("*/*.json")):
        if file.name not in ("train.json", "test.json"):
            continue
        records = json.loads(file.read_text(encoding="utf-8"))
        keep = np.sort(np.random.default_rng(seed).permutation(len(records))[:per_task])
        atomic_write_text(dst / file.parent.name / file.name,
                          json.dumps([records[int(i)] for i in keep], ensure_ascii=False))
        counts.setdefault(file.parent.name, {})[file.stem] = len(keep)
    if not counts:
        raise ValueError(f"--make-data-subset: no <task>/train.json or test.json under {str(src)!r}")
    for extra in ("DATA_LICENSE", "README.md"):
        if (src / extra).is_file():
            atomic_write_text(dst / extra, (src / extra).read_text(encoding="utf-8"))
    return {"tasks": counts, "bytes": sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="", help="LLM-Adapters commonsense folder (needed by round)")
    p.add_argument("--out", default="", help="report JSON, rewritten after every part")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes: checks the code paths")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--round-model", default="full", choices=("full", "medium"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--make-data-subset", nargs=2, metavar=("SRC", "DST"))
    p.add_argument("--per-task", type=int, default=64)
    return p.parse_args(argv)


def usage_errors(args: argparse.Namespace, parts: list[str]) -> list[str]:
    """One line per missing or bad argument, each naming it (empty: the usage is fine)."""
    errors = []
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        errors.append(f"--parts: got {args.parts!r}, expected a comma-separated subset of {','.join(PARTS)}")
    if not args.out:
        errors.append("--out: missing; give the report JSON path (rewritten after every part)")
    needs_data = [p for p in ("round", "eval") if p in parts]
    if needs_data and not args.data:
        errors.append(f"--data: missing; the {' and '.join(needs_data)} part{'s' if len(needs_data) > 1 else ''} "
                      "read the LLM-Adapters commonsense folder")
    return errors


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts and write the report; 0 if every part ran, 1 if one failed, 2 on bad usage."""
    from ubsmoe.io import atomic_write_json

    args = _parse(argv)
    if args.make_data_subset:
        info = make_data_subset(*args.make_data_subset, args.per_task, args.seed)
        print(json.dumps(info))
        return 0
    parts = [p for p in args.parts.split(",") if p]
    errors = usage_errors(args, parts)
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if errors:
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    check = Check(device=torch.device(args.device), dtype=args.dtype, quick=args.quick,
                  data=args.data, round_model=args.round_model, seed=args.seed)
    report: dict[str, Any] = {
        "schema": SCHEMA, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick, "targets": TARGETS, "environment": {}, "parts": {}, "summary": {}}
    try:
        report["environment"] = environment(check.device)
    except Exception as e:  # noqa: BLE001  (the parts still run and report their own errors)
        report["environment"] = {"error": f"{type(e).__name__}: {e}"}
    atomic_write_json(Path(args.out), report)
    for name in parts:
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        entry = run_part(name, check)
        report["parts"][name] = entry
        report["summary"][name] = entry.get("summary", {"error": entry["error"]})
        atomic_write_json(Path(args.out), report)
        print(f"[gpu_check] {name}: {entry['status']} in {entry['wall_s']:.1f} s"
              + (f" ({entry['error']})" if entry["error"] else ""), file=sys.stderr, flush=True)
    return 0 if all(e["status"] == "ok" for e in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
