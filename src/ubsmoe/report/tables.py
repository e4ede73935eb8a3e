"""Paper-shaped accuracy tables across runs, with the papers' published numbers beside ours.

Two shapes, one pair per (setting, evaluation protocol, ``top_k_mode``):

* **tasks** (the papers' Table 1/2 shape): rows are the scored tasks and
  ``average``, columns the methods; a run's value for a task is its accuracy on
  that task averaged over the budget levels (final evaluation round).
* **budgets** (Table 3 shape): rows are the budget levels beta, columns the
  methods; a run's value is its average over tasks at that level.

A cell is ``mean ± std (n=seeds)`` over the group's runs of that method: the
mean and the sample standard deviation (``n - 1`` in the denominator; ``-`` for
one seed).

Paper-number matching rule (:func:`paper_matches`): a cell gets the published
number of ``paper_tables.csv`` (shipped with the package, its ``source`` kept)
when all hold:

1. metric ``accuracy`` and the run's model is OLMoE-1B-7B (its name contains
   ``OLMoE-1B-7B``) for Tables 1 and 3, or the dense OLMo-1B (name contains
   ``OLMo-1B`` but not ``OLMoE``) for Table 2;
2. the method maps to the paper's name (:data:`PAPER_METHOD`; naive ``smoe`` has
   no published row);
3. the row matches: a task row by task name (``average`` for the average) in the
   UB-SMoE paper's Table 1 (OLMoE, Commonsense-15K) or Table 2 (OLMo-1B); a budget
   row beta_j, j the 1-based position of the level among the run's 4 levels
   (lowest first; other level counts match no budget row), in its Table 3.

Everything else (the A3SMoE paper's Dolly ROUGE-L tables, TeleQuAD, Table 5
ablations, Table 6 client counts, the tiny presets) has no matching published
number and says so.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ubsmoe.io import atomic_write_text
from ubsmoe.report.runs import RunGroup, RunRecord

PAPER_METHOD = {
    "fedit": "Homo-LoRA", "hetlora": "HetLoRA", "flexlora": "FlexLoRA", "flora": "FLoRA",
    "florist": "FLoRIST", "smoe_llb": "SMoE-LLB", "a3smoe": "A3SMoE", "ubsmoe": "UB-SMoE",
}
"""Our method name -> the papers' column name (``smoe``, naive SMoE, has none)."""


def load_paper_tables(path: str | Path | None = None) -> list[dict[str, str]]:
    """Rows of the papers' published numbers (columns source, table, setting, row, method, metric, value).

    Args:
        path: a CSV of that shape; None: the copy shipped in the package.
    """
    if path is None:
        text = (resources.files("ubsmoe.report") / "paper_tables.csv").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``n - 1``; None for one value).

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("values: expected at least one value")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def format_cell(values: list[float]) -> str:
    """``mean ± std (n=N)`` with 4 decimals (``-`` for the std of one value); ``-`` when empty."""
    if not values:
        return "-"
    m, s = mean_std(values)
    return f"{m:.4f} ± {'-' if s is None else f'{s:.4f}'} (n={len(values)})"


def eval_rows(run: RunRecord, protocol: str, mode: str) -> list[dict[str, Any]]:
    """The run's final accuracy rows of ``protocol`` at ``top_k_mode == mode``, lowest budget first.

    Rows from summaries written before ``top_k_mode`` existed count as ``budget``.
    """
    rows = [r for r in (run.summary or {}).get("accuracy", [])
            if r["protocol"] == protocol and r.get("top_k_mode", "budget") == mode]
    return sorted(rows, key=lambda r: r["budget"])


def protocols_and_modes(group: RunGroup) -> list[tuple[str, str]]:
    """The (protocol, top_k_mode) pairs any run of the group was scored with, sorted."""
    return sorted({(r["protocol"], r.get("top_k_mode", "budget"))
                   for run in group.runs for r in (run.summary or {}).get("accuracy", [])})


def model_family(model: str) -> str | None:
    """``olmoe`` for OLMoE-1B-7B, ``olmo1b`` for the dense OLMo-1B, else None (no paper setting)."""
    if "OLMoE-1B-7B" in model:
        return "olmoe"
    if "OLMo-1B" in model and "OLMoE" not in model:
        return "olmo1b"
    return None


