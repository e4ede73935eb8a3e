"""Shared fixtures: a tiny tokenizer and tiny patched OLMoE models (random, CPU, float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "commonsense"

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
