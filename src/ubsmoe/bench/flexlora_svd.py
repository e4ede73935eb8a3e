"""Benchmark: FlexLoRA aggregation in factored form vs the dense SVD it replaces.

FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024, arXiv 2402.11505) aggregates
dW = sum_c p_c s_c B_c A_c, takes its SVD and gives a rank-r client
A = V_r^T, B = U_r diag(S_r) / s (DESIGN.md section 5). :func:`run_benchmark` times, in
one run, at the OLMoE-1B-7B module shapes ubsmoe puts LoRA on (hidden d = 2048, expert
intermediate I = 1024):

- ``attn``: q/k/v/o projections, ``[d, d]`` = 2048 x 2048;
- ``expert_gate_up``: an expert's fused gate+up projection ``[2I, d]`` = 2048 x 2048
  (the SMoE layer's ``gate_up_proj`` layout);
- ``expert_down``: an expert's down projection ``[d, I]`` = 2048 x 1024;

for two variants of one module's aggregation + redistribution to every client rank:

- factored: ``stack_lora`` + ``factored_svd`` (two QRs and a small SVD, float64
  internally) + ``flexlora_redistribute``, as :class:`~ubsmoe.methods.flexlora.FlexLoRA`;
- dense: materialise dW ([out, in], float32), ``torch.linalg.svd(dW,
  full_matrices=False)``, ``flexlora_redistribute``.

Setup: 8 clients, ranks cycling 12, 16, 24, 40 (R = 184), alpha = 16 (s = alpha / r),
random p_c, float32 inputs, CPU, ``torch.set_num_threads(threads)`` in the parent and
in every memory subprocess (reported).

Timing: all variants in this process (``time.perf_counter``, after warm-up runs),
interleaved per repeat, median/min/max seconds over ``repeats``; the speedup is the
ratio of the medians (also reported per repeat). Memory: each (module, variant) runs once more
in a fresh subprocess that resets its peak RSS (``/proc/self/clear_refs``), runs the
aggregation and reports the peak (``VmHWM``) minus its RSS just before it, so the
figure includes LAPACK workspaces and allocator overhead (Linux only; ``None`` where the
kernel refuses the reset). The report also lists the bytes of the largest tensors
each variant holds at once (analytic lower bound).

The factored form must be at least ``required_speedup`` (10x) faster than the dense
SVD for the 2048 x 2048 modules; ``passed`` says whether it was.

Usage::

    python -m ubsmoe.bench.flexlora_svd --out flexlora_svd.json --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ubsmoe.core.lora import factored_svd, stack_lora
from ubsmoe.methods.flexlora import flexlora_redistribute

CLIENT_RANKS = [12, 16, 24, 40]
NUM_CLIENTS = 8
ALPHA = 16.0
SEED = 0
CHECK_RANK = 40  # rank at which factored and dense results are compared
REQUIRED_SPEEDUP = 10.0
OLMOE_LAYERS, OLMOE_EXPERTS, OLMOE_ATTN_MODULES = 16, 64, 4


def module_shapes(dim: int, inter: int) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of the benchmarked modules (OLMoE-1B-7B: dim 2048, expert inter 1024)."""
    return {"attn": (dim, dim), "expert_gate_up": (2 * inter, dim), "expert_down": (dim, inter)}


def make_clients(out_features: int, in_features: int, seed: int = SEED
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[float], list[float]]:
    """Random client factors of one module.

    Returns:
        ``(As, Bs, scales, weights)``: per client A_c ``[r_c, in]``, B_c ``[out, r_c]``
        (float32), s_c = alpha / r_c and p_c (summing to 1).
    """
    g = torch.Generator().manual_seed(seed)
    ranks = [CLIENT_RANKS[c % len(CLIENT_RANKS)] for c in range(NUM_CLIENTS)]
    As = [torch.randn(r, in_features, generator=g) / in_features**0.5 for r in ranks]
    Bs = [0.01 * torch.randn(out_features, r, generator=g) for r in ranks]
    scales = [ALPHA / r for r in ranks]
    p = torch.rand(NUM_CLIENTS, generator=g, dtype=torch.float64) + 0.5
    weights = (p / p.sum()).tolist()
    return As, Bs, scales, weights


def run_factored(As, Bs, scales, weights):
    """Stack, factored SVD, redistribute to every client rank; never forms dW.

    Returns:
        ``((U [out, q], S [q], Vh [q, in]), [(A_r, B_r) per client rank])``.
    """
    A_st, B_st = stack_lora(As, Bs, scales, weights)  # [R, in], [out, R]
    U, S, Vh = factored_svd(B_st, A_st)  # [out, q], [q], [q, in]
    factors = [flexlora_redistribute(U, S, Vh, r, ALPHA / r) for r in CLIENT_RANKS]
    return (U, S, Vh), factors


