"""Figures of the evaluation rows beyond accuracy: held-out loss and eval-time expert utilization per level.

Same conventions as :mod:`ubsmoe.report.figures` (one line per method, mean over
seeds with the sample std as error bars, budget levels on a log axis).
"""

from __future__ import annotations

from pathlib import Path

from ubsmoe.report.plotting import (
    FigureResult,
    draw_average_per_budget,
    draw_per_budget,
    new_figure,
    save_figure,
)
from ubsmoe.report.runs import RunGroup
from ubsmoe.report.tables import protocols_and_modes
from ubsmoe.report.utilization import level_utilization, utilization_modes


def fig_loss_per_budget(group: RunGroup, path: Path) -> FigureResult:
    """Average loss over tasks per budget level beta, one line per method (lower is better).

    One axis per K mode the runs were scored with (``budget`` first); error bars
    are the sample std over seeds, as every report figure.

    Args:
        group: a :class:`~ubsmoe.report.runs.RunGroup`.
        path: the PNG to write.

    Returns:
        A :class:`~ubsmoe.report.figures.FigureResult` (skipped when no run has
        ``loss`` rows).
    """
    name, title = "loss_per_budget", "Average held-out loss over tasks per budget level (final round)"
    modes = sorted((m for p, m in protocols_and_modes(group) if p == "loss"), key=lambda m: m != "budget")
    if not modes:
        return FigureResult(name, title, None, "no loss rows in the summaries (eval.protocols without loss)")
    fig, axes = new_figure(len(modes))
    for ax, mode in zip(axes, modes):
        draw_average_per_budget(ax, group, "loss", mode, "loss (nats per token, mean over tasks; lower is better)")
    fig.suptitle(title, fontsize=11)
    return FigureResult(name, title, save_figure(fig, path))


def fig_eval_utilization_per_budget(group: RunGroup, path: Path) -> FigureResult:
    """Eval-time utilization entropy and Gini per budget level, one line per method (K from budget).

    Args:
        group: the runs of one setting.
        path: the PNG to write.

    Returns:
        A :class:`~ubsmoe.report.figures.FigureResult`, skipped when no run's eval
        rows carry utilization (``eval.utilization`` off, or a dense model).
    """
    name, title = ("eval_utilization_per_budget",
                   "Expert utilization at evaluation per budget level (same tokens for every method)")
    modes = utilization_modes(group)
    if not modes:
        return FigureResult(name, title, None, "no eval rows with utilization (eval.utilization off, "
                                                 "or no SMoE layer)")
    mode = modes[0]
    fig, axes = new_figure(2)
    for ax, (key, label) in zip(axes, [("entropy", "entropy (nats, mean over layers)"),
                                       ("gini", "Gini coefficient (mean over layers)")]):
        draw_per_budget(ax, group, lambda run, key=key: {b: float(u[key]["mean"]) for b, u in
                                                         (level_utilization(run, mode) or {}).items()},
                        "budget level β (evaluated at its K, log scale)", label, f"{key}, K from {mode}")
        if key == "entropy":
            entropy_max = next((u["entropy"]["max"] for run in group.runs
                                for u in (level_utilization(run, mode) or {}).values()
                                if "max" in u["entropy"]), None)
            if entropy_max is not None:
                ax.axhline(entropy_max, color="gray", linestyle="--", linewidth=1,
                           label=f"uniform over experts, ln E = {entropy_max:.2f}")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return FigureResult(name, title, save_figure(fig, path))
