"""``ubsmoe bench``: performance suites written to one JSON report.

The project's claim is that a weak client really computes less. The suites measure
it: each is a function registered under a name with :func:`register_suite` that
returns a JSON-ready dict. :func:`run_bench` runs the selected suites in one
process and assembles the report::

    {
      "schema": "ubsmoe-bench/1",
      "created": ISO time, "command": the command line, "quick": bool,
      "environment": versions, CPU, threads, load average,
      "suites": {name: the suite's dict, ...},
      "summary": {name: the suite's headline figures, ...}
    }

A suite's dict holds at least ``description``, ``wall_s`` (seconds the suite took)
and ``load_average`` (``[1, 5, 15]``-minute load before and after it: timings on a
shared machine are only comparable within a suite). Suites that time things use
:func:`interleaved_timings`: every case runs once per repeat, in alternating order
(A, B, C, then C, B, A, ...), so a change in machine load hits all cases alike, and
:func:`ratio_stats` gives both the ratio of medians and the median of per-repeat
ratios. Suites: ``layer``, ``model_step`` (compute per budget), ``server_memory`` and
``federated`` (server memory, traffic, Flower overhead), ``dispatch`` (ATen
operations of a local step, a kernel-launch proxy), ``eval`` (evaluation
examples per second); a new suite is a module that
calls :func:`register_suite`, imported at the bottom of this file.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import torch

SCHEMA = "ubsmoe-bench/1"

SuiteFn = Callable[["BenchOptions"], dict[str, Any]]
_SUITES: dict[str, SuiteFn] = {}


@dataclass
class BenchOptions:
    """Options shared by every suite.

    Attributes:
        quick: tiny shapes and two repeats: checks that every suite runs and
            reports every field (for tests), not a measurement.
        repeats: timed runs per case (medians and min/max are over these);
            None: the suite's default (quick: 2).
        warmup: untimed runs per case before timing; None: the suite's default.
        threads: ``torch.set_num_threads`` for the run; None keeps the current value.
        seed: seed of every random tensor and model.
    """

    quick: bool = False
    repeats: int | None = None
    warmup: int | None = None
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        errors = []
        if self.repeats is not None and self.repeats < 1:
            errors.append(f"repeats: got {self.repeats}, expected an integer >= 1")
        if self.warmup is not None and self.warmup < 0:
            errors.append(f"warmup: got {self.warmup}, expected an integer >= 0")
        if self.threads is not None and self.threads < 1:
            errors.append(f"threads: got {self.threads}, expected an integer >= 1")
        if errors:
            raise ValueError("; ".join(errors))

    def n_repeats(self, default: int) -> int:
        """Timed repeats: the option if set, else 2 in quick mode, else ``default``."""
        if self.repeats is not None:
            return self.repeats
        return 2 if self.quick else default

    def n_warmup(self, default: int) -> int:
        """Warm-up runs: the option if set, else 1 in quick mode, else ``default``."""
        if self.warmup is not None:
            return self.warmup
        return 1 if self.quick else default


def register_suite(name: str) -> Callable[[SuiteFn], SuiteFn]:
    """Decorator registering a suite function ``fn(options) -> dict`` under ``name``.

    Raises:
        ValueError: ``name`` is registered already.
    """

    def wrap(fn: SuiteFn) -> SuiteFn:
        """Register ``fn``."""
        if name in _SUITES:
            raise ValueError(f"bench suite {name!r} is registered twice")
        _SUITES[name] = fn
        return fn

    return wrap


def available_suites() -> list[str]:
    """Registered suite names in registration order (the default run order)."""
    return list(_SUITES)


def environment() -> dict[str, Any]:
    """Versions, CPU and thread settings of this process (JSON-ready)."""
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.is_available(),
        "load_average": load_average(),
        # OpenMP waiting matters on a shared machine: with spinning threads (the default)
        # and oversubscribed cores every per-expert matmul's barrier can cost a time slice.
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                                "MKL_NUM_THREADS", "GOMP_SPINCOUNT")},
    }


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute system load averages, or None where unsupported."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


@contextmanager
def num_threads(threads: int | None):
    """Run the block with ``torch.set_num_threads(threads)`` (None: unchanged)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def summarize(times: list[float]) -> dict[str, Any]:
    """Median, min, max and all values of a list of durations in seconds."""
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "times_s": list(times),
    }