def paper_matches(paper: list[dict[str, str]], model: str, method: str, kind: str, row: str,
                  level: int | None = None, num_levels: int | None = None) -> list[dict[str, str]]:
    """The published numbers matching one of our cells (the rule in the module docstring).

    Args:
        paper: from :func:`load_paper_tables`.
        model: the run's ``model`` name.
        method: our method name.
        kind: ``tasks`` or ``budgets``.
        row: the task name or ``average`` (``tasks``); ignored for ``budgets``.
        level: 0-based position of the budget level (``budgets``).
        num_levels: budget levels of the run (``budgets``: only 4 match).

    Returns:
        Matching paper rows (possibly several tables), each with its ``source``.
    """
    family = model_family(model)
    name = PAPER_METHOD.get(method)
    if family is None or name is None:
        return []
    out = []
    for p in paper:
        if p["metric"] != "accuracy" or p["method"] != name or not p["source"].startswith("UB-SMoE"):
            continue
        if kind == "tasks":
            table = "1" if family == "olmoe" else "2"
            if p["table"] == table and p["row"].lower() == row.lower() and \
                    (table != "1" or "Commonsense" in p["setting"]):
                out.append(p)
        elif (family == "olmoe" and num_levels == 4 and level is not None
              and p["table"] == "3" and p["row"] == f"beta_{level + 1}"):
            out.append(p)
    return out


@dataclass
class AccuracyTable:
    """One paper-shaped table of a group.

    Attributes:
        group: the setting label.
        kind: ``tasks`` or ``budgets``.
        protocol: ``generation`` or ``loglik``.
        mode: ``top_k_mode`` of the rows (``budget``: each level at its own K_j).
        methods: the column order.
        rows: per row: ``row`` (task or beta), ``setting`` (K / rank it ran at),
            ``cells`` {method: {values, seeds, cell, paper: [paper rows]}}.
    """

    group: str
    kind: str
    protocol: str
    mode: str
    methods: list[str]
    rows: list[dict[str, Any]]

    @property
    def title(self) -> str:
        """Readable title: shape, protocol, K mode and setting."""
        metric = "loss (nats/token, lower is better)" if self.protocol == "loss" else "accuracy"
        what = (f"{metric} per task, averaged over budget levels" if self.kind == "tasks"
                else f"average {metric} over tasks, per budget level")
        return (f"{what}; protocol {self.protocol}, K from {self.mode}; setting: {self.group}")


def _k_rank(rows_by_method: dict[str, list[dict[str, Any]]]) -> str:
    """The K and LoRA rank each method's rows ran at, e.g. ``K=1 r=20`` or ``smoe: K=1 r=20; hetlora: ...``."""
    texts = {}
    for method, rows in rows_by_method.items():
        ks = sorted({r["top_k"] for r in rows})
        rs = sorted({r.get("lora_rank") for r in rows if r.get("lora_rank") is not None})
        texts[method] = (f"K={'/'.join(map(str, ks))}" + (f" r={'/'.join(map(str, rs))}" if rs else ""))
    unique = set(texts.values())
    if len(unique) == 1:
        return unique.pop()
    return "; ".join(f"{m}: {t}" for m, t in texts.items())


def accuracy_tables(group: RunGroup, paper: list[dict[str, str]]) -> list[AccuracyTable]:
    """The tasks- and budgets-shaped tables of a group, for each (protocol, K mode) it was scored with."""
    tables = []
    methods = group.methods
    all_paper = paper
    for protocol, mode in protocols_and_modes(group):
        paper = [] if protocol == "loss" else all_paper  # the papers publish no loss
        per_run = {id(run): eval_rows(run, protocol, mode) for run in group.runs}
        tasks = sorted({t for rows in per_run.values() for r in rows for t in r["per_task"]})
        budgets = sorted({r["budget"] for rows in per_run.values() for r in rows})
        task_rows = []
        for task in [*tasks, "average"]:
            cells, used = {}, {}
            for method in methods:
                values, seeds, model = [], [], ""
                for run in group.by_method(method):
                    rows = per_run[id(run)]
                    key = "average" if task == "average" else task
                    vals = [r["average"] if key == "average" else r["per_task"][key]
                            for r in rows if key == "average" or key in r["per_task"]]
                    if vals:
                        values.append(statistics.fmean(vals))
                        seeds.append(run.seed)
                        model = run.summary.get("model", "")
                        used.setdefault(method, []).extend(rows)
                cells[method] = {"values": values, "seeds": seeds, "cell": format_cell(values),
                                 "paper": paper_matches(paper, model, method, "tasks", task)}
            task_rows.append({"row": task, "setting": "all levels: " + _k_rank(used), "cells": cells})
        budget_rows = []
        for j, beta in enumerate(budgets):
            cells, used = {}, {}
            for method in methods:
                values, seeds, model = [], [], ""
                for run in group.by_method(method):
                    rows = [r for r in per_run[id(run)] if r["budget"] == beta]
                    if rows:
                        values.append(rows[0]["average"])
                        seeds.append(run.seed)
                        model = run.summary.get("model", "")
                        used.setdefault(method, []).extend(rows)
                cells[method] = {"values": values, "seeds": seeds, "cell": format_cell(values),
                                 "paper": paper_matches(paper, model, method, "budgets", "", j,
                                                        len(budgets))}
            budget_rows.append({"row": f"beta={beta:g}", "setting": _k_rank(used), "cells": cells})
        tables.append(AccuracyTable(group.label, "tasks", protocol, mode, methods, task_rows))
        tables.append(AccuracyTable(group.label, "budgets", protocol, mode, methods, budget_rows))
    return tables


