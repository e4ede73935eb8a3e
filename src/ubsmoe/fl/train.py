"""Local training on one client (plain PyTorch, no Flower).

One function, :func:`local_train`, reads like the algorithm: forward, loss, method
loss hook, backward, method gradient hook, clip, step, method update hook (UB-SMoE's
pseudo-gradient acts here, in the space of updates), log. :class:`ClientRuntime` holds what a client keeps between rounds
(model, tokenizer, its tokenized partition) and :meth:`ClientRuntime.train_round`
turns the server's instruction into a :class:`~ubsmoe.methods.aggregation.ClientUpdate`.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.config import RunConfig, TrainConfig
from ubsmoe.data.commonsense import load_commonsense
from ubsmoe.data.instruction import load_data
from ubsmoe.data.partition import cached_partition_clients, partition_labels
from ubsmoe.data.prompts import collate, format_prompt, tokenize_example
from ubsmoe.errors import ConfigError
from ubsmoe.methods import ClientUpdate, Method, get_method_class
from ubsmoe.models import (
    adapter_state,
    build_model,
    load_adapter_state,
    routing_mask,
    set_activation_checkpointing,
    set_top_k,
    smoe_layers,
    step_stats,
)
from ubsmoe.models.adapters import merge_into_base, set_lora_rank
from ubsmoe.models.architecture import tokenizer_vocab_size
from ubsmoe.models.tokenizer import cache_dir, train_tokenizer


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (response) tokens.

    Args:
        logits: ``[batch, seq, vocab]``.
        labels: ``[batch, seq]`` token ids, -100 where no loss is taken (prompt, padding).

    Returns:
        Scalar loss in float32 (0 with no labelled token).
    """
    shift_logits = logits[:, :-1, :].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:]  # [B, T-1]
    if not (shift_labels != -100).any():
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                           shift_labels.reshape(-1), ignore_index=-100)


