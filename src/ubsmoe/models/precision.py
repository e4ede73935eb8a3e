"""Adapters in the compute dtype with float32 masters (``train.adapter_dtype=compute``, issue 24).

By default the adapters (attention LoRA, expert LoRA, a trainable router) stay float32
under a bfloat16 base model, and every call casts the activations to float32 and the
result back (PEFT), or the factors to bfloat16 and their gradients back (the SMoE
layer): on ``olmoe_medium`` 90 of the 186 casts of a bfloat16 step, plus the expert
factors' rank padding on every call. :class:`AdapterMasters` keeps the float32 tensors
as masters and, for the forward and backward only, puts a copy in the compute dtype in
each adapter parameter:

1. :meth:`AdapterMasters.to_compute` (before a step's forwards): copy every master
   into its compute-dtype buffer and point the parameter at it. Expert LoRA factors
   get rank-padded buffers once (``ExpertLoRA.padded``), so the grouped matmuls use
   them without padding per call, and the A buffer holds ``scale * A``
   (``ExpertLoRA.prescaled``), so no call multiplies by the LoRA scale; :meth:`to_master`
   multiplies A's gradient by the scale (the gradient formed is that of ``scale * A``).
2. :meth:`AdapterMasters.accumulate` (after each micro-batch's backward): add the
   compute-dtype gradient into a float32 gradient (micro-batches accumulate in float32).
3. :meth:`AdapterMasters.to_master` (after the last backward): point each parameter
   back at its float32 master with the float32 gradient, so the method's hooks,
   clipping, Adam (its state float32) and the PG update act on float32 values exactly
   as with float32 adapters.

What changes numerically: the forward and backward use the adapters rounded to the
compute dtype, and their gradients are rounded to it before the float32 accumulation
(as any bfloat16 activation gradient already is). Updates are applied to the float32
masters, so Adam's small steps are not rounded away. Vectors (phi, biases) stay
float32. tests/test_precision.py bounds the difference to float32 adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ubsmoe.core.smoe import ExpertLoRA, SMoELayer

ADAPTER_DTYPES = ("float32", "compute")


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's frozen floating weights (the first one found; float32 if none)."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            return p.dtype
    return torch.float32


@dataclass
class _Entry:
    param: nn.Parameter
    master: torch.Tensor  # float32, the parameter's own tensor on entry
    work: torch.Tensor  # compute dtype, same shape (a view into a padded buffer for expert LoRA)
    grad: torch.Tensor | None = None  # float32 accumulated gradient of this step


class AdapterMasters:
    """Float32 masters of a model's trainable matrices, compute-dtype copies for forward/backward.

    Args:
        model: a patched model whose trainable tensors are float32.
        mode: ``float32`` (nothing is done: every method is a no-op) or ``compute``
            (matrices, i.e. trainable tensors with >= 2 dimensions, in the frozen
            weights' dtype; nothing to do when that is float32).

    Raises:
        ValueError: ``mode`` not in :data:`ADAPTER_DTYPES`.
    """

    def __init__(self, model: nn.Module, mode: str = "float32") -> None:
        if mode not in ADAPTER_DTYPES:
            raise ValueError(f"mode: got {mode!r}, expected one of {', '.join(ADAPTER_DTYPES)}")
        self.entries: list[_Entry] = []
        self._loras: list[ExpertLoRA] = []
        self._scaled: dict[int, float] = {}  # id(expert LoRA A) -> its scale
        self._scaled_entries: list[tuple[_Entry, float]] = []
        dtype = compute_dtype(model)
        if mode == "float32" or dtype == torch.float32:
            return
        padded: dict[int, torch.Tensor] = {}
        for lora in (m for m in model.modules() if isinstance(m, ExpertLoRA)):
            if not (lora.A.requires_grad and lora.A.dtype == torch.float32):
                continue
            a, b = _padded_buffers(lora.A, lora.B, dtype)  # [E, r', in], [E, out, r']
            rank = lora.A.shape[1]
            padded[id(lora.A)], padded[id(lora.B)] = a[:, :rank], b[..., :rank]
            lora.padded = (a, b)
            self._loras.append(lora)
            self._scaled[id(lora.A)] = lora.scale
        # The trainable router stays float32 (its logits decide the top-K: bfloat16 logits
        # flip near-tied choices; tests/test_fewer_launches.py measured a 27% gradient change).
        routers = {id(m.router_weight) for m in model.modules() if isinstance(m, SMoELayer)}
        for p in model.parameters():
            if p.requires_grad and p.dtype == torch.float32 and p.dim() >= 2 and id(p) not in routers:
                work = padded.get(id(p))
                if work is None:
                    work = torch.empty_like(p, dtype=dtype)
                self.entries.append(_Entry(p, p.data, work))
                if id(p) in self._scaled:
                    self._scaled_entries.append((self.entries[-1], self._scaled[id(p)]))

    @torch.no_grad()
    def to_compute(self) -> None:
        """Copy the masters into the compute-dtype buffers; the parameters use those.

        Call with no gradient held (after ``zero_grad(set_to_none=True)``).
        """
        if not self.entries:
            return
        torch._foreach_copy_([e.work for e in self.entries], [e.master for e in self.entries])
        if self._scaled_entries:  # expert LoRA A copies hold scale * A (ExpertLoRA.prescaled)
            torch._foreach_mul_([e.work for e, _ in self._scaled_entries], [s for _, s in self._scaled_entries])
        for e in self.entries:
            e.param.grad = None
            e.param.data = e.work
            e.grad = None
        for lora in self._loras:
            lora.prescaled = True

    @torch.no_grad()
    def accumulate(self) -> None:
        """Move the parameters' compute-dtype gradients into the float32 ones (after a backward)."""
        for e in self.entries:
            g = e.param.grad
            if g is None:
                continue
            if e.grad is None:
                e.grad = g.to(torch.float32)
            else:
                e.grad.add_(g)
            e.param.grad = None

    def to_master(self) -> None:
        """Point every parameter at its float32 master, with its float32 gradient (or None).

        A prescaled expert LoRA A got the gradient of ``scale * A``; it is multiplied by
        ``scale`` here, so the master's gradient is that of ``A`` (chain rule).
        """
        scaled = [(e.grad, s) for e, s in self._scaled_entries if e.grad is not None]
        if scaled:
            torch._foreach_mul_([g for g, _ in scaled], [s for _, s in scaled])
        for lora in self._loras:
            lora.prescaled = False
        for e in self.entries:
            e.param.grad = None
            e.param.data = e.master
            e.param.grad = e.grad
            e.grad = None

    def restore(self) -> None:
        """Leave the model as it came: float32 parameters, no padded buffers."""
        self.to_master()
        for lora in self._loras:
            lora.padded = None


def _padded_buffers(lora_a: torch.Tensor, lora_b: torch.Tensor,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed ``[E, r', in]`` and ``[E, out, r']`` buffers, r' = the rank padded to 16-byte rows."""
    align = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    num_experts, rank, in_features = lora_a.shape
    padded = rank + (-rank % align)
    a = lora_a.new_zeros((num_experts, padded, in_features), dtype=dtype)
    b = lora_b.new_zeros((num_experts, lora_b.shape[1], padded), dtype=dtype)
    return a, b
