"""Figures of a group of runs (matplotlib, Agg canvas): pure functions from loaded runs to PNG files.

Each ``fig_*`` function takes a :class:`~ubsmoe.report.runs.RunGroup` and an
output path and returns a :class:`FigureResult`: the PNG path, or None and the
reason the figure was skipped (the metric was not logged by these runs). Lines
are per method: the mean over the method's seeds, with a ±1 std band (sample
std) when there are several seeds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ubsmoe.config import config_from_dict
from ubsmoe.errors import ConfigError
from ubsmoe.methods.base import phi_layer_of
from ubsmoe.metrics.flops import Budget, budget_table
from ubsmoe.metrics.model_shape import model_shape_from_config
from ubsmoe.models.architecture import olmoe_config
from ubsmoe.report.eval_figures import fig_eval_utilization_per_budget, fig_loss_per_budget
from ubsmoe.report.plotting import (
    FigureResult,
    draw_average_per_budget,
    line_style,
    mean_band,
    new_figure,
    plot_series,
    save_figure,
    seeds_label,
)
from ubsmoe.report.runs import RunGroup, RunRecord
from ubsmoe.report.tables import protocols_and_modes

ENTROPY_SCALARS = ("mean", "variance", "max")
"""Keys of a diagnostics record's ``entropy`` that are not extra entropies to plot."""


def _per_round(group: RunGroup, kind: str, value: Callable[[dict[str, Any]], float | None]
               ) -> dict[str, list[dict[int, float]]]:
    """Per method, per run: {round: value} of the ``kind`` records (None values and NaN dropped)."""
    out: dict[str, list[dict[int, float]]] = {}
    for method in group.methods:
        series = []
        for run in group.by_method(method):
            s = {}
            for r in run.records(kind):
                v = value(r)
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    s[int(r["round"])] = float(v)
            if s:
                series.append(s)
        if series:
            out[method] = series
    return out


def _round_figure(group: RunGroup, path: Path, name: str, title: str, ylabel: str,
                  panels: list[tuple[str, dict[str, list[dict[int, float]]]]], missing: str,
                  hline: tuple[float, str] | None = None,
                  hlines: list[tuple[float, str] | None] | None = None) -> FigureResult:
    """Per-round line figure with one axis per non-empty panel; skipped when all are empty.

    ``hline`` (value, label) is a dashed reference line on every panel; ``hlines``
    (one entry per panel of ``panels``, None for none) overrides it per panel.
    """
    refs = hlines if hlines is not None else [hline] * len(panels)
    kept = [(t, d, h) for (t, d), h in zip(panels, refs) if d]
    if not kept:
        return FigureResult(name, title, None, missing)
    fig, axes = new_figure(len(kept))
    for ax, (sub, data, ref) in zip(axes, kept):
        for i, (method, series) in enumerate(data.items()):
            xs, m, s = mean_band(series)
            plot_series(ax, xs, m, s, f"{method} {seeds_label(series)}", **line_style(i))
        if ref is not None:
            ax.axhline(ref[0], color="gray", linestyle="--", linewidth=1, label=ref[1])
        ax.set_xlabel("federated round")
        ax.set_ylabel(ylabel)
        ax.set_title(sub, fontsize=10)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return FigureResult(name, title, save_figure(fig, path))


def fig_accuracy_per_budget(group: RunGroup, path: Path) -> FigureResult:
    """Average accuracy over tasks per budget level beta, one line per method, one axis per protocol."""
    name, title = "accuracy_per_budget", "Average accuracy over tasks per budget level (final round)"
    scored = [(p, m) for p, m in protocols_and_modes(group) if p != "loss"]  # loss: fig_loss_per_budget
    pairs = [(p, m) for p, m in scored if m == "budget"] or scored
    if not pairs:
        return FigureResult(name, title, None, "no accuracy rows in the summaries")
    fig, axes = new_figure(len(pairs))
    for ax, (protocol, mode) in zip(axes, pairs):
        draw_average_per_budget(ax, group, protocol, mode, "accuracy (fraction correct, mean over tasks)")
    fig.suptitle(title, fontsize=11)
    return FigureResult(name, title, save_figure(fig, path))


