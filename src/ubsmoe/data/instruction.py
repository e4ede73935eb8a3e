"""Any instruction data: a folder of tasks in the LLM-Adapters / Alpaca format, or an
HF dataset with a column mapping (``data.name=instruction``; docs/data-and-models.md, "Your own data").

A folder holds one sub-folder per task with ``train.json`` and/or ``test.json``, each a
JSON list of records ``{"instruction", "input" (optional), "output", "answer"
(optional)}`` (the format of LLM-Adapters, Hu et al., EMNLP 2023, arXiv 2304.01933,
and of Alpaca). A top-level ``train.json`` is a combined training file: a record's
task is its ``data.task_field`` value when present, else the folder's name. Splits,
carving of test-only tasks and de-duplication are the commonsense loader's
(:func:`ubsmoe.data.commonsense.add_task`, :func:`~ubsmoe.data.commonsense.finish_split`).

Each task gets an answer type (``label``, ``letter``, ``numeric``, ``text``), from
``data.answer_types`` or :func:`detect_answer_type`; the metric follows it
(:mod:`ubsmoe.eval.instruction`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ubsmoe.config import COMMONSENSE_TASKS, DataConfig
from ubsmoe.data.commonsense import CommonsenseData, add_task, finish_split, load_commonsense
from ubsmoe.errors import ConfigError

COMBINED_FILE = "train.json"
# Gold answers of the commonsense suite ("true", "solution2", "answer3", "ending1", "option2").
LABEL_PATTERN = re.compile(r"^(true|false|solution\d|answer\d|ending\d|option\d)$")
# An option letter A-E, optionally "(B)" or "B." / "B)".
LETTER_PATTERN = re.compile(r"^\(?([A-E])[).]?$")


def parse_number(text: str) -> float | None:
    """``text`` as a number, thousands separators (``,``) removed; None if it is not one.

    Args:
        text: e.g. ``"1,234.5"``, ``" -3 "``, ``"7/2"`` (not a number: None).

    Returns:
        The float value, or None.
    """
    try:
        value = float(text.strip().replace(",", ""))
    except ValueError:
        return None
    return None if math.isnan(value) else value  # NaN is not an answer


def gold_answer(record: dict[str, Any]) -> str:
    """The reference answer of a record: its ``"answer"`` when non-empty, else its ``"output"``.

    Returns:
        The stripped answer string.
    """
    answer = record.get("answer")
    if answer is None or str(answer).strip() == "":
        answer = record["output"]
    return str(answer).strip()


def detect_answer_type(task: str, records: list[dict[str, Any]]) -> str:
    """The answer type of a task, by the documented rule (docs/data-and-models.md, "Your own data").

    In order: a commonsense task name, or every gold answer (:func:`gold_answer`)
    a commonsense label (``true``/``false``, ``solutionN``, ``answerN``, ``endingN``,
    ``optionN``) -> ``label``; every gold answer an option letter ``A``-``E``
    (optionally ``(B)``, ``B.``, ``B)``) -> ``letter``; every gold answer a number
    (:func:`parse_number`) -> ``numeric``; otherwise (or no records) -> ``text``.

    Args:
        task: the task name.
        records: the task's records (train and test).

    Returns:
        One of ``label``, ``letter``, ``numeric``, ``text``.
    """
    if task in COMMONSENSE_TASKS:
        return "label"
    answers = [gold_answer(r) for r in records]
    if not answers:
        return "text"
    if all(LABEL_PATTERN.match(a) for a in answers):
        return "label"
    if all(LETTER_PATTERN.match(a) for a in answers):
        return "letter"
    if all(parse_number(a) is not None for a in answers):
        return "numeric"
    return "text"


def _check_records(records: Any, file: str) -> list[dict[str, Any]]:
    """Validate a parsed JSON file: a list of records with string instruction/output."""
    if not isinstance(records, list):
        raise ConfigError(f"data.path: {file}: expected a JSON list of records, got {type(records).__name__}")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ConfigError(f"data.path: {file}: record {i} is not an object")
        for key in ("instruction", "output"):
            if not isinstance(r.get(key), str):
                raise ConfigError(
                    f"data.path: {file}: record {i} has no string {key!r} (records need 'instruction' "
                    "and 'output'; 'input' and 'answer' are optional)")
        if r.get("input") is not None and not isinstance(r["input"], str):
            raise ConfigError(f"data.path: {file}: record {i} has a non-string 'input'")
    return records


def read_instruction_file(file: Path, task: str, task_field: str = "") -> list[dict[str, Any]]:
    """Records of one JSON file, each copied with ``"task"`` set.

    Args:
        file: a JSON list of records.
        task: the task of every record, unless ``task_field`` names a field a
            record carries (a combined file).
        task_field: the record field holding the task (empty: always ``task``).

    Returns:
        The records, in file order.

    Raises:
        ConfigError: the file cannot be read, is not valid JSON, not a list, or a
            record lacks a string ``instruction`` / ``output`` (one line naming the
            file and the record's index).
    """
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"data.path: cannot read {str(file)!r} ({e})") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"data.path: {str(file)!r} is not valid JSON ({e})") from e
    records = _check_records(records, repr(str(file)))
    out = []
    for r in records:
        own = r.get(task_field) if task_field else None
        out.append({**r, "task": str(own) if own not in (None, "") else task})
    return out


def _load_hf(cfg: DataConfig) -> tuple[dict[str, list[dict[str, Any]]], bool]:
    """Records of ``cfg.hf_dataset`` by task, and whether they carry a task column."""
    try:
        # optional and slow to import: only a hub data source needs it
        import datasets

        dataset = datasets.load_dataset(cfg.hf_dataset, split=cfg.hf_split)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"data.hf_dataset: cannot load {cfg.hf_dataset!r} split {cfg.hf_split!r} with "
            f"datasets.load_dataset (the hub needs a network; offline, point data.path at a "
            f"local copy): {first}") from e
    missing = [c for c in cfg.columns.values() if c not in dataset.column_names]
    if missing:
        raise ConfigError(f"data.columns: {missing} not in {cfg.hf_dataset!r}'s columns "
                          f"{dataset.column_names}")
    default = cfg.hf_dataset.rstrip("/").split("/")[-1]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for i, row in enumerate(dataset):
        record = {field: ("" if row[col] is None else str(row[col])) for field, col in cfg.columns.items()}
        if not record["instruction"]:
            raise ConfigError(f"data.hf_dataset: {cfg.hf_dataset!r} row {i} has an empty "
                              f"{cfg.columns['instruction']!r} (the instruction)")
        record["task"] = record.get("task") or default
        by_task.setdefault(record["task"], []).append(record)
    return by_task, "task" in cfg.columns


def load_instruction(cfg: DataConfig, seed: int) -> CommonsenseData:
    """Load instruction data from ``cfg.path`` (a task folder) or ``cfg.hf_dataset``.

    Folder: tasks are the sub-folders holding ``train.json`` and/or ``test.json``
    (sorted by name), plus the tasks named in a top-level ``train.json`` (its
    records' ``cfg.task_field``, else the folder's name); ``cfg.tasks`` filters
    them (a requested task not found is reported in ``skipped``). A task's
    training records are its ``train.json`` and its combined-file records; a task
    with only ``test.json`` gets the carved split of the commonsense loader. HF
    dataset: the rows of ``cfg.hf_split`` mapped by ``cfg.columns``, grouped by
    their ``task`` column (else one task named after the dataset), each group
    carved like a test-only task. Then duplicates and training records that are
    test questions are dropped and the pool sampled (``cfg.train_examples``).

    Args:
        cfg: the data config (``name == "instruction"``).
        seed: base seed of carving and sampling.

    Returns:
        A :class:`~ubsmoe.data.commonsense.CommonsenseData` with ``answer_types``
        (``cfg.answer_types`` first, else :func:`detect_answer_type` on the task's
        records) and ``partition_by`` (``task``, or ``iid`` when no record names a task).

    Raises:
        ConfigError: neither ``data.path`` nor ``data.hf_dataset`` is set, the
            folder holds no task data, a file is malformed, the HF dataset cannot
            be loaded, or none of ``cfg.tasks`` has data.
    """
    per_task: dict[str, dict[str, list[dict[str, Any]]]] = {}
    carries_task = True
    if cfg.hf_dataset:
        by_task, carries_task = _load_hf(cfg)
        for task, records in by_task.items():
            per_task[task] = {"test": records}
        source = cfg.hf_dataset
    else:
        if not cfg.path:
            raise ConfigError("data.path: required with data.name=instruction (a folder of "
                              "<task>/train.json and/or <task>/test.json), or set data.hf_dataset")
        root = Path(cfg.path).expanduser()
        if not root.is_dir():
            raise ConfigError(f"data.path: {str(root)!r} does not exist or is not a folder")
        root = root.resolve()
        source = str(root)
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            for split in ("train", "test"):
                file = folder / f"{split}.json"
                if file.is_file():
                    per_task.setdefault(folder.name, {})[split] = read_instruction_file(file, folder.name)
        combined = root / COMBINED_FILE
        if combined.is_file():
            records = read_instruction_file(combined, "", cfg.task_field)
            carries_task = any(r["task"] for r in records) or bool(per_task)
            for r in records:
                r["task"] = r["task"] or root.name
                per_task.setdefault(r["task"], {}).setdefault("train", []).append(r)
        if not per_task:
            raise ConfigError(f"data.path: {source!r} holds no task folder with train.json or "
                              f"test.json and no top-level {COMBINED_FILE}")
    tasks = list(cfg.tasks) if cfg.tasks else sorted(per_task)
    out = CommonsenseData(data_dir=source)
    for task in tasks:
        splits = per_task.get(task)
        if not splits:
            out.skipped[task] = f"no data for task {task!r} in {source}"
            continue
        add_task(out, task, splits.get("train"), splits.get("test"), cfg.carved_train_fraction, seed)
        given = cfg.answer_types.get(task)
        out.answer_types[task] = given or detect_answer_type(
            task, (splits.get("train") or []) + (splits.get("test") or []))
    if len(out.skipped) == len(tasks):
        raise ConfigError(f"data.tasks: none of {tasks} found in {source!r} (found: {sorted(per_task)})")
    out.partition_by = "task" if carries_task else "iid"
    return finish_split(out, cfg.train_examples, seed)


def load_data(cfg: DataConfig, seed: int) -> CommonsenseData:
    """Load the run's data by ``cfg.name``: :func:`~ubsmoe.data.commonsense.load_commonsense`
    or :func:`load_instruction`.

    Raises:
        ConfigError: as the chosen loader.
    """
    if cfg.name == "instruction":
        return load_instruction(cfg, seed)
    return load_commonsense(cfg, seed)
