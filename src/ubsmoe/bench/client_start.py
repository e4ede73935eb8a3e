"""Where a deployed ClientApp's cold start goes (issue 23 part 4): ``python -m ubsmoe.bench.client_start``.

Flower starts one ClientApp process per message in a deployment, so every client and
round pays a fresh interpreter, the imports and the runtime build. This bench starts
``--runs`` fresh interpreters that do what that process does, in order, and times
each phase by wall clock and by the process's CPU time (the CPU time is what to
compare on a loaded shared machine: wall time there is mostly waiting for a core):

1. ``interpreter``: from ``Popen`` to the first line of the child (Python start);
2. ``imports``: importing :mod:`ubsmoe.fl.client_app` (torch, transformers, Flower:
   Flower loads the app module before it calls ``train``);
3. ``setup``: :func:`ubsmoe.fl.client_app._runtime` as ``train`` calls it, the span
   the train record reports as ``setup_s`` (data, tokenizer, partitions, model build,
   patching), split into ``shared_setup`` (data, tokenizer, partitions) and ``model``
   (build, patch, the method's tensors).

The config is the loopback deployment test's (tests/test_deployment.py). One untimed
run first fills the on-disk caches (tokenizer, partitions) as the ServerApp does
before any ClientApp starts. Prints one row per phase: the median over the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# The deployment test's overrides (tests/test_deployment.py OVERRIDES).
DEPLOY_OVERRIDES = ("data.tasks=[boolq,piqa] data.train_examples=48 data.max_length=64 fl.num_clients=3 "
                    "fl.rounds=2 fl.budget_pattern=reverse_long_tail train.batch_size=4 train.max_local_steps=1 "
                    "eval.protocols=[loglik] eval.examples_per_task=2 eval.batch_size=4 "
                    "model.tiny.vocab_size=512")

CHILD = r"""
import json, resource, sys, time
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
marks = {"interpreter": (time.time(), cpu())}
from ubsmoe.fl import client_app
marks["imports"] = (time.time(), cpu())
from ubsmoe.budgets import parse_node_config
from ubsmoe.config import load_config
from ubsmoe.fl import client_runtime as fl_runtime
cfg = load_config(overrides=sys.argv[1].split())
decl = parse_node_config({"partition-id": 0})
built = {}
real_shared = fl_runtime.shared_setup
def timed_shared(c):
    out = real_shared(c)
    built["shared_setup"] = (time.time(), cpu())
    return out
fl_runtime.shared_setup = timed_shared
client_app._runtime(cfg, decl, 0)
marks["shared_setup"] = built["shared_setup"]
marks["model"] = (time.time(), cpu())
print("MARKS" + json.dumps(marks))
"""

PHASES = ("interpreter", "imports", "shared_setup", "model")


def run_once(overrides: str) -> dict[str, tuple[float, float]]:
    """One fresh interpreter: ``{phase: (wall s, CPU s)}`` of each phase, plus ``setup`` and ``total``."""
    start = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, overrides], capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    line = next(s for s in out.stdout.splitlines() if s.startswith("MARKS"))
    marks = json.loads(line[len("MARKS"):])
    phases, prev_wall, prev_cpu = {}, start, 0.0
    for name in PHASES:
        wall, cpu = marks[name]
        phases[name] = (wall - prev_wall, cpu - prev_cpu)
        prev_wall, prev_cpu = wall, cpu
    s = [phases[p] for p in ("shared_setup", "model")]
    phases["setup (setup_s)"] = (sum(w for w, _ in s), sum(c for _, c in s))
    phases["total"] = (marks["model"][0] - start, marks["model"][1])
    return phases


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run the bench; print and return the median wall and CPU seconds per phase."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed fresh interpreters (median reported)")
    ap.add_argument("--overrides", default=DEPLOY_OVERRIDES, help="the run config's key=value overrides")
    ap.add_argument("--json", default="", help="also write the medians to this JSON file")
    args = ap.parse_args(argv)
    run_once(args.overrides)  # fills the tokenizer and partition caches, as the ServerApp does
    runs = [run_once(args.overrides) for _ in range(args.runs)]
    out = {}
    print(f"{'phase':18s} {'wall s':>8s} {'CPU s':>8s}   (median of {args.runs} fresh interpreters)")
    for name in runs[0]:
        wall = statistics.median(r[name][0] for r in runs)
        cpu = statistics.median(r[name][1] for r in runs)
        out[name] = {"wall_s": wall, "cpu_s": cpu}
        print(f"{name:18s} {wall:8.2f} {cpu:8.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"runs": args.runs, "median": out}, f, indent=2)
    return out


if __name__ == "__main__":
    main()
