"""Evaluation protocol ``loss``: held-out next-token loss of the reference response.

For every test record the model reads the training example exactly as a client
trains on it (:func:`ubsmoe.data.commonsense.tokenize_example`: Alpaca prompt,
then the record's ``output`` and eos, cut to ``data.max_length`` the same way) and
is scored on the tokens training labels: the reference response and its eos, never
the prompt. An example's score is its summed negative log-likelihood in nats,
``x_i = -sum_t log p(y_t | y_<t)`` over its ``t_i`` labelled tokens (the first
token of a sequence has no prediction and is never labelled, as in
:func:`ubsmoe.fl.train.causal_lm_loss`).

Task metric (nats per token, lower is better): the token-weighted mean
``L = sum_i x_i / sum_i t_i``, the quantity the training loss estimates on a
batch; one long response weighs as much as its tokens.

Standard error: examples are the independent units, so ``L`` is a ratio of two
sample means and its standard error is the ratio estimator's (first-order delta
method, as for a ratio estimator in survey sampling, Cochran, "Sampling
Techniques", 3rd ed., eq. 6.9)::

    SE(L) = sqrt( sum_i (x_i - L t_i)^2 / (n (n - 1)) ) / mean_i(t_i)

It is None for fewer than two examples. The per-example mean loss
``mean_i(x_i / t_i)`` with its ordinary standard error would estimate a different
quantity (every example weighted alike) and is not reported.

A row over several tasks averages the per-task losses without weights (as the
accuracy protocols average their tasks); its standard error is
``sqrt(sum_t SE_t^2) / T`` (tasks scored on disjoint examples).

Pure torch; evaluation has no side effects on the model (see
:func:`ubsmoe.eval.context.evaluating`), and padding is never routed to experts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ubsmoe.data.prompts import IGNORE_INDEX, collate, tokenize_example
from ubsmoe.eval.context import check_batch_size, evaluating, logits_from, model_device

LOSS_PROTOCOL = "loss"
LOSS_METRIC = "nats_per_token"
"""The metric name of ``loss`` rows: mean next-token loss, nats per labelled token, lower is better."""
LOSS_ROW_KEYS = ("metric", "lower_is_better", "stderr", "per_task_stderr", "per_task_tokens")
"""Keys of a ``loss`` row (:func:`loss_row_fields`) that the run summary keeps (its examples
per task are the summary's ``data.test_examples_scored``, as for every protocol)."""


def response_nll(model: nn.Module, tokenizer, records: Sequence[dict[str, Any]], batch_size: int,
                 max_length: int) -> tuple[list[float], list[int]]:
    """Summed next-token loss of each record's reference response given its prompt.

    Examples are tokenized as training does (:func:`tokenize_example` with
    ``max_length``), sorted by length (longest first, so a batch holds examples of
    similar length), right-padded (:func:`collate`) and run ``batch_size`` per
    forward, with padding kept out of routing. Only the positions that predict a
    labelled token are projected onto the vocabulary; log-probabilities are computed
    in float32 and summed in float64.

    Args:
        model: a causal LM (Hugging Face, possibly PEFT-wrapped), at the K and
            adapters to evaluate.
        tokenizer: its tokenizer; needs eos and pad tokens.
        records: records with ``instruction``, optional ``input``, and ``output``
            (the reference response).
        batch_size: examples per forward.
        max_length: ``data.max_length``, tokens per example (prompt cut from the left).

    Returns:
        ``(nats, tokens)``: per record, in the order of ``records``, the summed
        negative log-likelihood of its labelled tokens (nats, >= 0) and their number.

    Raises:
        ValueError: ``batch_size`` or ``max_length`` < 1, or the tokenizer lacks an
            eos or pad token.
    """

    check_batch_size(batch_size)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: needs a pad token for batched scoring")
    examples = [tokenize_example(tokenizer, r, max_length) for r in records]
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))  # stable
    nats = [0.0] * len(examples)
    tokens = [0] * len(examples)
    device = model_device(model)
    with evaluating(model, tokenizer, "right"):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = collate([examples[i] for i in rows], tokenizer.pad_token_id)
            target = batch["labels"][:, 1:]  # [B, T-1]: position t predicts token t + 1
            scored = target != IGNORE_INDEX  # [B, T-1]
            counts = scored.sum(dim=1)  # [B]
            if not scored.any():
                continue
            first = int(scored.any(dim=0).nonzero()[0])  # earliest position any row scores
            input_ids = batch["input_ids"].to(device)
            attention_mask = batch["attention_mask"].to(device)
            logits = logits_from(model, input_ids, attention_mask, first)  # [B, seq_len - first, vocab]
            row_idx, col_idx = scored[:, first:].nonzero(as_tuple=True)  # [N], [N]
            picked = logits[row_idx.to(device), col_idx.to(device)].float()  # [N, vocab]
            logp = torch.log_softmax(picked, dim=-1)
            goal = target[:, first:][row_idx, col_idx].to(device)  # [N]
            token_nll = -logp.gather(-1, goal[:, None])[:, 0]  # [N]
            per_row = torch.zeros(len(rows), dtype=torch.float64)
            per_row.index_add_(0, row_idx, token_nll.double().cpu())
            for j, i in enumerate(rows):
                nats[i] = float(per_row[j])
                tokens[i] = int(counts[j])
    return nats, tokens


