"""Config section of the data: :class:`DataConfig` (source, tasks, partition, prompt fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ubsmoe.config.choices import (
    ANSWER_TYPES,
    COMMONSENSE_TASKS,
    DATA_NAMES,
    PARTITIONS,
    RECORD_FIELDS,
)
from ubsmoe.errors import bad_value as _bad
from ubsmoe.errors import raise_if_any


@dataclass
class DataConfig:
    """Instruction data (commonsense or the user's own), its splits and how it is spread over clients.

    Attributes:
        name: ``commonsense`` (the LLM-Adapters suite, the default) or
            ``instruction`` (any folder of tasks in that format, or an HF dataset;
            docs page "Your data and models", "Your own data").
        path: folder of the data (one sub-folder per task with train.json /
            test.json); with ``name=instruction`` the folder of your tasks (required
            unless ``hf_dataset``). Empty (commonsense only): ``$UBSMOE_DATA`` (its
            ``commonsense`` sub-folder if present), then ``../shared/data/commonsense``
            next to the working directory or the package checkout, then download.
        tasks: task names; a task absent from the data is reported as skipped.
            Empty: every task (commonsense: the eight, boolq, piqa, social_i_qa,
            hellaswag, winogrande, ARC-Challenge, ARC-Easy, openbookqa; instruction:
            a filter on the tasks found, empty: all).
        task_field: record field naming the task of a record in a top-level
            combined ``train.json`` (instruction data; records without it belong to
            a task named after the folder).
        hf_dataset: a Hugging Face dataset (hub name or local dataset folder) read
            with ``datasets.load_dataset`` instead of ``path`` (instruction data);
            a hub name needs the hub (offline: one line naming the dataset).
        hf_split: the split of ``hf_dataset`` to read.
        columns: record field -> dataset column for ``hf_dataset`` (fields:
            instruction, input, output, answer, task, category; instruction and
            output required).
        answer_types: task -> ``label`` | ``letter`` | ``numeric`` | ``text``;
            tasks not listed are detected (see ``ubsmoe.eval.instruction`` and the
            detection rule in the docs page "Your data and models").
        partition_field: record field whose values the Dirichlet partition is
            drawn over (e.g. ``category``; empty: the task, or IID when records
            carry no task).
        train_examples: total training examples sampled over all tasks, seeded
            (Commonsense-15K: 15000). 0 keeps every example.
        carved_train_fraction: for tasks with only a test file, the share of it
            carved off (deterministically, disjointly) as training data.
        max_length: tokens per training example (prompt + response), truncated.
        partition: ``dirichlet`` (non-IID over the task label, or over
            ``partition_field``) or ``iid``.
        dirichlet_alpha: concentration of the Dirichlet partitioner (flwr-datasets).
    """

    name: str = "commonsense"
    path: str = ""
    tasks: list[str] = field(default_factory=list)
    task_field: str = "task"
    hf_dataset: str = ""
    hf_split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)
    answer_types: dict[str, str] = field(default_factory=dict)
    partition_field: str = ""
    train_examples: int = 15000
    carved_train_fraction: float = 0.5
    max_length: int = 256
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5

    def __post_init__(self) -> None:
        errors = []
        if self.name not in DATA_NAMES:
            errors.append(_bad("data.name", self.name, f"one of {', '.join(DATA_NAMES)}"))
        if self.name == "commonsense":
            if not self.tasks:
                self.tasks = list(COMMONSENSE_TASKS)
            bad = [t for t in self.tasks if t not in COMMONSENSE_TASKS]
            if bad:
                errors.append(
                    _bad("data.tasks", self.tasks, f"a non-empty list from {', '.join(COMMONSENSE_TASKS)}")
                )
            for key in ("hf_dataset", "columns", "answer_types", "partition_field"):
                if getattr(self, key):
                    errors.append(_bad(f"data.{key}", getattr(self, key),
                                       "empty with data.name=commonsense (use data.name=instruction)"))
        if not isinstance(self.columns, dict) or any(
                k not in RECORD_FIELDS or not isinstance(v, str) or not v for k, v in self.columns.items()):
            errors.append(_bad("data.columns", self.columns,
                               f"a mapping from {', '.join(RECORD_FIELDS)} to column names"))
        elif self.hf_dataset and not {"instruction", "output"} <= set(self.columns):
            errors.append(_bad("data.columns", self.columns,
                               "a mapping with at least 'instruction' and 'output' when data.hf_dataset is set"))
        if not isinstance(self.answer_types, dict) or any(
                v not in ANSWER_TYPES for v in self.answer_types.values()):
            errors.append(_bad("data.answer_types", self.answer_types,
                               f"a mapping task -> one of {', '.join(ANSWER_TYPES)}"))
        if self.hf_dataset and self.path:
            errors.append(_bad("data.hf_dataset", self.hf_dataset, "empty when data.path is set (one source)"))
        if self.train_examples < 0:
            errors.append(_bad("data.train_examples", self.train_examples, "an integer >= 0"))
        if not 0.0 < self.carved_train_fraction < 1.0:
            errors.append(
                _bad("data.carved_train_fraction", self.carved_train_fraction, "a number in (0, 1)")
            )
        if self.max_length < 16:
            errors.append(_bad("data.max_length", self.max_length, "an integer >= 16"))
        if self.partition not in PARTITIONS:
            errors.append(_bad("data.partition", self.partition, f"one of {', '.join(PARTITIONS)}"))
        if not self.dirichlet_alpha > 0:
            errors.append(_bad("data.dirichlet_alpha", self.dirichlet_alpha, "a number > 0"))
        raise_if_any(errors)


