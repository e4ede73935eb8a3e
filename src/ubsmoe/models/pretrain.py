"""Pretrain a small OLMoE-architecture model from scratch, offline: the testbed base.

A random model shows none of the paper's phenomena (its experts are interchangeable,
so dropping K costs nothing). :func:`pretrain` trains an ``OlmoeForCausalLM`` with
OLMoE-1B-7B's routing layout (64 experts, top-8; OLMoE: Muennighoff et al., "OLMoE:
Open Mixture-of-Experts Language Models", arXiv 2409.02060) at native top-8 on local
text, with the next-token loss plus OLMoE's load-balancing loss exactly as
transformers computes it (``output_router_logits=True``, the config's
``router_aux_loss_coef``; ``load_balancing_loss_func`` of
``transformers.models.olmoe.modeling_olmoe``), and saves an ordinary Hugging Face
folder (``config.json``, ``model.safetensors``, tokenizer files, ``README.md`` model
card, ``pretrain.json``) that ``AutoModelForCausalLM.from_pretrained`` loads and
``ubsmoe run model.name=PATH model.init=pretrained`` fine-tunes.

Corpus (:func:`ubsmoe.data.pretrain_corpus.build_corpus`), local text only:

- the training records (``train.json``) of the commonsense tasks, each formatted
  with the project's prompt template (:func:`~ubsmoe.data.commonsense.format_prompt`
  + ``output``), so the base sees the answer formats of BoolQ, ARC-e, ARC-c and OBQA;
- never a record whose ``(instruction, input)`` key
  (:func:`~ubsmoe.data.commonsense.record_key`) equals a record of any task's
  ``test.json`` (test-only tasks such as PIQA therefore contribute nothing: their
  carved training share depends on the fine-tuning seed);
- never a record the testbed fine-tunes on: the union over ``finetune_seeds`` of the
  ``finetune_examples``-record samples :func:`~ubsmoe.data.commonsense.load_commonsense`
  draws (the embedded default run draws 2000 with ``train.seed``);
- a seeded ``heldout_fraction`` of the remaining records is held out for the
  held-out loss; plain ``.txt`` files of ``text_dir`` and a Hugging Face dataset's
  text column (``hf_dataset``; needs the hub or its cache, so untested offline) are
  added to the training text only.

Determinism: documents are tokenized and concatenated (each followed by eos) into
one token stream, cut into ``seq_len`` sequences; the sequences of step ``s`` are a
function of ``(seed, s)`` only (one seeded permutation per epoch), there is no
dropout, and the learning rate is a function of the step. Two runs with one seed and
thread count give bitwise-equal weights on CPU, and a run resumed from its checkpoint
(model, AdamW state, step; written atomically every ``checkpoint_every`` steps) gives
the same weights as an uninterrupted one.

Evaluation: the held-out sequences' mean next-token loss (nats/token) at K = 8 and at
K = 1, 2, 4 (every router's ``top_k`` set to K); the K-drop is the mean paired
per-sequence difference ``loss_K - loss_8`` with its standard error over sequences.
"""

from __future__ import annotations

import hashlib
import math
import platform
import shutil
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers.models.olmoe.modeling_olmoe import OlmoeTopKRouter

from ubsmoe.config import ModelConfig, TinyModelConfig
from ubsmoe.config.pretrain import PretrainConfig
from ubsmoe.errors import ConfigError
from ubsmoe.io import atomic_torch_save
from ubsmoe.models.build import random_model
from ubsmoe.models.pretrain_card import FINAL_LOSS_STEPS, save_base
from ubsmoe.models.tokenizer import cache_dir, train_tokenizer

CHECKPOINT_DIR = ".pretrain_checkpoint"
CHECKPOINT_FILE = "state.pt"
EVAL_TOP_KS = (8, 4, 2, 1)


@dataclass
class Corpus:
    """Pretraining text, before tokenization.

    Attributes:
        train: training documents (formatted records, then extra text files, then
            the hub dataset's rows), in a fixed order.
        heldout: held-out documents (formatted records only).
        counts: record and document counts by source and exclusion reason.
        data_dir: the resolved commonsense data folder.
    """

    train: list[str]
    heldout: list[str]
    counts: dict[str, int]
    data_dir: str


