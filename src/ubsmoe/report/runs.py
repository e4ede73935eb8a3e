"""Loading finished (and unfinished) run directories for the cross-run report.

A run directory holds ``summary.json`` (written when the run finishes),
``metrics.jsonl`` (one record per line: ``train``, ``diagnostics``, ``eval``,
``timing``), ``config.yaml`` and, from ``ubsmoe sweep``, ``cell.json``
(``{"experiment", "scale", "label", "settings", "seed", "config_hash"}``).
Pure file reading: no torch, no Flower.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ubsmoe.io import read_jsonl

SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
CELL_FILE = "cell.json"
CELL_KEYS = ("experiment", "scale", "label", "settings", "seed", "config_hash")


@dataclass
class RunRecord:
    """One run directory as loaded for the report.

    Attributes:
        path: the run directory.
        summary: ``summary.json`` (None: the run has not finished).
        metrics: the ``metrics.jsonl`` records, in file order (a truncated last line is dropped).
        config: ``config.yaml`` as a plain dict (empty when absent).
        cell: ``cell.json`` of a sweep cell, or None.
    """

    path: Path
    summary: dict[str, Any] | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    cell: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        """The run wrote its summary."""
        return self.summary is not None

    @property
    def method(self) -> str:
        """The method name (cell settings, then summary, then config; ``?`` when unknown)."""
        if self.cell and "method" in self.cell.get("settings", {}):
            return str(self.cell["settings"]["method"])
        if self.summary and "method" in self.summary:
            return str(self.summary["method"])
        return str(self.config.get("method", "?"))

    @property
    def seed(self) -> int | None:
        """The run's seed (``cell.json`` seed, else ``train.seed`` of config.yaml)."""
        if self.cell and "seed" in self.cell:
            return int(self.cell["seed"])
        seed = self.config.get("train", {}).get("seed")
        return None if seed is None else int(seed)

    def records(self, kind: str) -> list[dict[str, Any]]:
        """The metrics records of ``type == kind``, in round order."""
        return [r for r in self.metrics if r.get("type") == kind]


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (:func:`ubsmoe.io.read_jsonl`); none when the file is absent."""
    return read_jsonl(path) if path.is_file() else []


def load_run(run_dir: str | Path) -> RunRecord:
    """Load one run directory (finished or not).

    Raises:
        ValueError: ``cell.json`` or ``summary.json`` is not valid JSON, or
            ``cell.json`` lacks a key of :data:`CELL_KEYS` (the message names the file).
    """
    run_dir = Path(run_dir)
    summary = None
    if (run_dir / SUMMARY_FILE).is_file():
        try:
            summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{run_dir / SUMMARY_FILE}: not valid JSON ({e})") from e
    cell = None
    if (run_dir / CELL_FILE).is_file():
        try:
            cell = json.loads((run_dir / CELL_FILE).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{run_dir / CELL_FILE}: not valid JSON ({e})") from e
        missing = [k for k in CELL_KEYS if k not in cell]
        if missing:
            raise ValueError(f"{run_dir / CELL_FILE}: missing {', '.join(missing)}; expected keys "
                             f"{', '.join(CELL_KEYS)}")
    config: dict[str, Any] = {}
    if (run_dir / CONFIG_FILE).is_file():
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")) or {}
    return RunRecord(run_dir, summary, _read_jsonl(run_dir / METRICS_FILE), config, cell)


def is_run_dir(path: Path) -> bool:
    """A run directory: has summary.json, metrics.jsonl or cell.json."""
    return any((path / f).is_file() for f in (SUMMARY_FILE, METRICS_FILE, CELL_FILE))


def find_runs(dirs: list[str | Path]) -> list[RunRecord]:
    """Every run directory in ``dirs``: each is a run directory or a folder searched recursively.

    A folder counts as a run directory when it holds ``summary.json``,
    ``metrics.jsonl`` or ``cell.json`` (so unfinished runs are found too); the
    search does not descend into a run directory.

    Returns:
        Loaded runs, sorted by path, each once.

    Raises:
        FileNotFoundError: a path in ``dirs`` does not exist or is not a directory.
        ValueError: a malformed ``cell.json`` / ``summary.json`` (see :func:`load_run`).
    """
    found: dict[Path, RunRecord] = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            raise FileNotFoundError(f"DIR: {str(d)!r} is not a directory (expected a run directory or a "
                                    "folder of run directories)")
        stack = [d]
        while stack:
            p = stack.pop()
            if is_run_dir(p):
                found.setdefault(p.resolve(), load_run(p))
                continue
            stack.extend(sorted((c for c in p.iterdir() if c.is_dir() and c.name != "checkpoints"),
                                reverse=True))
    return [found[k] for k in sorted(found)]


def _freeze(value: Any) -> Any:
    """A hashable, order-independent form of a JSON value."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def privacy_setting(summary: dict[str, Any]) -> str | None:
    """A run's DP setting from ``summary["privacy"]``, e.g. ``central sigma=2.85 C=0.1 groups=all``.

    Returns:
        None for a run without DP (no ``privacy`` entry).
    """
    dp = summary.get("privacy")
    if not dp:
        return None
    return (f"{dp['mode']} sigma={dp['noise_multiplier']:g} C={dp['clipping_norm']:g} "
            f"sigma_k={dp['counts_noise_multiplier']:g} groups={','.join(dp['groups'])}")