def client_seed(base_seed: int, client_id: int, round_idx: int) -> int:
    """Per-client, per-round seed derived from the base seed (stable across runs)."""
    digest = hashlib.sha256(f"{base_seed}:{client_id}:{round_idx}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def batch_indices(num_examples: int, batch_size: int, epochs: int, max_steps: int,
                  seed: int) -> list[list[int]]:
    """The example indices of each batch of a round: a seeded shuffle per epoch.

    Args:
        num_examples: size of the client's partition.
        batch_size: examples per batch (the last batch of an epoch may be smaller).
        epochs: passes over the partition.
        max_steps: stop after this many batches (0: no cap).
        seed: seed of the ``torch.Generator`` drawing the permutations.

    Returns:
        One list of partition indices per batch, in training order.
    """
    gen = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    for _ in range(epochs):
        order = torch.randperm(num_examples, generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            batches.append(order[start:start + batch_size])
            if max_steps and len(batches) >= max_steps:
                return batches
    return batches


def make_batches(examples: list[dict], indices: list[list[int]],
                 pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """Collate the examples of each batch of :func:`batch_indices`.

    Args:
        examples: tokenized examples ``{"input_ids": [...], "labels": [...]}``.
        indices: partition indices per batch, in training order.
        pad_token_id: the tokenizer's padding id.

    Returns:
        Batches of ``input_ids``/``attention_mask``/``labels``, each ``[batch, seq]``.
    """
    return [collate([examples[i] for i in idx], pad_token_id) for idx in indices]


def split_batch(batch: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split a right-padded batch into micro-batches of ``micro_batch_size`` rows.

    Columns that are padding in every row of a micro-batch are dropped at the right
    (exact for right padding and a causal model: no real token attends to them).

    Args:
        batch: ``input_ids``/``attention_mask``/``labels``, each ``[batch, seq]``.
        micro_batch_size: rows per micro-batch (the last may hold fewer).

    Returns:
        Micro-batches with the same keys, each ``[<= micro_batch_size, <= seq]``.
    """
    rows = batch["input_ids"].shape[0]
    parts = []
    for start in range(0, rows, micro_batch_size):
        part = {k: v[start:start + micro_batch_size] for k, v in batch.items()}
        width = int(part["attention_mask"].sum(1).max())
        parts.append({k: v[:, :max(width, 1)] for k, v in part.items()})
    return parts


def local_train(model: nn.Module, batches: list[dict[str, torch.Tensor]], method: Method,
                train_cfg: TrainConfig, top_k: int) -> dict[str, float]:
    """Train the model's LoRA parameters on ``batches`` with a fresh Adam optimizer.

    One optimizer step per batch (the effective batch, ``train.batch_size``): zero
    the gradients, clear the SMoE layers' per-step routing statistics, then per
    micro-batch (``train.grad_accumulation_steps`` of them) forward, task loss,
    method loss, backward; then the method's gradient hook once on the accumulated
    gradients (UB-SMoE's PG sees the active set of the whole batch), clipping and
    the optimizer step. A micro-batch's task loss is its mean token loss weighted by
    its share of the step's labelled tokens, so the accumulated gradient is the full
    batch's mean-token-loss gradient; the method's extra loss is averaged over the
    micro-batches (exact for losses of the parameters alone, e.g. UB-SMoE's range
    penalty; SMoE-LLB's load-balancing loss is a per-micro-batch statistic).
    With ``train.activation_checkpointing`` the decoder layers are recomputed in the
    backward pass (:func:`~ubsmoe.models.runtime.set_activation_checkpointing`).

    Args:
        model: patched model; only parameters with ``requires_grad`` are trained.
        batches: from :func:`make_batches`, each of up to ``train.batch_size`` rows.
        method: supplies the extra loss, the optimizer's parameter groups
            (:meth:`Method.param_groups`), the gradient hook (after backward), the
            update hook (after the optimizer step) and per-step metrics
            (:meth:`Method.step_metrics`, once per optimizer step).
        train_cfg: lr, gradient clipping (over all trainable parameters),
            accumulation and checkpointing.
        top_k: K_c the client runs at (already set on the model).

    Returns:
        ``{"loss": mean task loss over steps, "steps": n, "examples": n, "tokens": n}``
        (steps: optimizer steps; tokens: labelled tokens, i.e. response tokens) plus,
        per key of :meth:`Method.step_metrics`, its maximum over the steps.

    Batches may live on the CPU; each is split into micro-batches and counted there,
    then moved to the model's device. On CUDA the optimizer is fused Adam (same update
    rule, fewer kernels); on CPU torch's default Adam.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    # On CUDA, fused Adam updates every tensor in a few kernels (the per-tensor foreach
    # path is torch's default); on CPU torch's default keeps CPU runs as they were.
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.Adam(method.param_groups(model, train_cfg.lr), lr=train_cfg.lr, **fused)
    micro_batch_size = train_cfg.batch_size // train_cfg.grad_accumulation_steps
    set_activation_checkpointing(model, train_cfg.activation_checkpointing)
    model.train()
    total_loss, steps, examples, tokens = 0.0, 0, 0, 0
    step_max: dict[str, float] = {}
    try:
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            # Split and count labelled tokens where the batch lives (the CPU, as batches
            # arrive), so nothing waits for the device before the optimizer step.
            parts = split_batch(batch, micro_batch_size)
            step_tokens = int((batch["labels"][:, 1:] != -100).sum())  # labelled tokens of the step
            part_tokens = [int((part["labels"][:, 1:] != -100).sum()) for part in parts]
            parts = [{k: v.to(device, non_blocking=True) for k, v in part.items()} for part in parts]
            part_losses = []  # detached, read once after the step (no host sync before it)
            with step_stats(model):
                for part, n_tokens in zip(parts, part_tokens):
                    with routing_mask(model, part["attention_mask"]):
                        logits = model(input_ids=part["input_ids"],
                                       attention_mask=part["attention_mask"]).logits
                    weight = n_tokens / step_tokens if step_tokens else 1.0 / len(parts)
                    loss = causal_lm_loss(logits, part["labels"]) * weight
                    extra = method.extra_loss(model, top_k)
                    objective = loss if extra is None else loss + extra / len(parts)
                    objective.backward()
                    part_losses.append(loss.detach())
                # Once per optimizer step, after every micro-batch's forward and extra loss
                # (the parameters, e.g. UB-SMoE's phi, are those of this step's loss).
                for key, value in method.step_metrics(model).items():
                    step_max[key] = max(step_max.get(key, value), value)
                method.after_backward(model, top_k)  # once, on the accumulated gradients
            if train_cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
            optimizer.step()
            method.after_step(model, top_k)
            step_loss = 0.0
            for value in torch.stack(part_losses).tolist() if part_losses else []:  # one host sync
                step_loss += value
            total_loss += step_loss
            steps += 1
            examples += batch["input_ids"].shape[0]
            tokens += step_tokens
    finally:
        set_activation_checkpointing(model, False)
        model.eval()
    return {"loss": total_loss / max(steps, 1), "steps": steps, "examples": examples, "tokens": tokens,
            **step_max}


def sync_base_merges(model: nn.Module, applied: list[str],
                     merges: Sequence[tuple[str, dict[str, torch.Tensor]]]) -> bool:
    """Merge into ``model``'s base weights the merges it has not applied yet.

    Args:
        model: a model from :func:`~ubsmoe.models.build_model`.
        applied: ids of the merges already in ``model``, oldest first; extended in place.
        merges: the run's merge history ``(id, factors)``, oldest first (see
            :meth:`~ubsmoe.methods.base.Method.base_merges`).

    Returns:
        True when ``model`` now holds exactly ``merges``; False (nothing changed) when
        ``applied`` is not a prefix of the history, i.e. the model holds merges of
        another run or round: the caller rebuilds the model and calls again.
    """
    ids = [mid for mid, _ in merges]
    if ids[:len(applied)] != applied:
        return False
    for mid, factors in merges[len(applied):]:
        merge_into_base(model, factors)
        applied.append(mid)
    return True


def runtime_key(cfg: RunConfig) -> str:
    """Hash of what a client runtime depends on (model, data, method, clients, seed)."""
    d = cfg.to_dict()
    key = {k: d[k] for k in ("model", "data", "method", d["method"])}
    key["num_clients"] = cfg.fl.num_clients
    key["seed"] = cfg.train.seed
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass
class SharedSetup:
    """What the server and every client build identically from the config.

    Attributes:
        data: the loaded :class:`~ubsmoe.data.commonsense.CommonsenseData`.
        tokenizer: the model's tokenizer (trained locally for `tiny`).
        partitions: client id -> indices into ``data.train``.
    """

    data: object
    tokenizer: object
    partitions: list[list[int]]


def shared_setup(cfg: RunConfig) -> SharedSetup:
    """Load data, the tokenizer and the client partitions (deterministic for a config).

    The tokenizer is trained locally for ``model.init=random`` (see
    :func:`~ubsmoe.models.tokenizer.train_tokenizer`), else loaded with the checkpoint's.

    Raises:
        ConfigError: the data cannot be resolved or is too small for the clients.
        ValueError: ``model.name`` has no readable OLMoE config (``random``).
        OSError: the pretrained tokenizer cannot be loaded (hub unreachable, bad path).
    """
    data = load_data(cfg.data, cfg.train.seed)
    if cfg.model.resolved_init == "random":
        # Offline: a BPE tokenizer trained on the run's text to the preset's or the
        # architecture's vocabulary size (cached by text and size).
        texts = [format_prompt(r) + r["output"] for r in data.train]
        tokenizer = train_tokenizer(texts, tokenizer_vocab_size(cfg.model), cache_dir(cfg.model))
    else:
        # lazy: resolving AutoTokenizer imports every tokenizer class (0.5 CPU s of a ClientApp's start)
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model.name)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OSError(f"model.name: could not load the tokenizer of {cfg.model.name!r} ({first}); "
                          "without the hub use model.init=random or a local checkpoint path") from e
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    try:
        labels, data.partition_by = partition_labels(data.train, cfg.data.partition_field,
                                                     data.partition_by)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    partition = "iid" if data.partition_by == "iid" else cfg.data.partition
    partitions = cached_partition_clients(labels, cfg.fl.num_clients, partition, cfg.data.dirichlet_alpha,
                                          cfg.train.seed, cache_dir(cfg.model))
    return SharedSetup(data=data, tokenizer=tokenizer, partitions=partitions)


TOKENIZER_FILE_LIMIT = 64 * 2**20  # bytes of tokenizer files a message may carry


def tokenizer_to_files(tokenizer) -> dict[str, str]:
    """The tokenizer's ``save_pretrained`` files as ``{file name: text}``, to send to a node.

    Raises:
        ValueError: a file is not UTF-8 text or the files exceed 64 MiB together.
    """
    with tempfile.TemporaryDirectory(prefix="ubsmoe-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        files = {}
        for path in sorted(Path(tmp).iterdir()):
            if path.is_file():
                try:
                    files[path.name] = path.read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"tokenizer file {path.name} is not UTF-8 text; "
                                     "it cannot be sent to a node") from e
    if sum(len(t.encode()) for t in files.values()) > TOKENIZER_FILE_LIMIT:
        raise ValueError(f"the tokenizer's files exceed {TOKENIZER_FILE_LIMIT >> 20} MiB")
    return files


def tokenizer_from_files(files: dict[str, str]):
    """Inverse of :func:`tokenizer_to_files`: the tokenizer, loaded with ``AutoTokenizer``.

    Raises:
        ValueError: no files, or a file name with a path separator.
    """
    # lazy: resolving AutoTokenizer imports every tokenizer class; only a node with its own data needs it
    from transformers import AutoTokenizer

    if not files:
        raise ValueError("no tokenizer files were sent")
    with tempfile.TemporaryDirectory(prefix="ubsmoe-tok-") as tmp:
        for name, text in files.items():
            if Path(name).name != name or name in (".", ".."):
                raise ValueError(f"tokenizer file name {name!r} is not a plain file name")
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(tmp)
        # Everything is read now; the backend tokenizer does not keep the files open.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def node_setup(cfg: RunConfig, client_id: int, data_path: str, tokenizer) -> SharedSetup:
    """The setup of a node that trains on its own data (``data-path=`` in its node config).

    The node's folder is read like ``data.path`` (same layout and settings: tasks,
    carving, ``data.train_examples`` cap, seed) and all of its training records are
    client ``client_id``'s partition; the tokenizer is the one the server sent (a node
    never trains its own).

    Args:
        cfg: the run config.
        client_id: the client id the server gave the node.
        data_path: the node's data folder.
        tokenizer: the server's tokenizer (:func:`tokenizer_from_files`).

    Raises:
        ConfigError: the folder cannot be read (names ``data.path``), or holds no
            training record.
    """
    data = load_commonsense(replace(cfg.data, path=data_path), cfg.train.seed)
    if not data.train:
        raise ConfigError(f"data-path: {data_path!r} holds no training records for data.tasks")
    partitions: list[list[int]] = [[] for _ in range(cfg.fl.num_clients)]
    partitions[client_id] = list(range(len(data.train)))
    return SharedSetup(data=data, tokenizer=tokenizer, partitions=partitions)


class ClientRuntime:
    """What a client process keeps between rounds: model, tokenizer, tokenized partitions.

    One model per process serves every client id the process is asked to run (a
    simulation worker runs many clients in turn), on ``model.device`` (batches are
    moved there per step; the update's adapters and counts come back as CPU
    tensors), resized to each client's LoRA rank
    and carrying the run's base-weight merges; partitions are tokenized on first use
    and cached.

    Args:
        cfg: the run config.
        setup: a prebuilt :class:`SharedSetup` (built from ``cfg`` if None).
    """

    def __init__(self, cfg: RunConfig, setup: SharedSetup | None = None) -> None:
        self.cfg = cfg
        self.setup = setup or shared_setup(cfg)
        self.tokenizer = self.setup.tokenizer
        self.model, _ = build_model(cfg.model, self.tokenizer, seed=cfg.train.seed)
        self.method = get_method_class(cfg.method)(cfg.method_config)
        self.method.prepare_model(self.model)
        self._examples: dict[int, list[dict]] = {}
        self._merged: list[str] = []  # ids of the base merges applied to self.model

    def examples(self, client_id: int) -> list[dict]:
        """The tokenized training partition of ``client_id``.

        Raises:
            ValueError: ``client_id`` outside ``[0, fl.num_clients)``.
        """
        if not 0 <= client_id < self.cfg.fl.num_clients:
            raise ValueError(f"client_id: got {client_id}, expected 0..{self.cfg.fl.num_clients - 1}")
        if client_id not in self._examples:
            records = [self.setup.data.train[i] for i in self.setup.partitions[client_id]]
            self._examples[client_id] = [
                tokenize_example(self.tokenizer, r, self.cfg.data.max_length) for r in records
            ]
        return self._examples[client_id]

    def train_round(self, client_id: int, round_idx: int, top_k: int,
                    global_adapters: dict[str, torch.Tensor], lora_rank: int | None = None,
                    lora_alpha: float | None = None,
                    base_merges: Sequence[tuple[str, dict[str, torch.Tensor]]] = ()) -> ClientUpdate:
        """Load the global adapters, train one round at ``top_k`` and build the update.

        Args:
            client_id: partition id of the client.
            round_idx: 1-based round number (seeds the data order).
            top_k: K_c for this client (already passed through the method).
            global_adapters: name -> tensor, as :func:`~ubsmoe.models.adapter_state`
                (at ``lora_rank``: what the method sends a client of that rank).
            lora_rank, lora_alpha: LoRA rank and alpha the client trains at (None:
                keep the model's, ``model.lora_rank`` / ``model.lora_alpha`` unless a
                previous round changed them).
            base_merges: the run's base-weight merges so far, ``(id, factors)`` oldest
                first (:meth:`~ubsmoe.methods.base.Method.base_merges`); the ones this
                runtime has not applied yet are merged into its model first.
        """
        cfg = self.cfg
        start = time.perf_counter()
        examples = self.examples(client_id)
        if not sync_base_merges(self.model, self._merged, base_merges):
            # Another run's merges are in this model: start again from the base weights.
            self.model, _ = build_model(cfg.model, self.tokenizer, seed=cfg.train.seed)
            self.method.prepare_model(self.model)
            self._merged = []
            sync_base_merges(self.model, self._merged, base_merges)
        if lora_rank is not None:
            set_lora_rank(self.model, lora_rank,
                          cfg.model.lora_alpha if lora_alpha is None else lora_alpha,
                          seed=cfg.train.seed + 1)
        load_adapter_state(self.model, global_adapters)
        set_top_k(self.model, top_k)
        for layer in smoe_layers(self.model):
            layer.reset_stats()
        seed = client_seed(cfg.train.seed, client_id, round_idx)
        torch.manual_seed(seed)
        indices = batch_indices(len(examples), cfg.train.batch_size, cfg.train.local_epochs,
                                cfg.train.max_local_steps, seed)
        batches = make_batches(examples, indices, self.tokenizer.pad_token_id)
        stats = local_train(self.model, batches, self.method, cfg.train, top_k)
        layers = smoe_layers(self.model)
        # p_c's count: distinct examples trained on (epochs do not multiply it; a step
        # cap that ends the round early lowers it below the partition size).
        trained = len({i for idx in indices for i in idx})
        return ClientUpdate(
            client_id=client_id,
            num_examples=trained,
            adapters=adapter_state(self.model),
            # [L, E] and [L]; a dense backbone has no SMoE layer: [0, 0] and [0].
            expert_counts=torch.stack([m.expert_counts.cpu() for m in layers]) if layers
            else torch.zeros(0, 0, dtype=torch.float64),
            token_counts=torch.stack([m.token_count.cpu() for m in layers]) if layers
            else torch.zeros(0, dtype=torch.float64),
            top_k=top_k,
            loss=stats["loss"],
            metrics={"steps": float(stats["steps"]), "tokens": float(stats["tokens"]),
                     "train_s": time.perf_counter() - start,
                     **{k: float(v) for k, v in stats.items()
                        if k not in ("loss", "steps", "examples", "tokens")}},
        )
