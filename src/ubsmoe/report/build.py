"""The cross-run report: ``report.md``, CSV tables and PNG figures from run directories.

:func:`build_report` finds the runs (:func:`ubsmoe.report.runs.find_runs`),
groups them by setting, and writes per group the paper-shaped tables
(:mod:`ubsmoe.report.tables`) and figures (:mod:`ubsmoe.report.figures`), and one
``report.md`` that ties them together with each run's provenance and the list of
unfinished runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from ubsmoe.io import atomic_write_text
from ubsmoe.report import figures as F
from ubsmoe.report.loss import LOSS_PROTOCOL_TEXT
from ubsmoe.report.runs import RunGroup, RunRecord, find_runs, group_key, group_runs, privacy_text
from ubsmoe.report.tables import (
    AccuracyTable,
    accuracy_tables,
    load_paper_tables,
    markdown_table,
    table_to_grid,
    write_long_csv,
    write_table_csv,
)
from ubsmoe.report.utilization import UTILIZATION_PROTOCOL_TEXT, utilization_tables

PROTOCOL_TEXT = {
    "generation": ("generation: greedy decoding of a response to the Alpaca prompt, first answer label "
                   "in it compared with the gold label (LLM-Adapters' protocol, as the papers)"),
    "loglik": ("loglik: every answer option scored by the summed log-probability of "
               "'the correct answer is <label>' given the prompt; the best one is the prediction"),
    "loss": LOSS_PROTOCOL_TEXT,
    **UTILIZATION_PROTOCOL_TEXT,
}
MODE_TEXT = {
    "budget": "each budget level evaluated at its own K_j (and rank r_j for the rank methods)",
    "native": "every level evaluated at the model's native top-k with that level's adapters",
}
PROVENANCE_KEYS = ("git_commit", "device", "command", "python", "platform")


@dataclass
class Report:
    """What :func:`build_report` wrote.

    Attributes:
        out: the report folder.
        markdown: ``report.md``.
        runs: every run found (complete or not).
        groups: the complete runs by setting.
        tables: every accuracy table, all groups.
        csvs: every CSV written.
        figures: every figure result (written or skipped), all groups.
    """

    out: Path
    markdown: Path
    runs: list[RunRecord]
    groups: list[RunGroup]
    tables: list[AccuracyTable] = field(default_factory=list)
    csvs: list[Path] = field(default_factory=list)
    figures: list[F.FigureResult] = field(default_factory=list)

    @property
    def incomplete(self) -> list[RunRecord]:
        """Runs without summary.json."""
        return [r for r in self.runs if not r.complete]


def provenance_text(run: RunRecord) -> str:
    """One line of the run's ``summary["provenance"]``, or ``not recorded``."""
    prov = (run.summary or {}).get("provenance")
    if not prov:
        return "not recorded"
    parts = [f"{k}: {prov[k]}" for k in PROVENANCE_KEYS if prov.get(k) not in (None, "")]
    versions = prov.get("versions") or {}
    if versions:
        parts.append("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())))
    return "; ".join(parts) if parts else "not recorded"


def _rel(path: Path, out: Path) -> str:
    """``path`` relative to ``out`` when inside it, else absolute."""
    try:
        return str(path.relative_to(out))
    except ValueError:
        return str(path)


def _run_table(runs: list[RunRecord], labels: dict[int, str]) -> str:
    """Markdown table of every run: path, method, seed, status, rounds, DP epsilon, setting group."""
    grid = [["run directory", "method", "seed", "status", "rounds", "privacy", "group"]]
    for r in runs:
        status = "complete" if r.complete else "incomplete (no summary.json)"
        rounds = (r.summary or {}).get("rounds_completed",
                                       max((int(m["round"]) for m in r.records("train")), default=0))
        grid.append([str(r.path), r.method, str(r.seed if r.seed is not None else "-"), status,
                     str(rounds), privacy_text(r.summary), labels.get(id(r), "-")])
    return markdown_table(grid)


def build_report(dirs: list[str | Path], out: str | Path, command: str = "") -> Report:
    """Write the cross-run report of the runs under ``dirs`` into ``out``.

    Writes ``report.md``; per group g (1-based) and (protocol, K mode): CSVs
    ``g{g}_tasks_{protocol}_{mode}.csv`` and ``g{g}_budgets_{protocol}_{mode}.csv``
    (paper-shaped, :func:`ubsmoe.report.tables.write_table_csv`), and per group the
    PNG figures ``g{g}_{name}.png``; over all groups ``accuracy_long.csv`` (one
    numeric row per cell and matched paper number). All writes are atomic.

    Args:
        dirs: run directories or folders of run directories.
        out: report folder (created).
        command: the command line, quoted at the top of report.md.

    Returns:
        What was written (:class:`Report`).

    Raises:
        FileNotFoundError: a path of ``dirs`` is not a directory.
        ValueError: no run directory under ``dirs``, or a malformed cell.json / summary.json.
    """
    out = Path(out)
    runs = find_runs(dirs)
    if not runs:
        raise ValueError(f"DIR: no run directory (summary.json, metrics.jsonl or cell.json) under "
                         f"{', '.join(str(d) for d in dirs)}")
    groups = group_runs(runs)
    paper = load_paper_tables()
    report = Report(out, out / "report.md", runs, groups)
    labels = {id(r): f"g{i}" for i, g in enumerate(groups, 1) for r in g.runs}
    md = ["# UB-SMoE cross-run report", ""]
    if command:
        md += [f"Command: `{command}`", ""]
    md += [(f"Runs found: {len(runs)} ({len(runs) - len(report.incomplete)} complete, "
           f"{len(report.incomplete)} incomplete), in {len(groups)} setting group(s)."), "",
           "## Runs", "", _run_table(runs, labels), ""]
    if report.incomplete:
        md += ["Incomplete runs (no summary.json; not in the tables or figures):", ""]
        for r in report.incomplete:
            rounds = max((int(m["round"]) for m in r.records("train")), default=0)
            md.append(f"- {r.path}: {r.method}, {rounds} round(s) logged, group "
                      f"{group_key(r)[0] if r.cell else '-'}")
        md.append("")
    md += ["## Provenance", ""]
    md += [f"- {r.path}: {provenance_text(r)}" for r in runs if r.complete]
    md += ["", "## How to read the tables", "",
           ("Cells are `mean ± std (n=seeds)` over the runs of a method in the group: mean and sample "
           "standard deviation (n - 1 in the denominator; `-` for one seed) of the final-round "
           "accuracy (fraction correct). Tasks tables: a run's value for a task is its accuracy "
           "averaged over the budget levels (the papers' Table 1 shape); budgets tables: a run's "
           "average over tasks at that level (Table 3 shape). `K / rank` is what each row ran at. "
           "Protocol `loss` tables hold the mean next-token loss in nats per token instead of "
           "accuracy (lower is better) and never a published number."),
           "",
           ("Published numbers (`paper_tables.csv`, shipped with ubsmoe; `source` column kept in "
           "accuracy_long.csv) sit beside ours where the setting matches: metric accuracy, from the "
           "UB-SMoE paper; the run's model is OLMoE-1B-7B (Tables 1 and 3) or the dense OLMo-1B "
           "(Table 2); the method has a published column (fedit=Homo-LoRA, hetlora=HetLoRA, "
           "flexlora=FlexLoRA, flora=FLoRA, florist=FLoRIST, smoe_llb=SMoE-LLB, a3smoe=A3SMoE, "
           "ubsmoe=UB-SMoE; naive smoe has none); a task row matches Table 1/2 by task name (or "
           "`average`), a budget row matches Table 3's beta_j by the level's "
           "position j among the run's 4 levels. Otherwise the cell says `no match`."), ""]
    for gi, group in enumerate(groups, 1):
        md += [f"## Group g{gi}: {group.label}", "",
               (f"Methods: {', '.join(f'{m} ({len(group.by_method(m))} seed(s))' for m in group.methods)}. "
               f"Model: {group.runs[0].summary.get('model')}, "
               f"{len(group.runs[0].summary.get('clients', []))} clients, "
               f"{group.runs[0].summary.get('rounds_completed')} rounds."), ""]
        tables = accuracy_tables(group, paper) + utilization_tables(group)  # eval-time entropy, Gini
        report.tables += tables
        for t in tables:
            csv_path = write_table_csv(t, out / f"g{gi}_{t.kind}_{t.protocol}_{t.mode}.csv")
            report.csvs.append(csv_path)
            matched = sum(1 for row in t.rows for c in row["cells"].values() if c["paper"])
            md += [f"### {t.kind}: protocol {t.protocol}, K from {t.mode}", "",
                   (f"Evaluation protocol: {PROTOCOL_TEXT.get(t.protocol, t.protocol)}; "
                   f"{MODE_TEXT.get(t.mode, t.mode)}."), "",
                   markdown_table(table_to_grid(t)), "",
                   f"CSV: [{csv_path.name}]({csv_path.name}). "
                   + (f"{matched} cell(s) with a published number beside them."
                      if matched else "No published number matches this setting (see the rule above)."),
                   ""]
        md += ["### Figures", ""]
        results = [fn(group, out / f"g{gi}_{fn.__name__[4:]}.png") for fn in F.FIGURES]
        flops_fig, costs = F.fig_flops_params(group, out / f"g{gi}_flops_params.png")
        results.append(flops_fig)
        report.figures += results
        for res in results:
            if res.path is None:
                md += [f"- {res.title}: not drawn ({res.note}).", ""]
            else:
                md += [f"**{res.title}**" + (f" ({res.note})" if res.note else ""), "",
                       f"![{res.title}]({_rel(res.path, out)})", ""]
        if costs:
            grid = [["method", "beta", "K", "LoRA rank", "activated params (M)", "train GFLOP/token"]]
            for method, rows in costs.items():
                grid += [[method, f"{r['beta']:g}", str(r["top_k"]), str(r["lora_rank"]),
                          f"{r['activated_params'] / 1e6:.3f}", f"{r['train_flops_per_token'] / 1e9:.4f}"]
                         for r in rows]
            md += [("Compute per budget level (ubsmoe.metrics.flops, analytic, per token; "
                   "sequence length data.max_length):"), "", markdown_table(grid), ""]
    long_csv = write_long_csv(report.tables, out / "accuracy_long.csv")
    report.csvs.append(long_csv)
    md += ["## Files", "", (f"- [{long_csv.name}]({long_csv.name}): every cell as numbers (mean, std, n, "
           "seeds) with the matched published number, its table, row and source."), ""]
    atomic_write_text(report.markdown, "\n".join(md) + "\n")
    return report


def group_rich_tables(report: Report) -> list[Any]:
    """Rich tables of each group's budgets-shaped accuracy (the terminal summary of ``ubsmoe report``).

    Paper columns with no matching published number in any row are left out of the
    terminal table (the caption says so; the CSV keeps them as ``no match``), so
    several methods still fit an 80-column terminal.
    """
    out = []
    for t in report.tables:
        if t.kind != "budgets":
            continue
        grid = table_to_grid(t)
        keep = [j for j, col in enumerate(grid[0])
                if "(paper " not in col or any(row[j] != "no match" for row in grid[1:])]
        dropped = len(grid[0]) - len(keep)
        table = Table(title=t.title, caption=(f"{dropped} paper column(s) without a matching published "
                                              "number left out (see the CSV)") if dropped else None)
        for j in keep:
            table.add_column(grid[0][j], overflow="fold")
        for row in grid[1:]:
            table.add_row(*(row[j] for j in keep))
        out.append(table)
    return out
