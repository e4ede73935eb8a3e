"""Tables and figure of the ``loss`` evaluation protocol (mean next-token loss, nats per token).

Lower is better, unlike every other protocol; the titles, axis labels and report text
here say so. The numbers come from the summary's ``loss`` rows
(:func:`ubsmoe.eval.loss.loss_row_fields`).
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

LOSS_PROTOCOL_TEXT = ("loss: mean next-token loss (nats per token) of the reference response (and eos) "
                      "given its prompt, the tokens training labels; token-weighted over a task's "
                      "examples, tasks averaged without weights; lower is better")
"""The report's one-line description of the ``loss`` protocol."""


def _cell(value: float, stderr: float | None) -> str:
    """``2.034`` over ``±0.012`` (the standard error, on a second line so four budget levels
    fit an 80-column log; left out when there is none)."""
    return f"{value:.3f}" + ("" if stderr is None else f"\n±{stderr:.3f}")


def loss_table(summary: dict[str, Any], mode: str | None = None) -> Table:
    """Loss per task (rows) and budget level (columns), with standard errors; lower is better.

    Same layout as :func:`ubsmoe.report.accuracy_table` (one column per evaluated
    row: beta, K, K mode, LoRA rank); a cell is the loss over ``±SE`` in nats per token
    (:mod:`ubsmoe.eval.loss`), the ``average`` row the unweighted mean over tasks.

    Args:
        summary: a run's summary (``summary.json``) or ``ubsmoe eval``'s result.
        mode: only the rows of this K mode (``budget`` / ``native``); None: all.
    """
    rows = [r for r in summary.get("accuracy", [])
            if r["protocol"] == "loss" and (mode is None or r.get("top_k_mode") == mode)]
    tasks = sorted({t for r in rows for t in r["per_task"]})
    n = summary.get("data", {}).get("test_examples_scored", {})
    table = Table(title=(f"{summary.get('method')}: loss (nats/token, lower is better, ± standard error), "
                         f"round {rows[0]['round'] if rows and 'round' in rows[0] else '-'}"))
    table.add_column("task", no_wrap=True)
    for r in rows:
        rank = f"\nr={r['lora_rank']}" if "lora_rank" in r else ""
        table.add_column(f"β={r['budget']:g}\nK={r['top_k']} {r.get('top_k_mode', '-')}{rank}",
                         justify="right", no_wrap=True)
    for t in tasks:
        table.add_row(f"{t} (n={n.get(t, '?')})",
                      *[_cell(r["per_task"][t], r.get("per_task_stderr", {}).get(t))
                        if t in r["per_task"] else "-" for r in rows])
    table.add_row("average", *[_cell(r["average"], r.get("stderr")) for r in rows], style="bold")
    return table
