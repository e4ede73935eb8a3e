"""Commonsense evaluation: answer extraction, batched generation and choice scoring."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from ubsmoe.config import ModelConfig
from ubsmoe.eval import (
    choice_logprobs,
    evaluate_task,
    extract_answer,
    generate_responses,
    generation_accuracy,
    generation_predictions,
    loglik_accuracy,
    subsample,
)
from ubsmoe.eval.commonsense import ANSWER_PATTERNS
from ubsmoe.eval.loglik import RESPONSE_PREFIX
from ubsmoe.models import build_model, set_top_k, smoe_layers, train_tokenizer

LABELS = ["answer1", "answer2", "answer3", "answer4"]
WORDS = ["sun", "plant", "water", "energy", "food", "rock", "cloud", "river", "animal", "heat",
         "light", "seed", "tree", "mold", "wind", "soil", "ice", "metal", "sound", "moon"]


def _prompt(instruction: str) -> str:
    return ("Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Response:\n")


def _question(i: int) -> str:
    # Deterministic questions of varied length, so batches need padding.
    n = 3 + (i * 7) % 17
    body = " ".join(WORDS[(i + 3 * j) % len(WORDS)] for j in range(n))
    options = " ".join(f"Answer{k + 1}: {WORDS[(i + k) % len(WORDS)]}" for k in range(4))
    return f"Please choose the correct answer to the question: {body}?\n\n{options}"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny model is overhead-bound; intra-op threads only spin against other load.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    texts = []
    for i in range(300):
        texts.append(_prompt(_question(i)) + RESPONSE_PREFIX + LABELS[i % 4])
        texts.append(f"true or false: the {WORDS[i % len(WORDS)]} is solution{1 + i % 2} option{1 + i % 2}")
    tokenizer = train_tokenizer(texts, 600, tmp_path_factory.mktemp("tok"))
    model, tokenizer = build_model(ModelConfig(), tokenizer, seed=0)
    return model, tokenizer


# ---------------------------------------------------------------- extract_answer


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("ARC-Easy", "the correct answer is answer3 because", "answer3"),
        ("openbookqa", "answer2 or maybe answer1", "answer2"),
        ("social_i_qa", "The correct answer is Answer1.", None),  # case-sensitive
        ("social_i_qa", "Answer1 is wrong, the correct answer is answer2", "answer2"),
        ("boolq", "True.", None),
        ("boolq", "True? No: the correct answer is false", "false"),
        ("boolq", "the correct answer is false", "false"),
        ("boolq", "false, though some say true", "false"),  # first match, not last
        ("piqa", "the correct answer is solution2", "solution2"),
        ("piqa", "solution2 beats solution1", "solution2"),
        ("hellaswag", "ending4 fits best", "ending4"),
        ("hellaswag", "Ending1 or ending3", "ending3"),
        ("winogrande", "OPTION1", None),
        ("winogrande", "  option2 then option1  ", "option2"),
        ("ARC-Challenge", "I do not know", None),
        ("winogrande", "the correct answer is answer1", None),
        ("boolq", "", None),
    ],
)
def test_extract_answer(task, text, expected):
    assert extract_answer(task, text) == expected


def test_extract_answer_unknown_task_lists_known():
    with pytest.raises(ValueError, match="boolq") as e:
        extract_answer("mmlu", "answer1")
    assert "winogrande" in str(e.value)


def test_extract_answer_is_llm_adapters_findall_first():
    """Same result as LLM-Adapters' ``re.findall(pattern, sentence.strip())[0]`` (or no
    label) on mixed-case strings with several labels."""
    import re

    texts = ["Answer2 answer4 answer1", "ANSWER3", "x answer5answer1", "answer1", "",
             "TRUE false True true", "solution1 Solution2", "ending2ending1", "Option2 option1"]
    for task, pattern in ANSWER_PATTERNS.items():
        for text in texts:
            found = re.findall(pattern, text.strip())
            assert extract_answer(task, text) == (found[0] if found else None), (task, text)


def test_generation_accuracy_compares_case_sensitively(tiny):
    """A gold label in another case is not matched (LLM-Adapters: ``label == predict``)."""
    _, tokenizer = tiny
    stub = FixedAnswerLM(tokenizer)  # responds "the correct answer is answer3 because answer1"
    prompts = [_prompt(_question(i)) for i in range(2)]
    assert generation_accuracy(stub, tokenizer, "ARC-Easy", prompts, ["answer3", "Answer3"], 2, 8) == 0.5


# ---------------------------------------------------------------- subsample


def test_subsample_is_seeded_stable_and_ordered():
    records = list(range(100))
    a = subsample(records, 10, seed=3)
    assert a == subsample(records, 10, seed=3)
    assert len(a) == 10 and len(set(a)) == 10
    assert a == sorted(a)  # original order kept
    assert a != subsample(records, 10, seed=4)
    assert subsample(records, 0, seed=3) == records
    assert subsample(records, 100, seed=3) == records
    assert subsample(records, 500, seed=3) == records
    with pytest.raises(ValueError, match="n"):
        subsample(records, -1, seed=0)


# ---------------------------------------------------------------- log-likelihood


def _brute_force_scores(model, tokenizer, prompts, choices):
    """Unbatched, unpadded reference: one forward per (prompt, candidate)."""
    model.eval()
    scores = []
    with torch.no_grad():
        for prompt, cs in zip(prompts, choices):
            p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            row = []
            for c in cs:
                c_ids = tokenizer(RESPONSE_PREFIX + c, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p_ids + c_ids])
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
                targets = torch.tensor(c_ids)
                pos = torch.arange(len(p_ids) - 1, len(p_ids) + len(c_ids) - 1)
                row.append(float(logp[pos, targets].sum()))
            scores.append(row)
    return scores


@pytest.mark.parametrize("top_k", [8, 2])
def test_loglik_matches_unbatched_brute_force(tiny, top_k):
    model, tokenizer = tiny
    set_top_k(model, top_k)
    prompts = [_prompt(_question(i)) for i in range(5)]
    lengths = {len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) >= 3  # padding really happens
    choices = [LABELS, LABELS[:2], LABELS[:3], ["answer2", "answer4"], LABELS[:3]]
    try:
        batched = choice_logprobs(model, tokenizer, prompts, choices, batch_size=4)
        reference = _brute_force_scores(model, tokenizer, prompts, choices)
    finally:
        set_top_k(model, 8)
    for got, want, cs in zip(batched, reference, choices):
        assert len(got) == len(cs)
        assert got == pytest.approx(want, abs=1e-4)
        assert max(range(len(cs)), key=got.__getitem__) == max(range(len(cs)), key=want.__getitem__)
    # Scores are genuine log-probabilities of multi-token continuations.
    assert all(s < 0 for row in batched for s in row)
    # Accuracy follows the argmax: gold = best candidate -> 1, gold = worst -> 0.
    set_top_k(model, top_k)
    try:
        best = [cs[max(range(len(cs)), key=r.__getitem__)] for r, cs in zip(reference, choices)]
        worst = [cs[min(range(len(cs)), key=r.__getitem__)] for r, cs in zip(reference, choices)]
        assert loglik_accuracy(model, tokenizer, prompts, choices, best, batch_size=3) == 1.0
        assert loglik_accuracy(model, tokenizer, prompts, choices, worst, batch_size=3) == 0.0
        mixed = best[:3] + worst[3:]
        assert loglik_accuracy(model, tokenizer, prompts, choices, mixed, batch_size=64) == 0.6
    finally:
        set_top_k(model, 8)


def _forward_rows(model):
    """A forward pre-hook counting the sequences (rows) the model runs; returns (rows, handle)."""
    rows = []

    def hook(module, args, kwargs):
        rows.append(kwargs["input_ids"].shape[0])

    return rows, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_loglik_shares_one_sequence_per_group_of_candidates(tiny):
    """Candidates differing only in their last token run as one sequence, same scores."""
    model, tokenizer = tiny
    prompts = [_prompt(_question(i)) for i in range(6)]
    # Mixed label sets: some share everything up to the last token, some do not.
    choices = [LABELS, ["answer1", "false"], ["solution1", "solution2"], LABELS[:3],
               ["option1", "answer2", "option2"], ["true", "false"]]
    cont = {c: tokenizer(RESPONSE_PREFIX + c, add_special_tokens=False)["input_ids"]
            for cs in choices for c in cs}
    groups = sum(len({tuple(cont[c][:-1]) for c in cs}) for cs in choices)
    candidates = sum(len(cs) for cs in choices)
    assert groups < candidates  # the tokenizer gives these labels shared prefixes
    rows, handle = _forward_rows(model)
    try:
        shared = choice_logprobs(model, tokenizer, prompts, choices, batch_size=4)
        shared_rows = sum(rows)
        rows.clear()
        separate = choice_logprobs(model, tokenizer, prompts, choices, batch_size=4,
                                   share_prefix=False)
        separate_rows = sum(rows)
    finally:
        handle.remove()
    assert shared_rows == groups
    assert separate_rows == candidates
    reference = _brute_force_scores(model, tokenizer, prompts, choices)
    for got, other, want in zip(shared, separate, reference):
        assert got == pytest.approx(want, abs=1e-4)
        assert other == pytest.approx(want, abs=1e-4)


def test_loglik_refuses_a_candidate_without_tokens(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"choices\[0\]\[1\]"):
        choice_logprobs(model, tokenizer, [_prompt(_question(0))], [["answer1", ""]],
                        batch_size=2, prefix="")


def test_loglik_restores_state_and_validates(tiny):
    model, tokenizer = tiny
    prompts = [_prompt(_question(i)) for i in range(3)]
    model.train()
    tokenizer.padding_side = "left"
    counts = [layer.expert_counts.clone() for layer in smoe_layers(model)]
    loglik_accuracy(model, tokenizer, prompts, [LABELS] * 3, ["answer1"] * 3, batch_size=4)
    assert model.training
    assert tokenizer.padding_side == "left"
    for layer, before in zip(smoe_layers(model), counts):
        assert torch.equal(layer.expert_counts, before)
    model.eval()
    with pytest.raises(ValueError, match="answers"):
        loglik_accuracy(model, tokenizer, prompts, [LABELS] * 3, ["answer9"] * 3, batch_size=4)
    with pytest.raises(ValueError, match="answers"):
        loglik_accuracy(model, tokenizer, prompts, [LABELS] * 3, ["answer1"] * 2, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        choice_logprobs(model, tokenizer, prompts, [LABELS] * 3, batch_size=0)
    assert loglik_accuracy(model, tokenizer, [], [], [], batch_size=4) == 0.0


# ---------------------------------------------------------------- generation


def test_batched_generation_equals_unbatched(tiny):
    model, tokenizer = tiny
    prompts = [_prompt(_question(i)) for i in range(4)]
    model.train()
    tokenizer.padding_side = "right"
    batched = generate_responses(model, tokenizer, prompts, batch_size=4, max_new_tokens=5)
    assert model.training and tokenizer.padding_side == "right"
    single = generate_responses(model, tokenizer, prompts, batch_size=1, max_new_tokens=5)
    assert batched == single
    assert any(r for r in batched)
    # Only new tokens are decoded: no response repeats the prompt.
    assert not any("### Response" in r for r in batched)
    # Reference without our code: an unpadded greedy generate call.
    model.eval()
    ids = tokenizer(prompts[2], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=5, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == batched[2]


@pytest.fixture(scope="module")
def answering(tiny):
    """The tiny model with its " answer", "1".."4" output rows scaled x4: greedy
    responses often hold a label (prompt-dependent), some never do."""
    import copy

    model, tokenizer = tiny
    model = copy.deepcopy(model)
    label_ids = sorted({t for label in LABELS
                        for t in tokenizer(" " + label, add_special_tokens=False)["input_ids"]})
    with torch.no_grad():
        model.get_output_embeddings().weight[label_ids] *= 4.0
    return model, tokenizer


def _reference_predictions(model, tokenizer, task, prompts, max_new_tokens):
    """Per-example, unpadded, full-length greedy generation, then extraction."""
    model.eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            out.append(extract_answer(task, tokenizer.decode(seq[0, ids.shape[1]:],
                                                             skip_special_tokens=True)))
    return out


def test_sorted_early_stopping_generation_equals_per_example_loop(answering):
    model, tokenizer = answering
    prompts = [_prompt(_question(i)) for i in range(32)]
    assert len({len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}) >= 8
    reference = _reference_predictions(model, tokenizer, "ARC-Easy", prompts, 12)
    got = generation_predictions(model, tokenizer, "ARC-Easy", prompts, batch_size=8, max_new_tokens=12)
    assert got == reference
    assert None in got and any(got)  # both labelled and unlabelled rows
    answers = [LABELS[i % 4] for i in range(32)]
    expected = sum(p == a for p, a in zip(reference, answers)) / 32
    assert generation_accuracy(model, tokenizer, "ARC-Easy", prompts, answers, 8, 12) == expected
    # The stop really happens: stopped responses end at their label, the rest run on.
    full = generate_responses(model, tokenizer, prompts, batch_size=8, max_new_tokens=12)
    stopped = generate_responses(model, tokenizer, prompts, batch_size=8, max_new_tokens=12,
                                 task="ARC-Easy")
    shorter = [i for i, (a, b) in enumerate(zip(full, stopped)) if len(b) < len(a)]
    assert shorter and all(full[i].startswith(stopped[i]) for i in range(32))
    assert all(extract_answer("ARC-Easy", stopped[i]) is not None for i in shorter)
    # Sorting by length only changes the batching, not the responses or their order.
    unsorted = generate_responses(model, tokenizer, prompts, batch_size=8, max_new_tokens=12,
                                  sort_by_length=False)
    assert unsorted == full


class FixedAnswerLM(nn.Module):
    """A stub whose greedy response is always ``" answer3 because ..."``."""

    def __init__(self, tokenizer) -> None:
        super().__init__()
        self.proj = nn.Linear(1, 1)
        self.suffix = tokenizer("the correct answer is answer3 because answer1",
                                add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        self.tokenizer = tokenizer
        self.calls = 0

    def generate(self, input_ids, attention_mask, do_sample, pad_token_id, **kwargs):
        self.calls += 1
        assert do_sample is False and not torch.is_grad_enabled() and not self.training
        assert pad_token_id == self.tokenizer.pad_token_id
        assert bool(attention_mask[:, -1].all())  # left padding: every prompt ends at the right
        suffix = self.suffix.expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, suffix], dim=1)


def test_generation_accuracy_scores_extracted_answer(tiny):
    _, tokenizer = tiny
    stub = FixedAnswerLM(tokenizer)
    stub.train()
    # The prompts mention "Answer1" first, so decoding the prompt too would be wrong.
    prompts = [_prompt(_question(i)) for i in range(5)]
    answers = ["answer3", "answer1", "answer3", "answer2", "answer3"]
    acc = generation_accuracy(stub, tokenizer, "ARC-Easy", prompts, answers,
                              batch_size=2, max_new_tokens=8)
    assert acc == pytest.approx(3 / 5)
    assert stub.calls == 3
    assert stub.training
    assert generation_accuracy(stub, tokenizer, "boolq", prompts, ["true"] * 5, 4, 8) == 0.0
    with pytest.raises(ValueError, match="task"):
        generation_accuracy(stub, tokenizer, "nope", prompts, answers, 2, 8)


# ---------------------------------------------------------------- evaluate_task


@pytest.fixture
def fake_data_module(monkeypatch):
    """Stands in for the data layer's prompt template and label sets, as evaluate_task sees them."""
    import ubsmoe.eval.commonsense as ev

    module = types.SimpleNamespace(format_prompt=lambda r: _prompt(r["instruction"]),
                                   answer_choices=lambda task, r: list(LABELS))
    monkeypatch.setattr(ev, "format_prompt", module.format_prompt)
    monkeypatch.setattr(ev, "answer_choices", module.answer_choices)
    return module


