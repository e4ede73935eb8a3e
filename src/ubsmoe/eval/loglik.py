"""Log-likelihood choice scoring (lm-evaluation-harness style; DESIGN.md section 6).

Gao et al., "The Language Model Evaluation Harness", Zenodo 10256836: every
candidate's continuation ``"the correct answer is <label>"`` (the training response
format) is scored by the sum of its token log-probabilities given the prompt, and the
best one is predicted. Candidates sharing their tokens after a common prefix are run
as one sequence (:func:`choice_logprobs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ubsmoe.eval.context import check_batch_size, evaluating, logits_from, model_device

# What the training response starts with; each candidate is scored as PREFIX + label.
RESPONSE_PREFIX = "the correct answer is "


def _continuation_groups(prompt_ids: Sequence[Sequence[int]], choices: Sequence[Sequence[str]],
                         cont_ids: dict[str, list[int]], share_prefix: bool
                         ) -> list[tuple[int, list[int], list[tuple[int, int]], int]]:
    """The sequences :func:`choice_logprobs` runs, one per group of candidates.

    Candidates of one example whose continuations agree up to their last token form a
    group: one sequence ``prompt + continuation[:-1]`` scores them all (the shared
    tokens at their positions, each candidate's last token at the final position).
    Without ``share_prefix`` every candidate is its own group.

    Returns:
        ``(example, ids, [(choice index, last token)], prompt_len)`` per group.

    Raises:
        ValueError: an example without choices, an empty prompt or an empty continuation.
    """
    groups: list[tuple[int, list[int], list[tuple[int, int]], int]] = []
    for i, (p_ids, cs) in enumerate(zip(prompt_ids, choices)):
        if not cs:
            raise ValueError(f"choices[{i}]: empty; every example needs at least one candidate")
        if not p_ids:
            raise ValueError(f"prompts[{i}]: empty after tokenization")
        by_prefix: dict[object, tuple[list[int], list[tuple[int, int]]]] = {}  # key -> (shared, members)
        for j, c in enumerate(cs):
            cont = cont_ids[c]
            if not cont:
                raise ValueError(f"choices[{i}][{j}]: {c!r} has no tokens after the prefix")
            key = tuple(cont[:-1]) if share_prefix else j
            by_prefix.setdefault(key, (cont[:-1], []))[1].append((j, cont[-1]))
        for shared, members in by_prefix.values():
            groups.append((i, list(p_ids) + shared, members, len(p_ids)))
    return groups


def choice_logprobs(model: nn.Module, tokenizer, prompts: Sequence[str],
                    choices: Sequence[Sequence[str]], batch_size: int,
                    prefix: str = RESPONSE_PREFIX, share_prefix: bool = True) -> list[list[float]]:
    """Log-probability of each candidate response given its prompt.

    For example i and candidate c the continuation is ``prefix + c`` (default
    ``"the correct answer is " + c``, the commonsense training response);
    prompt and continuation are tokenized separately without special tokens and
    concatenated, and the score is the sum over continuation tokens of
    ``log p(token | prompt, earlier continuation tokens)``, computed in float32 and
    summed in float64.

    Candidates whose continuations differ only in their last token (the commonsense
    labels: ``"... is answer1"`` .. ``"... is answer4"`` differ in the label's final
    token) share one forward pass of ``prompt + continuation[:-1]``: a causal model
    gives every candidate the same log-probabilities for the shared tokens, and the
    last position's distribution scores each candidate's last token. A four-choice
    task thus runs one sequence per example instead of four; the scores equal the
    per-candidate ones up to float noise of the batch composition
    (``share_prefix=False`` runs one sequence per candidate). Sequences are sorted by
    length (longest first, to limit padding), right-padded and run ``batch_size`` per
    forward; only the logits of continuation positions are projected onto the
    vocabulary.

    Args:
        model: a causal LM (Hugging Face, possibly PEFT-wrapped).
        tokenizer: its tokenizer; needs a pad token.
        prompts: one prompt per example.
        choices: candidate labels per example (e.g. ``["answer1", ..., "answer4"]``).
        batch_size: sequences per forward.
        prefix: text before the candidate in the continuation.
        share_prefix: score candidates that differ only in their last token with one
            sequence (False: one sequence per candidate).

    Returns:
        ``[num_examples][num_choices_i]`` summed log-probabilities (nats).

    Raises:
        ValueError: mismatched lengths, an example without choices, an empty prompt,
            a candidate with no continuation tokens, no pad token, or ``batch_size`` < 1.
    """
    check_batch_size(batch_size)
    if len(prompts) != len(choices):
        raise ValueError(f"choices: got {len(choices)} lists for {len(prompts)} prompts")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer: needs a pad token for batched scoring")
    if not prompts:
        return []
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    labels = sorted({c for cs in choices for c in cs})
    cont_ids = dict(zip(labels, tokenizer([prefix + c for c in labels],
                                          add_special_tokens=False)["input_ids"]))
    groups = _continuation_groups(prompt_ids, choices, cont_ids, share_prefix)
    groups.sort(key=lambda g: -len(g[1]))  # stable: equal lengths keep their order

    scores = [[0.0] * len(cs) for cs in choices]
    device = model_device(model)
    with evaluating(model, tokenizer, "right"):
        for start in range(0, len(groups), batch_size):
            chunk = groups[start:start + batch_size]
            seq_len = max(len(ids) for _, ids, _, _ in chunk)
            input_ids = torch.full((len(chunk), seq_len), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), seq_len), dtype=torch.long)
            for row, (_, ids, _, _) in enumerate(chunk):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                attention_mask[row, :len(ids)] = 1
            # Logits at position t predict token t + 1: keep the positions that predict a
            # shared continuation token or a candidate's last token, [first, seq_len).
            first = min(p_len for _, _, _, p_len in chunk) - 1
            rows, cols, targets = [], [], []  # shared continuation tokens
            last_cols, cand_rows, cand_tokens = [], [], []  # final position, candidates' last tokens
            for row, (_, ids, members, p_len) in enumerate(chunk):
                for t in range(p_len, len(ids)):
                    rows.append(row)
                    cols.append(t - 1 - first)
                    targets.append(ids[t])
                last_cols.append(len(ids) - 1 - first)
                for _, token in members:
                    cand_rows.append(row)
                    cand_tokens.append(token)
            input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
            logits = logits_from(model, input_ids, attention_mask, first)  # [B, seq_len - first, vocab]
            per_row = torch.zeros(len(chunk), dtype=torch.float64)
            if rows:
                rows_t = torch.tensor(rows, device=device)
                picked = logits[rows_t, torch.tensor(cols, device=device)]  # [shared tokens, vocab]
                logp = torch.log_softmax(picked.float(), dim=-1)  # float32 for stable sums
                token_logp = logp.gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
                per_row.index_add_(0, rows_t.cpu(), token_logp.double().cpu())  # [B]
            final = logits[torch.arange(len(chunk), device=device),
                           torch.tensor(last_cols, device=device)]  # [B, vocab]
            final_logp = torch.log_softmax(final.float(), dim=-1)
            cand_logp = final_logp[torch.tensor(cand_rows, device=device),
                                   torch.tensor(cand_tokens, device=device)].double().cpu()
            k = 0
            for row, (i, _, members, _) in enumerate(chunk):
                for j, _ in members:
                    scores[i][j] = float(per_row[row] + cand_logp[k])
                    k += 1
    return scores


def loglik_accuracy(model: nn.Module, tokenizer, prompts: Sequence[str],
                    choices: Sequence[Sequence[str]], answers: Sequence[str],
                    batch_size: int, prefix: str = RESPONSE_PREFIX) -> float:
    """Accuracy of log-likelihood choice scoring (see :func:`choice_logprobs`).

    The prediction is the candidate with the highest summed log-probability (ties:
    the first one), as lm-evaluation-harness's ``acc``.

    Args:
        model: a causal LM (Hugging Face, possibly PEFT-wrapped).
        tokenizer: its tokenizer.
        prompts: one prompt per example.
        choices: candidate labels per example.
        answers: gold label per example; must be one of that example's choices.
        batch_size: sequences per forward.
        prefix: text before the candidate (see :func:`choice_logprobs`).

    Returns:
        Fraction of examples (in [0, 1]) predicted correctly; 0.0 for no examples.

    Raises:
        ValueError: mismatched lengths, or a gold answer that is not a candidate.
    """
    if len(answers) != len(prompts):
        raise ValueError(f"answers: got {len(answers)} for {len(prompts)} prompts")
    for i, (a, cs) in enumerate(zip(answers, choices)):
        if a not in cs:
            raise ValueError(f"answers[{i}]: {a!r} is not among the choices {list(cs)}")
    if not prompts:
        return 0.0
    scores = choice_logprobs(model, tokenizer, prompts, choices, batch_size, prefix)
    correct = sum(cs[int(np.argmax(s))] == a for s, cs, a in zip(scores, choices, answers))
    return correct / len(prompts)