def fig_entropy_per_round(group: RunGroup, path: Path) -> FigureResult:
    """Utilization entropy per round: per-layer mean, and any further entropy the runs logged.

    Further entropies are the numeric keys of the diagnostics record's ``entropy``
    other than ``per_layer``/``mean``/``variance``/``max`` (e.g. one over all
    layer-expert pairs); without them that panel is left out and the note says so.
    """
    name, title = "entropy_per_round", "Expert-utilization entropy per round (training, at each client's K_c)"
    logged = {k: v for run in group.runs for r in run.records("diagnostics")
              for k, v in r.get("entropy", {}).items() if isinstance(v, (int, float))}
    # A key `<k>_max` is the uniform-utilization maximum of entropy `<k>` (a constant), drawn as
    # that panel's reference line rather than as a series of its own.
    extra = sorted(k for k in logged if k not in ENTROPY_SCALARS and not k.endswith("_max"))
    mean = _per_round(group, "diagnostics", lambda r: r.get("entropy", {}).get("mean"))
    panels = [("mean over layers of the per-layer entropy", mean)]
    refs: list[tuple[float, str] | None] = [
        (logged["max"], f"uniform over experts, ln M = {logged['max']:.2f}") if "max" in logged else None]
    for k in extra:
        sub = ("over all layer-expert pairs (entropy 'global')" if k == "global" else f"entropy '{k}'")
        panels.append((sub, _per_round(group, "diagnostics", lambda r, k=k: r.get("entropy", {}).get(k))))
        top = logged.get(f"{k}_max")
        refs.append((top, f"uniform over all pairs, ln(L·M) = {top:.2f}" if k == "global"
                     else f"maximum of '{k}' = {top:.2f}") if top is not None else None)
    res = _round_figure(group, path, name, title, "entropy (nats)", panels,
                        "no diagnostics records with utilization entropy", hlines=refs)
    if res.path is not None and not extra:
        res.note = "entropy over all layer-expert pairs: not logged by these runs (panel left out)"
    return res


