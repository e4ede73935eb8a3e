"""CPU time of a local step with and without ``train.fused_ops`` (issue 24), interleaved in one process.

For ``olmoe_medium`` (hidden 512, 4 layers, 64 experts, 8 x 128 tokens, random weights,
LoRA rank 20), float32 and bfloat16 with ``train.adapter_dtype=compute``, K = 1 and 8:
one model per (dtype, option), then rounds in which every case runs one local step
(``local_train`` on one batch: forward, loss, backward, clipping, Adam) in turn, so
every case sees the same machine load. Reports per case the median seconds, and per
dtype and K the fused / host time ratio and the K1/K8 ratio of each path.

Writes ``--out`` (JSON). Usage (docs/dispatch.md quotes the command and its table)::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/fused_step_cpu.py --threads 1 \\
        --rounds 7 --out /tmp/fused_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from ubsmoe.bench.model_step import OLMOE_MEDIUM, SMOE_RANK, _batch, _build
from ubsmoe.config import TrainConfig
from ubsmoe.fl.train import local_train
from ubsmoe.io import atomic_write_text
from ubsmoe.methods import get_method_class
from ubsmoe.models import set_top_k

CASES = [("float32", "float32"), ("bfloat16", "compute")]  # (model dtype, train.adapter_dtype)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="timed steps per case (after one warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = _batch(OLMOE_MEDIUM, 0)
    method = get_method_class("smoe")()
    models, cfgs = {}, {}
    for dtype, adapters in CASES:
        for fused in (False, True):
            model = _build(OLMOE_MEDIUM, SMOE_RANK, 0, dtype=dtype)
            method.prepare_model(model)
            models[(dtype, fused)] = model
            cfgs[(dtype, fused)] = replace(TrainConfig(), adapter_dtype=adapters, fused_ops=fused,
                                           batch_size=OLMOE_MEDIUM.batch_size)
    times: dict[tuple, list[float]] = {(d, f, k): [] for (d, f) in models for k in (1, 8)}
    for r in range(args.rounds + 1):
        for (dtype, fused, k), out in times.items():
            model = models[(dtype, fused)]
            set_top_k(model, k)
            start = time.perf_counter()
            local_train(model, [batch], method, cfgs[(dtype, fused)], k)
            if r > 0:  # round 0 is the warm-up
                out.append(time.perf_counter() - start)
    median = {key: statistics.median(v) for key, v in times.items()}
    report = {"model": OLMOE_MEDIUM.name, "tokens_per_step": OLMOE_MEDIUM.batch_size * OLMOE_MEDIUM.seq_len,
              "threads": args.threads, "rounds": args.rounds, "torch": torch.__version__,
              "cases": {f"{d}_{'fused' if f else 'host'}_k{k}": {"median_s": m, "times_s": times[(d, f, k)]}
                        for (d, f, k), m in median.items()},
              "ratios": {}}
    for dtype, _ in CASES:
        report["ratios"][dtype] = {
            **{f"fused_over_host_k{k}": median[(dtype, True, k)] / median[(dtype, False, k)] for k in (1, 8)},
            **{f"k1_over_k8_{'fused' if f else 'host'}": median[(dtype, f, 1)] / median[(dtype, f, 8)]
               for f in (False, True)}}
    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    for dtype, ratios in report["ratios"].items():
        print(dtype, {k: round(v, 3) for k, v in ratios.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
