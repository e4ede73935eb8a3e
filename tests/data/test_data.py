"""Tests for ubsmoe.data: prompts, data resolution and loading, tokenization,
client partitioning and budget assignment. Uses the real commonsense files in
../shared/data/commonsense (read-only)."""

from __future__ import annotations

import json
import urllib.error
from collections import Counter
from pathlib import Path

import pytest
import torch

from ubsmoe.config import DataConfig
from ubsmoe.data import (
    IGNORE_INDEX,
    answer_choices,
    assign_budgets,
    collate,
    format_prompt,
    load_commonsense,
    partition_clients,
    resolve_data_dir,
    tokenize_example,
    top_k_for_budget,
)
from ubsmoe.data import commonsense as cs
from ubsmoe.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "commonsense"
PRESENT_TASKS = [
    "boolq", "piqa", "social_i_qa", "winogrande", "ARC-Challenge", "ARC-Easy", "openbookqa",
]
LEVELS = [0.125, 0.25, 0.5, 1.0]

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no data at {SHARED}")


@pytest.fixture(autouse=True)
def _no_env_data(monkeypatch):
    monkeypatch.delenv("UBSMOE_DATA", raising=False)


@pytest.fixture(scope="module")
def full_data():
    """Every task, all training examples kept (no sampling)."""
    return load_commonsense(DataConfig(path=str(SHARED), train_examples=0), seed=0)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, full_data):
    from ubsmoe.models.tokenizer import train_tokenizer

    records = full_data.train[::50]
    texts = [format_prompt(r) + r["output"] for r in records]
    return train_tokenizer(texts, vocab_size=600, cache=tmp_path_factory.mktemp("tok"))


# --- prompts -----------------------------------------------------------------------


def test_prompt_variants():
    no_input = format_prompt({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert no_input == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n"
    )
    assert format_prompt({"instruction": "Say hi."}) == no_input
    with_input = format_prompt({"instruction": "Greet.", "input": "Bob"})
    assert with_input == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nGreet.\n\n### Input:\nBob\n\n### Response:\n"
    )


# --- resolve_data_dir --------------------------------------------------------------


def test_resolve_explicit_path(tmp_path, monkeypatch):
    monkeypatch.setenv("UBSMOE_DATA", str(tmp_path / "ignored"))
    assert resolve_data_dir(str(tmp_path)) == tmp_path.resolve()


def test_resolve_missing_explicit_path_raises(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"^data\.path: .*nope") as e:
        resolve_data_dir(str(missing))
    assert "\n" not in str(e.value)


def test_resolve_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("UBSMOE_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path.resolve()
    (tmp_path / "commonsense").mkdir()
    assert resolve_data_dir() == (tmp_path / "commonsense").resolve()
    monkeypatch.setenv("UBSMOE_DATA", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="UBSMOE_DATA"):
        resolve_data_dir()


def test_resolve_shared_fallbacks(tmp_path, monkeypatch):
    # ../shared/data/commonsense relative to the working directory comes first ...
    shared = tmp_path / "shared" / "data" / "commonsense"
    shared.mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert resolve_data_dir() == shared.resolve()
    # ... then relative to the package checkout (the real shared folder here).
    monkeypatch.chdir(tmp_path)
    assert resolve_data_dir() == SHARED.resolve()


def test_resolve_download_failure_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cs, "_REPO_ROOT", tmp_path / "a" / "b")
    monkeypatch.setenv("UBSMOE_CACHE", str(tmp_path / "cache"))

    def offline(url, timeout=60.0):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(cs, "_fetch", offline)
    with pytest.raises(ConfigError, match="data.path: could not be resolved") as e:
        resolve_data_dir()
    assert "UBSMOE_DATA" in str(e.value) and "raw.githubusercontent.com" in str(e.value)
    assert not (tmp_path / "cache" / "data" / "commonsense" / cs._COMPLETE_MARKER).exists()