def privacy_text(summary: dict[str, Any] | None) -> str:
    """The report's privacy cell: ``off`` or ``central, epsilon 7.9 at delta 1e-05`` (``inf``: no noise)."""
    dp = (summary or {}).get("privacy")
    if not dp:
        return "off"
    eps = "inf" if dp.get("epsilon") is None else f"{dp['epsilon']:.3g}"
    return f"{dp['mode']}, epsilon {eps} at delta {dp['delta']:g}"


def group_key(run: RunRecord) -> tuple[str, tuple]:
    """The setting a run belongs to: everything but the method and the seed.

    With ``cell.json``: ``(experiment, settings minus method and seed)``. Without:
    the summary's model, number of clients, budget levels, rounds, scored tasks
    and examples per task, plus config.yaml's budget pattern and partition, and
    the DP setting (:func:`privacy_setting`; runs without DP have none).

    Returns:
        ``(label, key)``: a readable label and a hashable key.
    """
    if run.cell is not None:
        settings = {k: v for k, v in run.cell["settings"].items() if k not in ("method", "seed")}
        text = ", ".join(f"{k}={v}" for k, v in sorted(settings.items()))
        return (f"{run.cell['experiment']} ({run.cell['scale']}){': ' + text if text else ''}",
                ("cell", run.cell["experiment"], run.cell["scale"], _freeze(settings)))
    s = run.summary or {}
    fl = run.config.get("fl", {})
    data = run.config.get("data", {})
    setting = {
        "model": s.get("model", run.config.get("model", {}).get("name")),
        "clients": len(s.get("clients", [])) or fl.get("num_clients"),
        "budgets": sorted({r["budget"] for r in s.get("accuracy", [])}) or fl.get("budgets"),
        "rounds": s.get("rounds_completed", fl.get("rounds")),
        "tasks": s.get("data", {}).get("tasks_scored", data.get("tasks")),
        "examples_per_task": run.config.get("eval", {}).get("examples_per_task"),
        "budget_pattern": fl.get("budget_pattern"),
        "partition": data.get("partition"),
        "privacy": privacy_setting(s),
    }
    text = ", ".join(f"{k}={v}" for k, v in setting.items() if v is not None and k != "tasks")
    return text, ("summary", _freeze(setting))


@dataclass
class RunGroup:
    """Runs of one setting (see :func:`group_key`), across methods and seeds.

    Attributes:
        label: readable setting.
        runs: the complete runs of the group, sorted by (method, seed).
    """

    label: str
    runs: list[RunRecord]

    @property
    def methods(self) -> list[str]:
        """Methods present, in first-seen order of the sorted runs."""
        return list(dict.fromkeys(r.method for r in self.runs))

    def by_method(self, method: str) -> list[RunRecord]:
        """The group's runs of ``method`` (one per seed)."""
        return [r for r in self.runs if r.method == method]


def group_runs(runs: list[RunRecord]) -> list[RunGroup]:
    """Group the complete runs by setting (see :func:`group_key`); groups in first-seen order."""
    groups: dict[tuple, RunGroup] = {}
    for run in sorted((r for r in runs if r.complete), key=lambda r: (r.method, r.seed or 0, str(r.path))):
        label, key = group_key(run)
        groups.setdefault(key, RunGroup(label, [])).runs.append(run)
    return list(groups.values())
