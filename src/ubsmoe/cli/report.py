"""``ubsmoe report``: the cross-run report (markdown, CSV tables, figures) of run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ubsmoe.cli.app import app, console, fail
from ubsmoe.cli.run import print_summary
from ubsmoe.report import load_summary
from ubsmoe.report.runs import SUMMARY_FILE


@app.command()
def report(
    dirs: Annotated[list[Path], typer.Argument(
        help="run directories, or folders searched recursively for run directories")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="report folder (default: DIR/report for one DIR; required for several)")]
        = None,
) -> None:
    """Cross-run report: report.md, paper-shaped CSV tables and PNG figures (one run: also its tables)."""
    # matplotlib (about a second): only for this command, so the others start fast
    from ubsmoe.report.build import build_report, group_rich_tables

    if out is None:
        if len(dirs) > 1:
            fail(f"--out: required with several DIRs (got {len(dirs)}); give the report folder")
        out = dirs[0] / "report"
    single = len(dirs) == 1 and (dirs[0] / SUMMARY_FILE).is_file()
    if single:
        print_summary(load_summary(dirs[0]), dirs[0])
    command = " ".join(["ubsmoe report", *map(str, dirs), f"--out {out}"])
    try:
        result = build_report(dirs, out, command=command)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if not single:
        for table in group_rich_tables(result):
            console.print(table)
    for run in result.incomplete:
        console.print(f"incomplete (no summary.json): {run.path}", highlight=False)
    skipped = [f for f in result.figures if f.path is None]
    console.print(f"report: {result.markdown} ({len(result.runs)} runs, {len(result.groups)} group(s), "
                  f"{len(result.csvs)} CSV, {len(result.figures) - len(skipped)} figures"
                  + (f", {len(skipped)} skipped: see report.md" if skipped else "") + ")", highlight=False)