def loss_stats(nats: Sequence[float], tokens: Sequence[int]) -> dict[str, Any]:
    """Token-weighted mean loss and its ratio-estimator standard error (module docstring).

    Args:
        nats: per example, summed negative log-likelihood (nats).
        tokens: per example, labelled tokens.

    Returns:
        ``{"loss": sum(nats) / sum(tokens), "stderr": SE or None (n < 2),
        "tokens": sum(tokens), "n": examples}``; ``loss`` is None when no token was
        labelled.

    Raises:
        ValueError: ``nats`` and ``tokens`` differ in length, or a token count is negative.
    """
    if len(nats) != len(tokens):
        raise ValueError(f"tokens: got {len(tokens)} counts for {len(nats)} examples")
    if any(t < 0 for t in tokens):
        raise ValueError("tokens: counts must be >= 0")
    n, total = len(nats), int(sum(tokens))
    if total == 0:
        return {"loss": None, "stderr": None, "tokens": 0, "n": n}
    value = math.fsum(nats) / total
    stderr = None
    if n >= 2:
        resid = math.fsum((x - value * t) ** 2 for x, t in zip(nats, tokens))
        stderr = math.sqrt(resid / (n * (n - 1))) / (total / n)
    return {"loss": value, "stderr": stderr, "tokens": total, "n": n}


def evaluate_loss(model: nn.Module, tokenizer, records: Sequence[dict[str, Any]], batch_size: int,
                  max_length: int) -> dict[str, Any]:
    """The ``loss`` protocol on one task: :func:`response_nll`, then :func:`loss_stats`.

    Returns:
        :func:`loss_stats`'s dict (``loss`` in nats per token, ``stderr``, ``tokens``, ``n``).

    Raises:
        ValueError: as :func:`response_nll`.
    """
    nats, tokens = response_nll(model, tokenizer, records, batch_size, max_length)
    return loss_stats(nats, tokens)


def add_loss_scores(result: dict[str, Any], model: nn.Module, tokenizer, records: Sequence[dict[str, Any]],
                    batch_size: int, max_length: int) -> dict[str, Any]:
    """Add the ``loss`` protocol to one task's scores (the dict of ``evaluate_task``).

    Sets ``result["loss"]`` (nats per token), ``result["loss_stderr"]`` and
    ``result["loss_tokens"]``, and, where ``result`` names its metrics (instruction
    data's ``metric``), ``result["metric"]["loss"] = LOSS_METRIC``. A task without
    examples gets no ``loss`` (no value to average). ``result["n"]`` is set to the
    examples scored.

    Args:
        result: the task's scores so far; changed in place.
        model, tokenizer, records, batch_size, max_length: as :func:`response_nll`.

    Returns:
        ``result``.
    """
    stats = evaluate_loss(model, tokenizer, records, batch_size, max_length)
    result["n"] = stats["n"]
    if stats["loss"] is None:
        return result
    result[LOSS_PROTOCOL] = stats["loss"]
    result["loss_stderr"] = stats["stderr"]
    result["loss_tokens"] = stats["tokens"]
    if isinstance(result.get("metric"), dict):
        result["metric"][LOSS_PROTOCOL] = LOSS_METRIC
    return result


def loss_row_fields(scores: dict[str, dict[str, Any]], per_task: dict[str, float]) -> dict[str, Any]:
    """The extra fields of an evaluation row of protocol ``loss``.

    Args:
        scores: per task, the dict :func:`add_loss_scores` filled.
        per_task: the row's per-task losses (the tasks it covers).

    Returns:
        ``{"metric": LOSS_METRIC, "lower_is_better": True, "stderr": SE of the
        row's average (``sqrt(sum SE_t^2) / T``; None when a task has none),
        "per_task_stderr": {task: SE or None}, "per_task_tokens": {task: tokens}}``.
    """
    per_se = {t: scores[t].get("loss_stderr") for t in per_task}
    known = [se for se in per_se.values() if se is not None]
    stderr = (math.sqrt(math.fsum(se * se for se in known)) / len(per_task)
              if per_task and len(known) == len(per_task) else None)
    return {"metric": LOSS_METRIC, "lower_is_better": True, "stderr": stderr,
            "per_task_stderr": per_se,
            "per_task_tokens": {t: int(scores[t].get("loss_tokens", 0)) for t in per_task}}
