"""Any instruction data (data.name=instruction): loading, answer types, generative metrics,
partitioning, malformed files, and a round over a folder with all four answer types."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_rounds

from ubsmoe.config import DataConfig, load_config
from ubsmoe.data.instruction import detect_answer_type, load_instruction, parse_number
from ubsmoe.data.partition import partition_clients, partition_labels
from ubsmoe.errors import ConfigError
from ubsmoe.eval.instruction import (
    BertScore,
    extract_letter,
    extract_number,
    label_choices,
    response_prefix,
    rouge_l,
)

CONFIGS = Path(__file__).resolve().parents[2] / "src" / "ubsmoe" / "configs"
WORDS = ["the", "a", "cat", "sat", "on", "mat", "dog", "ran", "fast", "answer", "is", "blue", "sky", "red", "green", "tree", "river", "stone", "water", "fire", "light", "dark", "bird", "fish", "sun", "moon"]


# ----- hand-made data ---------------------------------------------------------------------
def _write(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")


COLOURS = {"sky": "blue", "grass": "green", "blood": "red", "snow": "white", "coal": "black",
           "sun": "yellow"}


def _label_records():
    """Yes/no facts answered true/false, in the commonsense response format."""
    out = []
    for i, (thing, colour) in enumerate(COLOURS.items()):
        for j, guess in enumerate(COLOURS.values()):
            ans = "true" if guess == colour else "false"
            out.append({"instruction": f"Is the {thing} {guess}? Answer format: true/false",
                        "input": "", "output": f"the correct answer is {ans}", "answer": ans,
                        "category": "facts" if (i + j) % 2 else "colours"})
    return out  # 36 records


def _letter_records(offset=0):
    out = []
    for i in range(24):
        n = i + offset
        options = [n + 1, n + 2, n + 3, n + 4]
        letter = "ABCD"[n % 4]
        out.append({"instruction": f"Which option equals {options[n % 4]}? (A) {options[0]} (B) "
                                   f"{options[1]} (C) {options[2]} (D) {options[3]}",
                    "output": f"the answer is {letter}", "answer": letter,
                    "category": "math" if i % 3 else "reading"})
    return out


def _numeric_records():
    return [{"instruction": f"What is {a} plus {b}?", "input": "", "output": str(a + b),
             "category": "math" if a % 2 else "reading"}
            for a in range(1, 7) for b in (3, 5, 8, 13, 21)]  # 30 records


def _text_records():
    out = []
    for i, (thing, colour) in enumerate(COLOURS.items()):
        for k in range(5):
            out.append({"instruction": f"Describe the {thing} in a sentence ({k}).",
                        "input": f"Note {k}: keep it short." if k % 2 else "",
                        "output": f"The {thing} is {colour} and it looks {'bright' if k % 2 else 'calm'}.",
                        "category": "facts" if (i + k) % 2 else "colours"})
    return out  # 30 records


def make_folder(root: Path) -> Path:
    """label (test only, carved), letter (train + test), numeric (test only), text (test only)."""
    _write(root / "yesno" / "test.json", _label_records())
    _write(root / "choose" / "train.json", _letter_records(100))
    _write(root / "choose" / "test.json", _letter_records(0))
    _write(root / "arith" / "test.json", _numeric_records())
    _write(root / "describe" / "test.json", _text_records())
    return root


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path / "data")


def tiny_bert(path: Path) -> Path:
    """A tiny random BERT with a word-level vocabulary, saved for bert-score (num_layers=2)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *COLOURS, *COLOURS.values(), "."]
    (path / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)), encoding="utf-8")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt"), model_max_length=128).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(dict.fromkeys(vocab)), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    return path


# ----- metrics -------------------------------------------------------------------------------
def test_rouge_l_on_hand_made_pairs():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == [1.0]
    # LCS("the cat sat on the mat", "the cat sat") = 3 tokens: P = 3/6, R = 3/3, F = 2/3
    assert rouge_l(["the cat sat on the mat"], ["the cat sat"])[0] == pytest.approx(2 / 3)
    assert rouge_l(["blue sky"], ["red tree"]) == [0.0]
    with pytest.raises(ValueError, match="references"):
        rouge_l(["a"], [])


