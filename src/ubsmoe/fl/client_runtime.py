"""A client's run setup and what it keeps between rounds (plain PyTorch, no Flower).

:func:`shared_setup` loads the data, the tokenizer and the client partitions the
server and every client build identically from the config (:func:`node_setup` for a
node with its own data; :func:`tokenizer_to_files` / :func:`tokenizer_from_files`
carry the server's tokenizer to it). :class:`ClientRuntime` holds what a client keeps
between rounds (model, tokenizer, its tokenized partition) and
:meth:`ClientRuntime.train_round` turns the server's instruction into a
:class:`~ubsmoe.methods.aggregation.ClientUpdate` by running
:func:`ubsmoe.fl.train.local_train`.
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
from torch import nn

from ubsmoe.config import RunConfig
from ubsmoe.data.commonsense import load_commonsense
from ubsmoe.data.instruction import load_data
from ubsmoe.data.partition import cached_partition_clients, partition_labels
from ubsmoe.data.prompts import format_prompt, tokenize_example
from ubsmoe.errors import ConfigError
from ubsmoe.fl.privacy import privatise_update
from ubsmoe.fl.train import batch_indices, client_seed, local_train, make_batches
from ubsmoe.methods import ClientUpdate, get_method_class
from ubsmoe.models import adapter_state, build_model, load_adapter_state, set_top_k, smoe_layers
from ubsmoe.models.adapters import merge_into_base, set_lora_rank
from ubsmoe.models.architecture import tokenizer_vocab_size
from ubsmoe.models.tokenizer import cache_dir, train_tokenizer


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
        self.method.set_lora_scale(cfg.model.lora_scale_rule, cfg.model.lora_scale)
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

        With ``privacy.mode`` on, the update is privatised before it is returned
        (:func:`ubsmoe.fl.privacy.privatise_update`: clipped, noised in local mode,
        counts as a histogram, uniform weight).
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
                          cfg.model.alpha_for(lora_rank) if lora_alpha is None else lora_alpha,
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
        update = ClientUpdate(
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
        if not cfg.privacy.enabled:
            return update
        # DP: clip (and, local, noise) the update and the counts; uniform weight (docs/privacy.md).
        return privatise_update(update, global_adapters, cfg.privacy, round_idx,
                                layers[0].max_top_k if layers else 1)
