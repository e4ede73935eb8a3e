"""Commonsense accuracy, two ways (DESIGN.md section 6).

* ``generation``: the paper's protocol, from LLM-Adapters' ``commonsense_evaluate.py``
  (Hu et al., "LLM-Adapters: An Adapter Family for Parameter-Efficient Fine-Tuning of
  Large Language Models", EMNLP 2023, arXiv 2304.01933): decode a response to the
  Alpaca prompt, take the first answer label in it ("answer2", "true", ...; matched
  case-sensitively, as LLM-Adapters' ``extract_answer``) and compare it exactly with
  the gold label. We decode greedily (LLM-Adapters uses beam search by
  default); an unparseable response counts as wrong.
* ``loglik``: lm-evaluation-harness-style choice scoring (Gao et al., "The Language
  Model Evaluation Harness", Zenodo 10256836): score every candidate's continuation
  ``"the correct answer is <label>"`` (the training response format) by the sum of its
  token log-probabilities given the prompt and predict the best one. This protocol
  always produces a valid answer, so it is informative even for weak models.

The scoring functions take plain lists (``prompts``, ``choices``, ``answers``);
:func:`evaluate_task` builds them from LLM-Adapters records with
:mod:`ubsmoe.data.prompts` and :mod:`ubsmoe.data.commonsense`. The ``loglik``
protocol is :mod:`ubsmoe.eval.loglik`; the model state both share,
:mod:`ubsmoe.eval.context`.

Evaluation has no side effects on the model: training mode, the tokenizer's
padding side and the SMoE layers' utilization counters are restored afterwards, and
padding tokens are never routed to experts.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import StoppingCriteriaList

from ubsmoe.data.commonsense import answer_choices
from ubsmoe.data.prompts import format_prompt
from ubsmoe.eval.context import check_batch_size, evaluating, model_device
from ubsmoe.eval.loglik import loglik_accuracy
from ubsmoe.models.runtime import routing_mask

PROTOCOLS = ("generation", "loglik")

# First-match label patterns of LLM-Adapters' `extract_answer` (commonsense_evaluate.py).
_MULTIPLE_CHOICE = r"answer1|answer2|answer3|answer4|answer5"
ANSWER_PATTERNS: dict[str, str] = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": _MULTIPLE_CHOICE,
    "ARC-Challenge": _MULTIPLE_CHOICE,
    "ARC-Easy": _MULTIPLE_CHOICE,
    "openbookqa": _MULTIPLE_CHOICE,
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
_COMPILED = {task: re.compile(p) for task, p in ANSWER_PATTERNS.items()}


def extract_answer(task: str, text: str) -> str | None:
    """The first answer label of ``task`` in a generated response.

    Follows LLM-Adapters' ``commonsense_evaluate.py::extract_answer``:
    ``re.findall(pattern, text.strip())[0]`` with the task's label pattern
    (:data:`ANSWER_PATTERNS`), case-sensitive, so ``"Answer1"`` or ``"True"`` is
    not a label and the earliest label in the text wins (``"answer2 ... answer1"``
    gives ``"answer2"``).

    Args:
        task: a commonsense task name, e.g. ``"boolq"`` or ``"ARC-Easy"``.
        text: the generated response (new tokens only, decoded).

    Returns:
        The label exactly as it appears (``"answer3"``, ``"true"``), or None if the
        response holds no label (LLM-Adapters returns ``""``; neither equals a
        gold label).

    Raises:
        ValueError: unknown task (the message lists the known ones).
    """
    pattern = _COMPILED.get(task)
    if pattern is None:
        raise ValueError(f"task: got {task!r}, expected one of {', '.join(ANSWER_PATTERNS)}")
    match = pattern.search(text.strip())  # leftmost match = findall(...)[0]
    return None if match is None else match.group(0)


def subsample(records: Sequence[Any], n: int, seed: int) -> list[Any]:
    """A fixed, seeded subset of ``n`` records in their original order.

    Args:
        records: the test set.
        n: examples to keep; 0 or ``n >= len(records)`` keeps all.
        seed: seed of the ``numpy.random.Generator`` that draws the subset.

    Returns:
        The chosen records, in the order they appear in ``records``.

    Raises:
        ValueError: ``n < 0``.
    """
    if n < 0:
        raise ValueError(f"n: got {n}, expected an integer >= 0")
    if n == 0 or n >= len(records):
        return list(records)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(records), size=n, replace=False))
    return [records[int(i)] for i in keep]


class _AnswerStop:
    """Stopping criterion: a row is done once its response holds an answer label.

    Called by ``generate`` after every decoding step with the sequences so far; rows
    already done stay done (``generate`` pads them). The check is ``found`` (for a
    commonsense task its own :func:`extract_answer`), so a stopped response extracts
    to the same label as the full-length one (no label of a task is a prefix of
    another, so a later token cannot create an earlier-starting match).

    Args:
        tokenizer: decodes the new tokens.
        found: response text -> True once it holds an answer.
        prompt_len: columns of the (left-padded) prompt; new tokens follow.
    """

    def __init__(self, tokenizer, found: Callable[[str], bool], prompt_len: int) -> None:
        self.tokenizer = tokenizer
        self.found = found
        self.prompt_len = prompt_len
        self.done: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        """``input_ids [B, prompt_len + new]`` -> ``[B]`` bool, True where the row is done."""
        if self.done is None:
            self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        todo = (~self.done).nonzero().squeeze(-1).tolist()
        if todo:
            texts = self.tokenizer.batch_decode(input_ids[todo, self.prompt_len:],
                                                skip_special_tokens=True)
            for row, text in zip(todo, texts):
                if self.found(text):
                    self.done[row] = True
        return self.done.clone()


def _has_label(task: str, text: str) -> bool:
    return extract_answer(task, text) is not None


def generate_responses(model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int,
                       max_new_tokens: int, task: str | None = None,
                       sort_by_length: bool = True,
                       stop: Callable[[str], bool] | None = None) -> list[str]:
    """Greedy responses to ``prompts``, decoded from the new tokens only.

    Prompts are tokenized without special tokens (as in :func:`loglik_accuracy`),
    sorted by token length (longest first, so a batch holds prompts of similar
    length and little padding) and left-padded in batches of ``batch_size``;
    ``generate`` decodes with the KV cache and derives position ids from the
    attention mask, so a batched response equals the unbatched one up to float
    noise (padding is masked in attention and never routed to experts). A row stops
    at the tokenizer's eos token, after ``max_new_tokens``, or, with ``task``, once
    :func:`extract_answer` finds a label in its response (the label it extracts is
    then the one the full-length response would give). Responses come back in the
    order of ``prompts``.

    Args:
        model: a causal LM (Hugging Face, possibly PEFT-wrapped).
        tokenizer: its tokenizer; needs a pad token.
        prompts: full prompts (ending in ``"### Response:\\n"``).
        batch_size: prompts per ``generate`` call.
        max_new_tokens: response length limit in tokens.
        task: stop a row at its first answer label of this task (None: no early stop).
        sort_by_length: batch prompts sorted by length (False: in the given order).
        stop: instead of ``task``, stop a row once ``stop(response)`` is True (the
            predicate must not change its answer as more tokens follow).

    Returns:
        One response string per prompt (truncated after the label with ``task``).

    Raises:
        ValueError: ``batch_size`` or ``max_new_tokens`` < 1, no pad token, or an
            unknown ``task``.
    """
    check_batch_size(batch_size)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: got {max_new_tokens}, expected an integer >= 1")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: needs a pad token for batched generation")
    if task is not None:
        extract_answer(task, "")  # validate the task before generating anything
        stop = functools.partial(_has_label, task)
    device = model_device(model)
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = list(range(len(prompts)))
    if sort_by_length:
        order.sort(key=lambda i: -len(ids[i]))  # stable: equal lengths keep their order
    responses: list[str] = [""] * len(prompts)
    with evaluating(model, tokenizer, "left"):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, padding=True,
                                  return_tensors="pt").to(device)
            prompt_len = batch["input_ids"].shape[1]
            stopping = None if stop is None else StoppingCriteriaList(
                [_AnswerStop(tokenizer, stop, prompt_len)])
            # The mask covers the prefill forward only; decode steps are all real tokens.
            with routing_mask(model, batch["attention_mask"]):
                out = model.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    stopping_criteria=stopping,
                )  # [B, prompt_len + new]
            texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
            for i, text in zip(rows, texts):
                responses[i] = text
    return responses


def generation_predictions(model: nn.Module, tokenizer, task: str, prompts: Sequence[str],
                           batch_size: int, max_new_tokens: int) -> list[str | None]:
    """The label each greedy response gives (:func:`extract_answer`), per prompt.

    Generation stops per row at the first label (see :func:`generate_responses`).

    Args:
        model: a causal LM (Hugging Face, possibly PEFT-wrapped).
        tokenizer: its tokenizer.
        task: task name, selects the label pattern.
        prompts: one prompt per example.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: response length limit in tokens.

    Returns:
        Per prompt, the extracted label or None (no label: counts as wrong).

    Raises:
        ValueError: unknown task or a bad ``batch_size``/``max_new_tokens``.
    """
    extract_answer(task, "")  # validate the task before generating anything
    if not prompts:
        return []
    responses = generate_responses(model, tokenizer, prompts, batch_size, max_new_tokens, task=task)
    return [extract_answer(task, r) for r in responses]


def generation_accuracy(model: nn.Module, tokenizer, task: str, prompts: Sequence[str],
                        answers: Sequence[str], batch_size: int, max_new_tokens: int) -> float:
    """Accuracy under the paper's protocol: greedy response, first label, exact match.

    As LLM-Adapters' ``commonsense_evaluate.py`` (``label == predict``): the label
    extracted by :func:`extract_answer` must equal the gold answer string (only
    surrounding whitespace of the gold answer is stripped; no case folding).

    Args:
        model: a causal LM (Hugging Face, possibly PEFT-wrapped).
        tokenizer: its tokenizer.
        task: task name, selects the label pattern (see :func:`extract_answer`).
        prompts: one prompt per example.
        answers: gold labels (``"answer2"``, ``"true"``, ...), one per example.
        batch_size: prompts per ``generate`` call.
        max_new_tokens: response length limit in tokens.

    Returns:
        Fraction of examples (in [0, 1]) whose extracted label equals the gold one;
        0.0 for no examples.

    Raises:
        ValueError: unknown task, ``prompts``/``answers`` of different lengths, or a
            bad ``batch_size``/``max_new_tokens``.
    """
    extract_answer(task, "")  # validate the task before generating anything
    if len(prompts) != len(answers):
        raise ValueError(f"answers: got {len(answers)} for {len(prompts)} prompts")
    if not prompts:
        return 0.0
    predictions = generation_predictions(model, tokenizer, task, prompts, batch_size, max_new_tokens)
    correct = sum(p == a.strip() for p, a in zip(predictions, answers))
    return correct / len(prompts)


def evaluate_task(model: nn.Module, tokenizer, task: str, records: Sequence[dict],
                  protocols: Sequence[str], batch_size: int, max_new_tokens: int
                  ) -> dict[str, float]:
    """Evaluate one commonsense task under the requested protocols.

    Args:
        model: a causal LM at the budget level to evaluate (set K first with
            :func:`ubsmoe.models.set_top_k`).
        tokenizer: its tokenizer.
        task: task name (see :data:`ANSWER_PATTERNS`).
        records: LLM-Adapters records ``{"instruction", "input", "output", "answer"}``.
        protocols: a subset of ``("generation", "loglik")``.
        batch_size: examples (generation) or sequences (loglik) per forward.
        max_new_tokens: response length limit for ``generation``.

    Returns:
        ``{"generation": acc, "loglik": acc, "n": num_examples}``, with only the
        requested protocols.

    Raises:
        ValueError: unknown task or protocol.
    """
    extract_answer(task, "")  # validate the task name
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"protocols: got {unknown}, expected a subset of {', '.join(PROTOCOLS)}")
    prompts = [format_prompt(r) for r in records]
    answers = [str(r["answer"]).strip() for r in records]
    result: dict[str, float] = {}
    if "generation" in protocols:
        result["generation"] = generation_accuracy(model, tokenizer, task, prompts, answers,
                                                   batch_size, max_new_tokens)
    if "loglik" in protocols:
        choices = [answer_choices(task, r) for r in records]
        result["loglik"] = loglik_accuracy(model, tokenizer, prompts, choices, answers, batch_size)
    result["n"] = len(records)
    return result
