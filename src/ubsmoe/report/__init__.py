"""Reports of runs: console tables (:mod:`~ubsmoe.report.console`), the cross-run report
(:mod:`~ubsmoe.report.build`: runs, paper-shaped CSV tables, figures). This package only re-exports."""

from ubsmoe.report.console import (
    accuracy_table,
    bench_tables,
    change_table,
    flops_notes,
    flops_tables,
    load_summary,
    plan_tables,
)

__all__ = [
    "accuracy_table",
    "bench_tables",
    "change_table",
    "flops_notes",
    "flops_tables",
    "load_summary",
    "plan_tables",
]