def fig_entropy_per_layer(group: RunGroup, path: Path) -> FigureResult:
    """Per-layer utilization entropy at the last logged round, one line per method."""
    name, title = "entropy_per_layer", "Per-layer utilization entropy, last round (training, at each client's K_c)"
    fig, axes = new_figure(1)
    ax = axes[0]
    plotted, maxes = False, []
    for i, method in enumerate(group.methods):
        series = []
        for run in group.by_method(method):
            diag = [r for r in run.records("diagnostics") if "per_layer" in r.get("entropy", {})]
            if diag:
                series.append(dict(enumerate(diag[-1]["entropy"]["per_layer"])))
                maxes.append(diag[-1]["entropy"].get("max"))
        if series:
            xs, m, s = mean_band(series)
            plot_series(ax, xs, m, s, f"{method} {seeds_label(series)}", **line_style(i))
            plotted = True
    if not plotted:
        return FigureResult(name, title, None, "no diagnostics records with per-layer entropy")
    if maxes and maxes[0] is not None:
        ax.axhline(maxes[0], color="gray", linestyle="--", linewidth=1,
                   label=f"uniform over experts, ln M = {maxes[0]:.2f}")
    ax.set_xlabel("MoE layer index (0 = first)")
    ax.set_ylabel("entropy (nats)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    return FigureResult(name, title, save_figure(fig, path))


def fig_gini_per_round(group: RunGroup, path: Path) -> FigureResult:
    """Gini coefficient of expert utilization per round (mean over layers)."""
    return _round_figure(
        group, path, "gini_per_round",
        "Gini coefficient of expert utilization per round (training, at each client's K_c)",
        "Gini coefficient (0 = uniform, 1 = one expert)",
        [("mean over layers", _per_round(group, "diagnostics", lambda r: r.get("gini", {}).get("mean")))],
        "no diagnostics records with a Gini coefficient")


def _final_phi(run: RunRecord) -> list[list[float]] | None:
    """The global phi ``[L, E]`` of the run's last round checkpoint, or None (no phi / no checkpoint)."""
    ckpts = sorted((run.path / "checkpoints").glob("round_*.pt"))
    if not ckpts:
        return None
    try:
        state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - an unreadable checkpoint only drops the scatter
        return None
    adapters = state.get("adapters", {})
    layer_of = phi_layer_of(list(adapters))
    if not layer_of:
        return None
    return torch.stack([adapters[n].float() for n in sorted(layer_of, key=layer_of.get)]).tolist()


def fig_phi_vs_utilization(group: RunGroup, path: Path) -> FigureResult:
    """DMR phi vs utilization: correlation per round, and a scatter at the last round (phi methods only).

    Left: mean over layers of the per-layer Pearson and Spearman correlation of phi
    and u~ (``phi_utilization`` in the diagnostics). Right: every (layer, expert)
    pair of the first seed's last checkpoint, phi against the last round's u~.
    """
    name, title = "phi_vs_utilization", "DMR modulation phi vs expert utilization"
    pearson = _per_round(group, "diagnostics", lambda r: r.get("phi_utilization", {}).get("pearson"))
    spearman = _per_round(group, "diagnostics", lambda r: r.get("phi_utilization", {}).get("spearman"))
    if not pearson and not spearman:
        return FigureResult(name, title, None, "no method with phi (UB-SMoE) among these runs")
    scatter = {}
    for method in pearson:
        run = group.by_method(method)[0]
        diag = [r for r in run.records("diagnostics") if "utilization" in r]
        phi = _final_phi(run)
        if diag and phi is not None and len(phi) == len(diag[-1]["utilization"]):
            scatter[method] = (diag[-1]["utilization"], phi, run.seed, diag[-1]["round"])
    fig, axes = new_figure(2 if scatter else 1)
    ax = axes[0]
    for i, method in enumerate(sorted(set(pearson) | set(spearman))):
        for label, data, style in (("Pearson", pearson, "-"), ("Spearman", spearman, "--")):
            if method in data:
                xs, m, s = mean_band(data[method])
                plot_series(ax, xs, m, s, f"{method} {label} {seeds_label(data[method])}", linestyle=style,
                             **line_style(i))
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("federated round")
    ax.set_ylabel("correlation of phi and u~ (mean over layers)")
    ax.set_title("per-round correlation", fontsize=10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    note = ""
    if scatter:
        ax = axes[1]
        for method, (util, phi, seed, rnd) in scatter.items():
            u = [x for row in util for x in row]
            p = [x for row in phi for x in row]
            ax.scatter(u, p, s=8, alpha=0.5, label=f"{method} seed {seed}, round {rnd} "
                                                    f"({len(util)} layers x {len(util[0])} experts)")
        ax.set_xlabel("utilization u~ (share of the layer's routed tokens)")
        ax.set_ylabel("phi (DMR modulation, logit offset)")
        ax.set_title("last round, every layer-expert pair", fontsize=10)
        ax.legend(fontsize=8)
    else:
        note = "scatter left out: no round checkpoint with phi to read"
    fig.suptitle(title, fontsize=11)
    return FigureResult(name, title, save_figure(fig, path), note)


def fig_pg_alignment(group: RunGroup, path: Path) -> FigureResult:
    """Pseudo-gradient alignment per round: mean cosine over inactive experts, per method and K."""
    name, title = "pg_alignment", "Pseudo-gradient alignment with the true gradient per round"
    data: dict[str, list[dict[int, float]]] = {}
    for method in group.methods:
        ks = sorted({a["top_k"] for run in group.by_method(method) for r in run.records("diagnostics")
                     for a in r.get("pg_alignment", [])})
        for k in ks:
            series = _per_round(group, "diagnostics", lambda r, k=k: next(
                (a["mean"] for a in r.get("pg_alignment", []) if a["top_k"] == k), None))
            if method in series:
                data[f"{method} K={k}"] = series[method]
    return _round_figure(group, path, name, title, "cosine(PG, true gradient), mean over inactive experts",
                         [("probe batch, each budget level's K", data)],
                         "no PG alignment logged (no method with a pseudo-gradient, or "
                         "eval.pg_probe_examples = 0)", (0.0, "no alignment (cosine 0)"))


def fig_train_loss(group: RunGroup, path: Path) -> FigureResult:
    """Training loss per round: all clients (data-weighted) and the lowest-budget clients."""
    name, title = "train_loss", "Training loss per round"
    total = _per_round(group, "train", lambda r: r.get("loss"))
    low: dict[str, list[dict[int, float]]] = {}
    for method in group.methods:
        series = []
        for run in group.by_method(method):
            clients = run.summary.get("clients", [])
            if not clients:
                continue
            lowest = min(c["budget"] for c in clients)
            ids = {c["id"] for c in clients if c["budget"] == lowest}
            s = {}
            for r in run.records("train"):
                losses = [c["loss"] for c in r.get("clients", []) if c.get("id") in ids]
                if losses:
                    s[int(r["round"])] = statistics.fmean(losses)
            if s:
                series.append(s)
        if series:
            low[method] = series
    return _round_figure(group, path, name, title, "cross-entropy loss (nats per token)",
                         [("all clients (data-weighted mean)", total),
                          ("lowest-budget clients (mean over those sampled)", low)],
                         "no train records in metrics.jsonl")


def budget_cost(run: RunRecord) -> list[dict[str, Any]] | None:
    """Training FLOPs and activated parameters per token at each budget level the run evaluated.

    Rebuilds the model shape from the run's ``config.yaml`` (preset sizes or the
    shipped / local OLMoE config, as ``ubsmoe plan``) and counts with
    :func:`ubsmoe.metrics.flops.budget_table` at each level's evaluated K and LoRA
    rank (``top_k_mode`` ``budget`` rows), ``seq_len = data.max_length``.

    Returns:
        Per level ``{beta, top_k, lora_rank, activated_params, train_flops_per_token}``,
        or None when the config is missing or its model cannot be resolved offline.
    """
    if not run.config:
        return None
    try:
        cfg = config_from_dict(run.config)
        shape = model_shape_from_config(olmoe_config(cfg.model).to_dict(), cfg.model.name)
    except (ConfigError, ValueError, OSError, KeyError):
        return None
    rows = {}
    for r in (run.summary or {}).get("accuracy", []):
        if r.get("top_k_mode", "budget") == "budget":
            rows[r["budget"]] = Budget(r["budget"], int(r["top_k"]), int(r.get("lora_rank") or
                                                                          cfg.model.lora_rank))
    if not rows:
        return None
    table = budget_table(shape, [rows[b] for b in sorted(rows)], seq_len=cfg.data.max_length,
                         lora_targets="all" if cfg.model.attention_lora else "mlp",
                         router_trainable=cfg.model.router_trainable)
    return [{"beta": r["beta"], "top_k": r["top_k"], "lora_rank": r["lora_rank"],
             "activated_params": r["activated_params"],
             "train_flops_per_token": r["flops_per_token"]["total"]} for r in table["rows"]]


def fig_flops_params(group: RunGroup, path: Path) -> tuple[FigureResult, dict[str, list[dict[str, Any]]]]:
    """Training GFLOP per token and activated parameters per budget level, per method.

    Returns:
        The figure and the per-method cost rows (:func:`budget_cost` of the method's first run).
    """
    name, title = "flops_params", "Compute per budget level (analytic, per token)"
    costs = {}
    for method in group.methods:
        c = budget_cost(group.by_method(method)[0])
        if c:
            costs[method] = c
    if not costs:
        return FigureResult(name, title, None, "no run config from which to rebuild the model shape"), costs
    fig, axes = new_figure(2)
    betas = sorted({r["beta"] for c in costs.values() for r in c})
    big = max(r["activated_params"] for c in costs.values() for r in c)
    scale, unit = (1e9, "B") if big >= 1e9 else (1e6, "M")
    fbig = max(r["train_flops_per_token"] for c in costs.values() for r in c)
    fscale, funit = (1e9, "GFLOP") if fbig >= 1e9 else (1e6, "MFLOP")
    for i, (method, c) in enumerate(costs.items()):
        xs = [r["beta"] for r in c]
        axes[0].plot(xs, [r["train_flops_per_token"] / fscale for r in c], label=method, **line_style(i))
        axes[1].plot(xs, [r["activated_params"] / scale for r in c], label=method, **line_style(i))
    for ax, ylabel in ((axes[0], f"training {funit} per token (fwd + bwd)"),
                       (axes[1], f"activated parameters ({unit})")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(betas, [f"{b:g}" for b in betas])
        ax.set_xlabel("budget level β (log scale)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[0].set_title("training FLOPs", fontsize=10)
    axes[1].set_title("activated parameters", fontsize=10)
    fig.suptitle(title, fontsize=11)
    return FigureResult(name, title, save_figure(fig, path)), costs


FIGURES: tuple[Callable[[RunGroup, Path], FigureResult], ...] = (
    fig_accuracy_per_budget, fig_loss_per_budget, fig_eval_utilization_per_budget, fig_entropy_per_round,
    fig_entropy_per_layer, fig_gini_per_round, fig_phi_vs_utilization, fig_pg_alignment, fig_train_loss,
)
"""The per-group figures besides :func:`fig_flops_params`, in report order."""
