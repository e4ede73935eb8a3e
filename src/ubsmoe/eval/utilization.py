"""Expert utilization at evaluation time, per budget level, over the same tokens for every method.

Training-time utilization (the ``diagnostics`` records) mixes the K_c each client
trained at, and FedIT or the rank methods train at the native top-k, so its entropy
and Gini compare different things across methods. Here every budget level j is
measured as it is evaluated (K_j, rank r_j, :meth:`ubsmoe.fl.server.Server.score_levels`)
on one fixed token set: the scored test records of every task (``eval.examples_per_task``,
seeded, the same for every method), each tokenized as a training example
(:func:`ubsmoe.data.commonsense.tokenize_example`: prompt, reference response, eos, cut
to ``data.max_length``). Every real token counts, prompt included; padding is never
routed. Per SMoE layer l and expert i the utilization is ``u_{l,i} = a_{l,i} / n_l``
(tokens routed to the expert over tokens processed; rows sum to K_j), and its entropy
and Gini coefficient are :func:`ubsmoe.metrics.diagnostics.utilization_summary`'s.

Pure torch; the model's utilization counters are restored afterwards
(:func:`ubsmoe.eval.context.evaluating`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ubsmoe.data.prompts import collate, tokenize_example
from ubsmoe.eval.context import check_batch_size, evaluating, model_device
from ubsmoe.metrics.diagnostics import utilization_summary
from ubsmoe.models.runtime import routing_mask, smoe_layers


def eval_expert_counts(model: nn.Module, tokenizer, records: Sequence[dict[str, Any]], batch_size: int,
                       max_length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Tokens routed to each expert and tokens processed, per SMoE layer, over ``records``.

    One forward per batch of ``batch_size`` examples (sorted by length, right-padded,
    padding kept out of routing); only the last position is projected onto the
    vocabulary.

    Args:
        model: the model at the K and adapters to measure.
        tokenizer: its tokenizer (eos and pad tokens).
        records: records with ``instruction``, optional ``input``, ``output``.
        batch_size: examples per forward.
        max_length: ``data.max_length``.

    Returns:
        ``(counts [L, E], tokens [L])`` float64 (``a_{l,i}`` and ``n_l``), or None for a
        model without SMoE layers (a dense backbone).

    Raises:
        ValueError: ``batch_size`` < 1 or a tokenizer without eos/pad token.
    """

    check_batch_size(batch_size)
    layers = smoe_layers(model)
    if not layers:
        return None
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: needs a pad token for batched scoring")
    examples = [tokenize_example(tokenizer, r, max_length) for r in records]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    device = model_device(model)
    with evaluating(model, tokenizer, "right"):  # counters restored on exit
        for layer in layers:
            layer.reset_stats()
        for start in range(0, len(order), batch_size):
            batch = collate([examples[i] for i in order[start:start + batch_size]], tokenizer.pad_token_id)
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            with routing_mask(model, attention_mask):
                model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        counts = torch.stack([layer.expert_counts.detach().double().cpu() for layer in layers])  # [L, E]
        tokens = torch.stack([layer.token_count.detach().double().cpu() for layer in layers])  # [L]
    return counts, tokens


def utilization_stats(counts: torch.Tensor, tokens: torch.Tensor) -> dict[str, Any]:
    """Utilization ``u = a / n`` per layer and its entropy and Gini (an eval row's ``utilization``).

    Args:
        counts: ``[L, E]`` tokens routed to each expert.
        tokens: ``[L]`` tokens processed per layer.

    Returns:
        ``{"tokens": n of the first layer, "entropy": {"per_layer", "mean", "variance",
        "max", "global", "global_max"}, "gini": {"per_layer", "mean"}}`` (entropy in
        nats, see :func:`ubsmoe.metrics.diagnostics.utilization_summary`).

    Raises:
        ValueError: shapes that do not match, or no token processed.
    """

    if counts.dim() != 2 or tokens.shape != counts.shape[:1]:
        raise ValueError(f"counts/tokens: got shapes {tuple(counts.shape)} and {tuple(tokens.shape)}, "
                         "expected [L, E] and [L]")
    if not bool((tokens > 0).all()):
        raise ValueError("tokens: every layer must have processed at least one token")
    u = counts.double() / tokens.double()[:, None]  # [L, E], rows sum to K
    return {"tokens": int(tokens[0]), **utilization_summary(u)}


def level_utilization(model: nn.Module, tokenizer, tests: Mapping[str, Sequence[dict[str, Any]]],
                      batch_size: int, max_length: int) -> dict[str, Any] | None:
    """Eval-time utilization of the model as set, over every task's scored records pooled.

    Args:
        model, tokenizer, batch_size, max_length: as :func:`eval_expert_counts`.
        tests: task -> scored test records (tasks pooled in sorted order).

    Returns:
        :func:`utilization_stats`'s dict, or None (no SMoE layer, or no record).
    """
    records = [r for task in sorted(tests) for r in tests[task]]
    if not records:
        return None
    measured = eval_expert_counts(model, tokenizer, records, batch_size, max_length)
    return None if measured is None else utilization_stats(*measured)