def stable_seed(*keys: Any) -> int:
    """A 63-bit seed from ``keys`` via SHA-256 (stable across processes and platforms)."""
    digest = hashlib.sha256("/".join(str(k) for k in keys).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def token_stream(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Every text tokenized (no special tokens) and followed by eos, concatenated.

    Returns:
        ``[num_tokens]`` int64.
    """
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for start in range(0, len(texts), 1024):
        for row in tokenizer(texts[start:start + 1024], add_special_tokens=False)["input_ids"]:
            ids += row
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def stream_digest(stream: torch.Tensor) -> str:
    """SHA-256 (hex) of a token stream as little-endian int32."""
    return hashlib.sha256(stream.numpy().astype("<i4").tobytes()).hexdigest()


def to_sequences(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a token stream into ``[num_sequences, seq_len]`` (the remainder is dropped)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def batch_indices(step: int, batch_size: int, num_sequences: int, seed: int) -> list[int]:
    """The sequences of optimizer step ``step`` (0-based): a function of ``(seed, step)`` only.

    Sample ``i = step * batch_size + b`` is position ``i % num_sequences`` of epoch
    ``i // num_sequences``'s permutation, seeded by ``(seed, epoch)``.
    """
    out = []
    perms: dict[int, np.ndarray] = {}
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch = i // num_sequences
        if epoch not in perms:
            perms[epoch] = np.random.default_rng(stable_seed(seed, "order", epoch)).permutation(num_sequences)
        out.append(int(perms[epoch][i % num_sequences]))
    return out


def learning_rate(step: int, cfg: PretrainConfig) -> float:
    """Learning rate of step ``step``: linear warm-up, then cosine decay to ``lr / 10``."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_model(cfg: PretrainConfig, tokenizer: Any):
    """A randomly initialised ``OlmoeForCausalLM`` of ``cfg``'s sizes (the tiny preset's builder).

    Built by :func:`ubsmoe.models.build.random_model` from a ``tiny`` preset with
    ``cfg``'s sizes, so the architecture and special ids are the preset's; the
    config's ``router_aux_loss_coef`` is ``cfg.aux_loss_coef``.
    """

    tiny = TinyModelConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                           num_attention_heads=cfg.num_heads, intermediate_size=cfg.expert_size,
                           num_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
                           vocab_size=cfg.vocab_size, max_position_embeddings=max(1024, cfg.seq_len),
                           initializer_range=cfg.initializer_range)
    model = random_model(ModelConfig(name="tiny", tiny=tiny, dtype="float32", device="cpu"),
                         len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.seed)
    model.config.router_aux_loss_coef = cfg.aux_loss_coef
    model.router_aux_loss_coef = cfg.aux_loss_coef  # OlmoeForCausalLM copies it at construction
    return model


def set_router_top_k(model: torch.nn.Module, k: int) -> None:
    """Route every token of ``model`` (an unpatched OLMoE model) to its top-``k`` experts."""

    for module in model.modules():
        if isinstance(module, OlmoeTopKRouter):
            module.top_k = k


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
               lr: float, grad_clip: float) -> tuple[float, float]:
    """One optimizer step on ``input_ids`` ``[batch, seq]``; returns (next-token loss, aux loss).

    The loss is transformers' own: ``OlmoeForCausalLM`` with ``labels=input_ids`` and
    ``output_router_logits=True`` returns next-token loss + ``router_aux_loss_coef`` *
    load-balancing loss (both nats-scale scalars; the first is reported per token).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True, use_cache=False)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    aux = float(out.aux_loss.detach())
    return float(out.loss.detach()) - model.router_aux_loss_coef * aux, aux


@torch.no_grad()
def sequence_losses(model: torch.nn.Module, sequences: torch.Tensor, top_k: int,
                    batch_size: int = 16) -> torch.Tensor:
    """Mean next-token loss (nats/token) of each sequence at ``top_k`` experts per token.

    Args:
        model: an unpatched OLMoE causal LM (its routers' ``top_k`` is restored after).
        sequences: ``[num_sequences, seq_len]`` token ids.
        top_k: experts per token during the evaluation.
        batch_size: sequences per forward pass.

    Returns:
        ``[num_sequences]`` float64.
    """
    import torch.nn.functional as F

    native = next(m.top_k for m in model.modules() if isinstance(m, OlmoeTopKRouter))
    was_training = model.training
    model.eval()
    set_router_top_k(model, top_k)
    try:
        out = []
        for start in range(0, sequences.shape[0], batch_size):
            ids = sequences[start:start + batch_size]  # [b, T]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()  # [b, T-1, V]
            loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [b, T-1]
            out.append(loss.mean(dim=1).double())
        return torch.cat(out)
    finally:
        set_router_top_k(model, native)
        model.train(was_training)


def heldout_report(model: torch.nn.Module, sequences: torch.Tensor, native_k: int,
                   batch_size: int = 16) -> dict[str, Any]:
    """Held-out loss at the native K and the K-drop at K = 1, 2, 4 (paired, with standard errors).

    Returns:
        ``{"loss": {K: {"mean", "se"}}, "k_drop": {K: {"mean", "se"}}, "sequences": n}``
        with K as strings; ``k_drop[K]`` is the mean over sequences of
        ``loss_K - loss_native`` and ``se`` its standard error (std / sqrt(n), ddof 1).
    """
    n = sequences.shape[0]
    per_k = {k: sequence_losses(model, sequences, k, batch_size) for k in EVAL_TOP_KS if k <= native_k}
    if native_k not in per_k:
        per_k[native_k] = sequence_losses(model, sequences, native_k, batch_size)

    def stats(x: torch.Tensor) -> dict[str, float]:
        """Mean and standard error (over sequences) of per-sequence losses ``x`` ``[n]``."""
        se = float(x.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        return {"mean": float(x.mean()), "se": se}

    return {"loss": {str(k): stats(v) for k, v in sorted(per_k.items(), reverse=True)},
            "k_drop": {str(k): stats(v - per_k[native_k]) for k, v in sorted(per_k.items(), reverse=True)
                       if k != native_k},
            "sequences": n}


def _checkpoint_path(out: Path) -> Path:
    return out / CHECKPOINT_DIR / CHECKPOINT_FILE


def pretrain(cfg: PretrainConfig, corpus: Corpus, command: str = "", resume: bool = False, progress: bool = True,
             stop_after: int | None = None) -> dict[str, Any]:
    """Pretrain, evaluate and save a model (module docstring); returns the card data.

    Args:
        cfg: the run's settings.
        corpus: the training and held-out documents
            (:func:`ubsmoe.data.pretrain_corpus.build_corpus` builds the default one).
        command: the command line recorded in the model card.
        resume: continue from ``cfg.out``'s checkpoint (its settings must equal ``cfg``).
        progress: show a rich progress bar (tokens/s, loss, ETA).
        stop_after: stop (as if killed) once this many steps are done and
            checkpointed, without evaluating or saving the model; for tests.

    Returns:
        The model card's data (:data:`~ubsmoe.models.pretrain_card.REQUIRED_CARD_FIELDS` and more), also written to
        ``cfg.out/pretrain.json``; empty when stopped by ``stop_after``.

    Raises:
        ConfigError: ``cfg.out`` is not empty without ``resume``, ``resume`` without a
            checkpoint, a checkpoint of other settings, or a corpus too short for ``seq_len``.
    """
    out = Path(cfg.out).expanduser()
    ckpt = _checkpoint_path(out)
    if resume and not ckpt.is_file():
        raise ConfigError(f"--resume: {str(out)!r} holds no pretraining checkpoint ({CHECKPOINT_DIR}/)")
    if not resume and out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out: {str(out)!r} is not empty; pass --resume to continue an interrupted "
                          f"pretraining or choose an empty folder")
    previous = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    # With more than one thread some CPU kernels reduce in a run-dependent order (measured: 2
    # threads gave different weights in two processes after 8 steps); deterministic mode fixes it.
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _pretrain(cfg, corpus, command, resume, progress, stop_after, out, ckpt)
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1])


def _pretrain(cfg: PretrainConfig, corpus: Corpus, command: str, resume: bool, progress: bool, stop_after: int | None,
              out: Path, ckpt: Path) -> dict[str, Any]:
    """:func:`pretrain` after its checks, under its thread count and deterministic mode."""

    wall_start = time.perf_counter()
    tokenizer = train_tokenizer(corpus.train, cfg.vocab_size, cache_dir(ModelConfig()))
    train_stream = token_stream(tokenizer, corpus.train)
    heldout_stream = token_stream(tokenizer, corpus.heldout)
    train_seqs = to_sequences(train_stream, cfg.seq_len)  # [N, T]
    heldout_seqs = to_sequences(heldout_stream, cfg.seq_len)  # [N_h, T]
    if train_seqs.shape[0] < 1 or heldout_seqs.shape[0] < 2:
        raise ConfigError(f"seq_len: got {cfg.seq_len}, expected a length that leaves at least one "
                          f"training and two held-out sequences ({train_stream.numel()} / "
                          f"{heldout_stream.numel()} tokens)")
    digest = stream_digest(train_stream)
    model = make_model(cfg, tokenizer)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)
    step, prior_wall, history = 0, 0.0, []
    if resume:
        state = torch.load(ckpt, weights_only=False)
        if state["config"] != cfg.identity() or state["corpus_sha256"] != digest:
            diff = sorted(k for k in cfg.identity() if state["config"].get(k) != cfg.identity()[k])
            raise ConfigError(f"--resume: the checkpoint in {str(out)!r} was made with other settings "
                              f"({', '.join(diff) or 'corpus'} differ); repeat its command")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, prior_wall, history = state["step"], state["wall_time_s"], state["history"]

    def save_checkpoint() -> None:
        """Write model, optimizer, step, history and settings atomically (resume point)."""
        atomic_torch_save(ckpt, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "step": step, "history": history, "config": cfg.identity(),
                                 "corpus_sha256": digest,
                                 "wall_time_s": prior_wall + time.perf_counter() - wall_start})

    tokens_per_step = cfg.batch_size * cfg.seq_len
    loop_start, first_step = time.perf_counter(), step
    model.train()
    bar = _progress_bar(progress)
    with bar:
        task = bar.add_task("pretrain", total=cfg.steps, completed=step, tps="-", loss="-")
        while step < cfg.steps:
            ids = train_seqs[batch_indices(step, cfg.batch_size, train_seqs.shape[0], cfg.seed)]  # [B, T]
            lm, aux = train_step(model, optimizer, ids, learning_rate(step, cfg), cfg.grad_clip)
            history.append((lm, aux))
            step += 1
            loop_s = time.perf_counter() - loop_start
            bar.update(task, completed=step, loss=f"{lm:.3f}",
                       tps=f"{(step - first_step) * tokens_per_step / max(loop_s, 1e-9):,.0f}")
            if progress and not bar.console.is_terminal and (step % 10 == 0 or step == cfg.steps):
                bar.console.print(f"step {step}/{cfg.steps} loss {lm:.4f} aux {aux:.4f} "
                                  f"{(step - first_step) * tokens_per_step / max(loop_s, 1e-9):,.0f} tok/s "
                                  f"{loop_s:.0f} s", highlight=False)  # a log file gets lines, not a bar
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_checkpoint()
            if stop_after is not None and step >= stop_after and step < cfg.steps:
                save_checkpoint()
                return {}
    loop_s = time.perf_counter() - loop_start
    report = heldout_report(model, heldout_seqs, cfg.top_k, cfg.eval_batch_size)
    tail = history[-FINAL_LOSS_STEPS:]
    card = {
        "command": command or "(called from Python)",
        "corpus_sha256": digest,
        "heldout_sha256": stream_digest(heldout_stream),
        "data_dir": corpus.data_dir,
        "records": {k: v for k, v in corpus.counts.items() if not k.startswith("excluded")},
        "excluded": {k.removeprefix("excluded_"): v for k, v in corpus.counts.items()
                     if k.startswith("excluded")},
        "corpus_tokens": int(train_stream.numel()),
        "heldout_tokens": int(heldout_stream.numel()),
        "train_sequences": int(train_seqs.shape[0]),
        "heldout_sequences": int(heldout_seqs.shape[0]),
        "vocab_size": len(tokenizer),
        "steps": cfg.steps,
        "tokens_trained": cfg.steps * tokens_per_step,
        "epochs": cfg.steps * cfg.batch_size / train_seqs.shape[0],
        "final_train_loss": float(np.mean([h[0] for h in tail])),
        "final_aux_loss": float(np.mean([h[1] for h in tail])),
        "heldout_loss": report["loss"],
        "k_drop": report["k_drop"],
        # training throughput of this session's steps (a resumed run: the steps after resuming)
        "tokens_per_s": (cfg.steps - first_step) * tokens_per_step / max(loop_s, 1e-9),
        "resumed": resume,
        "wall_time_s": prior_wall + time.perf_counter() - wall_start,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": cfg.identity(),
        "versions": {"torch": torch.__version__, "transformers": version("transformers"),
                     "python": platform.python_version()},
    }
    save_base(out, model, tokenizer, card)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
    return card



def _progress_bar(enabled: bool):
    """A rich progress bar with tokens/s, loss and ETA (disabled: nothing is drawn)."""

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[tps]} tok/s"), TextColumn("loss {task.fields[loss]}"),
                    TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled)


