"""Runtime switches of a patched model: K per token, the routing mask, step statistics, checkpointing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ubsmoe.core.smoe import SMoELayer, TokenMask


def smoe_layers(model: nn.Module) -> list[SMoELayer]:
    """The model's SMoE layers in depth order."""
    return [m for m in model.modules() if isinstance(m, SMoELayer)]


def set_top_k(model: nn.Module, k: int) -> None:
    """Set K_c on every SMoE layer (raises ``ValueError`` outside ``[1, num_experts]``)."""
    for layer in smoe_layers(model):
        layer.set_top_k(k)


@contextmanager
def routing_mask(model: nn.Module, attention_mask: torch.Tensor | None) -> Iterator[None]:
    """Route only real tokens: padding (``attention_mask == 0``) skips the experts.

    Args:
        attention_mask: ``[batch, seq]`` 1 for real tokens, or None for all tokens.
    """
    layers = smoe_layers(model)
    mask = None if attention_mask is None else TokenMask.from_attention_mask(attention_mask)
    for layer in layers:
        layer.token_mask = mask
    try:
        yield
    finally:
        for layer in layers:
            layer.token_mask = None


@contextmanager
def step_stats(model: nn.Module) -> Iterator[None]:
    """One optimizer step: PG's per-batch routing statistics cover all its micro-batches.

    On entry every SMoE layer's ``batch_expert_counts`` and ``router_prob_sum`` are
    cleared and then accumulate over every forward inside the block, so a gradient
    hook run at the end of the block (before leaving it) sees the active set and pi
    of the whole effective batch (docs/concepts.md, "Memory for long runs"). The utilization
    counters ``expert_counts``/``token_count`` are not touched.
    """
    layers = smoe_layers(model)
    for layer in layers:
        layer.batch_expert_counts = None
        layer.router_prob_sum = None
        layer.accumulate_step_stats = True
    try:
        yield
    finally:
        for layer in layers:
            layer.accumulate_step_stats = False


def _checkpoint_contexts(layers: list[SMoELayer]):
    """``context_fn`` for ``torch.utils.checkpoint``: the recompute replays this forward.

    Called when a checkpointed decoder layer runs forward. The recompute context
    (entered in the backward pass) restores the SMoE layers' ``token_mask`` of that
    forward, so padding is skipped exactly as it was, and sets ``recomputing`` so the
    replay records no statistics and keeps no router logits.
    """
    masks = [layer.token_mask for layer in layers]

    @contextmanager
    def recompute() -> Iterator[None]:
        """Replay the forward's token mask and mark the SMoE layers as recomputing."""
        saved = [(layer.token_mask, layer.recomputing) for layer in layers]
        for layer, mask in zip(layers, masks):
            layer.token_mask = mask
            layer.recomputing = True
        try:
            yield
        finally:
            for layer, (mask, flag) in zip(layers, saved):
                layer.token_mask = mask
                layer.recomputing = flag

    return nullcontext(), recompute()


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing of every decoder layer on or off.

    Uses transformers' per-layer mechanism (``GradientCheckpointingLayer``: only in
    training mode with autograd on, caching off) with
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``; the recomputation in
    the backward pass counts no token twice in the SMoE layers' utilization
    statistics and captures no router logits (see :func:`_checkpoint_contexts`).

    Args:
        model: a model from :func:`build_model` (possibly PEFT-wrapped).
        enabled: True to checkpoint, False to store activations as usual.

    Raises:
        ValueError: ``enabled`` and the model has no checkpointable decoder layer.
    """
    # lazy: transformers takes seconds to import; only this path needs it
    from transformers.modeling_layers import GradientCheckpointingLayer

    decoder_layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if enabled and not decoder_layers:
        raise ValueError("model: no decoder layer supports activation checkpointing")
    for module in decoder_layers:
        smoe = smoe_layers(module)
        module.gradient_checkpointing = bool(enabled)
        module._gradient_checkpointing_func = partial(
            checkpoint, use_reentrant=False, context_fn=partial(_checkpoint_contexts, smoe))