def run_dense(As, Bs, scales, weights):
    """Reference: materialise dW ``[out, in]`` and take its dense thin SVD.

    Returns:
        As :func:`run_factored`, with ``q = min(out, in)``.
    """
    dW = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=As[0].dtype)  # [out, in]
    for A, B, s, p in zip(As, Bs, scales, weights, strict=True):
        dW.addmm_(B, A, alpha=p * s)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)  # [out, q], [q], [q, in]
    factors = [flexlora_redistribute(U, S, Vh, r, ALPHA / r) for r in CLIENT_RANKS]
    return (U, S, Vh), factors


VARIANTS: dict[str, Callable] = {"factored": run_factored, "dense": run_dense}


def theoretical_bytes(variant: str, out_features: int, in_features: int) -> int:
    """Bytes of the largest tensors a variant holds at once (a lower bound).

    factored: float64 copies of B_st and A_st^T, Q_B, Q_A and U (all [*, R]) plus the
    float32 U and Vh; dense: dW, the copy LAPACK factorises, and U and Vh (float32),
    without the LAPACK workspace.
    """
    R = sum(CLIENT_RANKS[c % len(CLIENT_RANKS)] for c in range(NUM_CLIENTS))
    if variant == "factored":
        q = min(out_features, in_features, R)
        f64 = 8 * (2 * out_features * R + 2 * in_features * R + out_features * q)
        return f64 + 4 * q * (out_features + in_features)
    q = min(out_features, in_features)
    return 4 * (2 * out_features * in_features + q * (out_features + in_features))


