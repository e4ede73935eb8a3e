"""The prompt, tokenization and batching of instruction examples, whatever their source.

Training examples are the Alpaca prompt of :data:`PROMPT_TEMPLATE` (as LLM-Adapters,
Hu et al., EMNLP 2023, arXiv 2304.01933, uses it) followed by the ``output`` text
and eos, with the loss on the response tokens only (:func:`tokenize_example`,
:func:`collate`). Records are dicts ``{"instruction", "input", "output", ...}``
(:mod:`ubsmoe.data.commonsense`, :mod:`ubsmoe.data.instruction`).
"""

from __future__ import annotations

from typing import Any

import torch

# Alpaca prompt as used by LLM-Adapters' generate_prompt (finetune.py and
# commonsense_evaluate.py), without the stray indentation of its triple-quoted
# strings. The response (record["output"]) follows "### Response:\n".
PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

IGNORE_INDEX = -100  # label value torch.nn.functional.cross_entropy skips

# Public source used when no local copy is found (LLM-Adapters, main branch).


def format_prompt(record: dict[str, Any]) -> str:
    """The Alpaca prompt for one record, ending in ``"### Response:\\n"``.

    Args:
        record: an LLM-Adapters record with ``"instruction"`` and optionally
            ``"input"``; an empty or missing input selects the no-input variant.

    Returns:
        The prompt text; the training target ``record["output"]`` follows it directly.

    Raises:
        KeyError: the record has no ``"instruction"``.

    Source: ``generate_prompt`` in LLM-Adapters ``finetune.py`` (Alpaca template).
    """
    instruction = record["instruction"]
    extra = record.get("input") or ""
    if extra:
        return PROMPT_TEMPLATE.format(instruction=instruction, input=extra)
    return PROMPT_TEMPLATE_NO_INPUT.format(instruction=instruction)


def tokenize_example(tokenizer: Any, record: dict[str, Any], max_length: int) -> dict[str, list[int]]:
    """Token ids and labels of one training example, loss on the response only.

    ``input_ids = tokens(prompt) + tokens(response) + [eos]``; prompt and response
    are tokenized separately (``add_special_tokens=False``) so the boundary is
    exact. ``labels`` is ``-100`` on the prompt tokens and equals ``input_ids`` on
    the response and eos. Too long: the prompt is cut from the left (its end, with
    ``### Response:``, survives); a response that alone exceeds ``max_length`` is
    cut at its end (eos dropped with it).

    Args:
        tokenizer: a Hugging Face tokenizer with ``eos_token_id``.
        record: an LLM-Adapters record; the response is ``record["output"]``.
        max_length: maximum tokens per example.

    Returns:
        ``{"input_ids": [seq], "labels": [seq]}`` with ``seq <= max_length``.

    Raises:
        ValueError: ``max_length < 1`` or the tokenizer has no eos token.
    """
    if max_length < 1:
        raise ValueError(f"data.max_length: got {max_length}, expected an integer >= 1")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token; set tokenizer.eos_token")
    prompt = tokenizer(format_prompt(record), add_special_tokens=False)["input_ids"]
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [eos]
    response = response[:max_length]
    room = max_length - len(response)
    prompt = prompt[len(prompt) - room:] if room < len(prompt) else prompt
    return {
        "input_ids": prompt + response,
        "labels": [IGNORE_INDEX] * len(prompt) + response,
    }


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples to the longest one in the batch.

    Args:
        examples: outputs of :func:`tokenize_example`.
        pad_token_id: id written into ``input_ids`` at padded positions.

    Returns:
        ``input_ids`` [batch, seq] int64, ``attention_mask`` [batch, seq] int64
        (1 on real tokens), ``labels`` [batch, seq] int64 (-100 on padding and on
        prompt tokens).

    Raises:
        ValueError: ``examples`` is empty.
    """
    if not examples:
        raise ValueError("collate: got an empty list of examples")
    batch, seq = len(examples), max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((batch, seq), pad_token_id, dtype=torch.long)  # [batch, seq]
    attention_mask = torch.zeros((batch, seq), dtype=torch.long)  # [batch, seq]
    labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)  # [batch, seq]
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(e["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
