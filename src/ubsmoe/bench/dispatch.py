"""Suite ``dispatch``: ATen operations (a proxy for kernel launches) of one local step.

On a GPU a small model's local step is bound by the host: every ATen operation is
at least one kernel launch of a few microseconds, whatever its size (issue 24). The
CPU cannot time launches, but it can count them. :class:`LaunchCounter` is a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` that sees every ATen
operation below autograd (forward and backward alike) and counts those that are not
views (aliasing operations: ``OpOverload.is_view``, and in-place metadata changes,
``torch.Tag.inplace_view``, and ``_unsafe_view``) and profiler markers, since
those launch no kernel.

:func:`count_local_step` runs exactly a client's step,
:func:`~ubsmoe.fl.train.local_train` on one batch, under the counter and splits the
count

- by phase: ``setup`` (splitting and counting the batch), ``forward`` (the model,
  the loss and the method's extra loss), ``backward``, ``method`` (the method's
  step metrics and gradient/update hooks, e.g. UB-SMoE's PG), ``clip`` (gradient
  clipping), ``optimizer`` (Adam's step, its state created on this first step
  included), ``finalize`` (reading the losses back);
- for forward + backward, by component: ``attention`` (the host attention and the
  frozen q/k/v/o projections), ``attention_lora`` (PEFT's LoRA wrapper around
  them: casts to the adapter dtype, the two matmuls, scaling, the add),
  ``router`` (the SMoE layer outside its experts: router logits, softmax, top-k,
  slot sort, routing statistics), ``experts`` (gather, grouped matmuls with their
  LoRA, activation, combine), ``loss`` (outside the model: cross-entropy, the
  method's extra loss), ``other`` (embedding, norms, residual adds, rotary
  embedding, LM head) and ``casts``: every ``aten._to_copy`` (a dtype or device
  copy), wherever it runs (``casts_by_component`` says where);
- by decoder layer (``by_layer``), from which the count at another depth follows.

Attribution. Forward operations belong to the innermost marked scope that is
running: forward pre/post hooks on the marked modules (the model, attention
modules, PEFT LoRA wrappers and their base layers, SMoE layers, decoder layers) and
a wrapper around each SMoE layer's ``experts_forward`` push and pop a scope. Every
push and pop records autograd's sequence number at that moment; an autograd node
takes the next sequence number when it is created, so a backward operation is
attributed through the node running it (``torch._C._current_autograd_node``) to
the scope that was innermost when that node was created (``AccumulateGrad`` nodes,
which have no sequence number, through the parameter they accumulate into).
Limits: a backward operation the engine runs outside any node (the loss's seed
gradient ``ones_like``) counts as forward ``loss``; nodes created in a scope are
that scope's even where their work belongs elsewhere (the ``.to`` of the SMoE
output is ``experts``); components are found by module type and name, which fits
the OLMoE family this suite builds (a new host family may need a new rule).

The counter itself is :mod:`ubsmoe.bench.launch_counter`. The count is a proxy (issue 24): SDPA and fused Adam break down differently on
CUDA, and a CUDA kernel may be several launches or a CPU operation none; the GPU
check validates it. ``ops`` and ``by_component`` are deterministic for a given
model, batch, K and method (tests/bench/test_dispatch.py holds a baseline).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from ubsmoe.bench.harness import BenchOptions, register_suite
from ubsmoe.bench.launch_counter import COMPONENTS, LaunchCounter
from ubsmoe.bench.model_step import OLMOE_MEDIUM, QUICK, SMOE_RANK, StepConfig, _batch, _build
from ubsmoe.config import TinyModelConfig, TrainConfig

DISPATCH_KS = [1, 8]
# "bfloat16_compute": a bfloat16 model with train.adapter_dtype=compute (adapters in
# bfloat16 for forward + backward, float32 masters; on a float32 model the option changes nothing);
# "_fused" adds train.fused_ops (the host's norms, rotary and attention LoRA hand-written).
DISPATCH_DTYPES = ["float32", "bfloat16", "bfloat16_compute", "bfloat16_compute_fused"]


def case_train_config(label: str, train_cfg: TrainConfig) -> tuple[str, TrainConfig]:
    """``(model dtype, train config)`` of a dtype label of :data:`DISPATCH_DTYPES`.

    A label is the model's dtype, then optionally ``_compute``
    (``train.adapter_dtype=compute``) and ``_fused`` (``train.fused_ops``).

    Raises:
        ValueError: an unknown dtype or suffix.
    """
    dtype, *options = label.split("_")
    if dtype not in ("float32", "bfloat16") or not set(options) <= {"compute", "fused"}:
        raise ValueError(f"dtype label: got {label!r}, expected float32 or bfloat16 followed by "
                         "optional _compute and _fused")
    return dtype, replace(train_cfg, adapter_dtype="compute" if "compute" in options else "float32",
                          fused_ops="fused" in options)
DISPATCH_METHODS = ["smoe", "ubsmoe"]
OLMOE_1B_7B_LAYERS = 16
# OLMoE-1B-7B's shapes (allenai/OLMoE-1B-7B-0924: hidden 2048, 16 heads, expert
# intermediate 1024, 64 experts, top-8, vocabulary 50304), random weights, 2 of its 16
# decoder layers: every layer after the first launches the same operations, so the full
# depth's count follows (:func:`full_depth_ops`, the report's ``full_depth``). 2 x 128 tokens:
# the forward + backward count does not depend on the token count (every expert
# projection is one grouped matmul whatever the tokens per expert), and a step of this
# model costs about 0.3 TFLOP on the CPU at this batch.
OLMOE_1B_7B_2L = StepConfig(
    "olmoe_1b_7b_2l",
    TinyModelConfig(hidden_size=2048, num_hidden_layers=2, num_attention_heads=16,
                    intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                    vocab_size=50304, max_position_embeddings=4096),
    batch_size=2, seq_len=128)


def one_micro_batch(train_cfg: TrainConfig, rows: int) -> TrainConfig:
    """``train_cfg`` with ``batch_size`` raised to ``rows`` if below and no accumulation.

    So that a batch of ``rows`` examples is one optimizer step of one micro-batch.
    """
    if train_cfg.batch_size >= rows and train_cfg.grad_accumulation_steps == 1:
        return train_cfg
    return replace(train_cfg, batch_size=max(rows, train_cfg.batch_size), grad_accumulation_steps=1)


class PhaseMarkedMethod:
    """A method whose hooks run under a :class:`LaunchCounter`'s ``method`` phase.

    Wraps any :class:`~ubsmoe.methods.base.Method` (everything else delegates to it).

    ``local_train`` calls ``step_metrics`` and ``after_backward`` after the backward
    and before clipping, ``after_step`` after the optimizer step; the phase after each
    is ``clip`` and ``finalize`` respectively. Optimizer-step hooks switch ``clip`` to
    ``optimizer`` and back to ``method``.
    """

    def __init__(self, method, counter: LaunchCounter) -> None:
        self._method = method
        self._counter = counter

    def __getattr__(self, name: str):
        """Everything else is the wrapped method's (``param_groups``, ``extra_loss``, ...)."""
        return getattr(self._method, name)

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        """The method's step metrics, phase ``method``."""
        with self._counter.phase("method"):
            return self._method.step_metrics(model)

    def after_backward(self, model: nn.Module, top_k: int) -> None:
        """The method's gradient hook, phase ``method``; ``clip`` follows."""
        with self._counter.phase("method", then="clip"):
            self._method.after_backward(model, top_k)

    def after_step(self, model: nn.Module, top_k: int) -> None:
        """The method's update hook, phase ``method``; ``finalize`` follows."""
        with self._counter.phase("method", then="finalize"):
            self._method.after_step(model, top_k)


