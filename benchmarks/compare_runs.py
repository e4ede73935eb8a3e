"""Compare two ubsmoe run directories: metrics.jsonl losses and summary.json accuracy, diagnostics, train loss.

A refactor must not change a run's numbers (issue 21). Run the embedded default before
and after the change (`ubsmoe run --out A` on the old commit, `--out B` on the new one),
then `python benchmarks/compare_runs.py A B`: it prints whether every training loss
(global and per client, per round) and the summary's accuracy rows, diagnostics and
train losses are equal (timing fields left out), and exits 1 when they are not.
"""
import json
import sys
from pathlib import Path

a, b = Path(sys.argv[1]), Path(sys.argv[2])
def losses(d):
    out = []
    for line in (d / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("type") == "train":
            out.append((r["round"], "global", r["loss"]))
            for c in r.get("clients", []):
                out.append((r["round"], c["id"], c["loss"]))
    return out
def rows(d):
    s = json.loads((d / "summary.json").read_text())
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if not any(t in k for t in ("_s", "seconds", "time", "wall", "elapsed", "pid"))}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip({"accuracy": s["accuracy"], "diagnostics": s["diagnostics"], "train_loss": s["train_loss"]})
la, lb = losses(a), losses(b)
print("train loss entries:", len(la), len(lb), "equal:", la == lb)
if la != lb:
    for x, y in zip(la, lb):
        if x != y: print("  differ:", x, y); break
ra, rb = rows(a), rows(b)
print("summary rows equal:", ra == rb)
if ra != rb:
    print(json.dumps(ra)[:500]); print(json.dumps(rb)[:500])
sys.exit(0 if (la == lb and ra == rb) else 1)
