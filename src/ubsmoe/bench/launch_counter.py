"""Counting ATen operations (a proxy for kernel launches) by phase, component and layer.

:class:`LaunchCounter` is the :class:`~torch.utils._python_dispatch.TorchDispatchMode`
behind the ``dispatch`` bench suite (:mod:`ubsmoe.bench.dispatch`, whose module
docstring explains what is counted, how operations are attributed and the limits).
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

COMPONENTS = ("attention", "attention_lora", "router", "experts", "casts", "loss", "other")
PHASES = ("setup", "forward", "backward", "masters", "method", "clip", "optimizer", "finalize")
CAST_OP = "aten._to_copy.default"


def is_view_op(func: torch._ops.OpOverload) -> bool:
    """True for an operation that only makes an alias or changes metadata (no kernel).

    Aliasing operations (``func.is_view``: a non-mutating aliased argument, e.g.
    ``view``, ``t``, ``expand``, ``detach``) and in-place metadata changes
    (``torch.Tag.inplace_view``, e.g. ``t_``, ``unsqueeze_``).
    """
    return bool(getattr(func, "is_view", False)) or torch.Tag.inplace_view in getattr(func, "tags", ())


def launches_nothing(func: torch._ops.OpOverload) -> bool:
    """True for an operation left out of the count (it launches no kernel).

    A view (:func:`is_view_op`), ``aten._unsafe_view`` (a view whose schema does not
    say so: ``reshape`` of a fresh matmul output in autograd's composite ops), or a
    profiler marker (namespace ``profiler``, e.g. the ``record_function`` of Adam's step).
    """
    return (is_view_op(func) or func.namespace == "profiler"
            or func is torch.ops.aten._unsafe_view.default)


@dataclass(frozen=True)
class Scope:
    """Where an operation runs: its component and decoder layer (None: outside the layers)."""

    component: str
    layer: int | None = None


class LaunchCounter(TorchDispatchMode):
    """Count the non-view ATen operations run inside the mode, by phase, scope and name.

    Used bare, it counts everything under phase ``forward`` / ``backward`` (an
    operation run by an autograd node is backward) and scope ``other``; with
    :meth:`attach` (hooks on a model) and :meth:`phase` (markers) it attributes
    operations as described in the module docstring.

    Attributes:
        counts: ``(phase, component, layer, op name) -> count`` of non-view operations.
        views: operations left out (views and profiler markers, :func:`launches_nothing`).
        sequence: when ``record`` is set, the non-view op names in call order.
    """

    def __init__(self, record: bool = False) -> None:
        super().__init__()
        self.counts: Counter[tuple[str, str, int | None, str]] = Counter()
        self.views = 0
        self.record = record
        self.sequence: list[str] = []
        self.current_phase = "forward"
        self._stack: list[Scope] = [Scope("loss")]
        self._marks_seq: list[int] = []  # autograd sequence number at each scope change
        self._marks_scope: list[Scope] = []
        self._param_scope: dict[int, Scope] = {}

    # -- scopes and phases ------------------------------------------------------------
    def _mark(self) -> None:
        """Record the innermost scope from autograd's next sequence number on."""
        self._marks_seq.append(torch._C._autograd._get_sequence_nr())
        self._marks_scope.append(self._stack[-1])

    def push(self, component: str, layer: int | None = None) -> None:
        """Enter a scope (``layer`` None: the enclosing scope's layer)."""
        self._stack.append(Scope(component, self._stack[-1].layer if layer is None else layer))
        self._mark()

    def pop(self) -> None:
        """Leave the innermost scope.

        Raises:
            RuntimeError: no scope is open (a pop without its push).
        """
        if len(self._stack) == 1:
            raise RuntimeError("LaunchCounter.pop: no scope is open")
        self._stack.pop()
        self._mark()

    @contextmanager
    def phase(self, name: str, then: str | None = None) -> Iterator[None]:
        """Count the block's operations under phase ``name``, then switch to ``then``.

        Args:
            name: one of :data:`PHASES`.
            then: the phase after the block (None: the phase before it).

        Raises:
            ValueError: an unknown phase name.
        """
        for n in (name, then):
            if n is not None and n not in PHASES:
                raise ValueError(f"phase: got {n!r}, expected one of {', '.join(PHASES)}")
        before = self.current_phase
        self.current_phase = name
        try:
            yield
        finally:
            self.current_phase = before if then is None else then

    def _backward_scope(self, node) -> Scope:
        """The scope that created autograd ``node`` (see the module docstring)."""
        variable = getattr(node, "variable", None)
        if variable is not None:  # AccumulateGrad: no sequence number; its parameter's scope
            return self._param_scope.get(id(variable), Scope("other"))
        i = bisect.bisect_right(self._marks_seq, node._sequence_nr()) - 1
        return self._marks_scope[i] if i >= 0 else Scope("loss")

    # -- the mode -----------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        """Count ``func`` (unless a view) under the current phase and scope, then run it."""
        if launches_nothing(func):
            self.views += 1
        else:
            name = str(func)
            node = torch._C._current_autograd_node()
            if node is not None:
                phase, scope = "backward", self._backward_scope(node)
            else:
                phase, scope = self.current_phase, self._stack[-1]
            self.counts[(phase, scope.component, scope.layer, name)] += 1
            if self.record:
                self.sequence.append(name)
        return func(*args, **(kwargs or {}))

    # -- model hooks ----------------------------------------------------------------------
    @contextmanager
    def attach(self, model: nn.Module) -> Iterator[None]:
        """Mark ``model``'s component scopes for the block (hooks removed after it).

        Marked: the model itself (``other``; its first forward also switches the phase
        from ``setup`` to ``forward``), decoder layers (``...layers.<i>``: the layer
        index), attention modules (``...self_attn``: ``attention``), PEFT LoRA wrappers
        (``attention_lora``) and their base layers (``attention``), SMoE layers
        (``router``) and their ``experts_forward`` (``experts``).
        """
        from peft.tuners.lora import LoraLayer

        from ubsmoe.core.smoe import SMoELayer

        handles, wrapped = [], []
        layer_re = re.compile(r"(?:^|\.)layers\.(\d+)$")

        def scoped(module: nn.Module, component: str, layer: int | None = None) -> None:
            """Hooks pushing ``component`` around ``module``'s forward."""

            def pre(mod, args):
                """Open the module's scope."""
                if self.current_phase == "setup":
                    self.current_phase = "forward"
                self.push(component, layer)

            def post(mod, args, output):
                """Close the module's scope."""
                self.pop()

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post, always_call=True))

        names = dict(model.named_modules())
        bases = {id(m.get_base_layer()) for m in names.values() if isinstance(m, LoraLayer)}
        for name, module in names.items():
            match = layer_re.search(name)
            if module is model:
                scoped(module, "other")
            elif match:
                scoped(module, "other", int(match.group(1)))
            elif isinstance(module, LoraLayer):
                scoped(module, "attention_lora")
            elif id(module) in bases or name.endswith("self_attn"):
                scoped(module, "attention")
            elif isinstance(module, SMoELayer):
                scoped(module, "router")
                inner = module.experts_forward

                def experts_forward(*args, _inner=inner, **kwargs):
                    """``experts_forward`` inside an ``experts`` scope."""
                    self.push("experts")
                    try:
                        return _inner(*args, **kwargs)
                    finally:
                        self.pop()

                module.experts_forward = experts_forward
                wrapped.append(module)
        # A parameter's scope (for the AccumulateGrad nodes of the backward).
        for pname, p in model.named_parameters():
            parts = pname.split(".")
            layer = next((int(b) for a, b in itertools.pairwise(parts) if a == "layers" and b.isdigit()), None)
            owner = names.get(".".join(parts[:-1]))
            if "lora_" in pname and "self_attn" in pname:
                component = "attention_lora"
            elif isinstance(owner, SMoELayer):
                component = "router" if parts[-1] in ("router_weight", "phi") else "other"
            elif owner is not None and isinstance(names.get(".".join(parts[:-2])), SMoELayer):
                component = "experts"  # gate_up_lora.A, down_lora.B, ...
            else:
                component = "other"
            self._param_scope[id(p)] = Scope(component, layer)
        self.current_phase = "setup"
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for module in wrapped:
                del module.experts_forward

    # -- results ------------------------------------------------------------------------
    def total(self, phases: tuple[str, ...] | None = None) -> int:
        """Operations counted in ``phases`` (None: all)."""
        return sum(n for (ph, *_), n in self.counts.items() if phases is None or ph in phases)

    def summary(self, top: int = 20) -> dict[str, Any]:
        """The JSON-ready split of the count (keys in :func:`count_local_step`)."""
        fb = ("forward", "backward")
        by_phase = {ph: self.total((ph,)) for ph in PHASES}
        by_component = dict.fromkeys(COMPONENTS, 0)
        by_phase_component: dict[str, dict[str, int]] = {ph: dict.fromkeys(COMPONENTS, 0) for ph in fb}
        casts_by_component: dict[str, int] = {}
        component_ops: dict[str, Counter[str]] = {c: Counter() for c in COMPONENTS}
        by_layer: Counter[str] = Counter()
        ops: Counter[str] = Counter()
        optimizer_ops: Counter[str] = Counter()
        method_ops: Counter[str] = Counter()
        for (ph, comp, layer, name), n in self.counts.items():
            if ph in ("clip", "optimizer"):
                optimizer_ops[name] += n
            elif ph == "method":
                method_ops[name] += n
            if ph not in fb:
                continue
            bucket = "casts" if name == CAST_OP else comp
            if bucket == "casts":
                casts_by_component[comp] = casts_by_component.get(comp, 0) + n
            by_component[bucket] += n
            by_phase_component[ph][bucket] += n
            component_ops[bucket][name] += n
            by_layer["outside" if layer is None else str(layer)] += n
            ops[name] += n
        layers = sorted((k for k in by_layer if k != "outside"), key=int)
        return {
            "ops": by_phase["forward"] + by_phase["backward"],
            "forward_ops": by_phase["forward"],
            "backward_ops": by_phase["backward"],
            "optimizer_ops": by_phase["clip"] + by_phase["optimizer"],
            "method_ops": by_phase["method"],
            "masters_ops": by_phase["masters"],
            "total_ops": self.total(),
            "by_phase": by_phase,
            "by_component": by_component,
            "by_phase_component": by_phase_component,
            "casts_by_component": dict(sorted(casts_by_component.items())),
            "by_layer": {**{k: by_layer[k] for k in layers}, "outside": by_layer["outside"]},
            "top_ops": dict(ops.most_common(top)),
            "component_ops": {c: dict(v.most_common()) for c, v in component_ops.items() if v},
            "optimizer_top_ops": dict(optimizer_ops.most_common(top)),
            "method_top_ops": dict(method_ops.most_common(top)),
            "view_ops_excluded": self.views,
        }


