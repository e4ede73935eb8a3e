"""The testbed base's pretraining corpus: local commonsense training records, never a test or fine-tuning record.

See :mod:`ubsmoe.models.pretrain` (module docstring, "Corpus") for what enters and why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ubsmoe.config import COMMONSENSE_TASKS, DataConfig
from ubsmoe.config.pretrain import PretrainConfig
from ubsmoe.data.commonsense import _read_records, load_commonsense, record_key, resolve_data_dir
from ubsmoe.data.prompts import format_prompt
from ubsmoe.errors import ConfigError
from ubsmoe.models.pretrain import Corpus, stable_seed


def record_text(record: dict[str, Any]) -> str:
    """One record as the model sees it in fine-tuning: prompt template + response."""
    return format_prompt(record) + record["output"]


def build_corpus(cfg: PretrainConfig) -> Corpus:
    """The pretraining documents and their counts (module docstring, "Corpus").

    Args:
        cfg: data path, extra text, held-out fraction, excluded fine-tuning samples.

    Returns:
        A :class:`Corpus`. ``counts`` holds ``records_read`` (train.json records of
        every task), ``excluded_duplicate`` (a repeat within the train files),
        ``excluded_test`` (key equals a test record of any task), ``excluded_finetune``
        (in a fine-tuning sample), ``records_train``, ``records_heldout``,
        ``test_records`` (test keys checked against), ``text_files``, ``hf_rows``.

    Raises:
        ConfigError: the data folder cannot be resolved or read, ``text_dir`` is not
            a folder, or no training record is left.
    """
    data_dir = resolve_data_dir(cfg.data_path)
    test_keys: set[tuple[str, str]] = set()
    train_records: list[dict[str, Any]] = []
    for task in COMMONSENSE_TASKS:
        if (data_dir / task / "test.json").is_file():
            test_keys |= {record_key(r) for r in _read_records(data_dir / task / "test.json", task)}
        if (data_dir / task / "train.json").is_file():
            train_records += _read_records(data_dir / task / "train.json", task)
    finetune_keys: set[tuple[str, str]] = set()
    for seed in cfg.finetune_seeds:
        sample = load_commonsense(DataConfig(path=str(data_dir), train_examples=cfg.finetune_examples), seed)
        finetune_keys |= {record_key(r) for r in sample.train}
    counts = {"records_read": len(train_records), "excluded_duplicate": 0, "excluded_test": 0,
              "excluded_finetune": 0, "test_records": len(test_keys)}
    seen: set[tuple[str, str]] = set()
    kept = []
    for r in train_records:
        key = record_key(r)
        if key in seen:
            counts["excluded_duplicate"] += 1
        elif key in test_keys:
            counts["excluded_test"] += 1
        elif key in finetune_keys:
            counts["excluded_finetune"] += 1
        else:
            kept.append(r)
        seen.add(key)
    if not kept:
        raise ConfigError(f"data_path: no training record of {str(data_dir)!r} is left after excluding "
                          f"test and fine-tuning records")
    n_heldout = max(1, round(len(kept) * cfg.heldout_fraction))
    order = np.random.default_rng(stable_seed(cfg.seed, "heldout")).permutation(len(kept))
    heldout_idx = set(order[:n_heldout].tolist())
    train = [record_text(r) for i, r in enumerate(kept) if i not in heldout_idx]
    heldout = [record_text(r) for i, r in enumerate(kept) if i in heldout_idx]
    counts["records_train"], counts["records_heldout"] = len(train), len(heldout)
    counts["text_files"] = 0
    if cfg.text_dir:
        folder = Path(cfg.text_dir).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"text_dir: {str(folder)!r} does not exist or is not a folder")
        for path in sorted(folder.rglob("*.txt")):
            train.append(path.read_text(encoding="utf-8", errors="replace"))
            counts["text_files"] += 1
    counts["hf_rows"] = 0
    if cfg.hf_dataset:  # needs the hub (or its local cache): not exercised offline
        from datasets import load_dataset

        rows = load_dataset(cfg.hf_dataset, split=cfg.hf_split)[cfg.hf_column]
        train += [str(t) for t in rows if t]
        counts["hf_rows"] = len(rows)
    return Corpus(train=train, heldout=heldout, counts=counts, data_dir=str(data_dir))
