"""Typed run configuration: nested dataclasses, YAML files and `key=value` overrides.

A run is described by one :class:`RunConfig`. It is built once, at the edge (CLI or
the Flower adapter), from the embedded default YAML, an optional user YAML and
dotted overrides such as ``fl.rounds=3`` or ``a3smoe.gamma=2``. Unknown keys are
rejected, and every invalid field is reported in one :class:`ConfigError` that
names the dotted field, the bad value and what is allowed.

Each method's own hyperparameters live in that method's config class (see
:mod:`ubsmoe.methods`); in YAML they sit in a section named after the method.

This module is the foundation layer: it imports no method and no model. Method
sections reach it through a small table (:func:`register_method_section`): the
method registry (:mod:`ubsmoe.methods.registry`) enters every method's config class
and its cross-check of a whole run (:func:`register_run_check`, which checks the
method against the model) when a method is registered. The built-in methods are
registered by importing the package named :data:`BUILTIN_METHODS`; :func:`method_section`
imports it by that name on first use when the table is still empty, as a plugin
loader would, so ``load_config(...)`` works in a fresh process that imported only
``ubsmoe.config``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import math
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ubsmoe.budgets import DEVICE_NAMES, valid_device_name
from ubsmoe.errors import ConfigError
from ubsmoe.errors import bad_value as _bad
from ubsmoe.io import atomic_write_text

COMMONSENSE_TASKS = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Challenge",
    "ARC-Easy",
    "openbookqa",
)
BUDGET_PATTERNS = ("uniform", "long_tail", "reverse_long_tail")
PARTITIONS = ("iid", "dirichlet")
# Data sources (``data.name``): the LLM-Adapters commonsense suite, or any instruction data.
DATA_NAMES = ("commonsense", "instruction")
# Answer types of instruction tasks (``data.answer_types``), each with its own metric.
ANSWER_TYPES = ("label", "letter", "numeric", "text")
# Record fields an HF dataset's columns map onto (``data.columns``).
RECORD_FIELDS = ("instruction", "input", "output", "answer", "task", "category")
# Metric reported as a free-text task's value (``eval.text_metric``).
TEXT_METRICS = ("rouge_l", "bertscore_f1")
EVAL_PROTOCOLS = ("generation", "loglik", "loss")
# K a budget level is evaluated at: its own K_j (``budget``) or the model's native top-k.
EVAL_TOP_K = ("budget", "native")
# K a client trains at: the method's own choice (``auto``), K_c (``budget``) or native.
TRAIN_TOP_K = ("auto", "budget", "native")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_INITS = ("auto", "random", "pretrained")
# Random-weight OLMoE-architecture presets (sizes in ubsmoe.models.build.PRESETS).
MODEL_PRESETS = ("tiny", "medium", "tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-dense")


@dataclass
class TinyModelConfig:
    """Sizes of the randomly initialised OLMoE-architecture `tiny` preset.

    Experts and top-k match OLMoE-1B-7B (64 experts, top-8) so that budgets map to
    the same K_c; width and depth are small enough for CPU runs. ``initializer_range``
    is the std of the random weights (HF default 0.02; at that scale and width the
    experts' output, gated by ~1/64 softmax weights, is ~1e-3 of the residual stream,
    so K_c barely changes predictions — the embedded default uses 0.1).

    Attributes:
        hidden_size: hidden width H of the tiny preset (the ``tiny-*`` family
            presets and ``tiny-dense`` use the same sizes).
        num_hidden_layers: decoder layers L.
        num_attention_heads: attention heads.
        intermediate_size: expert intermediate size I (``tiny-dense``: its MLP is
            ``4 * intermediate_size``).
        num_experts: experts M per SMoE layer (OLMoE-1B-7B: 64).
        num_experts_per_tok: the native top-k K_max, in [1, ``num_experts``]
            (OLMoE-1B-7B: 8; a larger value is a config error naming both fields).
        vocab_size: vocabulary size; the tokenizer is trained locally to it and cached.
        max_position_embeddings: longest sequence the model accepts.
        initializer_range: std of the random weights, > 0 (HF default 0.02; the
            embedded default run uses 0.1: at 0.02 the experts' gated output is ~1e-3
            of the residual stream, so K barely changes predictions).
    """

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 32
    num_experts: int = 64
    num_experts_per_tok: int = 8
    vocab_size: int = 2048
    max_position_embeddings: int = 1024
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if not self.initializer_range > 0:
            raise ConfigError(_bad("model.tiny.initializer_range", self.initializer_range, "a number > 0"))
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(_bad("model.tiny.num_experts_per_tok", self.num_experts_per_tok,
                                   f"an integer in [1, model.tiny.num_experts={self.num_experts}]"))


@dataclass
class ModelConfig:
    """Which model to fine-tune and where its LoRA adapters go.

    Attributes:
        name: a random-weight preset (``tiny``: the CPU default; ``medium``: hidden
            512, 4 layers, 4 heads, 64 experts, top-8, expert intermediate 256,
            vocabulary 4096, the ``model_step`` bench shapes; ``tiny-mixtral``,
            ``tiny-qwen2-moe``, ``tiny-qwen3-moe``: the ``tiny`` sizes in that MoE
            family's architecture; ``tiny-dense``: a dense OLMo of the ``tiny``
            width, depth and MLP size ``4 * intermediate_size``), else a hub name or
            local path of a supported checkpoint (OLMoE, Mixtral, Qwen2-MoE,
            Qwen3-MoE; dense OLMo, Llama, Mistral; e.g. ``allenai/OLMoE-1B-7B-0924``,
            ``allenai/OLMo-1B-hf``; see ``ubsmoe.models.families`` and the docs page
            "Your data and models"). The shipped ``allenai/OLMoE-1B-7B-0924`` and
            ``allenai/OLMo-1B-hf`` (dense: ``fedit`` and the rank methods only)
            configs build offline with ``init=random``.
        lora_rank: LoRA rank r of every expert projection and attention projection.
        lora_alpha: LoRA alpha; the scale is alpha / r.
        attention_lora: also put LoRA on q/k/v/o attention projections (PEFT).
        dtype: parameter dtype of the frozen model: ``auto`` (bfloat16 on a GPU,
            float32 on CPU), ``float32``, ``bfloat16`` or ``float16``. LoRA factors
            (expert LoRA in ``SMoELayer``, attention LoRA through PEFT's adapter
            autocast), DMR phi and a trainable router stay float32 whatever this is.
        device: where clients train (model and batches) and the server evaluates:
            ``auto`` (``cuda:0`` when CUDA is visible, else CPU), ``cuda``,
            ``cuda:N`` or ``cpu``. Checked against the visible devices when the
            model is built. Adapters over the wire and in checkpoints are CPU tensors.
        init: ``pretrained`` (load the checkpoint's weights and tokenizer, from the
            hub or a local path), ``random`` (random weights of the preset's or the
            checkpoint's architecture, from a shipped or local config.json, built on
            the target device, with a tokenizer trained locally to its vocabulary
            size and cached: no hub access needed) or ``auto`` (``random`` for
            presets, ``pretrained`` otherwise). ``pretrained`` with a preset is a
            config error.
        k_min: smallest number of activated experts a client may get (K_min of
            K_c = clamp(floor(K_max beta), K_min, K_max)); at most the native top-k.
        router_trainable: train the router ``W_r`` of every SMoE layer (every
            method; it is uploaded with the adapters and aggregated by p_c-weighted
            mean like any non-LoRA adapter tensor, also by A3SMoE and the rank
            methods, as a plain dense tensor; DESIGN.md section 3), checkpointed and
            exported to ``adapter/router.safetensors``. Kept in float32 when
            ``dtype`` is lower precision (Adam steps of ~lr would round away in
            bfloat16). False keeps the host model's router frozen.
        tokenizer_cache: where the tiny preset's trained tokenizer is cached
            (empty: ``$UBSMOE_CACHE`` or ``~/.cache/ubsmoe``).
        lora_experts: M, a mixture of LoRA experts on a dense backbone's frozen MLP
            (beyond the papers; docs page "Your data and models", "Mixture of LoRA
            experts on a dense model"): every decoder layer's MLP becomes an SMoE
            layer of M experts that share the frozen MLP weights and differ by their
            own LoRA, with a new router ``W_r [M, H]`` that picks K_c per token, so
            the SMoE methods (``ubsmoe``, ``smoe``, ``smoe_llb``, ``a3smoe``) run on
            the dense model; not with ``flora``/``florist`` (they merge into the
            shared base). 0 (default): off. Dense families only.
        lora_experts_top_k: K_max, the LoRA experts a token runs at budget 1
            (``1 <= K_max <= M``); a level beta runs ``clamp(floor(K_max beta), k_min, K_max)``.
            Each active expert is one more pass through the frozen MLP.
    """

    name: str = "tiny"
    lora_rank: int = 20
    lora_alpha: float = 16.0
    attention_lora: bool = True
    dtype: str = "auto"
    device: str = "auto"
    init: str = "auto"
    k_min: int = 1
    router_trainable: bool = True
    tokenizer_cache: str = ""
    lora_experts: int = 0
    lora_experts_top_k: int = 2
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)

    def __post_init__(self) -> None:
        errors = []
        if self.lora_rank < 1:
            errors.append(_bad("model.lora_rank", self.lora_rank, "an integer >= 1"))
        if not self.lora_alpha > 0:
            errors.append(_bad("model.lora_alpha", self.lora_alpha, "a number > 0"))
        if self.dtype not in DTYPES:
            errors.append(_bad("model.dtype", self.dtype, f"one of {', '.join(DTYPES)}"))
        if self.k_min < 1:
            errors.append(_bad("model.k_min", self.k_min, "an integer >= 1"))
        if not valid_device_name(self.device):
            errors.append(_bad("model.device", self.device, DEVICE_NAMES))
        if self.init not in MODEL_INITS:
            errors.append(_bad("model.init", self.init, f"one of {', '.join(MODEL_INITS)}"))
        elif self.init == "pretrained" and self.name in MODEL_PRESETS:
            errors.append(_bad("model.init", self.init,
                               f"random or auto for the preset {self.name!r} (it has no pretrained weights)"))
        if not isinstance(self.router_trainable, bool):
            errors.append(_bad("model.router_trainable", self.router_trainable, "true or false"))
        if self.lora_experts < 0:
            errors.append(_bad("model.lora_experts", self.lora_experts, "an integer >= 0 (0: off)"))
        elif self.lora_experts and not 1 <= self.lora_experts_top_k <= self.lora_experts:
            errors.append(_bad("model.lora_experts_top_k", self.lora_experts_top_k,
                               f"an integer in [1, model.lora_experts={self.lora_experts}]"))
        _raise(errors)

    @property
    def resolved_init(self) -> str:
        """``random`` or ``pretrained``: ``auto`` resolved by the model name."""
        if self.init != "auto":
            return self.init
        return "random" if self.name in MODEL_PRESETS else "pretrained"


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
        _raise(errors)


@dataclass
class TrainConfig:
    """Local training on each client, per round.

    Attributes:
        lr: Adam learning rate.
        batch_size: examples per local optimizer step (the effective batch).
        grad_accumulation_steps: micro-batches per optimizer step (must divide
            ``batch_size``); each holds ``batch_size / grad_accumulation_steps``
            examples and the accumulated gradient equals the full batch's (docs
            page "Concepts", "Memory for long runs").
        activation_checkpointing: recompute each decoder layer's activations in
            the backward pass instead of storing them (non-reentrant
            ``torch.utils.checkpoint``; less memory, one more forward per layer);
            utilization counts are not affected.
        local_epochs: passes over the client's partition per round.
        max_local_steps: cap on optimizer steps per round (0: no cap).
        max_grad_norm: gradient clipping norm (0: off).
        seed: base seed; per-client seeds derive from it and the client id.
        top_k: experts per token a client trains with (DESIGN.md section 6):
            ``auto`` is the method's own choice (:attr:`Method.own_train_top_k`:
            K_c for ``smoe``, ``smoe_llb``, ``a3smoe``, ``ubsmoe``; the native top-k
            for ``fedit`` and the rank methods, which keep their rank r_c),
            ``budget`` its budget level's K_c (every method), ``native`` the model's
            top-k (only ``fedit`` and the rank methods). Methods that exist to vary K
            (the SMoE methods) reject ``native`` as a config error
            (:attr:`Method.train_top_k_modes`).
    """

    lr: float = 1.5e-4
    batch_size: int = 16
    local_epochs: int = 1
    max_local_steps: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    top_k: str = "auto"
    grad_accumulation_steps: int = 1
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        errors = []
        if not self.lr > 0:
            errors.append(_bad("train.lr", self.lr, "a number > 0"))
        if self.batch_size < 1:
            errors.append(_bad("train.batch_size", self.batch_size, "an integer >= 1"))
        if self.local_epochs < 1:
            errors.append(_bad("train.local_epochs", self.local_epochs, "an integer >= 1"))
        if self.max_local_steps < 0:
            errors.append(_bad("train.max_local_steps", self.max_local_steps, "an integer >= 0"))
        if self.max_grad_norm < 0:
            errors.append(_bad("train.max_grad_norm", self.max_grad_norm, "a number >= 0"))
        if self.top_k not in TRAIN_TOP_K:
            errors.append(_bad("train.top_k", self.top_k, f"one of {', '.join(TRAIN_TOP_K)}"))
        steps = self.grad_accumulation_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            errors.append(_bad("train.grad_accumulation_steps", steps, "an integer >= 1"))
        elif self.batch_size >= 1 and self.batch_size % steps:
            errors.append(_bad("train.grad_accumulation_steps", steps,
                               f"a divisor of train.batch_size={self.batch_size}"))
        if not isinstance(self.activation_checkpointing, bool):
            errors.append(_bad("train.activation_checkpointing", self.activation_checkpointing,
                               "true or false"))
        _raise(errors)


AGGREGATIONS = ("mean", "median", "trimmed_mean")


@dataclass
class FLConfig:
    """Federation: clients, rounds, participation and compute budgets.

    Attributes:
        num_clients: number of clients (Flower SuperNodes).
        rounds: federated rounds.
        fraction: share of clients sampled each round, in (0, 1].
        budgets: the budget levels beta_1..beta_n, each in (0, 1], strictly
            increasing; client c at level beta gets
            K_c = clamp(floor(K_max * beta), k_min, K_max) (K = 1, 2, 4, 8 on a
            top-8 model with the default levels).
        budget_pattern: how clients are spread over the levels: ``uniform``,
            ``long_tail`` (75% at the lowest level) or ``reverse_long_tail``
            (75% at the highest).
        client_cpus: CPUs reserved per simulated client: the local SuperLink's
            federation config ``client-resources-num-cpus`` (Ray resources). A
            whole number >= 1: Flower 1.42's federation config takes integer CPUs.
            W = floor(CPUs / this) worker processes run, one model each.
        client_gpus: GPUs reserved per simulated client (``client-resources-num-gpus``);
            fractions share a GPU between workers (0.25: four per GPU); 0: clients on
            the CPU (a worker that reserves no GPU sees none; ``ubsmoe run`` warns
            when a GPU is visible and refuses ``model.device=cuda``).
        keep_checkpoints: how many ``checkpoints/round_XXXX.pt`` to keep, newest
            first (0: keep all); older ones are deleted once a new one is written.
            Checkpoints are written atomically, so ``--resume`` always has one.
            The final adapters (``checkpoints/adapter``) are always kept.
        round_timeout_s: seconds the server waits for a round's replies (per try);
            a client that has not replied by then is left out of the round as
            ``timeout after T s`` and its late reply is discarded. 0: no timeout (a
            disconnected node is still left out, through the error reply Flower
            sends for a node that went offline).
        min_replies: a round completes only with at least this many good replies.
        min_reply_fraction: ... and at least this share of the round's sampled
            clients (rounded up), in (0, 1].
        round_retries: how often a round that missed ``min_replies`` /
            ``min_reply_fraction`` is tried again with the same clients and seeds
            before the run stops (0: never). Nothing of a failed try is committed;
            after the last try the run stops with one line naming the last complete
            round's checkpoint.
        reject_norm_multiple: reject a reply whose update norm ``||x_c - x_sent||_2``
            exceeds this multiple of the round's median (0: off; e.g. 3). Buffers
            the round's replies.
        aggregation: ``mean`` (the method's own p_c-weighted mean, streaming),
            ``median`` (coordinate-wise median) or ``trimmed_mean`` (Yin et al.,
            2018) of the tensors a method averages with data weights; the robust
            ones are unweighted across the good replies and buffer the round's
            replies. The rank methods (``hetlora``, ``flexlora``, ``flora``,
            ``florist``, ``a3smoe_flexlora``) aggregate factors all at once and
            accept only ``mean``.
        trim_fraction: share of replies cut at each end per coordinate by
            ``trimmed_mean``, in [0, 0.5).
    """

    num_clients: int = 8
    rounds: int = 20
    fraction: float = 1.0
    budgets: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    budget_pattern: str = "uniform"
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    keep_checkpoints: int = 2
    round_timeout_s: float = 0.0
    min_replies: int = 1
    min_reply_fraction: float = 0.5
    round_retries: int = 1
    reject_norm_multiple: float = 0.0
    aggregation: str = "mean"
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        errors = []
        if not self.round_timeout_s >= 0:
            errors.append(_bad("fl.round_timeout_s", self.round_timeout_s, "seconds >= 0 (0: no timeout)"))
        if self.min_replies < 1:
            errors.append(_bad("fl.min_replies", self.min_replies, "an integer >= 1"))
        if not 0.0 < self.min_reply_fraction <= 1.0:
            errors.append(_bad("fl.min_reply_fraction", self.min_reply_fraction, "a number in (0, 1]"))
        if self.round_retries < 0:
            errors.append(_bad("fl.round_retries", self.round_retries, "an integer >= 0"))
        if not self.reject_norm_multiple >= 0:
            errors.append(_bad("fl.reject_norm_multiple", self.reject_norm_multiple,
                               "a number >= 0 (0: off; e.g. 3)"))
        if self.aggregation not in AGGREGATIONS:
            errors.append(_bad("fl.aggregation", self.aggregation, f"one of {', '.join(AGGREGATIONS)}"))
        if not 0.0 <= self.trim_fraction < 0.5:
            errors.append(_bad("fl.trim_fraction", self.trim_fraction, "a number in [0, 0.5)"))
        if self.num_clients < 1:
            errors.append(_bad("fl.num_clients", self.num_clients, "an integer >= 1"))
        if self.rounds < 1:
            errors.append(_bad("fl.rounds", self.rounds, "an integer >= 1"))
        if not 0.0 < self.fraction <= 1.0:
            errors.append(_bad("fl.fraction", self.fraction, "a number in (0, 1]"))
        if not self.budgets or any(not (0.0 < b <= 1.0) for b in self.budgets):
            errors.append(_bad("fl.budgets", self.budgets, "a non-empty list of numbers in (0, 1]"))
        elif sorted(self.budgets) != list(self.budgets) or len(set(self.budgets)) != len(self.budgets):
            errors.append(_bad("fl.budgets", self.budgets, "strictly increasing levels"))
        if self.budget_pattern not in BUDGET_PATTERNS:
            errors.append(
                _bad("fl.budget_pattern", self.budget_pattern, f"one of {', '.join(BUDGET_PATTERNS)}")
            )
        if not (self.client_cpus >= 1 and float(self.client_cpus).is_integer()):
            errors.append(_bad("fl.client_cpus", self.client_cpus, "a whole number >= 1"))
        if not self.client_gpus >= 0:
            errors.append(_bad("fl.client_gpus", self.client_gpus, "a number >= 0 (fractions allowed)"))
        if self.keep_checkpoints < 0:
            errors.append(_bad("fl.keep_checkpoints", self.keep_checkpoints, "an integer >= 0 (0: keep all)"))
        _raise(errors)


@dataclass
class EvalConfig:
    """Evaluation of the global model per budget level.

    Attributes:
        protocols: ``generation`` (greedy decoding, first answer token extracted,
            the paper's protocol), ``loglik`` (log-likelihood choice scoring) and/or
            ``loss`` (mean next-token loss of the reference response given its
            prompt, nats per token, lower is better; :mod:`ubsmoe.eval.loss`).
            Default: ``generation`` and ``loglik``.
        examples_per_task: test examples scored per task, a fixed seeded subset
            (0: the whole test set).
        max_new_tokens: generation length for the generation protocol (a row
            also stops once its answer is found).
        batch_size: examples per evaluation batch.
        every_rounds: also evaluate every N rounds (0: only after the last round).
        pg_probe_examples: training examples in the fixed probe batch of the
            PG-alignment diagnostic, run every round for methods with a
            pseudo-gradient at each budget level's K (0: off).
        top_k: the K each budget level is evaluated at, one set of rows per entry:
            ``budget`` (level j at its own K_j, and rank methods at rank r_j: the
            papers' protocol, for every method) and/or ``native`` (every level at
            the model's top-k, still at rank r_j); each row carries its
            ``top_k_mode``.
        text_metric: the value a free-text task reports in a row's ``per_task``:
            ``rouge_l`` (ROUGE-L F) or ``bertscore_f1``; both are in
            ``per_task_metrics`` when computed.
        bertscore_model: BERTScore's scoring model, a hub name or a local folder
            with model and tokenizer (``bert_score`` ``model_type``); empty:
            BERTScore off (stated in the summary). Not loadable: BERTScore is
            skipped and ``summary.json`` says why.
        bertscore_num_layers: the layer BERTScore reads; 0: bert-score's own
            choice for a known ``bertscore_model`` (required for a local folder).
        utilization: also measure expert utilization at each level's evaluation K
            over the scored test records (the same tokens for every method; entropy
            and Gini in each eval row's ``utilization``, :mod:`ubsmoe.eval.utilization`).
    """

    protocols: list[str] = field(default_factory=lambda: ["generation", "loglik"])
    top_k: list[str] = field(default_factory=lambda: ["budget"])
    examples_per_task: int = 0
    max_new_tokens: int = 16
    batch_size: int = 16
    every_rounds: int = 0
    pg_probe_examples: int = 8
    text_metric: str = "rouge_l"
    bertscore_model: str = "roberta-large"
    bertscore_num_layers: int = 0
    utilization: bool = True

    def __post_init__(self) -> None:
        errors = []
        if self.text_metric not in TEXT_METRICS:
            errors.append(_bad("eval.text_metric", self.text_metric, f"one of {', '.join(TEXT_METRICS)}"))
        if self.bertscore_num_layers < 0:
            errors.append(_bad("eval.bertscore_num_layers", self.bertscore_num_layers, "an integer >= 0"))
        if not self.protocols or any(p not in EVAL_PROTOCOLS for p in self.protocols):
            errors.append(
                _bad("eval.protocols", self.protocols, f"a non-empty list from {', '.join(EVAL_PROTOCOLS)}")
            )
        if (not self.top_k or any(m not in EVAL_TOP_K for m in self.top_k)
                or len(set(self.top_k)) != len(self.top_k)):
            errors.append(_bad("eval.top_k", self.top_k,
                               f"a non-empty list of distinct values from {', '.join(EVAL_TOP_K)}"))
        if self.examples_per_task < 0:
            errors.append(_bad("eval.examples_per_task", self.examples_per_task, "an integer >= 0"))
        if self.max_new_tokens < 1:
            errors.append(_bad("eval.max_new_tokens", self.max_new_tokens, "an integer >= 1"))
        if self.batch_size < 1:
            errors.append(_bad("eval.batch_size", self.batch_size, "an integer >= 1"))
        if self.every_rounds < 0:
            errors.append(_bad("eval.every_rounds", self.every_rounds, "an integer >= 0"))
        if self.pg_probe_examples < 0:
            errors.append(_bad("eval.pg_probe_examples", self.pg_probe_examples, "an integer >= 0"))
        _raise(errors)


@dataclass
class LogConfig:
    """Where a run's per-round scalars go besides ``metrics.jsonl`` (see :mod:`ubsmoe.tracking`).

    Attributes:
        tensorboard: write TensorBoard event files of every numeric scalar in each
            metrics.jsonl record to ``run_dir/tensorboard/`` (docs page "Logging").
        wandb: also log the same scalars to Weights & Biases
            (``wandb.init(project=..., dir=run dir, config=resolved config)``; a
            resume continues the same W&B run). True without the ``wandb`` package
            is a config error (``pip install wandb``).
        wandb_project: the W&B project name.

    Raises:
        ConfigError: ``wandb`` true without the ``wandb`` package, or an empty project.
    """

    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "ubsmoe"

    def __post_init__(self) -> None:
        errors = []
        if self.wandb and importlib.util.find_spec("wandb") is None:
            errors.append("log.wandb=true needs `pip install wandb`")
        if not self.wandb_project.strip():
            errors.append(_bad("log.wandb_project", self.wandb_project, "a non-empty W&B project name"))
        _raise(errors)


@dataclass
class RunConfig:
    """One federated run: model, data, local training, federation, evaluation, method.

    ``method_config`` is the selected method's own config dataclass; in YAML and
    overrides it is the section named after the method (e.g. ``a3smoe.gamma``).

    Attributes:
        method: the federated method, one of ``ubsmoe methods`` (the method
            registry): ``ubsmoe`` (the default), ``smoe``, ``smoe_llb``,
            ``a3smoe``, ``fedit``, the LoRA-rank baselines ``hetlora``,
            ``flexlora``, ``flora``, ``florist``, and ``a3smoe_flexlora``. An
            unknown name is a config error listing the available ones.
        model: which model to fine-tune and where its LoRA adapters go.
        data: the data, its splits and its partition over clients.
        train: local training on each client.
        fl: the federation: clients, rounds, budgets, failures, aggregation.
        eval: evaluation of the global model per budget level.
        log: TensorBoard and W&B logging.
        method_config: the selected method's own config (the section named after
            the method).
    """

    method: str = "ubsmoe"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    method_config: Any = None

    def __post_init__(self) -> None:
        config_class = method_section(self.method)  # raises ConfigError naming the choices
        if self.method_config is None:
            self.method_config = config_class()
        elif not isinstance(self.method_config, config_class):
            raise ConfigError(
                f"method_config: expected {config_class.__name__} for method "
                f"'{self.method}', got {type(self.method_config).__name__}"
            )
        for check in _RUN_CHECKS:
            check(self)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data, method section under its name."""
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.name in ("method", "method_config"):
                continue
            out[f.name] = dataclasses.asdict(getattr(self, f.name))
        out[self.method] = dataclasses.asdict(self.method_config)
        return out


# Method sections (see the module docstring): method name -> its config dataclass, and
# the cross-checks of a built run, both filled by the method registry.
BUILTIN_METHODS = "ubsmoe.methods"
_METHOD_SECTIONS: dict[str, type] = {}
_RUN_CHECKS: list[Callable[[RunConfig], None]] = []


def register_method_section(name: str, config_class: type) -> None:
    """Enter method ``name`` and its config dataclass (its YAML section ``name:``).

    Called by :func:`ubsmoe.methods.registry.register_method`.

    Raises:
        ValueError: ``name`` is entered already with another config class.
    """
    if _METHOD_SECTIONS.get(name, config_class) is not config_class:
        raise ValueError(f"method {name!r}: config section entered twice")
    _METHOD_SECTIONS[name] = config_class


def register_run_check(check: Callable[[RunConfig], None]) -> None:
    """Add ``check(run)``, run at the end of every :class:`RunConfig` construction.

    A check raises :class:`ConfigError` (one line naming the field and what is
    allowed); the method registry adds the method-against-run cross-check.
    """
    if check not in _RUN_CHECKS:
        _RUN_CHECKS.append(check)


def method_sections() -> list[str]:
    """The method names with a config section, sorted (the registered methods)."""
    _load_builtin_methods()
    return sorted(_METHOD_SECTIONS)


def method_section(name: str) -> type:
    """The config dataclass of method ``name``.

    Raises:
        ConfigError: unknown name; the message lists the available ones.
    """
    _load_builtin_methods()
    try:
        return _METHOD_SECTIONS[name]
    except KeyError:
        raise ConfigError(
            f"method: got {name!r}, expected one of {', '.join(sorted(_METHOD_SECTIONS))}"
        ) from None


def _load_builtin_methods() -> None:
    """Register the built-in methods (import :data:`BUILTIN_METHODS` by name) once."""
    if not _METHOD_SECTIONS:
        importlib.import_module(BUILTIN_METHODS)


def _raise(errors: list[str]) -> None:
    if errors:
        raise ConfigError("\n".join(errors))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or an override string) to the annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, value, args[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(_bad(name, value, "a list"))
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(_bad(name, value, "true or false"))
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(_bad(name, value, "an integer"))
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(_bad(name, value, "an integer")) from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(_bad(name, value, "an integer"))
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(_bad(name, value, "a number"))
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(_bad(name, value, "a number")) from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(_bad(name, value, "a string"))
        return "" if value is None else str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, errors: list[str], **fixed: Any) -> Any:
    """Build dataclass ``cls`` from a nested dict, collecting errors with dotted names.

    ``fixed`` keyword arguments are passed to ``cls`` as they are (already built).
    """
    if not isinstance(data, dict):
        errors.append(_bad(prefix.rstrip("."), data, "a mapping of keys"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields or key == "method_config":
            allowed = ", ".join(sorted(k for k in fields if k != "method_config"))
            errors.append(f"{name}: unknown key (allowed: {allowed})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            sub = _build(tp, value, f"{name}.", errors)
            if sub is not None:
                kwargs[key] = sub
            continue
        try:
            kwargs[key] = _coerce(name, value, tp)
        except ConfigError as e:
            errors.append(str(e))
    kwargs.update(fixed)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        errors.extend(str(e).splitlines())
    except TypeError as e:  # pragma: no cover - a dataclass without defaults
        errors.append(f"{prefix.rstrip('.')}: {e}")
    return None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["fl.rounds=3", "method=a3smoe"]`` into a nested dict of YAML-parsed values.

    Raises:
        ConfigError: an override without ``=`` or with an empty key.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. fl.rounds=3")
        value = yaml.safe_load(raw) if raw.strip() else ""
        _set_dotted(tree, key, value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_config_dict() -> dict[str, Any]:
    """The embedded default run (``ubsmoe/configs/default.yaml``) as a nested dict."""
    text = resources.files("ubsmoe").joinpath("configs/default.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig`, reporting every problem at once.

    Raises:
        ConfigError: unknown keys, wrong types or out-of-range values (one per line).
    """
    tree = dict(tree)
    errors: list[str] = []
    method = tree.pop("method", "ubsmoe")
    try:
        config_class = method_section(method)
    except ConfigError as e:
        raise ConfigError(str(e)) from None
    method_tree = tree.pop(method, {}) or {}
    for other in method_sections():
        if other != method and other in tree:
            warnings.warn(
                f"config section '{other}' is ignored: the selected method is '{method}'",
                stacklevel=2,
            )
            tree.pop(other)
    method_config = _build(config_class, method_tree, f"{method}.", errors)
    run = (_build(RunConfig, {**tree, "method": method}, "", errors, method_config=method_config)
           if not errors else None)
    if errors:
        raise ConfigError("\n".join(errors))
    return run


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Resolve a run config: embedded default <- YAML file <- ``key=value`` overrides.

    Args:
        path: optional YAML file; its keys override the embedded default.
        overrides: dotted ``key=value`` strings, applied last.

    Raises:
        ConfigError: a missing or unreadable file, or any invalid field.
    """
    tree = default_config_dict()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file: {str(p)!r} does not exist")
        try:
            user = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r}: not valid YAML ({e})") from e
        if not isinstance(user, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
        tree = _merge(tree, user)
    if overrides:
        over = parse_overrides(overrides)
        # A new method discards the default's method section rather than merging it.
        if "method" in over and over["method"] != tree.get("method"):
            tree.pop(tree.get("method", ""), None)
        tree = _merge(tree, over)
    return config_from_dict(tree)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict to dotted keys (``{"fl": {"rounds": 2}} -> {"fl.rounds": 2}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        _set_dotted(tree, key, value)
    return tree
