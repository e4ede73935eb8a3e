"""``ubsmoe bench``: performance suites written to one JSON report.

The harness (registry, options, timing statistics, :func:`run_bench`) is
:mod:`ubsmoe.bench.harness`; the suites are :mod:`~ubsmoe.bench.layer`,
:mod:`~ubsmoe.bench.model_step`, :mod:`~ubsmoe.bench.server`,
:mod:`~ubsmoe.bench.dispatch` (ATen operations of a local step, a kernel-launch proxy),
:mod:`~ubsmoe.bench.base` (the testbed base's held-out loss and K-drop) and
:mod:`~ubsmoe.bench.evaluation`, registered in that order (the default run order)
when this package is imported. This package only re-exports.
"""

from ubsmoe.bench.harness import (
    SCHEMA,
    BenchOptions,
    SuiteFn,
    available_suites,
    device_sync,
    environment,
    interleaved_timings,
    load_average,
    num_threads,
    ratio_stats,
    register_suite,
    run_bench,
    summarize,
)

# Suite modules register themselves on import (order = default run order).
# isort: off
from ubsmoe.bench import layer, model_step, server  # noqa: F401
from ubsmoe.bench import dispatch  # noqa: F401
from ubsmoe.bench import base  # noqa: F401
from ubsmoe.bench import evaluation  # noqa: F401  (registered last: runs last)
# isort: on

__all__ = [
    "SCHEMA",
    "BenchOptions",
    "SuiteFn",
    "available_suites",
    "device_sync",
    "environment",
    "interleaved_timings",
    "load_average",
    "num_threads",
    "ratio_stats",
    "register_suite",
    "run_bench",
    "summarize",
]
