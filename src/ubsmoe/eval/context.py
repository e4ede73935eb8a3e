"""What every evaluation protocol shares: a side-effect-free model state, the device, batch checks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ubsmoe.models.runtime import routing_mask, smoe_layers


@contextmanager
def evaluating(model: nn.Module, tokenizer, padding_side: str) -> Iterator[None]:
    """Eval mode, the given padding side and no autograd; restore everything after.

    Training flags are restored module by module (a caller may keep parts in eval).
    The SMoE layers' utilization counters (a_i, n) and last router probabilities are
    restored too, so evaluating never leaks into a training round's statistics.
    """
    modes = [(m, m.training) for m in model.modules()]  # per module, restored exactly
    old_side = tokenizer.padding_side
    layers = smoe_layers(model)
    saved = [(layer.expert_counts.clone(), layer.token_count.clone(), layer.router_prob_sum)
             for layer in layers]
    model.eval()
    tokenizer.padding_side = padding_side
    try:
        # no_grad rather than inference_mode: nothing created here may later meet autograd.
        with torch.no_grad():
            yield
    finally:
        tokenizer.padding_side = old_side
        for module, training in modes:
            module.training = training
        for layer, (counts, tokens, probs) in zip(layers, saved):
            layer.expert_counts.copy_(counts)
            layer.token_count.copy_(tokens)
            layer.router_prob_sum = probs


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


def check_batch_size(batch_size: int) -> None:
    """Raise ValueError (one line naming ``batch_size``) unless it is >= 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size: got {batch_size}, expected an integer >= 1")


def logits_from(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                first: int) -> torch.Tensor:
    """The model's logits at positions ``first..T-1`` only, padding kept out of routing.

    Args:
        model: a causal LM (its SMoE layers honour :func:`ubsmoe.models.routing_mask`).
        input_ids, attention_mask: ``[B, T]`` on the model's device.
        first: the earliest position whose logits are needed (``logits_to_keep``
            saves projecting the rest onto the vocabulary).

    Returns:
        ``[B, T - first, vocab]`` logits.
    """
    with routing_mask(model, attention_mask):
        return model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            logits_to_keep=torch.arange(first, input_ids.shape[1], device=input_ids.device),
        ).logits  # [B, T - first, vocab]
