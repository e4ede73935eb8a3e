"""A byte-level BPE tokenizer trained locally to a model's vocabulary (no model hub), cached on disk."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from ubsmoe.config import ModelConfig
from ubsmoe.io import atomic_write_text

SPECIAL_TOKENS = ("<pad>", "<|endoftext|>")


def cache_dir(cfg: ModelConfig) -> Path:
    """Folder for cached artefacts (tokenizers): config, ``$UBSMOE_CACHE`` or ``~/.cache/ubsmoe``."""
    root = cfg.tokenizer_cache or os.environ.get("UBSMOE_CACHE") or Path.home() / ".cache" / "ubsmoe"
    return Path(root)


def train_tokenizer(texts: Iterable[str], vocab_size: int, cache: Path):
    """Train (or load from cache) a byte-level BPE tokenizer on ``texts``.

    The cache key is a hash of the texts and the vocabulary size, so the server and
    every client of a run get the identical tokenizer.

    Args:
        texts: training text (the run's training prompts and responses).
        vocab_size: target vocabulary size, including the special tokens.
        cache: folder holding one sub-folder per trained tokenizer.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``<pad>`` as pad token and
        ``<|endoftext|>`` as eos/bos.
    """
    # lazy: tokenizers is only needed when a tokenizer is trained
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # lazy: transformers takes seconds to import; only this path needs it
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    digest = hashlib.sha256()
    digest.update(str(vocab_size).encode())
    for t in texts:
        digest.update(t.encode("utf-8"))
        digest.update(b"\x00")
    path = cache / "tokenizers" / digest.hexdigest()[:16] / "tokenizer.json"
    if not path.is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)

        atomic_write_text(path, tok.to_str())
    return PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        pad_token="<pad>",
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )
