"""Commonsense instruction data in the LLM-Adapters format: download, loading, label sets.

The data is the commonsense suite of LLM-Adapters (Hu et al., "LLM-Adapters: An
Adapter Family for Parameter-Efficient Fine-Tuning of Large Language Models",
EMNLP 2023, arXiv 2304.01933; https://github.com/AGI-Edgerunners/LLM-Adapters):
one folder per task holding ``train.json`` and/or ``test.json``, each a JSON list
of records ``{"instruction", "input", "output", "answer"}``. ``answer`` is the
label (``"true"``, ``"solution2"``, ``"answer3"``, ``"option1"``, ...) and
``output`` is ``"the correct answer is <answer>"``. UB-SMoE (arXiv 2605.16690)
fine-tunes on Commonsense-15K, a 15k-example sample of these tasks.

Where the data comes from is decided by :func:`resolve_data_dir`; what is loaded,
carved and sampled by :func:`load_commonsense`; the label set of each task by
:func:`answer_choices`. The prompt, tokenization and batching shared by every data
source are :mod:`ubsmoe.data.prompts`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ubsmoe.config import COMMONSENSE_TASKS, DataConfig
from ubsmoe.errors import ConfigError
from ubsmoe.io import atomic_write_json, atomic_write_text

SOURCE_URL = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main"
COMBINED_TRAIN_FILE = "ft-training_set/commonsense_15k.json"
_COMPLETE_MARKER = ".download-complete"

# The repository root (src/ubsmoe/data/commonsense.py -> parents[3]); its sibling
# ``shared/data/commonsense`` is the checkout-relative fallback.
_REPO_ROOT = Path(__file__).resolve().parents[3]
_SHARED_SUBDIR = Path("shared") / "data" / "commonsense"

# Tasks whose label format is fixed (the "Answer format:" line of every record).
_FIXED_CHOICES = {
    "boolq": ["true", "false"],
    "piqa": ["solution1", "solution2"],
    "social_i_qa": ["answer1", "answer2", "answer3"],
    "hellaswag": ["ending1", "ending2", "ending3", "ending4"],
    "winogrande": ["option1", "option2"],
}
# Tasks whose number of options varies per record (ARC: 3-5, OpenBookQA: 4).
_COUNTED_CHOICES = ("ARC-Challenge", "ARC-Easy", "openbookqa")
_ANSWER_OPTION = re.compile(r"\bAnswer(\d+):")
_ANSWER_FORMAT = re.compile(r"Answer format:\s*(\S+)\s*$")


@dataclass
class CommonsenseData:
    """The loaded commonsense suite.

    Attributes:
        train: pooled training records over all tasks (after carving and sampling),
            each a copy of the file record with an added ``"task"`` key; ordered by
            task (``cfg.tasks`` order), then file order, train-file records before
            carved ones.
        test: task -> test records (with ``"task"``), in file order; records carved
            into ``train`` are removed.
        skipped: task -> reason, for requested tasks without data files.
        carved: task -> number of training records carved from its test file (only
            tasks without a train file appear).
        duplicates: task -> ``{"test": n, "train": n, "train_in_test": n}``, records
            dropped because their ``(instruction, input)`` repeats an earlier record
            of the same file (``test``, ``train``) or a record of any task's test
            set (``train_in_test``); only tasks with a drop appear, only non-zero
            counts are listed.
        data_dir: the resolved data folder (or the HF dataset's name).
        answer_types: task -> answer type (``label``, ``letter``, ``numeric``,
            ``text``) for instruction data; empty for commonsense (all ``label``).
        partition_by: what the client partition is drawn over: ``task``, a record
            field's name, or ``iid`` (one value only, so no skew to draw).
    """

    train: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    carved: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, dict[str, int]] = field(default_factory=dict)
    data_dir: str = ""
    answer_types: dict[str, str] = field(default_factory=dict)
    partition_by: str = "task"


def _cache_root() -> Path:
    return Path(os.environ.get("UBSMOE_CACHE") or Path.home() / ".cache" / "ubsmoe")


def resolve_data_dir(path: str = "") -> Path:
    """Find the commonsense data folder (one sub-folder per task).

    Order: ``path`` if given -> ``$UBSMOE_DATA`` (its ``commonsense`` sub-folder if
    present, else the folder itself) -> ``../shared/data/commonsense`` relative to
    the working directory -> the same relative to the repository checkout holding
    this package -> a completed download in ``($UBSMOE_CACHE or
    ~/.cache/ubsmoe)/data/commonsense`` -> a fresh download there from the public
    LLM-Adapters repository (:data:`SOURCE_URL`).

    Args:
        path: the explicit folder (``data.path``); empty to search.

    Returns:
        The resolved folder, absolute.

    Raises:
        ConfigError: ``path`` or ``$UBSMOE_DATA`` is given but is not a folder, or
            nothing was found and the download failed (the message lists every
            location tried).
    """
    if path:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise ConfigError(f"data.path: {str(p)!r} does not exist or is not a folder")
        return p.resolve()
    env = os.environ.get("UBSMOE_DATA")
    if env:
        p = Path(env).expanduser()
        if (p / "commonsense").is_dir():
            return (p / "commonsense").resolve()
        if p.is_dir():
            return p.resolve()
        raise ConfigError(f"data.path: $UBSMOE_DATA={env!r} does not exist or is not a folder")
    tried = []
    for candidate in (Path.cwd().parent / _SHARED_SUBDIR, _REPO_ROOT.parent / _SHARED_SUBDIR):
        if candidate.is_dir():
            return candidate.resolve()
        tried.append(str(candidate))
    cache = _cache_root() / "data" / "commonsense"
    if (cache / _COMPLETE_MARKER).is_file():
        return cache.resolve()
    try:
        download_commonsense(cache)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(
            "data.path: could not be resolved; tried data.path (empty), $UBSMOE_DATA (unset), "
            f"{', '.join(tried)} and a download from {SOURCE_URL} into {cache} ({e})"
        ) from e
    return cache.resolve()


def _fetch(url: str, timeout: float = 60.0) -> bytes:
    """GET ``url``; raises ``urllib.error.HTTPError`` (e.g. 404) or ``OSError``."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _fetch_json(url: str) -> list[dict[str, Any]] | None:
    """Fetched JSON list, or None if the file does not exist upstream (HTTP 404)."""
    try:
        data = _fetch(url)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise
    records = json.loads(data.decode("utf-8"))
    if not isinstance(records, list):
        raise TypeError(f"{url}: expected a JSON list of records")
    return records


def _task_of_format(record: dict[str, Any]) -> str | None:
    """The task a combined-file record belongs to, from its ``Answer format:`` line.

    ``answer1/...`` is shared by Social IQa, ARC and OpenBookQA and so is ambiguous
    (None); the other formats are unique to one task.
    """
    m = _ANSWER_FORMAT.search(record.get("instruction", ""))
    if not m:
        return None
    first = m.group(1).split("/")[0]
    for task, choices in _FIXED_CHOICES.items():
        if first == choices[0] and task != "social_i_qa":
            return task
    return None


def download_commonsense(dest: Path, tasks: tuple[str, ...] = COMMONSENSE_TASKS) -> Path:
    """Download the LLM-Adapters commonsense data into ``dest`` (network needed).

    For every task, ``dataset/<task>/test.json`` and, where upstream has one,
    ``dataset/<task>/train.json``. Tasks still without a train file get the records
    of the combined ``ft-training_set/commonsense_15k.json`` whose answer format
    identifies them unambiguously (BoolQ, PIQA, HellaSwag, WinoGrande); Social IQa,
    ARC and OpenBookQA share one format, so for them :func:`load_commonsense` falls
    back to carving their test file. Each file is written atomically; a marker file
    records completion.

    Args:
        dest: target folder (created).
        tasks: task folder names to fetch.

    Returns:
        ``dest``.

    Raises:
        OSError: the network or a file write failed (``urllib.error.URLError`` is an
            ``OSError``).
        ValueError: a downloaded file is not valid JSON.
        TypeError: a downloaded file is not a JSON list.
    """
    have_train: set[str] = set()
    for task in tasks:
        for split in ("test", "train"):
            records = _fetch_json(f"{SOURCE_URL}/dataset/{task}/{split}.json")
            if records is not None:
                atomic_write_json(dest / task / f"{split}.json", records)
                if split == "train":
                    have_train.add(task)
    combined = _fetch_json(f"{SOURCE_URL}/{COMBINED_TRAIN_FILE}")
    if combined is not None:
        atomic_write_json(dest / Path(COMBINED_TRAIN_FILE).name, combined)
        by_task: dict[str, list[dict[str, Any]]] = {}
        for record in combined:
            task = _task_of_format(record)
            if task in tasks and task not in have_train:
                by_task.setdefault(task, []).append(record)
        for task, records in by_task.items():
            atomic_write_json(dest / task / "train.json", records)
    atomic_write_text(dest / _COMPLETE_MARKER, "ok\n")
    return dest


def _stable_rng(*keys: Any) -> np.random.Generator:
    """A numpy Generator seeded from ``keys`` via SHA-256 (stable across processes,
    unlike Python's salted ``hash``)."""
    digest = hashlib.sha256("/".join(str(k) for k in keys).encode("utf-8")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def _read_records(file: Path, task: str) -> list[dict[str, Any]]:
    """Records of one JSON file, each copied with ``"task"`` added."""
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"data.path: cannot read {str(file)!r} ({e})") from e
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and "instruction" in r and "output" in r for r in records
    ):
        raise ConfigError(
            f"data.path: {str(file)!r} is not a JSON list of records with "
            "'instruction' and 'output'"
        )
    return [{**r, "task": task} for r in records]