def device_sync(device: str | torch.device) -> Callable[[], None] | None:
    """What waits for ``device``'s queued work: ``torch.cuda.synchronize`` on CUDA, else None.

    CUDA kernels run asynchronously, so a wall-clock timing of a call that launches
    them must synchronize before reading the clock (pass this as
    :func:`interleaved_timings`' ``sync``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def interleaved_timings(cases: dict[str, Callable[[], Any]], repeats: int,
                        warmup: int, sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Time every case ``repeats`` times, interleaved, after ``warmup`` untimed runs each.

    Within repeat i the cases run in the given order for even i and reversed for odd
    i, so that neither position nor a drift in machine load favours a case.

    Args:
        cases: name -> a callable running one unit of work (e.g. a forward+backward).
        repeats: timed runs per case (>= 1).
        warmup: untimed runs per case first (>= 0).
        sync: called before the clock starts and before it stops (e.g.
            :func:`device_sync` of a CUDA device), so asynchronous work of a case
            is timed in full and none of it spills into the next case.

    Returns:
        name -> ``repeats`` wall-clock durations in seconds (``time.perf_counter``).
    """
    names = list(cases)
    wait = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else names[::-1]:
            wait()
            start = time.perf_counter()
            cases[name]()
            wait()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_stats(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Ratio of two cases' timings measured side by side.

    Args:
        numerator, denominator: durations from one :func:`interleaved_timings` call
            (same length; element i of both comes from repeat i).

    Returns:
        ``of_medians`` (median / median) and the median, min and max of the
        per-repeat ratios ``numerator[i] / denominator[i]``.
    """
    paired = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {
        "of_medians": statistics.median(numerator) / statistics.median(denominator),
        "paired_median": statistics.median(paired),
        "paired_min": min(paired),
        "paired_max": max(paired),
    }


def run_bench(suites: list[str] | None = None, options: BenchOptions | None = None,
              command: str = "", progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the selected suites in this process and assemble the report.

    Args:
        suites: suite names (None: all, in registration order).
        options: shared options.
        command: the command line that produced the report (stored as is).
        progress: called with a suite's name before it starts.

    Returns:
        The report dict (see the module docstring).

    Raises:
        ValueError: an unknown suite name (the message lists the available ones).
    """
    options = options or BenchOptions()
    names = available_suites() if suites is None else list(suites)
    unknown = [n for n in names if n not in _SUITES]
    if unknown or not names:
        raise ValueError(
            f"suites: got {unknown or names}, expected one or more of {', '.join(available_suites())}"
        )
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "quick": options.quick,
        "options": {"repeats": options.repeats, "warmup": options.warmup,
                    "threads": options.threads, "seed": options.seed},
        "suites": {},
        "summary": {},
    }
    with num_threads(options.threads):
        report["environment"] = environment()
        for name in names:
            if progress is not None:
                progress(name)
            before = load_average()
            start = time.perf_counter()
            result = _SUITES[name](options)
            result["wall_s"] = time.perf_counter() - start
            result["load_average"] = {"before": before, "after": load_average()}
            report["suites"][name] = result
            report["summary"][name] = result.get("summary", {})
    return report


# Suite modules register themselves on import (order = default run order).
from ubsmoe.bench import layer, model_step, server  # noqa: F401, I001
from ubsmoe.bench import dispatch  # noqa: F401  (operation counts, issue 24)
from ubsmoe.bench import evaluation  # noqa: F401  (registered last: runs last)
