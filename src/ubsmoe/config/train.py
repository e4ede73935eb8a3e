"""Config section of local training: :class:`TrainConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from ubsmoe.config.choices import TRAIN_TOP_K
from ubsmoe.errors import bad_value as _bad
from ubsmoe.errors import raise_if_any


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
        adapter_dtype: ``float32`` (default: adapters stay float32 and are cast per
            call under a lower-precision base) or ``compute``: during each step's
            forward and backward the LoRA matrices (attention and expert LoRA; the
            router and phi stay float32) are copies in the base model's dtype, while clipping,
            Adam and the method's hooks act on float32 masters
            (:class:`~ubsmoe.models.precision.AdapterMasters`; fewer operations,
            docs page "Operation counts"). Same as ``float32`` on a float32 model.
        compile: ``torch.compile`` each decoder layer for local training (default
            off; one compile per K_c, docs page "Operation counts").
        fused_ops: run the host model's RMSNorms, and OLMoE's rotary application and
            attention LoRA projections, through hand-written autograd functions
            (:mod:`ubsmoe.models.fused`; fewer operations per step, the same values
            up to float32 summation order) during local training (default off).
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
    adapter_dtype: str = "float32"
    compile: bool = False
    fused_ops: bool = False

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
        if self.adapter_dtype not in ("float32", "compute"):
            errors.append(_bad("train.adapter_dtype", self.adapter_dtype, "float32 or compute"))
        if not isinstance(self.compile, bool):
            errors.append(_bad("train.compile", self.compile, "true or false"))
        if not isinstance(self.fused_ops, bool):
            errors.append(_bad("train.fused_ops", self.fused_ops, "true or false"))
        raise_if_any(errors)


