"""Suite ``eval``: evaluation throughput (examples per second) of both protocols.

Times :mod:`ubsmoe.eval.commonsense` on the ``tiny`` preset (random weights) and
synthetic ARC-style multiple-choice prompts of varied length (Alpaca template,
``answer1..answer4``, 40-200 tokens), all cases interleaved in one process:

- ``generation_before``: the earlier evaluation path, batched greedy decoding
  with the KV cache in the given prompt order, every row running to
  ``max_new_tokens`` (``sort_by_length=False``, no task stop);
- ``generation``: the current path, prompts sorted by length and each row
  stopped once :func:`~ubsmoe.eval.commonsense.extract_answer` finds a label.
  A random-weight model never writes a label, so this is the worst case of the
  stop (only the sorting helps);
- ``generation_answering``: the same on a copy of the model whose output rows of
  the label tokens are scaled x4, so that many responses hold a label early and
  the stop shows;
- ``loglik_separate``: batched, length-sorted choice scoring with one sequence per
  (example, candidate), the earlier path (``share_prefix=False``; four candidates
  per example);
- ``loglik``: the current path, one sequence per example: the four candidates
  differ only in their last token and share the forward pass of the rest
  (:func:`~ubsmoe.eval.loglik.choice_logprobs`).

Each case reports ``examples_per_s`` (examples / median time), and the generation
cases ``mean_response_tokens`` (tokens of the decoded responses, re-tokenized).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from ubsmoe.bench.harness import BenchOptions, interleaved_timings, register_suite, summarize
from ubsmoe.config import ModelConfig
from ubsmoe.data.prompts import format_prompt
from ubsmoe.eval.commonsense import generate_responses
from ubsmoe.eval.loglik import RESPONSE_PREFIX, choice_logprobs
from ubsmoe.models import build_model, train_tokenizer

LABELS = ["answer1", "answer2", "answer3", "answer4"]
_WORDS = ["sun", "plant", "water", "energy", "food", "rock", "cloud", "river", "animal", "heat",
          "light", "seed", "tree", "mold", "wind", "soil", "ice", "metal", "sound", "moon"]


def synthetic_prompts(n: int) -> list[str]:
    """``n`` deterministic ARC-style prompts (Alpaca template) of varied length."""
    prompts = []
    for i in range(n):
        body = " ".join(_WORDS[(i + 3 * j) % len(_WORDS)] for j in range(4 + (i * 11) % 60))
        options = " ".join(f"Answer{k + 1}: {_WORDS[(i + k) % len(_WORDS)]}" for k in range(4))
        prompts.append(format_prompt({"instruction": f"Please choose the correct answer to the "
                                                     f"question: {body}?\n\n{options}"}))
    return prompts


def _build(seed: int):
    """The tiny preset (random weights) and a tokenizer trained on the synthetic prompts."""
    texts = [p + RESPONSE_PREFIX + LABELS[i % 4] for i, p in enumerate(synthetic_prompts(400))]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tokenizer(texts, 1024, Path(tmp))
    model, tokenizer = build_model(ModelConfig(), tokenizer, seed=seed)
    model.eval()
    return model, tokenizer


@register_suite("eval")
def run(options: BenchOptions) -> dict[str, Any]:
    """Examples per second of generation and log-likelihood scoring, each before/after."""
    torch.manual_seed(options.seed)
    n = 8 if options.quick else 64
    batch_size, max_new_tokens = (4, 4) if options.quick else (16, 16)
    model, tokenizer = _build(options.seed)
    answering = copy.deepcopy(model)
    label_ids = sorted({t for label in LABELS
                        for t in tokenizer(" " + label, add_special_tokens=False)["input_ids"]})
    with torch.no_grad():
        answering.get_output_embeddings().weight[label_ids] *= 4.0
    prompts = synthetic_prompts(n)
    choices = [LABELS] * n
    responses: dict[str, list[str]] = {}

    def gen(name, m, **kw):
        """A case: generate for every prompt and keep the responses."""
        def case():
            """One timed generation pass over the prompts."""
            responses[name] = generate_responses(m, tokenizer, prompts, batch_size, max_new_tokens, **kw)
        return case

    cases = {
        "generation_before": gen("generation_before", model, sort_by_length=False),
        "generation": gen("generation", model, task="ARC-Easy"),
        "generation_answering": gen("generation_answering", answering, task="ARC-Easy"),
        "loglik_separate": lambda: choice_logprobs(model, tokenizer, prompts, choices, batch_size,
                                                   share_prefix=False),
        "loglik": lambda: choice_logprobs(model, tokenizer, prompts, choices, batch_size),
    }
    times = interleaved_timings(cases, options.n_repeats(3), options.n_warmup(1))
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    result: dict[str, Any] = {
        "description": "evaluation examples per second, tiny preset (random weights), CPU",
        "examples": n, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
        "prompt_tokens": {"min": min(lengths), "mean": statistics.mean(lengths), "max": max(lengths)},
        "cases": {},
    }
    for name, t in times.items():
        entry = summarize(t)
        entry["examples_per_s"] = n / entry["median_s"]
        if name in responses:
            new = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses[name]]
            entry["mean_response_tokens"] = statistics.mean(new)
        result["cases"][name] = entry
    c = result["cases"]
    result["summary"] = {
        "generation_before_ex_per_s": c["generation_before"]["examples_per_s"],
        "generation_ex_per_s": c["generation"]["examples_per_s"],
        "generation_answering_ex_per_s": c["generation_answering"]["examples_per_s"],
        "loglik_separate_ex_per_s": c["loglik_separate"]["examples_per_s"],
        "loglik_ex_per_s": c["loglik"]["examples_per_s"],
        "loglik_speedup": c["loglik"]["examples_per_s"] / c["loglik_separate"]["examples_per_s"],
        "generation_speedup": c["generation"]["examples_per_s"] / c["generation_before"]["examples_per_s"],
    }
    return result
