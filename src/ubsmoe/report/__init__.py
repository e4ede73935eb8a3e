"""Tables from a run directory's summary.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table


def accuracy_table(summary: dict[str, Any], protocol: str) -> Table:
    """Per-budget accuracy table (rows: budget levels; columns: K, LoRA rank, tasks, average).

    Args:
        summary: a run's summary (``summary.json``).
        protocol: ``generation`` or ``loglik``.
    """
    rows = [r for r in summary.get("accuracy", []) if r["protocol"] == protocol]
    tasks = sorted({t for r in rows for t in r["per_task"]})
    n = summary.get("data", {}).get("test_examples_scored", {})
    table = Table(title=f"{summary.get('method')}: accuracy ({protocol}), round {rows[0]['round'] if rows else '-'}")
    table.add_column("budget")
    table.add_column("K", justify="right")
    ranks = any("lora_rank" in r for r in rows)
    if ranks:
        table.add_column("rank", justify="right")
    for t in tasks:
        table.add_column(f"{t}\n(n={n.get(t, '?')})", justify="right")
    table.add_column("average", justify="right")
    for r in rows:
        rank = [str(r.get("lora_rank", "-"))] if ranks else []
        table.add_row(f"{r['budget']:g}", str(r["top_k"]), *rank,
                      *[f"{r['per_task'][t]:.3f}" for t in tasks], f"{r['average']:.3f}")
    return table


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """Read ``run_dir/summary.json``.

    Raises:
        FileNotFoundError: no summary (the run has not finished).
    """
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"run directory {str(run_dir)!r}: no summary.json (unfinished run?)")
    return json.loads(path.read_text(encoding="utf-8"))
