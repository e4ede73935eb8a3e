"""The markdown tables of docs/testbed.md from finished run directories (no torch needed).

    python benchmarks/testbed_tables.py grid SWEEP_DIR [SWEEP_DIR ...]   # per method and level
    python benchmarks/testbed_tables.py phi SWEEP_DIR                    # phi diagnostics per round

``grid``: per run label (the run directory name without its hash) and budget level K:
the ``loss`` task average at round 0 (``summary.json`` ``initial_accuracy``) and after
the last round (mean, ``± std`` over seeds when there are several; the runs' mean
standard error), ``loglik`` accuracy, and eval-time utilization entropy and Gini (mean
over layers). ``phi``: per run, from ``metrics.jsonl`` ``diagnostics`` rows, the
phi-utilization Spearman per round, the global phi's share outside its range, whether
the range penalty acted, phi's range; and the K = 1 loss at round 0 and the last round.
"""

from __future__ import annotations

import json
import re
import statistics as st
import sys
from pathlib import Path

LEVELS = ((0.125, 1), (0.25, 2), (0.5, 4), (1.0, 8))


def _ms(values: list[float]) -> str:
    """``0.123`` for one value, ``0.123 ± 0.004`` (sample std) for several."""
    return f"{values[0]:.3f}" if len(values) == 1 else f"{st.mean(values):.3f} ± {st.stdev(values):.3f}"


def grid(roots: list[str]) -> None:
    """Print the per-method, per-level table of every finished run under ``roots``."""
    runs: dict[str, list[dict]] = {}
    for root in roots:
        for path in sorted(Path(root).glob("*/summary.json")):
            label = re.sub(r"-seed\d+-[0-9a-f]+$", "", path.parent.name)
            runs.setdefault(label, []).append(json.loads(path.read_text()))
    print("| run (seeds) | K | loss round 0 | loss (mean se) | loglik | eval entropy | eval Gini |")
    print("|---|---|---|---|---|---|---|")
    for label, summaries in runs.items():
        for beta, k in LEVELS:
            def row(s: dict, key: str, protocol: str, beta: float = beta) -> dict:
                return next(r for r in s[key] if r["budget"] == beta and r["protocol"] == protocol)
            loss0 = [row(s, "initial_accuracy", "loss")["average"] for s in summaries]
            loss = [row(s, "accuracy", "loss") for s in summaries]
            ll = [row(s, "accuracy", "loglik")["average"] for s in summaries]
            util = [r["utilization"] for r in loss]
            print(f"| {label} ({len(summaries)}) | {k} | {_ms(loss0)} | {_ms([r['average'] for r in loss])} "
                  f"({st.mean(r['stderr'] for r in loss):.3f}) | {_ms(ll)} | "
                  f"{_ms([u['entropy']['mean'] for u in util])} | {_ms([u['gini']['mean'] for u in util])} |")


def phi(root: str) -> None:
    """Print one row per run under ``root``: phi diagnostics per round and the K = 1 loss."""
    for d in sorted(p for p in Path(root).iterdir() if (p / "metrics.jsonl").is_file()):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        diag = [r for r in rows if r.get("type") == "diagnostics" and "phi" in r]
        loss = {(r["round"], r["budget"]): r["average"] for r in rows
                if r.get("type") == "eval" and r["protocol"] == "loss"}
        last = max(k[0] for k in loss)
        spearman = " / ".join(f"{r['phi_utilization']['spearman']:+.2f}" for r in diag)
        outside = " / ".join(f"{r['phi'].get('outside_share', 0):.2f}" for r in diag)
        acted = " / ".join("yes" if r["phi"].get("penalty_acted") else "no" for r in diag)
        ranges = " / ".join(f"[{r['phi']['min']:+.2f}, {r['phi']['max']:+.2f}]" for r in diag)
        print(f"| {d.name} | {spearman} | {outside} | {acted} | {ranges} | "
              f"{loss.get((0, 0.125), float('nan')):.3f} -> {loss[(last, 0.125)]:.3f} |")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("grid", "phi"):
        sys.exit(__doc__)
    grid(sys.argv[2:]) if sys.argv[1] == "grid" else phi(sys.argv[2])