def test_our_bertscore_equals_bert_score_with_a_tiny_local_model(tmp_path):
    import bert_score

    model = tiny_bert(tmp_path / "bert")
    cands = ["the cat sat on the mat", "blue sky", "the sun is yellow ."]
    refs = ["the cat sat on the mat", "a dog ran fast", "the moon is dark ."]
    ours = BertScore(str(model), num_layers=2)
    assert ours.reason is None
    f1 = ours.f1(cands, refs)
    _, _, ref_f = bert_score.score(cands, refs, model_type=str(model), num_layers=2)
    assert f1 == pytest.approx(ref_f.tolist(), abs=1e-6)
    assert f1[0] == pytest.approx(1.0, abs=1e-5)  # identical pair
    assert f1[1] < 0.99  # a different pair scores below 1
    # an empty side scores 0 (bert-score's rule); the other pairs are unchanged by it
    assert ours.f1(["", *cands], ["x", *refs]) == pytest.approx([0.0, *f1], abs=1e-6)
    # another layer reads other hidden states: a different score
    assert BertScore(str(model), num_layers=1).f1(cands[1:], refs[1:]) != pytest.approx(f1[1:], abs=1e-6)


def test_bertscore_without_a_loadable_model_is_skipped_with_a_reason(tmp_path):
    missing = BertScore(str(tmp_path / "no-model"), num_layers=2)
    assert missing.scorer is None and "could not be loaded" in missing.reason
    with pytest.raises(RuntimeError, match="unavailable"):
        missing.f1(["a"], ["a"])
    assert "empty" in BertScore("", 0).reason


def test_numeric_and_letter_extraction():
    assert extract_number("so 3 apples and then 1,204.5 total") == 1204.5  # last number, commas dropped
    assert extract_number("-7") == -7.0
    assert extract_number("no digits") is None
    assert parse_number(" 1,000 ") == 1000.0 and parse_number("7/2") is None and parse_number("nan") is None
    assert extract_letter("the answer is (C), not D") == "C"
    assert extract_letter("A cat. B") == "A"  # a standalone capital counts, as documented
    assert extract_letter("Apple and Banana") is None
    assert extract_letter("b") is None


def test_answer_type_detection_rule():
    def recs(*answers):
        return [{"instruction": "q", "output": a} for a in answers]

    assert detect_answer_type("boolq", recs("anything")) == "label"  # commonsense task name
    assert detect_answer_type("t", recs("true", "false", "answer3")) == "label"
    assert detect_answer_type("t", recs("A", "(B)", "C.", "E")) == "letter"
    assert detect_answer_type("t", recs("12", "-3.5", "1,000")) == "numeric"
    assert detect_answer_type("t", recs("12", "twelve")) == "text"
    assert detect_answer_type("t", recs("F")) == "text"  # only A-E are option letters
    # an explicit "answer" field wins over the output text
    assert detect_answer_type("t", [{"instruction": "q", "output": "the answer is B", "answer": "B"}]) == "letter"
    assert detect_answer_type("t", []) == "text"


def test_label_choices_and_response_prefix():
    assert label_choices("t", ["answer3", "answer1"]) == ["answer1", "answer2", "answer3"]
    assert label_choices("t", ["true"]) == ["false", "true"]
    assert response_prefix(_label_records()) == "the correct answer is "
    assert response_prefix([{"output": "7"}, {"output": "x 8", "answer": "8"}]) == ""


# ----- loading -------------------------------------------------------------------------------
def _cfg(path, **kw):
    return DataConfig(name="instruction", path=str(path), train_examples=0, **kw)


def test_folder_tasks_splits_and_answer_types(folder):
    data = load_instruction(_cfg(folder), seed=0)
    assert sorted(data.test) == ["arith", "choose", "describe", "yesno"]
    assert data.answer_types == {"arith": "numeric", "choose": "letter", "describe": "text", "yesno": "label"}
    # test-only tasks get the commonsense loader's carved split (half, disjoint); choose has train.json
    assert data.carved == {"yesno": 18, "arith": 15, "describe": 15}
    assert len(data.test["choose"]) == 24 and sum(r["task"] == "choose" for r in data.train) == 24
    train_keys = {(r["instruction"], r.get("input") or "") for r in data.train}
    assert not train_keys & {(r["instruction"], r.get("input") or "") for t in data.test.values() for r in t}
    # same seed, same carving; another seed, another
    assert load_instruction(_cfg(folder), seed=0).train == data.train
    assert load_instruction(_cfg(folder), seed=1).train != data.train
    # data.tasks filters; data.answer_types overrides the detected type
    only = load_instruction(_cfg(folder, tasks=["arith", "nope"], answer_types={"arith": "text"}), 0)
    assert list(only.test) == ["arith"] and only.skipped == {"nope": f"no data for task 'nope' in {folder}"}
    assert only.answer_types == {"arith": "text"}


def test_combined_train_file_reads_the_task_field(tmp_path):
    root = tmp_path / "combined"
    _write(root / "arith" / "test.json", _numeric_records()[:10])
    extra = [{**r, "kind": "arith"} for r in _numeric_records()[10:20]] + \
            [{**r, "kind": "describe"} for r in _text_records()[:6]] + _text_records()[6:9]
    _write(root / "train.json", extra)
    data = load_instruction(_cfg(root, task_field="kind"), 0)
    counts = {t: sum(r["task"] == t for r in data.train) for t in ("arith", "describe", "combined")}
    # arith has combined-file training records, so its test file is not carved
    assert counts == {"arith": 10, "describe": 6, "combined": 3} and data.carved == {}
    assert len(data.test["arith"]) == 10 and data.partition_by == "task"


