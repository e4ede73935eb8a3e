"""Every registered method and the UB-SMoE ablation rows on one config, one table.

Runs each cell in this process through the library (:class:`~ubsmoe.fl.server.Server`
and :class:`~ubsmoe.fl.client_runtime.ClientRuntime`, the code the Flower apps call; same
seeds, same rounds, clients trained one after another), writes one run directory per
cell under ``--out`` and prints a Markdown table: per budget level its K and LoRA
rank, log-likelihood and generation accuracy, the final utilization entropy (nats,
max ln M) and Gini coefficient; for the ablation rows also whether the range penalty
acted (> 0 at any local step) and the share of phi outside [phi_min, phi_max].

Usage::

    python benchmarks/compare_methods.py --out runs/compare [--cells fedit,ubsmoe,...]
        [key=value ...]

The overrides apply to every cell (on top of the embedded default). A cell whose run
directory already holds ``summary.json`` is not run again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ABLATION = {  # UB-SMoE Table 5 rows as overrides (docs/methods/ubsmoe.md)
    "abl_none": ["ubsmoe.pg=false", "ubsmoe.dmr.learn_phi=false", "ubsmoe.dmr.server_update=false"],
    "abl_pg": ["ubsmoe.dmr.learn_phi=false", "ubsmoe.dmr.server_update=false"],
    "abl_pg_phi_nopenalty": ["ubsmoe.dmr.range_penalty=false", "ubsmoe.dmr.server_update=false"],
    "abl_pg_phi_penalty": ["ubsmoe.dmr.server_update=false"],
    "abl_pg_server": ["ubsmoe.dmr.learn_phi=false"],
}


def cells() -> dict[str, list[str]]:
    """Cell name -> overrides: every registered method, then the ablation rows (full = ``ubsmoe``)."""
    from ubsmoe.methods import available_methods

    out = {m: [f"method={m}"] for m in available_methods()}
    out.update({name: ["method=ubsmoe", *over] for name, over in ABLATION.items()})
    return out


def run_cell(name: str, overrides: list[str], out: Path) -> dict:
    """Run one cell to completion (or reuse its finished run directory); return its summary."""
    from ubsmoe.config import load_config
    from ubsmoe.fl.client_runtime import ClientRuntime, shared_setup
    from ubsmoe.fl.server import Server

    run_dir = out / name
    if (run_dir / "summary.json").is_file():
        return json.loads((run_dir / "summary.json").read_text())
    cfg = load_config(overrides=overrides)
    start = time.time()
    setup = shared_setup(cfg)
    server = Server(cfg, run_dir, setup)
    runtime = ClientRuntime(cfg, setup)
    for r in range(1, cfg.fl.rounds + 1):
        updates = [runtime.train_round(**server.client_task(c, r)) for c in server.sample_clients(r)]
        server.end_round(r, updates)
    summary = server.finish()
    print(f"{name}: {time.time() - start:.0f} s, loss {summary['train_loss'][-1]['loss']:.4f}",
          file=sys.stderr, flush=True)
    return summary


def row(name: str, summary: dict) -> str:
    """One Markdown table row of a finished cell."""
    acc = {}
    for a in summary["accuracy"]:
        if a.get("top_k_mode", "budget") == "budget":
            acc.setdefault(a["budget"], {})[a["protocol"]] = a
    levels = sorted(acc)
    k_r = " / ".join(f"{acc[b]['loglik']['top_k']},{acc[b]['loglik']['lora_rank']}" for b in levels)
    ll = " / ".join(f"{acc[b]['loglik']['average']:.3f}" for b in levels)
    gen = " / ".join(f"{acc[b]['generation']['average']:.3f}" for b in levels) \
        if all("generation" in acc[b] for b in levels) else "-"
    d = summary["diagnostics"]
    phi = d.get("phi", {})
    penalty = "-" if "penalty_acted" not in phi else (
        f"{'yes' if phi['penalty_acted'] else 'no'} ({phi.get('penalty_max', 0):.2g}), "
        f"{100 * phi.get('outside_share', 0):.1f}% outside")
    return (f"| {name} | {k_r} | {ll} | {gen} | {d['entropy']['mean']:.3f} | {d['gini']['mean']:.3f} "
            f"| {summary['train_loss'][-1]['loss']:.4f} | {penalty} |")


def main(argv: list[str] | None = None) -> int:
    """Run the selected cells and print the table; 2 on bad usage."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder of the run directories")
    p.add_argument("--cells", default="", help="comma-separated cell names (default: all)")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every cell")
    args = p.parse_args(argv)
    table = cells()
    names = [c for c in args.cells.split(",") if c] or list(table)
    bad = [c for c in names if c not in table]
    if bad:
        print(f"error: --cells: unknown {bad}, expected from {', '.join(table)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print("| cell | K,rank per level | loglik per level | generation per level | entropy (nats) "
          "| Gini | final train loss | range penalty acted (max), phi outside range |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        print(row(name, run_cell(name, [*table[name], *args.overrides], out)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
