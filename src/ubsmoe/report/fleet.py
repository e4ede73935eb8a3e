"""The fleet comparison's table and figure (issue 23 part 3): ``python -m ubsmoe.report.fleet SWEEP_DIR``.

Reads the run directories of ``ubsmoe sweep -c fleet`` (one per arm: ``fixed``,
``top``, ``auto``; the arm is the cell's ``arm`` setting in ``cell.json``) and gives

- per arm and round: the simulated round time ``sim_round_s`` (seconds on the
  simulated clock: the slowest reply, or the cut ``fl.round_timeout_s`` when one was
  cut), the clients left out and the level (beta) each client trained at;
- per arm: the final held-out loss (``eval.protocols`` ``loss``, nats per token) and
  accuracy (``loglik``) per budget level, and the total simulated time;
- a figure: levels per client per round (one panel per arm; a cross marks a client
  left out) and the simulated round time per arm.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ubsmoe.io import read_jsonl
from ubsmoe.report.plotting import new_figure, save_figure

ARMS = ("fixed", "top", "auto")


def arm_runs(sweep_dir: Path) -> dict[str, Path]:
    """``{arm: run directory}`` of a fleet sweep (cells without an ``arm`` setting are skipped)."""
    out = {}
    for cell in sorted(Path(sweep_dir).glob("*/cell.json")):
        arm = json.loads(cell.read_text(encoding="utf-8")).get("settings", {}).get("arm")
        if arm is not None and (cell.parent / "metrics.jsonl").is_file():
            out[str(arm)] = cell.parent
    return {a: out[a] for a in sorted(out, key=lambda a: ARMS.index(a) if a in ARMS else len(ARMS))}


def arm_summary(run_dir: Path) -> dict[str, Any]:
    """One arm's rounds and final evaluation.

    Returns:
        ``{"rounds": [{"round", "sim_round_s", "left_out": [ids], "levels": {id: beta}}],
        "sim_total_s", "loss": {beta: nats/token}, "accuracy": {beta: share}}``
        (the last round's evaluation at each level's own K).
    """
    records = list(read_jsonl(Path(run_dir) / "metrics.jsonl"))
    rounds = []
    for rec in records:
        if rec["type"] != "train":
            continue
        left = sorted(f["client"] for f in rec.get("failed", []))
        levels = {e["id"]: e["budget"] for e in rec["clients"]}
        rounds.append({"round": rec["round"], "sim_round_s": rec.get("sim_round_s", 0.0), "left_out": left,
                       "levels": levels, "why": {f["client"]: f["reason"] for f in rec.get("failed", [])}})
    evals = [r for r in records if r["type"] == "eval" and r.get("top_k_mode", "budget") == "budget"]
    last = max((r["round"] for r in evals), default=None)
    loss = {r["budget"]: r["average"] for r in evals if r["round"] == last and r["protocol"] == "loss"}
    acc = {r["budget"]: r["average"] for r in evals if r["round"] == last and r["protocol"] == "loglik"}
    return {"rounds": rounds, "sim_total_s": sum(r["sim_round_s"] for r in rounds), "loss": loss,
            "accuracy": acc}


def markdown(summaries: dict[str, dict[str, Any]], num_clients: int) -> str:
    """The per-round table and the per-level table (Markdown)."""
    lines = ["| arm | round | simulated round time (s) | left out | level (beta) per client 0..7 |",
             "|---|---|---|---|---|"]
    for arm, s in summaries.items():
        for r in s["rounds"]:
            lv = " ".join(f"{r['levels'][c]:g}" if c in r["levels"] else "x" for c in range(num_clients))
            left = ", ".join(str(c) for c in r["left_out"]) or "-"
            lines.append(f"| {arm} | {r['round']} | {r['sim_round_s']:.1f} | {left} | {lv} |")
    levels = sorted({b for s in summaries.values() for b in s["loss"]})
    lines += ["", "| arm | total simulated time (s) | "
              + " | ".join(f"loss / acc. at beta={b:g}" for b in levels) + " |",
              "|---|---|" + "---|" * len(levels)]
    for arm, s in summaries.items():
        cells = [f"{s['loss'][b]:.4f} / {s['accuracy'].get(b, float('nan')):.3f}" if b in s["loss"] else "-"
                 for b in levels]
        lines.append(f"| {arm} | {s['sim_total_s']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figure(summaries: dict[str, dict[str, Any]], num_clients: int, budgets: list[float], out: Path) -> Path:
    """Levels chosen per client per round (a panel per arm) and the round time per arm (last panel)."""
    fig, axes = new_figure(ncols=len(summaries) + 1, width=4.2)
    for ax, (arm, s) in zip(axes, summaries.items()):
        for c in range(num_clients):
            xs = [r["round"] for r in s["rounds"] if c in r["levels"]]
            ys = [budgets.index(r["levels"][c]) + 1 for r in s["rounds"] if c in r["levels"]]
            ax.plot(xs, [y + (c - (num_clients - 1) / 2) * 0.04 for y in ys], marker="o", markersize=4,
                    label=f"client {c} ({c + 1}x)" if ax is axes[0] else None)
            cut = [r["round"] for r in s["rounds"] if c in r["left_out"]]
            ax.plot(cut, [0.35 + c * 0.03] * len(cut), "x", color=ax.lines[-1].get_color(), markersize=7,
                    markeredgewidth=2)
        ax.set_title(f"arm: {arm}")
        ax.set_xlabel("round")
        ax.set_xticks([r["round"] for r in s["rounds"]])
        ax.set_yticks([0.45] + list(range(1, len(budgets) + 1)),
                      ["left out"] + [f"beta={b:g}" for b in budgets])
        ax.set_ylabel("level trained (budget beta)")
        ax.set_ylim(0.2, len(budgets) + 0.5)
    axes[0].legend(fontsize=7, loc="center right")
    ax = axes[-1]
    for i, (arm, s) in enumerate(summaries.items()):
        ax.plot([r["round"] for r in s["rounds"]], [r["sim_round_s"] for r in s["rounds"]], marker="os^"[i % 3],
                label=f"{arm} (total {s['sim_total_s']:.0f} s)")
    ax.set_title("round time per arm")
    ax.set_xlabel("round")
    ax.set_xticks(sorted({r["round"] for s in summaries.values() for r in s["rounds"]}))
    ax.set_ylabel("simulated round time (s)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def main(argv: list[str] | None = None) -> str:
    """Print the tables; write the figure."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--figure", type=Path, default=Path("docs/figures/fleet.png"))
    args = ap.parse_args(argv)
    runs = arm_runs(args.sweep_dir)
    if not runs:
        raise SystemExit(f"{args.sweep_dir}: no fleet run (cell.json with an arm setting and metrics.jsonl)")
    from ubsmoe.config import load_config  # lazy: only to read the runs' budgets and clients

    cfg = load_config(next(iter(runs.values())) / "config.yaml")
    summaries = {arm: arm_summary(d) for arm, d in runs.items()}
    text = markdown(summaries, cfg.fl.num_clients)
    print(text)
    figure(summaries, cfg.fl.num_clients, list(cfg.fl.budgets), args.figure)
    print(f"figure: {args.figure}")
    return text


if __name__ == "__main__":
    main()