class _PhaseMarkedMasters:
    """Wraps :class:`~ubsmoe.models.precision.AdapterMasters` so its copies count as phase ``masters``."""

    def __init__(self, counter: LaunchCounter) -> None:
        from ubsmoe.models.precision import AdapterMasters

        counter_ = counter

        class Marked(AdapterMasters):
            """AdapterMasters whose per-step copies run under phase ``masters``."""

            def to_compute(self) -> None:
                """Phase ``masters``, then ``setup`` (the forward's hooks switch to ``forward``)."""
                with counter_.phase("masters", then="setup"):
                    super().to_compute()

            def accumulate(self) -> None:
                """Phase ``masters``, then ``forward`` (a next micro-batch, or the hooks)."""
                with counter_.phase("masters", then="forward"):
                    super().accumulate()

            def to_master(self) -> None:
                """Phase ``masters`` (scaling prescaled gradients back), then as before."""
                with counter_.phase("masters"):
                    super().to_master()

        self.cls = Marked


def count_local_step(model: nn.Module, batch: dict[str, torch.Tensor], method, top_k: int,
                     train_cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Count the operations of one :func:`~ubsmoe.fl.train.local_train` step on ``batch``.

    Sets K with :func:`~ubsmoe.models.set_top_k` (outside the count), then runs the
    step (a fresh Adam, as every round) under a :class:`LaunchCounter` attached to
    ``model``. The step trains the model (its adapters change).

    Args:
        model: a patched model (:func:`~ubsmoe.models.build_model`), prepared for ``method``.
        batch: ``input_ids``/``attention_mask``/``labels``, each ``[batch, seq]``.
        method: a :class:`~ubsmoe.methods.base.Method`.
        top_k: K_c of the step.
        train_cfg: lr and clipping (default :class:`~ubsmoe.config.TrainConfig`; its
            ``batch_size`` is raised to the batch's rows, so the step is one micro-batch).

    Returns:
        JSON-ready dict: ``ops`` (forward + backward: model, loss, extra loss, and
        their backward), ``forward_ops``, ``backward_ops``, ``optimizer_ops``
        (clipping and the optimizer step), ``method_ops`` (the method's hooks),
        ``total_ops`` (the whole call), ``by_phase``, ``by_component`` (forward +
        backward per :data:`COMPONENTS`, summing to ``ops``), ``by_phase_component``,
        ``casts_by_component``, ``by_layer`` (forward + backward per decoder layer
        and ``outside`` them), ``top_ops``, ``component_ops`` (per component, per op
        name), ``optimizer_top_ops``, ``method_top_ops`` and ``view_ops_excluded``.
    """
    from ubsmoe.fl import train as train_module
    from ubsmoe.models import set_top_k

    train_cfg = one_micro_batch(train_cfg or TrainConfig(), batch["input_ids"].shape[0])
    set_top_k(model, top_k)
    counter = LaunchCounter()
    masters_cls = train_module.AdapterMasters
    train_module.AdapterMasters = _PhaseMarkedMasters(counter).cls  # restored below
    marked = PhaseMarkedMethod(method, counter)
    pre = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: setattr(counter, "current_phase", "optimizer"))
    post = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: setattr(counter, "current_phase", "method"))
    try:
        with counter.attach(model), counter:
            train_module.local_train(model, [batch], marked, train_cfg, top_k)
    finally:
        train_module.AdapterMasters = masters_cls
        pre.remove()
        post.remove()
    return counter.summary()


def full_depth_ops(by_layer: dict[str, int], depth: int) -> int:
    """The forward + backward count of the same model at ``depth`` decoder layers.

    The first layer launches fewer operations than the others (its input, the frozen
    embedding's output, needs no gradient); every later layer launches the same. So
    ``outside + layer 0 + (depth - 1) x last layer``.

    Args:
        by_layer: a case's ``by_layer`` (``"0"``, ``"1"``, ..., ``"outside"``).
        depth: decoder layers of the full model (>= 1).

    Raises:
        ValueError: ``depth`` < 1 or ``by_layer`` has no layer.
    """
    layers = sorted((k for k in by_layer if k != "outside"), key=int)
    if depth < 1 or not layers:
        raise ValueError(f"depth, by_layer: got {depth}, layers {layers}; expected depth >= 1 and "
                         "at least one layer")
    return by_layer.get("outside", 0) + by_layer[layers[0]] + (depth - 1) * by_layer[layers[-1]]


def dispatch_counts(step_cfg: StepConfig, seed: int = 0, ks: list[int] | None = None,
                    dtypes: list[str] | None = None, methods: list[str] | None = None,
                    warmup: int = 1, repeats: int = 1, full_depth: int | None = None,
                    progress=None, device: str = "cpu") -> dict[str, Any]:
    """Operation counts of one local step per dtype, method and K on one model config.

    One model per (dtype, method), built by the ``model_step`` suite's builder
    (random weights, LoRA rank 20 on attention and experts) and prepared for the
    method; per K, ``warmup`` uncounted steps, then ``repeats`` counted ones.

    Args:
        step_cfg: model sizes and batch.
        seed: model, LoRA and batch seed.
        ks, dtypes, methods: the grid (default K = 1, 8; float32, bfloat16, bfloat16_compute:
            a bfloat16 model with ``train.adapter_dtype=compute``, bfloat16_compute_fused:
            with ``train.fused_ops`` too (:func:`case_train_config`); smoe, ubsmoe).
        warmup: uncounted steps per case first (default 1): the first step with a new
            batch shape fills the shape-keyed caches of index ranges (slot positions,
            bag offsets, position ids; a few operations, once), which is not per-step
            work.
        repeats: counted steps per case (>= 1); the report keeps the first and says
            whether every repeat counted the same (``reproducible``).
        full_depth: when set, each case also gets ``full_depth_ops``, the forward +
            backward count at that many decoder layers (:func:`full_depth_ops`).
        progress: called with a case label before each case.
        device: where the models run (the GPU check counts on CUDA: fused Adam and
            SDPA break down there as they launch).

    Returns:
        ``{"config": ..., "models": {dtype: {method: {str(K): counts}}}}`` with the
        counts of :func:`count_local_step` plus ``reproducible``.

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    from ubsmoe.fl.train import local_train
    from ubsmoe.methods import get_method_class
    from ubsmoe.models import set_top_k

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats, warmup: got {repeats}, {warmup}, expected >= 1 and >= 0")
    ks = ks or DISPATCH_KS
    train_cfg = TrainConfig()
    batch = {k: v.to(device) for k, v in _batch(step_cfg, seed).items()}
    out: dict[str, Any] = {}
    for label in dtypes or DISPATCH_DTYPES:
        dtype, case_cfg = case_train_config(label, train_cfg)
        for name in methods or DISPATCH_METHODS:
            method = get_method_class(name)()
            model = _build(step_cfg, SMOE_RANK, seed, device, dtype)
            method.prepare_model(model)
            for k in ks:
                if progress is not None:
                    progress(f"{step_cfg.name} {dtype} {name} K={k}")
                for _ in range(warmup):
                    set_top_k(model, k)
                    local_train(model, [batch], method, one_micro_batch(case_cfg, step_cfg.batch_size), k)
                runs = [count_local_step(model, batch, method, k, case_cfg) for _ in range(repeats)]
                case = runs[0]
                case["reproducible"] = all(r == runs[0] for r in runs[1:])
                if full_depth is not None:
                    case["full_depth_ops"] = full_depth_ops(case["by_layer"], full_depth)
                out.setdefault(label, {}).setdefault(name, {})[str(k)] = case
            del model
    return {
        "config": {"name": step_cfg.name, "sizes": asdict(step_cfg.sizes),
                   "batch_size": step_cfg.batch_size, "seq_len": step_cfg.seq_len,
                   "lora_rank": SMOE_RANK, "attention_lora": True, "device": str(device),
                   "warmup": warmup, "repeats": repeats, "full_depth": full_depth,
                   "lr": train_cfg.lr, "max_grad_norm": train_cfg.max_grad_norm},
        "models": out,
    }


@register_suite("dispatch")
def dispatch_suite(options: BenchOptions) -> dict[str, Any]:
    """The ``dispatch`` suite: ``olmoe_medium`` and OLMoE-1B-7B's shape at 2 layers (quick: tiny).

    ``models.<shape>.<dtype>.<method>.<K>`` holds ``ops`` (forward + backward),
    ``optimizer_ops`` and ``by_component`` (and the rest of :func:`count_local_step`).
    ``options.repeats`` counted steps per case (default 1; quick 2), after
    ``options.warmup`` uncounted ones (default 1: the first step with a batch shape fills
    the caches of index ranges; tests/bench/test_dispatch.py checks that later steps and
    other batch shapes count the same).
    """
    configs = [(QUICK, None)] if options.quick else [(OLMOE_MEDIUM, None),
                                                     (OLMOE_1B_7B_2L, OLMOE_1B_7B_LAYERS)]
    models, configs_out = {}, {}
    for step_cfg, depth in configs:
        res = dispatch_counts(step_cfg, options.seed, warmup=1 if options.warmup is None else options.warmup,
                              repeats=options.n_repeats(1), full_depth=depth)
        models[step_cfg.name] = res["models"]
        configs_out[step_cfg.name] = res["config"]
    summary = {
        shape: {dtype: {method: {k: {"ops": c["ops"], "optimizer_ops": c["optimizer_ops"],
                                     "casts": c["by_component"]["casts"]}
                                 for k, c in per_k.items()}
                        for method, per_k in per_method.items()}
                for dtype, per_method in per_dtype.items()}
        for shape, per_dtype in models.items()
    }
    return {
        "description": ("non-view ATen operations (a kernel-launch proxy) of one local_train step "
                        "per model, dtype, method and K: forward + backward by component, "
                        "optimizer + clipping, method hooks"),
        "configs": configs_out,
        "models": models,
        "summary": summary,
    }


def markdown_tables(suite: dict[str, Any]) -> str:
    """Markdown tables of a ``dispatch`` suite result (for docs/dispatch.md).

    One table per model: a row per dtype, method and K with ``ops`` (forward +
    backward) by component, ``optimizer_ops``, ``method_ops`` and ``total_ops`` (and
    ``full_depth_ops`` where the model was counted at reduced depth).

    Args:
        suite: ``report["suites"]["dispatch"]`` of ``ubsmoe bench --suite dispatch``.

    Returns:
        The tables, each under a ``###`` heading naming the model and its batch.
    """
    out = []
    for shape, per_dtype in suite["models"].items():
        cfg = suite["configs"][shape]
        sizes = cfg["sizes"]
        depth = cfg.get("full_depth")
        out.append(f"### {shape}: hidden {sizes['hidden_size']}, {sizes['num_hidden_layers']} layers, "
                   f"{sizes['num_experts']} experts, vocabulary {sizes['vocab_size']}; "
                   f"{cfg['batch_size']} x {cfg['seq_len']} tokens\n")
        cols = ["dtype", "method", "K", "ops (fwd+bwd)", "fwd", "bwd", *COMPONENTS,
                "optimizer + clip", "masters", "method hooks", "whole step"]
        if depth:
            cols.append(f"fwd+bwd at {depth} layers")
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for dtype, per_method in per_dtype.items():
            for method, per_k in per_method.items():
                for k, c in per_k.items():
                    row = [dtype, method, k, c["ops"], c["forward_ops"], c["backward_ops"],
                           *(c["by_component"][comp] for comp in COMPONENTS),
                           c["optimizer_ops"], c.get("masters_ops", 0), c["method_ops"], c["total_ops"]]
                    if depth:
                        row.append(full_depth_ops(c["by_layer"], depth))
                    out.append("| " + " | ".join(str(v) for v in row) + " |")
        out.append("")
    return "\n".join(out)
