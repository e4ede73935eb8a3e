"""Benchmark: FlexLoRA aggregation in factored form vs the dense reference.

FlexLoRA (Bai et al., "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024) aggregates
dW = sum_c p_c s_c B_c A_c, takes its SVD and gives a rank-r client
A = V_r^T, B = U_r diag(S_r) / s. This script times, at OLMoE-1B-7B module shapes,

- factored: ``stack_lora`` + ``factored_svd`` (two QRs and a small SVD, float64
  internally) + ``flexlora_redistribute`` to each client rank;
- dense: materialise dW ([out, in], float32), ``torch.linalg.svd(dW,
  full_matrices=False)``, ``flexlora_redistribute`` to each client rank.

Setup: 8 clients, ranks cycling [12, 16, 24, 40] (R = 184), alpha = 16 (s = alpha / r),
random p_c, float32 inputs, CPU. Modules (``[out, in]``): attention ``[dim, dim]``,
expert up/gate ``[inter, dim]``, expert down ``[dim, inter]``.

Timing: all variants in this process (``time.perf_counter``, after warm-up runs),
median/min/max seconds over ``--repeats``. Memory: each (module, variant) runs once
more in a fresh subprocess that resets its peak RSS (``/proc/self/clear_refs``), runs
the aggregation and reports the peak (``VmHWM``) minus its RSS just before it, so the
figure includes LAPACK workspaces and allocator overhead (Linux only); the JSON also lists the theoretical bytes of the largest
tensors each variant holds at once (a lower bound).

Usage::

    python benchmarks/flexlora_svd.py --out flexlora_svd.json --repeats 3
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
from pathlib import Path

import torch

from ubsmoe.methods.lowrank import factored_svd, flexlora_redistribute, stack_lora

CLIENT_RANKS = [12, 16, 24, 40]
NUM_CLIENTS = 8
ALPHA = 16.0
SEED = 0
CHECK_RANK = 40  # rank at which factored and dense results are compared


def module_shapes(dim: int, inter: int) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of the benchmarked modules (OLMoE: dim 2048, expert inter 1024)."""
    return {"attn": (dim, dim), "expert_up": (inter, dim), "expert_down": (dim, inter)}


def make_clients(out_features: int, in_features: int, seed: int = SEED):
    """Random client factors: A_c ``[r_c, in]``, B_c ``[out, r_c]``, s_c, p_c (float32)."""
    g = torch.Generator().manual_seed(seed)
    ranks = [CLIENT_RANKS[c % len(CLIENT_RANKS)] for c in range(NUM_CLIENTS)]
    As = [torch.randn(r, in_features, generator=g) / in_features**0.5 for r in ranks]
    Bs = [0.01 * torch.randn(out_features, r, generator=g) for r in ranks]
    scales = [ALPHA / r for r in ranks]
    p = torch.rand(NUM_CLIENTS, generator=g, dtype=torch.float64) + 0.5
    weights = (p / p.sum()).tolist()
    return As, Bs, scales, weights


def run_factored(As, Bs, scales, weights):
    """Stack, factored SVD, redistribute to every client rank; never forms dW."""
    A_st, B_st = stack_lora(As, Bs, scales, weights)  # [R, in], [out, R]
    U, S, Vh = factored_svd(B_st, A_st)  # [out, q], [q], [q, in]
    factors = [flexlora_redistribute(U, S, Vh, r, ALPHA / r) for r in CLIENT_RANKS]
    return (U, S, Vh), factors


def run_dense(As, Bs, scales, weights):
    """Reference: materialise dW [out, in] and take its dense thin SVD."""
    dW = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=As[0].dtype)  # [out, in]
    for A, B, s, p in zip(As, Bs, scales, weights):
        dW.addmm_(B, A, alpha=p * s)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)  # [out, q], [q], [q, in]
    factors = [flexlora_redistribute(U, S, Vh, r, ALPHA / r) for r in CLIENT_RANKS]
    return (U, S, Vh), factors


VARIANTS = {"factored": run_factored, "dense": run_dense}


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


def measure_memory_child(variant: str, out_features: int, in_features: int) -> dict:
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


def measure_memory(variant: str, name: str, args: argparse.Namespace) -> dict:
    """Spawn a subprocess for one (module, variant) and return its RSS report."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant,
           "--module", name, "--dim", str(args.dim), "--inter", str(args.inter),
           "--threads", str(torch.get_num_threads())]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_variant(fn, clients, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn(*clients)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*clients)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "times_s": times}


def check_agreement(clients) -> dict:
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


def run_benchmark(args: argparse.Namespace) -> dict:
    load_start = os.getloadavg()  # other work on the machine skews the timings
    results = {}
    for name, (out_features, in_features) in module_shapes(args.dim, args.inter).items():
        clients = make_clients(out_features, in_features)
        entry: dict = {"shape_out_in": [out_features, in_features]}
        for variant, fn in VARIANTS.items():
            stats = time_variant(fn, clients, args.repeats, args.warmup)
            stats["theoretical_peak_tensor_mib"] = (
                theoretical_bytes(variant, out_features, in_features) / 2**20)
            if not args.skip_memory:
                stats.update(measure_memory(variant, name, args))
            entry[variant] = stats
        entry["speedup_median"] = entry["dense"]["median_s"] / entry["factored"]["median_s"]
        entry["agreement"] = check_agreement(clients)
        results[name] = entry
        print(f"{name:12s} [{out_features}x{in_features}] factored "
              f"{entry['factored']['median_s'] * 1e3:8.1f} ms, dense "
              f"{entry['dense']['median_s'] * 1e3:8.1f} ms, speedup "
              f"{entry['speedup_median']:6.1f}x", flush=True)
    return {
        "benchmark": "flexlora_svd",
        "torch_version": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15_start": list(load_start),
        "loadavg_1_5_15_end": list(os.getloadavg()),
        "platform": platform.platform(),
        "dtype": "float32 inputs; factored path computes in float64 internally",
        "num_clients": NUM_CLIENTS,
        "client_ranks": [CLIENT_RANKS[c % len(CLIENT_RANKS)] for c in range(NUM_CLIENTS)],
        "redistribute_ranks": CLIENT_RANKS,
        "alpha": ALPHA,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "memory_method": (
            "peak_rss_delta_mib: per (module, variant) fresh subprocess, peak RSS "
            "(VmHWM, reset via /proc/self/clear_refs just before) after one aggregation "
            "minus RSS just before it; "
            "theoretical_peak_tensor_mib: bytes of the largest simultaneously held "
            "tensors (lower bound, excludes LAPACK workspace)"
        ),
        "modules": results,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per variant")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs per variant")
    ap.add_argument("--dim", type=int, default=2048, help="hidden size (OLMoE: 2048)")
    ap.add_argument("--inter", type=int, default=1024,
                    help="expert intermediate size (OLMoE: 1024)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--skip-memory", action="store_true", help="no RSS subprocesses")
    ap.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--module", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        ap.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        out_features, in_features = module_shapes(args.dim, args.inter)[args.module]
        print(json.dumps(measure_memory_child(args.child, out_features, in_features)))
        return
    result = run_benchmark(args)
    text = json.dumps(result, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