def _proc_status_bytes(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel refuses.

    getrusage's max RSS is useless here: Linux carries it over from the parent
    across fork + exec, so a child spawned by a large parent reports the parent's peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory_child(variant: str, out_features: int, in_features: int) -> dict[str, Any]:
    """Run one aggregation in this (fresh) process and report RSS figures in MiB."""
    clients = make_clients(out_features, in_features)
    if not _reset_peak_rss():
        return {"peak_rss_delta_mib": None, "note": "cannot reset VmHWM on this system"}
    rss_before = _proc_status_bytes("VmRSS")
    VARIANTS[variant](*clients)
    peak_after = _proc_status_bytes("VmHWM")
    mib = 2**20
    return {
        "rss_before_mib": rss_before / mib,
        "peak_rss_after_mib": peak_after / mib,
        "peak_rss_delta_mib": (peak_after - rss_before) / mib,
    }


def measure_memory(variant: str, name: str, dim: int, inter: int, threads: int) -> dict[str, Any]:
    """Spawn a subprocess for one (module, variant) and return its RSS report (MiB).

    Raises:
        subprocess.CalledProcessError: the child failed.
    """
    cmd = [sys.executable, "-m", "ubsmoe.bench.flexlora_svd", "--child", variant,
           "--module", name, "--dim", str(dim), "--inter", str(inter), "--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_variants(clients, repeats: int, warmup: int) -> dict[str, dict[str, Any]]:
    """Wall seconds of every variant on ``clients``, interleaved.

    Each repeat runs every variant once, one after the other, so that a change in the
    machine's load hits all variants of that repeat alike; the speedup is then taken
    per repeat (dense / factored) as well as from the medians.

    Returns:
        Per variant ``{"median_s", "min_s", "max_s", "times_s"}``.
    """
    for _ in range(warmup):
        for fn in VARIANTS.values():
            fn(*clients)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant, fn in VARIANTS.items():
            t0 = time.perf_counter()
            fn(*clients)
            times[variant].append(time.perf_counter() - t0)
    return {v: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "times_s": t}
            for v, t in times.items()}


def check_agreement(clients) -> dict[str, Any]:
    """Relative differences between factored and dense results (float32 dense)."""
    (U_f, S_f, Vh_f), _ = run_factored(*clients)
    (U_d, S_d, Vh_d), _ = run_dense(*clients)
    r = CHECK_RANK
    prod_f = U_f[:, :r] @ torch.diag(S_f[:r]) @ Vh_f[:r]
    prod_d = U_d[:, :r] @ torch.diag(S_d[:r]) @ Vh_d[:r]
    return {
        "rank": r,
        "max_rel_singular_value_diff": float(((S_f[:r] - S_d[:r]).abs() / S_d[0]).max()),
        "rel_rank_r_product_diff": float(torch.linalg.norm(prod_f - prod_d)
                                         / torch.linalg.norm(prod_d)),
    }


def run_benchmark(dim: int = 2048, inter: int = 1024, repeats: int = 5, warmup: int = 1,
                  threads: int | None = None, memory: bool = True,
                  required_speedup: float = REQUIRED_SPEEDUP,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time (and measure the memory of) factored vs dense FlexLoRA aggregation, one report.

    Args:
        dim: hidden size d (OLMoE-1B-7B: 2048).
        inter: expert intermediate size I (OLMoE-1B-7B: 1024).
        repeats: timed runs per (module, variant).
        warmup: untimed runs per (module, variant) before timing.
        threads: ``torch.set_num_threads`` for this process and the memory
            subprocesses (None: keep torch's current count, which is then reported).
        memory: also measure peak RSS per (module, variant) in subprocesses.
        required_speedup: the dense/factored median time ratio the square
            ``[dim, dim]`` modules must reach.
        log: receives one progress line per module.

    Returns:
        The JSON-able report: setup, per-module timings (seconds), speedups,
        agreement, memory (MiB), an extrapolation to all of OLMoE-1B-7B's LoRA modules
        and ``passed``.

    Raises:
        ValueError: ``repeats < 1``, ``warmup < 0`` or ``threads < 1``.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads: got {threads}, expected an integer >= 1")
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    load_start = os.getloadavg()  # other work on the machine skews the timings
    results: dict[str, Any] = {}
    for name, (out_features, in_features) in module_shapes(dim, inter).items():
        clients = make_clients(out_features, in_features)
        entry: dict[str, Any] = {"shape_out_in": [out_features, in_features]}
        for variant, stats in time_variants(clients, repeats, warmup).items():
            stats["theoretical_peak_tensor_mib"] = (
                theoretical_bytes(variant, out_features, in_features) / 2**20)
            if memory:
                stats.update(measure_memory(variant, name, dim, inter, threads))
            entry[variant] = stats
        entry["speedup_median"] = entry["dense"]["median_s"] / entry["factored"]["median_s"]
        entry["speedup_per_repeat"] = [d / f for d, f in zip(entry["dense"]["times_s"],
                                                             entry["factored"]["times_s"], strict=True)]
        entry["agreement"] = check_agreement(clients)
        results[name] = entry
        log(f"{name:15s} [{out_features}x{in_features}] factored "
            f"{entry['factored']['median_s'] * 1e3:8.1f} ms, dense "
            f"{entry['dense']['median_s'] * 1e3:8.1f} ms, speedup {entry['speedup_median']:6.1f}x")
    square = [n for n, e in results.items() if e["shape_out_in"] == [dim, dim]]
    per_layer = {
        v: OLMOE_ATTN_MODULES * results["attn"][v]["median_s"]
        + OLMOE_EXPERTS * (results["expert_gate_up"][v]["median_s"] + results["expert_down"][v]["median_s"])
        for v in VARIANTS
    }
    return {
        "benchmark": "flexlora_svd",
        "torch_version": torch.__version__,
        "torch_num_threads": threads,
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15_start": list(load_start),
        "loadavg_1_5_15_end": list(os.getloadavg()),
        "platform": platform.platform(),
        "dtype": "float32 inputs; factored path computes in float64 internally",
        "dim": dim,
        "expert_intermediate": inter,
        "num_clients": NUM_CLIENTS,
        "client_ranks": [CLIENT_RANKS[c % len(CLIENT_RANKS)] for c in range(NUM_CLIENTS)],
        "redistribute_ranks": CLIENT_RANKS,
        "alpha": ALPHA,
        "repeats": repeats,
        "warmup": warmup,
        "memory_method": (
            "peak_rss_delta_mib: per (module, variant) fresh subprocess with the same thread "
            "count, peak RSS (VmHWM, reset via /proc/self/clear_refs just before) after one "
            "aggregation minus RSS just before it; theoretical_peak_tensor_mib: bytes of the "
            "largest simultaneously held tensors (analytic lower bound, excludes LAPACK "
            "workspace)"
        ) if memory else "not measured (memory=False); theoretical_peak_tensor_mib only",
        "modules": results,
        "olmoe_1b_7b_extrapolation_s": {
            "note": (f"median seconds x module count: per layer {OLMOE_ATTN_MODULES} attention + "
                     f"{OLMOE_EXPERTS} x (expert gate_up + down) modules; {OLMOE_LAYERS} layers"),
            "per_layer": per_layer,
            "model": {v: OLMOE_LAYERS * t for v, t in per_layer.items()},
        },
        "required_speedup": required_speedup,
        "required_for": square,
        "speedup_rule": "passed: speedup_median (dense median / factored median) >= required",
        "passed": all(results[n]["speedup_median"] >= required_speedup for n in square),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per variant")
    ap.add_argument("--dim", type=int, default=2048, help="hidden size (OLMoE: 2048)")
    ap.add_argument("--inter", type=int, default=1024, help="expert intermediate size (OLMoE: 1024)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--skip-memory", action="store_true", help="no RSS subprocesses")
    ap.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--module", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit status 1 when the required speedup is not reached."""
    args = parse_args(argv)
    if args.child:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        out_features, in_features = module_shapes(args.dim, args.inter)[args.module]
        print(json.dumps(measure_memory_child(args.child, out_features, in_features)))
        return 0
    result = run_benchmark(args.dim, args.inter, args.repeats, args.warmup, args.threads,
                           memory=not args.skip_memory)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    print(f"factored >= {result['required_speedup']:g}x faster on {', '.join(result['required_for'])}: "
          f"{'yes' if result['passed'] else 'NO'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
