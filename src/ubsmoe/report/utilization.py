"""Eval-time expert utilization across methods: tables and a figure per budget level.

Each eval row of a run carries ``utilization`` (:mod:`ubsmoe.eval.utilization`): the
entropy and Gini coefficient of expert utilization measured at that level's evaluation
K over the same test tokens for every method, so these compare methods like for like
(the training-time diagnostics mix each client's K_c). A cell is ``mean ± std (n=seeds)``
over the method's runs of the mean over layers, as the accuracy tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ubsmoe.report.runs import RunGroup, RunRecord
from ubsmoe.report.tables import AccuracyTable, format_cell

UTILIZATION_METRICS = {
    "eval_entropy": ("entropy", "utilization entropy (nats, mean over layers; ln E = uniform)"),
    "eval_gini": ("gini", "utilization Gini coefficient (mean over layers; 0 = uniform)"),
}
"""Table protocol name -> (key of a row's ``utilization``, what it is)."""

UTILIZATION_PROTOCOL_TEXT = {
    name: (f"{name}: expert {what}, measured at evaluation over every scored test record "
           "(prompt, reference response, eos) at the level's K, the same tokens for every method")
    for name, (_, what) in UTILIZATION_METRICS.items()
}
"""The report's description of each utilization table (``PROTOCOL_TEXT`` entries)."""


@dataclass
class UtilizationTable(AccuracyTable):
    """A budgets-shaped table of eval-time entropy or Gini (``protocol``: a key of
    :data:`UTILIZATION_METRICS`); same fields as :class:`AccuracyTable`."""

    @property
    def title(self) -> str:
        """Readable title: the quantity, K mode and setting."""
        return (f"eval-time expert {UTILIZATION_METRICS[self.protocol][1]}, per budget level; "
                f"K from {self.mode}; setting: {self.group}")


def level_utilization(run: RunRecord, mode: str) -> dict[float, dict[str, Any]]:
    """Per budget level beta, the ``utilization`` of the run's final eval rows at ``mode``.

    Rows of one level share one measurement, so the first row with one is taken.
    """
    out: dict[float, dict[str, Any]] = {}
    for r in (run.summary or {}).get("accuracy", []):
        if r.get("top_k_mode", "budget") == mode and "utilization" in r:
            out.setdefault(r["budget"], {**r["utilization"], "top_k": r["top_k"],
                                         "lora_rank": r.get("lora_rank")})
    return out


def utilization_modes(group: RunGroup) -> list[str]:
    """K modes whose rows carry utilization in any run (``budget`` first)."""
    modes = {r.get("top_k_mode", "budget") for run in group.runs
             for r in (run.summary or {}).get("accuracy", []) if "utilization" in r}
    return sorted(modes, key=lambda m: (m != "budget", m))


def utilization_tables(group: RunGroup) -> list[UtilizationTable]:
    """Entropy and Gini tables (rows: budget levels; columns: methods) per K mode; [] when no run has them."""
    tables = []
    for mode in utilization_modes(group):
        per_run = {id(run): level_utilization(run, mode) for run in group.runs}
        budgets = sorted({b for levels in per_run.values() for b in levels})
        for name, (key, _) in UTILIZATION_METRICS.items():
            rows = []
            for beta in budgets:
                cells, settings = {}, set()
                for method in group.methods:
                    values, seeds = [], []
                    for run in group.by_method(method):
                        level = per_run[id(run)].get(beta)
                        if level is not None:
                            values.append(float(level[key]["mean"]))
                            seeds.append(run.seed)
                            settings.add(f"K={level['top_k']}")
                    cells[method] = {"values": values, "seeds": seeds, "cell": format_cell(values), "paper": []}
                rows.append({"row": f"beta={beta:g}", "setting": "/".join(sorted(settings)), "cells": cells})
            tables.append(UtilizationTable(group.label, "budgets", name, mode, group.methods, rows))
    return tables
