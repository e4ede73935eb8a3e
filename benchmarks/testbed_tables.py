"""The markdown tables of docs/testbed.md from finished run directories (no torch needed).

    python benchmarks/testbed_tables.py grid SWEEP_DIR [SWEEP_DIR ...]   # per method and level
    python benchmarks/testbed_tables.py phi SWEEP_DIR                    # phi diagnostics per round
    python benchmarks/testbed_tables.py claims SWEEP_DIR [SWEEP_DIR ...] # the paper's claims, separated?
    python benchmarks/testbed_tables.py experts SWEEP_DIR [SWEEP_DIR ...] # expert LoRA B norms (needs torch)

``grid``: per run label (the run directory name without its hash) and budget level K:
the ``loss`` task average at round 0 (``summary.json`` ``initial_accuracy``) and after
the last round (mean, ``± std`` over seeds when there are several; the runs' mean
standard error), ``loglik`` accuracy, and eval-time utilization entropy and Gini (mean
over layers). ``phi``: per run, from ``metrics.jsonl`` ``diagnostics`` rows, the
phi-utilization Spearman per round, the global phi's share outside its range, whether
the range penalty acted, phi's range; and the K = 1 loss at round 0 and the last round.
``claims``: for each comparison of the paper's claims (:data:`CLAIMS`) present in the
runs, the two sides' means ± seed std and whether they separate: the issue's rule,
``|mean_a - mean_b| > 2 max(std_a, std_b)`` over seeds (needs 2+ seeds a side).
``experts``: per run label, from the last round checkpoint's global adapters, the expert
LoRA B factors' per-expert Frobenius norm ``||B_e||`` (B starts at zero, so it measures
how far expert e's adapter moved): the share of experts still at zero (no client ever
routed a token to them and nothing else moved them) and the 10th percentile and median
of the norm over the experts of every layer and projection; mean ± std over seeds.
"""

from __future__ import annotations

import json
import re
import statistics as st
import sys
from pathlib import Path

LEVELS = ((0.125, 1), (0.25, 2), (0.5, 4), (1.0, 8))


# (claim, metric, K, side a labels, side b labels): metric "loss" (nats/token, lower is
# better) or "entropy" (eval-time utilization entropy, nats, higher = more spread); a side
# pools the seeds of its labels' runs (a run label is the directory name without its hash).
RANK = ["hetlora", "flexlora", "flora", "florist"]
SMOE = ["smoe", "smoe_llb", "a3smoe", "ubsmoe"]
CLAIMS = [
    *[("rank methods at K = 1 fall behind the SMoE methods", "loss", 1, [r], [m]) for r in RANK for m in SMOE],
    ("naive SMoE concentrates utilization; A3SMoE spreads it", "entropy", 1, ["smoe"], ["a3smoe"]),
    ("naive SMoE concentrates utilization; UB-SMoE spreads it", "entropy", 1, ["smoe"], ["ubsmoe"]),
    ("UB-SMoE beats A3SMoE at the lowest budget", "loss", 1, ["ubsmoe"], ["a3smoe"]),
    ("UB-SMoE beats SMoE-LLB at the lowest budget", "loss", 1, ["ubsmoe"], ["smoe_llb"]),
    ("UB-SMoE beats naive SMoE at the lowest budget", "loss", 1, ["ubsmoe"], ["smoe"]),
    *[(f"Table 5: row {row} against none", "loss", 1, [f"ubsmoe-ablation={row}"], ["ubsmoe-ablation=none"])
      for row in ("pg", "phi_reg", "pg_phi_reg", "pg_server_update", "full")],
    *[(f"lambda_pg {v} against 0 (no PG)", metric, k, [f"ubsmoe-lambda_pg={v}"], ["ubsmoe-lambda_pg=0.0"])
      for v in ("0.001", "0.01", "0.1") for metric, k in (("loss", 1), ("loss", 8), ("entropy", 1))],
]


