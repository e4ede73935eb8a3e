"""Plot plumbing every report figure shares: an Agg figure, PNG writes, mean/std bands, line styles.

Pure functions on matplotlib's object API (no pyplot state), so figures can be drawn
in any thread or process.
"""

from __future__ import annotations

import io
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ubsmoe.io import atomic_write_bytes
from ubsmoe.report.runs import RunGroup, RunRecord
from ubsmoe.report.tables import eval_rows


@dataclass
class FigureResult:
    """One figure of the report.

    Attributes:
        name: file stem, e.g. ``accuracy_per_budget``.
        title: what it shows.
        path: the PNG written, or None when skipped.
        note: why it was skipped, or what it leaves out ("" when nothing).
    """

    name: str
    title: str
    path: Path | None
    note: str = ""


def new_figure(ncols: int = 1, width: float = 6.4) -> tuple[Figure, list[Any]]:
    """A figure with ``ncols`` side-by-side axes (Agg canvas, no pyplot state)."""
    fig = Figure(figsize=(width * ncols, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def save_figure(fig: Figure, path: Path) -> Path:
    """Write the figure as PNG (120 dpi) atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    return path


def mean_band(series: list[dict[int, float]]) -> tuple[list[int], list[float], list[float] | None]:
    """Per x: the mean over runs and the sample std (None when one run); x where every run has a value."""
    xs = sorted(set.intersection(*(set(s) for s in series))) if series else []
    means = [statistics.fmean(s[x] for s in series) for x in xs]
    stds = [statistics.stdev(s[x] for s in series) for x in xs] if len(series) > 1 else None
    return xs, means, stds


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
"""Marker per method (by position in the group), so overlapping lines stay distinguishable."""


def line_style(i: int) -> dict[str, Any]:
    """Line style of the i-th series: a marker that differs between neighbours, hollow after the first."""
    return {"marker": MARKERS[i % len(MARKERS)], "markersize": 7 if i else 5,
            "markerfacecolor": "none" if i else None}


def plot_series(ax: Any, xs: list, means: list[float], stds: list[float] | None, label: str,
                 **kw: Any) -> None:
    """A mean line with markers and, when ``stds``, a shaded ±1 std band.

    ``kw`` goes to ``Axes.plot`` (e.g. :func:`line_style`'s marker); default a small circle.
    """
    kw = {"marker": "o", "markersize": 4, **kw}
    line, = ax.plot(xs, means, label=label, **kw)
    if stds is not None:
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.15, linewidth=0)


def seeds_label(runs: list[RunRecord]) -> str:
    """``(n=2)``: how many seeds a line averages."""
    return f"(n={len(runs)})"




def draw_per_budget(ax: Any, group: RunGroup, value_of: Callable[[RunRecord], dict[float, float] | None],
                    xlabel: str, ylabel: str, title: str) -> None:
    """One axis of a per-budget figure: a line per method, mean over its seeds of ``value_of(run)``.

    Sample std as error bars, budget levels beta on a log-2 axis. The caller adds the
    legend (after any reference line of its own).

    Args:
        ax: a matplotlib axis (:func:`new_figure`).
        group: the runs of one setting.
        value_of: a run -> ``{beta: value}`` (None or empty: the run has no such rows).
        xlabel, ylabel: the axis labels, with their units.
        title: the axis title.
    """
    betas: set[float] = set()
    for i, method in enumerate(group.methods):
        series = [v for v in (value_of(run) for run in group.by_method(method)) if v]
        if not series:
            continue
        xs, m, s = mean_band(series)
        betas.update(xs)
        ax.errorbar(xs, m, yerr=s, capsize=3, label=f"{method} {seeds_label(series)}", **line_style(i))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(betas), [f"{b:g}" for b in sorted(betas)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)


def draw_average_per_budget(ax: Any, group: RunGroup, protocol: str, mode: str, ylabel: str) -> None:
    """One axis of a per-budget figure: each method's task average per budget level beta.

    A line per method (mean over its seeds, sample std as error bars), budget levels
    on a log-2 axis, titled with the protocol and where K came from.

    Args:
        ax: a matplotlib axis (:func:`new_figure`).
        group: the runs of one setting.
        protocol: the eval rows' protocol (``generation``, ``loglik``, ``loss``).
        mode: the rows' K mode (``budget`` or ``native``).
        ylabel: the y axis label, with its unit.
    """
    draw_per_budget(ax, group, lambda run: {r["budget"]: r["average"] for r in eval_rows(run, protocol, mode)},
                    "budget level β (fraction of the native top-k, log scale)", ylabel,
                    f"protocol {protocol}, K from {mode}")
    ax.legend(fontsize=8)