def record_key(record: dict[str, Any]) -> tuple[str, str]:
    """What makes two records the same example: ``(instruction, input)``.

    The prompt (:func:`~ubsmoe.data.prompts.format_prompt`) is built from these two fields only, so
    records with equal keys are the same question to the model whatever their
    ``output``. A missing or empty input is ``""``.
    """
    return record["instruction"], record.get("input") or ""


def _drop_duplicates(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Keep the first record of each :func:`record_key`, in order; also the count dropped."""
    seen: set[tuple[str, str]] = set()
    kept = []
    for r in records:
        key = record_key(r)
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept, len(records) - len(kept)


def load_commonsense(cfg: DataConfig, seed: int) -> CommonsenseData:
    """Load ``cfg.tasks`` from :func:`resolve_data_dir` ``(cfg.path)``.

    Every file first loses its duplicate records (same :func:`record_key`, the
    first one kept): LLM-Adapters' Social IQa test file, for one, holds 24 repeats,
    which carving would otherwise split between training and test. Per task:
    ``train.json`` and ``test.json`` are then used as they are. A task with only
    ``test.json`` has ``round(len * cfg.carved_train_fraction)`` records (half up)
    carved off into training, chosen by a permutation seeded from ``seed`` and the
    task name; the rest stay test, so the two are disjoint. A task with only
    ``train.json`` contributes training data and no test set. A task with neither is
    reported in ``skipped``. Training records whose key is in any task's test set are
    then dropped, so no test question is ever trained on; every drop is counted in
    ``duplicates``. Finally, if ``cfg.train_examples > 0`` and the pooled
    training set is larger, ``cfg.train_examples`` records are drawn uniformly
    without replacement (seeded), keeping pool order.

    Args:
        cfg: the data config (path, tasks, train_examples, carved_train_fraction).
        seed: base seed; the same seed gives the same split and sample.

    Returns:
        A :class:`CommonsenseData`. Counts are in examples (records).

    Raises:
        ConfigError: the data folder cannot be resolved, a file is not a JSON list
            of records, or none of ``cfg.tasks`` has any data file.

    Source: LLM-Adapters ``dataset/<task>/{train,test}.json``; Commonsense-15K
    sampling as in UB-SMoE (arXiv 2605.16690) section 6.
    """
    data_dir = resolve_data_dir(cfg.path)
    out = CommonsenseData(data_dir=str(data_dir))
    for task in cfg.tasks:
        folder = data_dir / task
        train_file, test_file = folder / "train.json", folder / "test.json"
        if not train_file.is_file() and not test_file.is_file():
            out.skipped[task] = f"no data files in {folder}"
            continue
        add_task(out, task,
                 _read_records(train_file, task) if train_file.is_file() else None,
                 _read_records(test_file, task) if test_file.is_file() else None,
                 cfg.carved_train_fraction, seed)
    if len(out.skipped) == len(cfg.tasks):
        raise ConfigError(
            f"data.tasks: none of {list(cfg.tasks)} has train.json or test.json under "
            f"data.path {str(data_dir)!r}"
        )
    return finish_split(out, cfg.train_examples, seed)


def add_task(out: CommonsenseData, task: str, train: list[dict[str, Any]] | None,
             test: list[dict[str, Any]] | None, carved_train_fraction: float, seed: int) -> None:
    """Add one task's records to ``out``: drop duplicates, carve a test-only task.

    Each given list first loses its duplicate records (:func:`record_key`, the
    first kept). With a ``train`` list it is the task's training data as is; with
    only ``test``, ``round(len * carved_train_fraction)`` records (half up), chosen
    by a permutation seeded from ``seed`` and the task name, are carved off into
    training and the rest stay test (disjoint). Counts go to ``out.carved`` and
    ``out.duplicates``.

    Args:
        out: the data being built (its ``train``, ``test``, ``carved`` and
            ``duplicates`` are extended in place).
        task: the task name (records already carry it in ``"task"``).
        train: the task's training records, or None.
        test: the task's test records, or None.
        carved_train_fraction: share of a test-only task carved into training, in (0, 1).
        seed: base seed of the carving permutation.
    """
    dropped: dict[str, int] = {}
    if test is not None:
        test, dropped["test"] = _drop_duplicates(test)
    if train is not None:
        train, dropped["train"] = _drop_duplicates(train)
        out.train.extend(train)
    elif test is not None:
        n_carve = _round_half_up(len(test) * carved_train_fraction)
        order = _stable_rng(seed, "carve", task).permutation(len(test))
        carved = set(order[:n_carve].tolist())
        out.train.extend(r for i, r in enumerate(test) if i in carved)
        test = [r for i, r in enumerate(test) if i not in carved]
        out.carved[task] = n_carve
    if test is not None:
        out.test[task] = test
    if any(dropped.values()):
        out.duplicates[task] = {k: n for k, n in dropped.items() if n}


def finish_split(out: CommonsenseData, train_examples: int, seed: int) -> CommonsenseData:
    """Drop training records that are test questions of any task, then sample the pool.

    Training records whose :func:`record_key` is in any task's test set are removed
    (counted as ``duplicates[task]["train_in_test"]``); then, if ``train_examples >
    0`` and the pool is larger, ``train_examples`` records are drawn uniformly
    without replacement (seeded), keeping pool order.

    Args:
        out: the data after every task was added (:func:`add_task`); changed in place.
        train_examples: size of the training sample (0: keep all).
        seed: base seed of the sample.

    Returns:
        ``out``.
    """
    test_keys = {record_key(r) for records in out.test.values() for r in records}
    in_test: dict[str, int] = {}
    for r in out.train:
        if record_key(r) in test_keys:
            in_test[r["task"]] = in_test.get(r["task"], 0) + 1
    if in_test:
        out.train = [r for r in out.train if record_key(r) not in test_keys]
        for task, n in in_test.items():
            out.duplicates.setdefault(task, {})["train_in_test"] = n
    if 0 < train_examples < len(out.train):
        keep = _stable_rng(seed, "train_examples").choice(
            len(out.train), size=train_examples, replace=False
        )
        out.train = [out.train[i] for i in np.sort(keep)]
    return out


def answer_choices(task: str, record: dict[str, Any]) -> list[str]:
    """The candidate label strings of one record, as the model should generate them.

    BoolQ ``true/false``; PIQA ``solution1/2``; Social IQa ``answer1..3``; HellaSwag
    ``ending1..4``; WinoGrande ``option1/2``; ARC-Challenge, ARC-Easy and OpenBookQA
    ``answer1..answerN`` with N the number of ``AnswerK:`` options in the
    instruction (ARC has 3-5, OpenBookQA 4).

    Args:
        task: the task name (one of ``ubsmoe.config.COMMONSENSE_TASKS``).
        record: the LLM-Adapters record (its ``"instruction"`` is read for the
            variable-option tasks).

    Returns:
        The labels in order; ``record["answer"]`` is one of them.

    Raises:
        ValueError: unknown task, or a variable-option record without ``AnswerK:``
            options.

    Source: ``extract_answer`` in LLM-Adapters ``commonsense_evaluate.py``.
    """
    if task in _FIXED_CHOICES:
        return list(_FIXED_CHOICES[task])
    if task in _COUNTED_CHOICES:
        n = len(_ANSWER_OPTION.findall(record.get("instruction", "")))
        if n == 0:
            raise ValueError(f"{task}: record has no 'AnswerK:' options in its instruction")
        return [f"answer{k}" for k in range(1, n + 1)]
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(COMMONSENSE_TASKS)}")