def _level_values(summaries: list[dict], metric: str, k: int) -> list[float]:
    """One value per run: the last round's ``loss`` task average or eval entropy at level K."""
    beta = {kk: b for b, kk in LEVELS}[k]
    rows = [next(r for r in s["accuracy"] if r["budget"] == beta and r["protocol"] == "loss") for s in summaries]
    return [r["average"] if metric == "loss" else r["utilization"]["entropy"]["mean"] for r in rows]


def _runs_by_label(roots: list[str]) -> dict[str, list[dict]]:
    """label (run directory name without ``-seedN-<hash>``) -> the summaries of its finished runs."""
    runs: dict[str, list[dict]] = {}
    for root in roots:
        for path in sorted(Path(root).glob("*/summary.json")):
            label = re.sub(r"-seed\d+-[0-9a-f]+$", "", path.parent.name)
            runs.setdefault(label, []).append(json.loads(path.read_text()))
    return runs


def claims(roots: list[str]) -> None:
    """Print one row per comparison of :data:`CLAIMS` whose runs exist under ``roots``."""
    runs = _runs_by_label(roots)
    print("| claim | metric at K | a | b | a: mean ± std (seeds) | b: mean ± std (seeds) | a - b | separated (> 2 x larger std) |")
    print("|---|---|---|---|---|---|---|---|")
    for claim, metric, k, side_a, side_b in CLAIMS:
        if not all(lbl in runs for lbl in side_a + side_b):
            continue
        a = _level_values([s for lbl in side_a for s in runs[lbl]], metric, k)
        b = _level_values([s for lbl in side_b for s in runs[lbl]], metric, k)
        sd = max(st.stdev(a) if len(a) > 1 else float("nan"), st.stdev(b) if len(b) > 1 else float("nan"))
        gap = st.mean(a) - st.mean(b)
        verdict = "n/a (1 seed)" if min(len(a), len(b)) < 2 else ("yes" if abs(gap) > 2 * sd else "no")
        print(f"| {claim} | {metric} K={k} | {'+'.join(side_a)} | {'+'.join(side_b)} | {_ms(a)} ({len(a)}) | "
              f"{_ms(b)} ({len(b)}) | {gap:+.3f} | {verdict} |")


def experts(roots: list[str]) -> None:
    """Print one row per run label: the expert LoRA B norms of its runs' last checkpoint."""
    import torch  # lazy: only this mode needs it

    stats: dict[str, list[tuple[float, float, float]]] = {}
    for root in roots:
        for path in sorted(Path(root).glob("*/summary.json")):
            label = re.sub(r"-seed\d+-[0-9a-f]+$", "", path.parent.name)
            last = max((path.parent / "checkpoints").glob("round_*.pt"))
            adapters = torch.load(last, weights_only=False, map_location="cpu")["adapters"]
            norms = torch.cat([v.double().flatten(1).norm(dim=1) for n, v in adapters.items()
                               if n.endswith("_lora.B")])  # [layers x projections x E]
            stats.setdefault(label, []).append((float((norms < 1e-12).double().mean()),
                                                float(norms.quantile(0.1)), float(norms.median())))
    print("| run (seeds) | experts with B = 0 (share) | 10th percentile of ||B_e|| | median ||B_e|| |")
    print("|---|---|---|---|")
    for label, rows in stats.items():
        cols = list(zip(*rows))
        print(f"| {label} ({len(rows)}) | {_ms(list(cols[0]))} | {_ms(list(cols[1]))} | {_ms(list(cols[2]))} |")


def _ms(values: list[float]) -> str:
    """``0.123`` for one value, ``0.123 ± 0.004`` (sample std) for several."""
    return f"{values[0]:.3f}" if len(values) == 1 else f"{st.mean(values):.3f} ± {st.stdev(values):.3f}"


def grid(roots: list[str]) -> None:
    """Print the per-method, per-level table of every finished run under ``roots``."""
    runs = _runs_by_label(roots)
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
    if len(sys.argv) < 3 or sys.argv[1] not in ("grid", "phi", "claims", "experts"):
        sys.exit(__doc__)
    {"grid": grid, "claims": claims, "experts": experts}.get(sys.argv[1], lambda roots: phi(roots[0]))(sys.argv[2:])
