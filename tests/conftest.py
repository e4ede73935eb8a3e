"""Shared fixtures: a tiny tokenizer and tiny patched OLMoE models (random, CPU, float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "commonsense"

# A small run on the shared data: 3 tasks, 4 clients, 2 rounds of 2 local steps (tiny preset).
SMALL = [
    "data.tasks=[boolq,piqa,ARC-Easy]",
    "data.train_examples=160",
    "data.max_length=128",
    "fl.num_clients=4",
    "fl.rounds=2",
    "train.batch_size=8",
    "train.max_local_steps=2",
    "eval.examples_per_task=4",
    "eval.max_new_tokens=4",
    "eval.batch_size=8",
    "model.tiny.vocab_size=512",
]

TEXTS = [
    f"Question {i}: is the sky blue? the correct answer is {'true' if i % 2 else 'false'} "
    f"answer{i % 5 + 1} solution{i % 2 + 1} option{i % 2 + 1} ending{i % 4 + 1}"
    for i in range(300)
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer (vocab 512) trained on synthetic text."""
    from ubsmoe.models import train_tokenizer

    return train_tokenizer(TEXTS, 512, tmp_path_factory.mktemp("tok"))


@pytest.fixture
def tiny_model_cfg():
    """The tiny preset's ModelConfig (64 experts, top-8, hidden 64, 2 layers)."""
    from ubsmoe.config import ModelConfig

    return ModelConfig()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