def _paper_text(matches: list[dict[str, str]]) -> str:
    """``0.3611 (Table 1)`` per match, ``; ``-joined; ``no match`` when none."""
    if not matches:
        return "no match"
    return "; ".join(f"{float(p['value']):.4f} (Table {p['table']})" for p in matches)


def table_to_grid(table: AccuracyTable) -> list[list[str]]:
    """Header + rows of strings: row, K / rank, then per method ``ours`` and ``paper`` columns."""
    header = ["row", "K / rank"]
    for m in table.methods:
        header += [f"{m} (ours)", f"{m} (paper {PAPER_METHOD.get(m, '-')})"]
    grid = [header]
    for row in table.rows:
        line = [row["row"], row["setting"]]
        for m in table.methods:
            c = row["cells"][m]
            line += [c["cell"], _paper_text(c["paper"])]
        grid.append(line)
    return grid


def write_table_csv(table: AccuracyTable, path: str | Path) -> Path:
    """Write the paper-shaped (wide) table as CSV, atomically; the first lines state the protocol.

    Columns: ``row``, ``K / rank``, then per method ``<m> (ours)`` (``mean ± std
    (n=seeds)``) and ``<m> (paper <name>)`` (matched published numbers or ``no match``).
    """
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([f"# {table.title}"])
    writer.writerows(table_to_grid(table))
    atomic_write_text(Path(path), buf.getvalue())
    return Path(path)


LONG_COLUMNS = ("group", "shape", "protocol", "top_k_mode", "row", "k_rank", "method", "mean", "std", "n",
                "seeds", "paper_method", "paper_table", "paper_row", "paper_value", "paper_source")


def long_rows(tables: list[AccuracyTable]) -> list[dict[str, Any]]:
    """One numeric row per (table, row, method, matched paper number) with the columns :data:`LONG_COLUMNS`.

    A cell without a matching paper number has one row with empty ``paper_*`` fields.
    """
    out = []
    for t in tables:
        for row in t.rows:
            for m in t.methods:
                c = row["cells"][m]
                if not c["values"]:
                    continue
                mean, std = mean_std(c["values"])
                base = {"group": t.group, "shape": t.kind, "protocol": t.protocol, "top_k_mode": t.mode,
                        "row": row["row"], "k_rank": row["setting"], "method": m, "mean": mean,
                        "std": "" if std is None else std, "n": len(c["values"]),
                        "seeds": " ".join(str(s) for s in c["seeds"])}
                for p in c["paper"] or [None]:
                    out.append({**base, **({"paper_method": p["method"], "paper_table": p["table"],
                                            "paper_row": p["row"], "paper_value": float(p["value"]),
                                            "paper_source": p["source"]} if p else
                                           {k: "" for k in LONG_COLUMNS if k.startswith("paper_")})})
    return out


def write_long_csv(tables: list[AccuracyTable], path: str | Path) -> Path:
    """Write :func:`long_rows` as CSV (header :data:`LONG_COLUMNS`), atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(LONG_COLUMNS))
    writer.writeheader()
    writer.writerows(long_rows(tables))
    atomic_write_text(Path(path), buf.getvalue())
    return Path(path)


def markdown_table(grid: list[list[str]]) -> str:
    """A GitHub-flavoured markdown table of a header + rows grid (``|`` escaped)."""
    def esc(s: str) -> str:
        """The cell text with ``|`` escaped."""
        return str(s).replace("|", "\\|")

    lines = ["| " + " | ".join(esc(c) for c in grid[0]) + " |",
             "|" + "|".join("---" for _ in grid[0]) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in grid[1:]]
    return "\n".join(lines)