def test_evaluate_task_combines_protocols(tiny, fake_data_module):
    model, tokenizer = tiny
    records = [{"instruction": _question(i), "input": "", "answer": LABELS[i % 4],
                "output": RESPONSE_PREFIX + LABELS[i % 4], "task": "ARC-Easy"} for i in range(4)]
    prompts = [_prompt(r["instruction"]) for r in records]
    answers = [r["answer"] for r in records]
    result = evaluate_task(model, tokenizer, "ARC-Easy", records, ["generation", "loglik"],
                           batch_size=4, max_new_tokens=4)
    assert set(result) == {"generation", "loglik", "n"}
    assert result["n"] == 4
    assert result["loglik"] == loglik_accuracy(model, tokenizer, prompts, [LABELS] * 4, answers, 4)
    assert result["generation"] == generation_accuracy(model, tokenizer, "ARC-Easy", prompts,
                                                       answers, 4, 4)
    only = evaluate_task(model, tokenizer, "ARC-Easy", records, ["loglik"], 4, 4)
    assert set(only) == {"loglik", "n"} and only["loglik"] == result["loglik"]
    with pytest.raises(ValueError, match="protocols"):
        evaluate_task(model, tokenizer, "ARC-Easy", records, ["rouge"], 4, 4)


def test_evaluate_task_with_real_prompt_module(tiny):
    data = pytest.importorskip("ubsmoe.data.commonsense")
    prompts_module = pytest.importorskip("ubsmoe.data.prompts")
    model, tokenizer = tiny
    records = [{"instruction": _question(i), "input": "", "answer": LABELS[(i + 1) % 4],
                "output": RESPONSE_PREFIX + LABELS[(i + 1) % 4], "task": "ARC-Challenge"}
               for i in range(3)]
    result = evaluate_task(model, tokenizer, "ARC-Challenge", records, ["loglik", "generation"],
                           batch_size=8, max_new_tokens=3)
    assert result["n"] == 3
    prompts = [prompts_module.format_prompt(r) for r in records]
    assert all(p.endswith("### Response:\n") for p in prompts)
    choices = [data.answer_choices("ARC-Challenge", r) for r in records]
    assert choices == [LABELS] * 3
    answers = [r["answer"] for r in records]
    assert result["loglik"] == loglik_accuracy(model, tokenizer, prompts, choices, answers, 8)
    assert 0.0 <= result["generation"] <= 1.0
