"""Suite ``base``: the shipped testbed base's held-out loss, K-drop and pretraining throughput.

The testbed base (``ubsmoe/testbed_base``, made by ``ubsmoe pretrain``) exists so that
dropping experts costs something: a model pretrained at top-8 should lose part of its
MLP output at K = 1. This suite measures that on the base as shipped, independently of
its model card:

- **held-out set**: rebuilt from the data as ``ubsmoe pretrain`` built it (the card's
  settings, :func:`ubsmoe.data.pretrain_corpus.build_corpus`), tokenized with the
  base's own tokenizer and cut into the card's ``seq_len``; its SHA-256 is compared with
  the card's ``heldout_sha256`` (``heldout_digest_matches``), so the figures are on the
  very sequences the card reports;
- **held-out loss** (nats/token) at K = 8, 4, 2, 1 and the **K-drop** at K = 1, 2, 4:
  the mean paired per-sequence difference to the native K with its standard error and
  ``z`` = mean / se (:func:`ubsmoe.models.pretrain.heldout_report`);
- **pretraining throughput**: tokens per second of ``ubsmoe pretrain``'s training step
  (:func:`ubsmoe.models.pretrain.train_step`: forward, load-balancing loss, backward,
  clipping, AdamW) at the card's sizes and batch, from random weights, median over the
  timed steps; beside it the card's recorded wall time and throughput.

The issue's target (issue 22): a K-drop at K = 1 of at least 0.05 nats/token and more
than 3 standard errors (``summary.meets_target``).

Quick mode evaluates the first 16 held-out sequences and times 2 steps: it checks
that the suite runs and reports every field, not the base.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ubsmoe.bench.harness import BenchOptions, register_suite
from ubsmoe.config.model import packaged_base_path
from ubsmoe.config.pretrain import PretrainConfig
from ubsmoe.data.pretrain_corpus import build_corpus
from ubsmoe.models.pretrain import (
    batch_indices,
    heldout_report,
    learning_rate,
    make_model,
    stream_digest,
    to_sequences,
    token_stream,
    train_step,
)
from ubsmoe.models.pretrain_card import card_data

K_DROP_TARGET = 0.05  # nats/token at K = 1 (issue 22)
K_DROP_MIN_Z = 3.0  # standard errors


def base_measurement(path: str | Path, quick: bool = False, steps: int = 10, warmup: int = 2,
                     seed: int = 0) -> dict[str, Any]:
    """Held-out loss per K, K-drop and pretraining throughput of the base at ``path``.

    Args:
        path: a folder written by ``ubsmoe pretrain`` (``pretrain.json``, weights, tokenizer).
        quick: 16 held-out sequences only (a structure check, not a measurement).
        steps: timed pretraining steps (tokens/s is batch x seq_len / median step time).
        warmup: untimed pretraining steps before timing.
        seed: seed of the throughput model's random weights.

    Returns:
        The suite's dict (module docstring), JSON-ready.

    Raises:
        ConfigError: the card's data folder cannot be resolved (as ``ubsmoe pretrain``).
        FileNotFoundError: ``path`` holds no ``pretrain.json``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    card = card_data(path)
    identity = dict(card["config"])
    cfg = PretrainConfig(**identity, out=str(path))  # out: never written here
    tokenizer = AutoTokenizer.from_pretrained(path)
    corpus = build_corpus(cfg)
    heldout_stream = token_stream(tokenizer, corpus.heldout)  # [tokens]
    heldout = to_sequences(heldout_stream, cfg.seq_len)  # [N_h, T]
    digest_matches = stream_digest(heldout_stream) == card.get("heldout_sha256")
    if quick:
        heldout = heldout[:16]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    start = time.perf_counter()
    report = heldout_report(model, heldout, cfg.top_k, cfg.eval_batch_size)
    eval_s = time.perf_counter() - start
    for drop in report["k_drop"].values():
        drop["z"] = drop["mean"] / drop["se"] if drop["se"] > 0 else float("inf")

    # Throughput needs only a few batches of training text: tokenize a prefix of the corpus
    # (doubling it until it holds (warmup + steps) batches), not all of it.
    need, docs = (warmup + steps) * cfg.batch_size, 1000
    while True:
        train = to_sequences(token_stream(tokenizer, corpus.train[:docs]), cfg.seq_len)  # [N, T]
        if train.shape[0] >= need or docs >= len(corpus.train):
            break
        docs *= 2
    fresh = make_model(cfg, tokenizer)
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    times = []
    for step in range(warmup + steps):
        ids = train[batch_indices(step, cfg.batch_size, train.shape[0], seed)]  # [B, T]
        t0 = time.perf_counter()
        train_step(fresh, optimizer, ids, learning_rate(step, cfg), cfg.grad_clip)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    k1 = report["k_drop"].get("1", {})
    summary = {
        "heldout_loss_native": report["loss"][str(cfg.top_k)]["mean"],
        "k_drop_k1": k1.get("mean"), "k_drop_k1_se": k1.get("se"), "k_drop_k1_z": k1.get("z"),
        "k_drop_k2": report["k_drop"].get("2", {}).get("mean"),
        "k_drop_k4": report["k_drop"].get("4", {}).get("mean"),
        "targets": {"k_drop_k1": K_DROP_TARGET, "z": K_DROP_MIN_Z},
        "meets_target": bool(k1 and k1["mean"] >= K_DROP_TARGET and k1["z"] > K_DROP_MIN_Z),
        "pretrain_tokens_per_s": tokens_per_step / step_s,
        "card_wall_time_s": card.get("wall_time_s"),
    }
    return {
        "description": "the testbed base: held-out loss (nats/token) per K, K-drop at K = 1, 2, 4 "
                       "(paired, standard error), pretraining throughput",
        "base": str(path),
        "card": {k: card.get(k) for k in ("command", "steps", "tokens_trained", "epochs", "wall_time_s",
                                           "tokens_per_s", "heldout_sha256", "parameters")},
        "heldout": {"sequences": int(heldout.shape[0]), "seq_len": cfg.seq_len,
                    "digest_matches": digest_matches, "eval_s": eval_s,
                    "loss": report["loss"], "k_drop": report["k_drop"]},
        "pretrain_throughput": {"steps": steps, "warmup": warmup, "step_s_median": step_s,
                                "step_s_min": min(times), "step_s_max": max(times),
                                "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_step / step_s,
                                "threads": torch.get_num_threads()},
        "summary": summary,
    }


@register_suite("base")
def base_suite(options: BenchOptions) -> dict[str, Any]:
    """The shipped testbed base (:func:`base_measurement` of ``ubsmoe/testbed_base``)."""
    return base_measurement(packaged_base_path(), quick=options.quick, steps=options.n_repeats(10),
                            warmup=options.n_warmup(2), seed=options.seed)
