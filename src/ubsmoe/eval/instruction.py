"""Metrics of instruction tasks by answer type (``data.name=instruction``;
docs/data-and-models.md, "Your own data").

* ``label``: commonsense-style label words, scored exactly as commonsense
  (:mod:`ubsmoe.eval.commonsense`: first label in the greedy response, exact match;
  log-likelihood over the task's labels).
* ``letter``: option letters A-E: the first standalone capital letter A-E in the
  response must equal the gold letter; log-likelihood over the letters.
* ``numeric``: the last number in the response (thousands commas removed), equal to
  the gold number within an absolute 1e-3, as LLM-Adapters' math evaluation
  (``evaluate.py``: last number, ``abs(label - pred) < 0.001``).
* ``text``: ROUGE-L F (Lin, 2004) via Google's ``rouge-score`` (``RougeScorer(["rougeL"])``,
  its default tokenizer: lower-cased, non-alphanumerics dropped, no stemming) and
  BERTScore F1 (Zhang et al., ICLR 2020, arXiv 1904.09675) via ``bert-score``
  (``BERTScorer(model_type, num_layers)``, no idf, no baseline rescaling), each the
  mean over examples, in [0, 1].

Only ``label`` and ``letter`` tasks have choices, so only they get the ``loglik``
protocol; every task gets ``generation``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rouge_score import rouge_scorer
from torch import nn

from ubsmoe.data.commonsense import answer_choices
from ubsmoe.data.instruction import LETTER_PATTERN, gold_answer, parse_number
from ubsmoe.data.prompts import format_prompt
from ubsmoe.eval.commonsense import ANSWER_PATTERNS, PROTOCOLS, extract_answer, generate_responses
from ubsmoe.eval.loglik import loglik_accuracy

NUMERIC_TOLERANCE = 1e-3  # absolute, as LLM-Adapters' evaluate.py
_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER = re.compile(r"(?<![A-Za-z])([A-E])(?![A-Za-z])")
_LABEL_FAMILY = re.compile(r"^([a-z]+)(\d)$")


def extract_letter(text: str) -> str | None:
    """The first standalone capital letter A-E in ``text`` (``"(B)"``, ``"is C."``), or None.

    Letters inside words (``"Apple"``) do not count; lower-case letters do not count.
    """
    m = _LETTER.search(text.strip())
    return None if m is None else m.group(1)


def extract_number(text: str) -> float | None:
    """The last number in ``text`` (commas removed first), as LLM-Adapters'
    ``extract_answer_number``; None when there is none."""
    found = _NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def normalise_letter(answer: str) -> str:
    """A gold letter answer (``"B"``, ``"(B)"``, ``"B."``) as the bare letter.

    Raises:
        ValueError: not an option letter A-E.
    """
    m = LETTER_PATTERN.match(answer.strip())
    if m is None:
        raise ValueError(f"answer: got {answer!r}, expected an option letter A-E")
    return m.group(1)


def label_choices(task: str, answers: Sequence[str]) -> list[str]:
    """The candidate labels of a ``label`` task from its gold answers.

    ``true``/``false`` give both; ``nameN`` (``answer3``, ``option2``) gives
    ``name1..nameM`` with M the largest N seen; anything else is its own label.

    Args:
        task: the task name (for the error message).
        answers: the gold answers of the task's scored records.

    Returns:
        Sorted distinct labels; every answer is among them.
    """
    labels: set[str] = set()
    for a in answers:
        m = _LABEL_FAMILY.match(a)
        if a in ("true", "false"):
            labels |= {"true", "false"}
        elif m:
            top = max(int(x[len(m.group(1)):]) for x in answers if x.startswith(m.group(1))
                      and _LABEL_FAMILY.match(x))
            labels |= {f"{m.group(1)}{k}" for k in range(1, top + 1)}
        else:
            labels.add(a)
    return sorted(labels)


def _first_label(labels: Sequence[str], text: str) -> str | None:
    """Leftmost occurrence of any label (longest first at a position), case-sensitive."""
    pattern = "|".join(re.escape(x) for x in sorted(labels, key=len, reverse=True))
    m = re.search(pattern, text.strip()) if pattern else None
    return None if m is None else m.group(0)


def response_prefix(records: Sequence[dict[str, Any]]) -> str:
    """The text every record's output has before its answer, for log-likelihood scoring.

    If every ``output`` is ``P + answer`` with one common ``P`` (commonsense:
    ``"the correct answer is "``) that is returned; otherwise ``""`` (the
    candidate alone is scored).
    """
    prefixes = set()
    for r in records:
        out, ans = str(r["output"]), gold_answer(r)
        if not out.endswith(ans):
            return ""
        prefixes.add(out[: len(out) - len(ans)])
    return prefixes.pop() if len(prefixes) == 1 else ""


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each (prediction, reference) pair, via ``rouge-score``.

    Args:
        predictions: generated texts.
        references: gold texts, one per prediction.

    Returns:
        ``[num_pairs]`` values in [0, 1] (an identical pair: 1.0).

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"references: got {len(references)} for {len(predictions)} predictions")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


class BertScore:
    """BERTScore F1 with one scoring model, loaded once (``bert_score.BERTScorer``).

    Args:
        model: ``eval.bertscore_model``, a hub name known to bert-score or a local
            folder with a model and tokenizer (``model_type``).
        num_layers: ``eval.bertscore_num_layers``; 0: bert-score's own layer for a
            known model (a local folder needs it).

    Attributes:
        scorer: the loaded ``BERTScorer``, or None when loading failed.
        reason: why BERTScore is skipped (None when loaded).
    """

    def __init__(self, model: str, num_layers: int = 0) -> None:
        self.model = model
        self.num_layers = num_layers
        self.scorer = None
        self.reason: str | None = None
        if not model:
            self.reason = "eval.bertscore_model is empty"
            return
        try:
            # optional and heavy (a BERT model): only the bertscore text metric needs it
            import bert_score

            self.scorer = bert_score.BERTScorer(model_type=model, num_layers=num_layers or None)
        except Exception as e:  # noqa: BLE001 - any load failure (offline, unknown model) skips the metric
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.reason = (f"eval.bertscore_model {model!r} could not be loaded "
                           f"({type(e).__name__}: {first})")

    def f1(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        """BERTScore F1 of each pair (the ``F`` of ``bert_score.score`` with this model and layer).

        Returns:
            ``[num_pairs]`` values (an identical pair: 1.0 up to float rounding; a
            pair with an empty prediction or reference: 0.0, as bert-score).

        Raises:
            RuntimeError: the scorer was not loaded (:attr:`reason` says why).
            ValueError: the two lists differ in length.
        """
        if self.scorer is None:
            raise RuntimeError(f"BERTScore unavailable: {self.reason}")
        if len(predictions) != len(references):
            raise ValueError(f"references: got {len(references)} for {len(predictions)} predictions")
        # A pair with an empty side scores 0, as bert-score itself rules; its own code
        # path for it calls a tokenizer method transformers 5 removed, so it is kept out.
        scores = [0.0] * len(predictions)
        keep = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
        if keep:
            _, _, f = self.scorer.score([predictions[i] for i in keep], [references[i] for i in keep])
            for i, x in zip(keep, f.tolist()):
                scores[i] = float(x)
        return scores


def task_metric(answer_type: str, text_metric: str = "rouge_l") -> str:
    """The name of the metric a task of ``answer_type`` reports under ``generation``.

    ``accuracy`` for label, letter and numeric; ``text_metric`` (``rouge_l`` or
    ``bertscore_f1``) for text.
    """
    return text_metric if answer_type == "text" else "accuracy"


def evaluate_instruction_task(model: nn.Module, tokenizer, task: str, answer_type: str,
                              records: Sequence[dict], protocols: Sequence[str], batch_size: int,
                              max_new_tokens: int, text_metric: str = "rouge_l",
                              bertscore: BertScore | None = None) -> dict[str, Any]:
    """Evaluate one instruction task with its answer type's metric.

    Args:
        model: a causal LM at the budget level to evaluate.
        tokenizer: its tokenizer (with a pad token).
        task: the task name.
        answer_type: ``label``, ``letter``, ``numeric`` or ``text``.
        records: the task's test records (``instruction``, ``input``, ``output``,
            optional ``answer``).
        protocols: a subset of ``("generation", "loglik")``; ``loglik`` applies to
            label and letter tasks only.
        batch_size: examples (generation) or sequences (loglik) per forward.
        max_new_tokens: response length limit in tokens.
        text_metric: what a text task's ``generation`` value is (``rouge_l`` or
            ``bertscore_f1``); with BERTScore unavailable it falls back to
            ``rouge_l`` (``metric`` says so).
        bertscore: the BERTScore scorer for text tasks (None: not computed).

    Returns:
        ``{"generation": value, "loglik": acc (label/letter only), "metric":
        {protocol: name}, "metrics": {name: value} (text: rouge_l and, when
        computed, bertscore_f1), "n": num_examples}``.

    Raises:
        ValueError: unknown answer type or protocol, or a letter task whose gold
            answer is not a letter.
    """
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown:
        raise ValueError(f"protocols: got {unknown}, expected a subset of {', '.join(PROTOCOLS)}")
    prompts = [format_prompt(r) for r in records]
    golds = [gold_answer(r) for r in records]
    result: dict[str, Any] = {"metric": {}, "n": len(records)}
    if not records:
        return result
    choices: list[list[str]] | None = None
    prefix = response_prefix(records)
    if answer_type == "label":
        if task in ANSWER_PATTERNS:
            choices = [answer_choices(task, r) for r in records]
            extract = lambda text: extract_answer(task, text)
        else:
            labels = label_choices(task, golds)
            choices = [labels] * len(records)
            extract = lambda text: _first_label(labels, text)
        prefix_free = not any(a != b and b.startswith(a) for a in choices[0] for b in choices[0])
        stop = (lambda text: extract(text) is not None) if prefix_free else None
    elif answer_type == "letter":
        golds = [normalise_letter(a) for a in golds]
        top = max(golds)
        choices = [[chr(c) for c in range(ord("A"), max(ord(top), ord("B")) + 1)]] * len(records)
        extract, stop = extract_letter, None
    elif answer_type == "numeric":
        extract, stop = extract_number, None
    elif answer_type == "text":
        extract, stop = None, None
    else:
        raise ValueError(f"answer_type: got {answer_type!r}, expected label, letter, numeric or text")

    if "generation" in protocols:
        responses = generate_responses(model, tokenizer, prompts, batch_size, max_new_tokens, stop=stop)
        if answer_type == "numeric":
            preds = [extract_number(r) for r in responses]
            hits = [p is not None and abs(p - parse_number(g)) < NUMERIC_TOLERANCE
                    for p, g in zip(preds, golds)]
            result["generation"] = sum(hits) / len(records)
            result["metric"]["generation"] = "accuracy"
        elif answer_type == "text":
            refs = [str(r["output"]) for r in records]
            metrics = {"rouge_l": sum(rouge_l(responses, refs)) / len(records)}
            if bertscore is not None and bertscore.scorer is not None:
                metrics["bertscore_f1"] = sum(bertscore.f1(responses, refs)) / len(records)
            name = text_metric if text_metric in metrics else "rouge_l"
            result["generation"] = metrics[name]
            result["metric"]["generation"] = name
            result["metrics"] = metrics
        else:
            hits = [extract(r) == g for r, g in zip(responses, golds)]
            result["generation"] = sum(hits) / len(records)
            result["metric"]["generation"] = "accuracy"
    if "loglik" in protocols and choices is not None:
        result["loglik"] = loglik_accuracy(model, tokenizer, prompts, choices, golds, batch_size, prefix)
        result["metric"]["loglik"] = "accuracy"
    return result