def test_download_layout_with_fake_source(tmp_path, monkeypatch):
    """Download code path against an in-memory fake of the upstream files."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cs, "_REPO_ROOT", tmp_path / "a" / "b")
    monkeypatch.setenv("UBSMOE_CACHE", str(tmp_path / "cache"))

    def rec(fmt, answer, question="Q?"):  # distinct questions: loading drops repeats
        return {"instruction": f"{question}\n\nAnswer format: {fmt}", "input": "",
                "output": f"the correct answer is {answer}", "answer": answer}

    files = {
        "dataset/boolq/test.json": [rec("true/false", "true", "B1?")],
        "dataset/boolq/train.json": [rec("true/false", "false", "B2?")],
        "dataset/piqa/test.json": [rec("solution1/solution2", "solution1", f"P{i}?") for i in range(4)],
        "ft-training_set/commonsense_15k.json": [
            rec("true/false", "true", "B3?"),  # boolq has its own train file: not used
            rec("solution1/solution2", "solution2", "P9?"),
            rec("answer1/answer2/answer3", "answer1"),  # ambiguous family: not used
        ],
    }

    def fake(url, timeout=60.0):
        key = url.removeprefix(cs.SOURCE_URL + "/")
        if key not in files:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        return json.dumps(files[key]).encode()

    monkeypatch.setattr(cs, "_fetch", fake)
    root = resolve_data_dir()
    assert root == (tmp_path / "cache" / "data" / "commonsense").resolve()
    assert json.loads((root / "piqa" / "train.json").read_text())[0]["answer"] == "solution2"
    assert len(json.loads((root / "boolq" / "train.json").read_text())) == 1
    assert not (root / "social_i_qa").exists()
    data = load_commonsense(DataConfig(tasks=["boolq", "piqa", "hellaswag"], train_examples=0), 0)
    assert data.carved == {} and set(data.skipped) == {"hellaswag"}
    assert len(data.train) == 2 and len(data.test["piqa"]) == 4
    # A second resolution uses the completed cache without fetching.
    monkeypatch.setattr(cs, "_fetch", lambda url, timeout=60.0: pytest.fail("fetched again"))
    assert resolve_data_dir() == root


# --- load_commonsense --------------------------------------------------------------


def _key(record):
    return record["instruction"], record["answer"]


def test_load_carves_disjoint_deterministic_split():
    cfg = DataConfig(path=str(SHARED), tasks=["piqa", "winogrande", "hellaswag", "boolq"],
                     train_examples=0, carved_train_fraction=0.3)
    a = load_commonsense(cfg, seed=1)
    b = load_commonsense(cfg, seed=1)
    c = load_commonsense(cfg, seed=2)
    raw = {t: json.loads((SHARED / t / "test.json").read_text()) for t in ("piqa", "winogrande")}
    assert a.skipped == {"hellaswag": f"no data files in {SHARED.resolve() / 'hellaswag'}"}
    assert a.data_dir == str(SHARED.resolve())
    assert set(a.carved) == {"piqa", "winogrande"}  # boolq has a train file
    for task, records in raw.items():
        expected = int(len(records) * 0.3 + 0.5)
        assert a.carved[task] == expected
        carved = [r for r in a.train if r["task"] == task]
        assert len(carved) == expected
        assert len(a.test[task]) == len(records) - expected
        assert not set(map(_key, carved)) & set(map(_key, a.test[task]))
        assert Counter(map(_key, carved)) + Counter(map(_key, a.test[task])) == Counter(
            map(_key, records))
        assert all(r["task"] == task for r in a.test[task])
    assert a.train == b.train and a.test == b.test
    assert [r for r in a.train if r["task"] == "piqa"] != [r for r in c.train if r["task"] == "piqa"]
    n_boolq = len(json.loads((SHARED / "boolq" / "train.json").read_text()))
    assert sum(r["task"] == "boolq" for r in a.train) == n_boolq
    assert "boolq" not in a.carved and len(a.test["boolq"]) == 3270


def test_load_samples_train_examples():
    cfg = DataConfig(path=str(SHARED), tasks=["ARC-Challenge", "social_i_qa"], train_examples=300)
    a = load_commonsense(cfg, seed=0)
    assert len(a.train) == 300
    assert a.train == load_commonsense(cfg, seed=0).train
    assert a.train != load_commonsense(cfg, seed=5).train
    assert {r["task"] for r in a.train} == {"ARC-Challenge", "social_i_qa"}
    # pool order kept: all ARC-Challenge records come before the carved social_i_qa ones
    tasks = [r["task"] for r in a.train]
    assert tasks == sorted(tasks, key=["ARC-Challenge", "social_i_qa"].index)
    # the test sets are not sampled
    assert len(a.test["ARC-Challenge"]) == 1172


def test_load_without_any_task_data_raises(tmp_path):
    (tmp_path / "boolq").mkdir()
    with pytest.raises(ConfigError, match="data.tasks"):
        load_commonsense(DataConfig(path=str(tmp_path), tasks=["boolq", "hellaswag"]), 0)


def test_load_bad_json_raises(tmp_path):
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.json").write_text("{not json")
    with pytest.raises(ConfigError, match="data.path: cannot read"):
        load_commonsense(DataConfig(path=str(tmp_path), tasks=["boolq"]), 0)


def test_full_suite_loads(full_data):
    assert set(full_data.test) == set(PRESENT_TASKS)
    assert set(full_data.skipped) == {"hellaswag"}
    assert set(full_data.carved) == {"piqa", "social_i_qa", "winogrande"}


def _question(record):
    return record["instruction"], record.get("input") or ""


@pytest.mark.parametrize("train_examples", [0, 15000])
def test_no_test_question_is_trained_on(train_examples):
    """Training and test differ by content, not just by index, for every task."""
    data = load_commonsense(DataConfig(path=str(SHARED), train_examples=train_examples), seed=0)
    trained = {_question(r) for r in data.train}
    for task, records in data.test.items():
        assert not trained & {_question(r) for r in records}, task
        assert len({_question(r) for r in records}) == len(records), task  # no repeats left
    assert len(trained) == len(data.train)


def test_duplicates_dropped_are_counted(full_data):
    """Counts match the files: repeats within each file, then training records that
    equal a test record (ARC-Easy's train file holds two of its test questions)."""
    expected = {}
    test_keys = set()
    for task in PRESENT_TASKS:
        for split in ("test", "train"):
            file = SHARED / task / f"{split}.json"
            if file.is_file():
                keys = [_question(r) for r in json.loads(file.read_text())]
                repeats = len(keys) - len(set(keys))
                if repeats:
                    expected.setdefault(task, {})[split] = repeats
                if split == "test":
                    test_keys |= set(keys)
    for task in PRESENT_TASKS:
        file = SHARED / task / "train.json"
        if file.is_file():
            n = len({_question(r) for r in json.loads(file.read_text())} & test_keys)
            if n:
                expected.setdefault(task, {})["train_in_test"] = n
    assert full_data.duplicates == expected
    assert full_data.duplicates["social_i_qa"] == {"test": 24}
    n_siqa = len(json.loads((SHARED / "social_i_qa" / "test.json").read_text()))
    assert full_data.carved["social_i_qa"] == int((n_siqa - 24) * 0.5 + 0.5)
    assert full_data.carved["social_i_qa"] + len(full_data.test["social_i_qa"]) == n_siqa - 24


# --- answer_choices ----------------------------------------------------------------


@pytest.mark.parametrize("task", PRESENT_TASKS)
def test_answer_choices_contain_answer(full_data, task):
    records = full_data.test[task] + [r for r in full_data.train if r["task"] == task]
    sizes = Counter()
    for r in records:
        choices = answer_choices(task, r)
        assert r["answer"] in choices
        assert r["instruction"].rstrip().endswith("Answer format: " + "/".join(choices))
        sizes[len(choices)] += 1
    if task.startswith("ARC"):
        assert set(sizes) == {3, 4, 5}
    elif task == "openbookqa":
        assert set(sizes) == {4}


def test_answer_choices_fixed_and_errors():
    assert answer_choices("hellaswag", {}) == ["ending1", "ending2", "ending3", "ending4"]
    assert answer_choices("boolq", {}) == ["true", "false"]
    with pytest.raises(ValueError, match="unknown task"):
        answer_choices("mmlu", {})
    with pytest.raises(ValueError, match="AnswerK"):
        answer_choices("ARC-Easy", {"instruction": "no options"})


# --- tokenization ------------------------------------------------------------------


def test_tokenize_masks_prompt(tokenizer, full_data):
    eos = tokenizer.eos_token_id
    for r in (full_data.test["piqa"][0], full_data.test["ARC-Easy"][3],
              {"instruction": "Greet.", "input": "Bob", "output": "Hello Bob"}):
        out = tokenize_example(tokenizer, r, max_length=1024)
        prompt_ids = tokenizer(format_prompt(r), add_special_tokens=False)["input_ids"]
        n = len(prompt_ids)
        assert out["input_ids"][:n] == prompt_ids
        assert out["labels"][:n] == [IGNORE_INDEX] * n
        assert IGNORE_INDEX not in out["labels"][n:]
        assert out["labels"][n:] == out["input_ids"][n:]
        assert out["input_ids"][-1] == eos
        decoded = tokenizer.decode(out["labels"][n:], skip_special_tokens=False)
        assert decoded == r["output"] + tokenizer.eos_token


def test_tokenize_truncates_prompt_from_left(tokenizer, full_data):
    r = full_data.test["social_i_qa"][0]
    response = tokenizer(r["output"], add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
    prompt = tokenizer(format_prompt(r), add_special_tokens=False)["input_ids"]
    max_length = len(response) + 12
    assert len(prompt) > 12
    out = tokenize_example(tokenizer, r, max_length=max_length)
    assert len(out["input_ids"]) == max_length
    assert out["input_ids"] == prompt[-12:] + response
    assert out["labels"] == [IGNORE_INDEX] * 12 + response
    assert tokenizer.decode(out["input_ids"][:12]).endswith("### Response:\n")


def test_tokenize_truncates_long_response(tokenizer):
    r = {"instruction": "Write.", "output": "a very long answer " * 40}
    out = tokenize_example(tokenizer, r, max_length=16)
    response = tokenizer(r["output"], add_special_tokens=False)["input_ids"]
    assert out["input_ids"] == response[:16]
    assert out["labels"] == response[:16]


def test_collate_pads_right(tokenizer, full_data):
    examples = [tokenize_example(tokenizer, r, 256) for r in full_data.test["boolq"][:3]]
    examples.append({"input_ids": [5, 6], "labels": [IGNORE_INDEX, 6]})
    batch = collate(examples, pad_token_id=tokenizer.pad_token_id)
    seq = max(len(e["input_ids"]) for e in examples)
    for key in ("input_ids", "attention_mask", "labels"):
        assert batch[key].shape == (4, seq) and batch[key].dtype == torch.int64
    assert batch["input_ids"][3].tolist() == [5, 6] + [tokenizer.pad_token_id] * (seq - 2)
    assert batch["attention_mask"][3].tolist() == [1, 1] + [0] * (seq - 2)
    assert batch["labels"][3].tolist() == [IGNORE_INDEX, 6] + [IGNORE_INDEX] * (seq - 2)
    for row, e in enumerate(examples):
        assert int(batch["attention_mask"][row].sum()) == len(e["input_ids"])
    with pytest.raises(ValueError):
        collate([], 0)


# --- partitioning ------------------------------------------------------------------


def _labels(per_task=120, tasks=7):
    return [f"task{t}" for t in range(tasks) for _ in range(per_task)]


def _mean_max_share(labels, clients):
    shares = []
    for idx in clients:
        counts = Counter(labels[i] for i in idx)
        shares.append(max(counts.values()) / len(idx))
    return sum(shares) / len(shares)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_partition_covers_each_index_once(partition):
    labels = _labels()
    clients = partition_clients(labels, 8, partition, 0.5, seed=3)
    assert len(clients) == 8
    flat = [i for c in clients for i in c]
    assert sorted(flat) == list(range(len(labels)))
    assert all(c == sorted(c) and c for c in clients)
    assert clients == partition_clients(labels, 8, partition, 0.5, seed=3)
    assert clients != partition_clients(labels, 8, partition, 0.5, seed=4)
    if partition == "iid":
        assert {len(c) for c in clients} == {len(labels) // 8}


def test_dirichlet_small_alpha_is_skewed():
    labels = _labels()
    iid = _mean_max_share(labels, partition_clients(labels, 8, "iid", 0.5, seed=0))
    skewed = _mean_max_share(labels, partition_clients(labels, 8, "dirichlet", 0.1, seed=0))
    assert iid < 0.35
    assert skewed > 0.6 and skewed > iid + 0.3


def test_dirichlet_tiny_data_terminates_without_empty_clients():
    labels = ["a", "a", "b", "c", "c", "c", "d", "e", "e"]
    for seed in range(5):
        clients = partition_clients(labels, 8, "dirichlet", 0.05, seed=seed)
        assert sorted(i for c in clients for i in c) == list(range(len(labels)))
        assert all(clients)


def test_partition_errors():
    with pytest.raises(ValueError, match="fl.num_clients"):
        partition_clients(["a"] * 5, 8, "iid", 0.5, 0)
    with pytest.raises(ValueError, match="data.partition"):
        partition_clients(["a"] * 10, 2, "shards", 0.5, 0)


# --- budgets -----------------------------------------------------------------------


def test_assign_budgets_counts():
    uniform = assign_budgets(8, LEVELS, "uniform", seed=0)
    assert Counter(uniform) == {b: 2 for b in LEVELS}
    long_tail = assign_budgets(8, LEVELS, "long_tail", seed=0)
    assert Counter(long_tail)[0.125] == 6 and len(long_tail) == 8
    assert set(long_tail) - {0.125} <= set(LEVELS[1:])
    reverse = assign_budgets(8, LEVELS, "reverse_long_tail", seed=0)
    assert Counter(reverse)[1.0] == 6 and len(reverse) == 8
    assert set(reverse) - {1.0} <= set(LEVELS[:-1])
    big = assign_budgets(40, LEVELS, "long_tail", seed=1)
    assert Counter(big) == {0.125: 30, 0.25: 4, 0.5: 3, 1.0: 3}
    assert assign_budgets(8, LEVELS, "long_tail", 7) == assign_budgets(8, LEVELS, "long_tail", 7)
    assert assign_budgets(3, [0.5], "reverse_long_tail", 0) == [0.5, 0.5, 0.5]


def test_assign_budgets_unknown_pattern():
    with pytest.raises(ValueError, match="fl.budget_pattern"):
        assign_budgets(8, LEVELS, "pareto", 0)


def test_top_k_for_budget():
    assert [top_k_for_budget(b, 8) for b in LEVELS] == [1, 2, 4, 8]
    assert top_k_for_budget(0.1, 8) == 1  # floor(0.8) = 0 -> clamped to k_min
    assert top_k_for_budget(0.25, 8, k_min=3) == 3
    assert top_k_for_budget(0.3, 64) == 19
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="fl.budgets"):
            top_k_for_budget(bad, 8)
    with pytest.raises(ValueError, match="k_min"):
        top_k_for_budget(0.5, 8, k_min=9)