def test_hf_dataset_with_a_column_mapping(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    rows = [{"q": r["instruction"], "ctx": r.get("input", ""), "resp": r["output"], "cat": r["category"]}
            for r in _text_records()]
    (src / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    cfg = DataConfig(name="instruction", hf_dataset=str(src), train_examples=0, carved_train_fraction=0.8,
                     columns={"instruction": "q", "input": "ctx", "output": "resp", "task": "cat"})
    data = load_instruction(cfg, 0)
    assert sorted(data.test) == ["colours", "facts"] and data.answer_types == {"colours": "text", "facts": "text"}
    assert len(data.train) + sum(map(len, data.test.values())) == 30 and data.carved == {"colours": 12, "facts": 12}
    assert data.train[0]["output"].startswith("The ")
    # without a task column the records form one task and carry no task: IID
    no_task = load_instruction(replace(cfg, columns={"instruction": "q", "output": "resp"}), 0)
    assert list(no_task.test) == ["hf"] and no_task.partition_by == "iid"
    with pytest.raises(ConfigError, match=r"data.columns: \['nope'\]"):
        load_instruction(replace(cfg, columns={"instruction": "nope", "output": "resp"}), 0)


def test_hf_dataset_offline_is_one_line_naming_the_dataset(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(name="instruction", hf_dataset="databricks/databricks-dolly-15k",
                     columns={"instruction": "instruction", "output": "response"})
    with pytest.raises(ConfigError) as e:
        load_instruction(cfg, 0)
    assert "\n" not in str(e.value) and "data.hf_dataset: cannot load 'databricks/databricks-dolly-15k'" in str(e.value)


@pytest.mark.parametrize(("write", "message"), [
    (lambda d: (d / "t").mkdir() or (d / "t" / "test.json").write_text("[{", encoding="utf-8"),
     r"t/test.json' is not valid JSON"),
    (lambda d: _write(d / "t" / "train.json", [{"instruction": "q", "input": ""}]),
     r"t/train.json': record 0 has no string 'output'"),
    (lambda d: _write(d / "t" / "test.json", {"instruction": "q", "output": "a"}),
     r"t/test.json': expected a JSON list of records, got dict"),
    (lambda d: _write(d / "train.json", [{"instruction": "q", "output": "a"}, "x"]),
     r"train.json': record 1 is not an object"),
    (lambda d: None, r"holds no task folder with train.json or test.json"),
])
def test_malformed_data_is_a_one_line_error_naming_the_file(tmp_path, write, message):
    root = tmp_path / "bad"
    root.mkdir()
    write(root)
    with pytest.raises(ConfigError, match=message) as e:
        load_instruction(_cfg(root), 0)
    assert "\n" not in str(e.value) and str(e.value).startswith("data.path: ")


def test_instruction_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="data.path: required with data.name=instruction"):
        load_instruction(DataConfig(name="instruction"), 0)
    for override, field in [("data.name=squad", "data.name"), ("data.answer_types={t: prose}", "data.answer_types"),
                            ("data.columns={question: q}", "data.columns"),
                            ("eval.text_metric=bleu", "eval.text_metric")]:
        with pytest.raises(ConfigError, match=field):
            load_config(overrides=["data.name=instruction", override])
    with pytest.raises(ConfigError, match="data.hf_dataset"):  # commonsense has no HF source
        load_config(overrides=["data.hf_dataset=x"])


# ----- partitioning ------------------------------------------------------------------------
def _skew(clients, labels):
    """Mean over clients of the largest share one label value has in the client's data."""
    return float(np.mean([max(np.unique([labels[i] for i in c], return_counts=True)[1]) / len(c)
                          for c in clients]))


def test_dirichlet_over_a_category_field_skews_clients_by_that_field(folder):
    data = load_instruction(_cfg(folder), 0)
    categories, by = partition_labels(data.train, "category")
    assert by == "category" and set(categories) == {"facts", "colours", "math", "reading"}
    tasks, by_task = partition_labels(data.train, "")
    assert by_task == "task"
    over_cat = partition_clients(categories, 4, "dirichlet", 0.1, 0)
    over_task = partition_clients(tasks, 4, "dirichlet", 0.1, 0)
    assert over_cat != over_task
    # partitioning over a field concentrates that field per client
    assert _skew(over_cat, categories) > _skew(over_task, categories)
    assert _skew(over_task, tasks) > _skew(over_cat, tasks)
    with pytest.raises(ValueError, match="data.partition_field: 'topic' is missing from"):
        partition_labels(data.train, "topic")


def test_records_with_neither_task_nor_category_are_split_iid(tmp_path):
    root = tmp_path / "flat"
    _write(root / "train.json", _text_records())  # no task field, no sub-folders
    data = load_instruction(_cfg(root), 0)
    assert data.partition_by == "iid" and set(data.answer_types) == {"flat"}
    labels, by = partition_labels(data.train, "", data.partition_by)
    assert by == "iid" and set(labels) == {""}


# ----- one federated round over all four answer types -------------------------------------
SMALL = [
    "data.name=instruction", "data.train_examples=0", "data.max_length=96",
    "fl.num_clients=2", "fl.rounds=1", "fl.budgets=[0.125,1.0]",
    "train.batch_size=4", "train.max_local_steps=2",
    "eval.examples_per_task=4", "eval.max_new_tokens=6", "eval.batch_size=8",
    "eval.bertscore_num_layers=2", "eval.pg_probe_examples=0", "model.tiny.vocab_size=400",
]


def _round(cfg, run_dir, setup=None):
    return run_rounds(cfg, run_dir, setup, rounds=1, finish=True)


@pytest.mark.slow
def test_one_round_over_an_instruction_folder_writes_each_tasks_metric_per_budget(folder, tmp_path):
    bert = tiny_bert(tmp_path / "bert")
    cfg = load_config(overrides=[*SMALL, f"data.path={folder}", f"eval.bertscore_model={bert}",
                                 f"model.tokenizer_cache={tmp_path / 'cache'}"])
    server, summary = _round(cfg, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["accuracy"] == summary["accuracy"]
    data = summary["data"]
    assert data["answer_types"] == {"arith": "numeric", "choose": "letter", "describe": "text", "yesno": "label"}
    assert data["task_metric"] == {"arith": "accuracy", "choose": "accuracy", "describe": "rouge_l",
                                   "yesno": "accuracy"}
    assert data["bertscore"] == {"model": str(bert), "num_layers": 2} and data["partition_by"] == "task"
    gen = [r for r in summary["accuracy"] if r["protocol"] == "generation"]
    ll = [r for r in summary["accuracy"] if r["protocol"] == "loglik"]
    assert [(r["budget"], r["top_k"]) for r in gen] == [(0.125, 1), (1.0, 8)] == [(r["budget"], r["top_k"]) for r in ll]
    for row in gen:
        assert set(row["per_task"]) == {"arith", "choose", "describe", "yesno"}
        assert row["per_task_metric"] == data["task_metric"]
        text = row["per_task_metrics"]["describe"]
        assert set(text) == {"rouge_l", "bertscore_f1"} and 0.0 <= text["rouge_l"] <= 1.0
        assert 0.0 < text["bertscore_f1"] <= 1.0 + 1e-6
        assert row["per_task"]["describe"] == text["rouge_l"]
        assert all(0.0 <= v <= 1.0 for t, v in row["per_task"].items() if t != "describe")
    for row in ll:  # only tasks with choices are scored by log-likelihood
        assert set(row["per_task"]) == {"choose", "yesno"}
    # the terminal table shows each task's metric and "-" where a protocol does not apply
    from rich.console import Console

    from ubsmoe.report import accuracy_table

    console = Console(width=250, record=True)
    console.print(accuracy_table(summary, "generation"))
    assert "rouge_l" in console.export_text()

    # eval.text_metric=bertscore_f1 moves the text task's reported value to BERTScore
    bs_cfg = replace(cfg, eval=replace(cfg.eval, text_metric="bertscore_f1"))
    from ubsmoe.fl.server import Server

    other = Server(bs_cfg, tmp_path / "run_bs", server.setup)
    other.state.adapters = server.state.adapters
    rows = [r for r in other.evaluate(1) if r["protocol"] == "generation"]
    for row, before in zip(rows, gen):
        assert row["per_task_metric"]["describe"] == "bertscore_f1"
        assert row["per_task"]["describe"] == pytest.approx(before["per_task_metrics"]["describe"]["bertscore_f1"])
        assert row["per_task"]["describe"] != pytest.approx(before["per_task"]["describe"])


def test_a_tiny_generative_run_without_a_bertscore_model_says_why(tmp_path):
    root = tmp_path / "gen"
    _write(root / "describe" / "test.json", _text_records())
    cfg = load_config(overrides=[*SMALL, f"data.path={root}", "eval.protocols=[generation,loglik]",
                                 f"eval.bertscore_model={tmp_path / 'absent'}", "eval.text_metric=bertscore_f1",
                                 f"model.tokenizer_cache={tmp_path / 'cache'}"])
    _, summary = _round(cfg, tmp_path / "run")
    assert "could not be loaded" in summary["data"]["bertscore"]["skipped"]
    assert summary["data"]["task_metric"] == {"describe": "rouge_l"}
    assert [r["protocol"] for r in summary["accuracy"]] == ["generation", "generation"]  # no choices: no loglik
    for row in summary["accuracy"]:
        assert row["per_task_metric"] == {"describe": "rouge_l"}
        assert set(row["per_task_metrics"]["describe"]) == {"rouge_l"}


# ----- shipped configs ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["dolly", "domain_qa"])
def test_shipped_generative_configs_load(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.data.name == "instruction"
    if name == "dolly":
        assert cfg.data.hf_dataset == "databricks/databricks-dolly-15k" and cfg.eval.text_metric == "rouge_l"
        assert cfg.data.columns == {"instruction": "instruction", "input": "context", "output": "response",
                                    "task": "category"}
        assert cfg.data.dirichlet_alpha == 5.0 and cfg.fl.num_clients == 8
    else:
        assert cfg.eval.text_metric == "bertscore_f1" and cfg.data.path


def test_dolly_config_runs_a_round_on_local_data_in_its_format(tmp_path):
    """The dolly config end to end with its column mapping, on a small local stand-in."""
    src = tmp_path / "dolly"
    src.mkdir()
    rows = [{"instruction": r["instruction"], "context": r.get("input", ""), "response": r["output"],
             "category": r["category"]} for r in _text_records()]
    (src / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    small = [o for o in SMALL if not o.startswith(("data.name", "eval.bertscore"))]
    cfg = load_config(CONFIGS / "dolly.yaml", [*small, f"data.hf_dataset={src}", "model.name=tiny",
                                               "model.init=auto", "eval.bertscore_model=",
                                               f"model.tokenizer_cache={tmp_path / 'cache'}"])
    _, summary = _round(cfg, tmp_path / "run")
    assert summary["data"]["task_metric"] == {"colours": "rouge_l", "facts": "rouge_l"}
    assert summary["data"]["bertscore"]["skipped"] == "eval.bertscore_model is empty"
    assert [r["protocol"] for r in summary["accuracy"]] == ["generation"] * 2


def test_a_tiny_table4_cell_runs_a_round_and_reports_bertscore_f1(tmp_path):
    """UB-SMoE Table 4's tiny cell (shipped experiment) over a free-text folder standing in for TeleQuAD."""
    from ubsmoe.experiments import find_cell, load_experiment, resolve_cell

    root = tmp_path / "telequad"
    _write(root / "qa" / "train.json", _text_records())
    _write(root / "qa" / "test.json", _text_records()[:8])
    bert = tiny_bert(tmp_path / "bert")
    exp = load_experiment("table4")
    cell, rest = find_cell(exp, "tiny", ["method=ubsmoe", f"data.path={root}", f"eval.bertscore_model={bert}",
                                         "eval.bertscore_num_layers=2", "fl.num_clients=2", "fl.rounds=1",
                                         "train.max_local_steps=2", "eval.examples_per_task=4",
                                         "eval.max_new_tokens=6", f"model.tokenizer_cache={tmp_path / 'cache'}",
                                         "model.tiny.vocab_size=400", "eval.pg_probe_examples=0"])
    cfg = resolve_cell(exp, cell, rest)
    _, summary = _round(cfg, tmp_path / "run")
    assert summary["data"]["task_metric"] == {"qa": "bertscore_f1"}
    rows = summary["accuracy"]
    assert {r["protocol"] for r in rows} == {"generation"}
    assert [r["budget"] for r in rows] == [0.125, 0.25, 0.5, 1.0]
    for row in rows:
        text = row["per_task_metrics"]["qa"]
        assert row["per_task"]["qa"] == text["bertscore_f1"] and 0.0 < text["bertscore_f1"] <= 1.0 + 1e-6


@pytest.mark.slow
def test_instruction_data_gets_loss_rows(tmp_path):
    """The ``loss`` protocol scores every answer type of instruction data (free text included)."""
    from ubsmoe.eval.loss import LOSS_METRIC

    folder = make_folder(tmp_path / "data")
    cfg = load_config(overrides=[*SMALL, f"data.path={folder}", "eval.protocols=[loss]",
                                 f"model.tokenizer_cache={tmp_path / 'cache'}"])
    _, summary = _round(cfg, tmp_path / "run")
    rows = summary["accuracy"]
    assert [(r["protocol"], r["top_k"]) for r in rows] == [("loss", 1), ("loss", 8)]
    for r in rows:  # every answer type, free text included, has a reference response to score
        assert set(r["per_task"]) == {"arith", "choose", "describe", "yesno"}
        assert r["per_task_metric"] == {t: LOSS_METRIC for t in r["per_task"]}
        assert all(v > 0 for v in r["per_task"].values()) and r["stderr"] > 0
