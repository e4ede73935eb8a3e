"""`ubsmoe pretrain` (ubsmoe.models.pretrain): determinism, resume, corpus exclusions, the card, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ubsmoe.config.pretrain import PretrainConfig
from ubsmoe.data.commonsense import record_key
from ubsmoe.data.pretrain_corpus import build_corpus
from ubsmoe.data.prompts import format_prompt
from ubsmoe.errors import ConfigError
from ubsmoe.models.pretrain import CHECKPOINT_DIR, batch_indices, pretrain
from ubsmoe.models.pretrain_card import CARD_FILE, REQUIRED_CARD_FIELDS


def run_pretrain(cfg: PretrainConfig, **kw) -> dict:
    """``ubsmoe pretrain``'s two steps: the default corpus, then pretraining on it."""
    return pretrain(cfg, build_corpus(cfg), **kw)


def _record(i: int, task: str, answer: str) -> dict:
    return {"instruction": f"{task} question {i}: is the number {i} even or odd and why is it so? "
                           f"Answer format: true/false",
            "input": "" if i % 3 else f"context {i}",
            "output": f"the correct answer is {answer}", "answer": answer}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Synthetic LLM-Adapters data: boolq and ARC-Easy with train and test, piqa test only.

    boolq's train file holds one record equal (by key) to an ARC-Easy test record and
    one repeat of an earlier boolq train record.
    """
    root = tmp_path_factory.mktemp("data")
    boolq_train = [_record(i, "boolq", "true" if i % 2 else "false") for i in range(60)]
    arc_test = [_record(i, "arc", "answer1") for i in range(500, 510)]
    boolq_train.append(dict(arc_test[3], output="the correct answer is true"))  # a test key
    boolq_train.append(dict(boolq_train[5]))  # a duplicate
    files = {"boolq/train.json": boolq_train,
             "boolq/test.json": [_record(i, "boolq", "true") for i in range(100, 110)],
             "ARC-Easy/train.json": [_record(i, "arc", "answer2") for i in range(200, 230)],
             "ARC-Easy/test.json": arc_test,
             "piqa/test.json": [_record(i, "piqa", "solution1") for i in range(300, 320)]}
    for name, records in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(records), encoding="utf-8")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("UBSMOE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def small(out: Path, data_dir: Path, **kw) -> PretrainConfig:
    """A very small config (8 experts, top-4, hidden 16, 2 threads): seconds."""
    base = {"out": str(out), "steps": 6, "seed": 0, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
            "expert_size": 8, "num_experts": 8, "top_k": 4, "vocab_size": 300, "seq_len": 32,
            "batch_size": 4, "warmup_steps": 2, "threads": 2, "data_path": str(data_dir),
            "heldout_fraction": 0.1, "finetune_seeds": [0], "finetune_examples": 10,
            "checkpoint_every": 2, "eval_batch_size": 8}
    return PretrainConfig(**{**base, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> tuple[Path, dict]:
    """One finished small run (6 steps, seed 0)."""
    import os

    os.environ.setdefault("UBSMOE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    out = tmp_path_factory.mktemp("ref") / "base"
    card = run_pretrain(small(out, data_dir), command="ubsmoe pretrain --out base", progress=False)
    return out, card


@pytest.mark.slow
def test_same_seed_gives_bitwise_equal_weights(tmp_path, data_dir, reference):
    ref_out, ref_card = reference
    card = run_pretrain(small(tmp_path / "again", data_dir), progress=False)
    assert_bitwise_equal(weights(ref_out), weights(tmp_path / "again"))
    assert card["corpus_sha256"] == ref_card["corpus_sha256"]
    assert card["final_train_loss"] == ref_card["final_train_loss"]
    run_pretrain(small(tmp_path / "other", data_dir, seed=1), progress=False)
    other = weights(tmp_path / "other")
    assert any(not torch.equal(other[k], v) for k, v in weights(ref_out).items())


@pytest.mark.slow
def test_two_processes_give_bitwise_equal_weights(tmp_path, data_dir, reference):
    """Two threads in fresh processes: without deterministic mode, CPU kernels differed."""
    import os
    import subprocess
    import sys

    script = ("import sys, json; from ubsmoe.config.pretrain import PretrainConfig; "
              "from ubsmoe.data.pretrain_corpus import build_corpus; from ubsmoe.models.pretrain import pretrain; "
              "cfg = PretrainConfig(**json.loads(sys.argv[1])); pretrain(cfg, build_corpus(cfg), progress=False)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    for name in ("p1", "p2"):
        cfg = {k: v for k, v in vars(small(tmp_path / name, data_dir)).items()}
        subprocess.run([sys.executable, "-c", script, json.dumps(cfg)], check=True, env=env)
    assert_bitwise_equal(weights(tmp_path / "p1"), weights(tmp_path / "p2"))
    assert_bitwise_equal(weights(tmp_path / "p1"), weights(reference[0]))


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, data_dir, reference):
    ref_out, ref_card = reference
    cfg = small(tmp_path / "resumed", data_dir)
    assert run_pretrain(cfg, progress=False, stop_after=3) == {}  # "killed" after step 3 (checkpoint at 3)
    assert (tmp_path / "resumed" / CHECKPOINT_DIR).is_dir()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    card = run_pretrain(cfg, progress=False, resume=True)
    assert_bitwise_equal(weights(ref_out), weights(tmp_path / "resumed"))
    assert card["final_train_loss"] == ref_card["final_train_loss"]
    assert card["heldout_loss"] == ref_card["heldout_loss"]
    assert not (tmp_path / "resumed" / CHECKPOINT_DIR).exists()  # removed once finished


def test_resume_refuses_other_settings_and_missing_checkpoint(tmp_path, data_dir):
    cfg = small(tmp_path / "run", data_dir)
    run_pretrain(cfg, progress=False, stop_after=2)
    with pytest.raises(ConfigError, match="lr differ"):
        run_pretrain(small(tmp_path / "run", data_dir, lr=1e-2), progress=False, resume=True)
    with pytest.raises(ConfigError, match="not empty"):
        run_pretrain(cfg, progress=False)
    with pytest.raises(ConfigError, match="no pretraining checkpoint"):
        run_pretrain(small(tmp_path / "none", data_dir), progress=False, resume=True)


def test_model_card_is_complete(reference):
    out, card = reference
    stored = json.loads((out / CARD_FILE).read_text())
    for name in REQUIRED_CARD_FIELDS:
        assert stored.get(name) not in (None, "", {}), name
    readme = (out / "README.md").read_text()
    assert "ubsmoe pretrain --out base" in readme
    assert card["corpus_sha256"] in readme and card["heldout_sha256"] in readme
    assert f"| steps | {card['steps']} |" in readme
    assert str(card["corpus_tokens"]) in readme and str(card["tokens_trained"]) in readme
    assert set(card["heldout_loss"]) == {"4", "2", "1"} and set(card["k_drop"]) == {"2", "1"}
    for k, v in card["k_drop"].items():
        assert f"| {k} | " in readme and f"{v['mean']:+.4f} +- {v['se']:.4f}" in readme
    assert f"{card['final_train_loss']:.4f}" in readme
    assert f"{card['wall_time_s']:.0f} s" in readme
    assert card["excluded"] == {"duplicate": 1, "test": 1, "finetune": stored["excluded"]["finetune"]}
    assert card["excluded"]["finetune"] > 0


def test_no_test_record_enters_the_corpus(tmp_path, data_dir):
    from ubsmoe.config import DataConfig
    from ubsmoe.data.commonsense import load_commonsense

    cfg = small(tmp_path / "x", data_dir)
    corpus = build_corpus(cfg)
    tests = [r for task in ("boolq", "ARC-Easy", "piqa")
             for r in json.loads((data_dir / task / "test.json").read_text())]
    docs = corpus.train + corpus.heldout
    for r in tests:  # the prompt is a function of the key only
        assert not any(d.startswith(format_prompt(r)) for d in docs), record_key(r)
    finetune = load_commonsense(DataConfig(path=str(data_dir), train_examples=10), 0).train
    for r in finetune:
        assert not any(d.startswith(format_prompt(r)) for d in docs), record_key(r)
    assert corpus.counts["excluded_test"] == 1 and corpus.counts["excluded_duplicate"] == 1
    assert corpus.counts["excluded_finetune"] == len({record_key(r) for r in finetune}
                                                     - {record_key(r) for r in tests})
    assert len(docs) == corpus.counts["records_read"] - sum(
        v for k, v in corpus.counts.items() if k.startswith("excluded"))
    assert not set(corpus.train) & set(corpus.heldout)


def test_text_dir_adds_training_text(tmp_path, data_dir):
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "b.txt").write_text("second file", encoding="utf-8")
    (folder / "a.txt").write_text("first file", encoding="utf-8")
    corpus = build_corpus(small(tmp_path / "x", data_dir, text_dir=str(folder)))
    assert corpus.train[-2:] == ["first file", "second file"] and corpus.counts["text_files"] == 2
    with pytest.raises(ConfigError, match="text_dir"):
        build_corpus(small(tmp_path / "x", data_dir, text_dir=str(tmp_path / "missing")))


def test_batches_depend_on_seed_and_step_only():
    first = [batch_indices(s, 4, 10, 0) for s in range(5)]  # 20 samples = 2 epochs of 10
    assert first == [batch_indices(s, 4, 10, 0) for s in range(5)]
    assert sorted(first[0] + first[1] + first[2][:2]) == list(range(10))  # an epoch is a permutation
    assert first != [batch_indices(s, 4, 10, 1) for s in range(5)]


def test_saved_folder_loads_with_automodel_and_the_project_loader(reference):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ubsmoe.config import ModelConfig
    from ubsmoe.models.build import build_model
    from ubsmoe.models.runtime import set_top_k

    out, _ = reference
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "olmoe" and model.config.num_experts_per_tok == 4
    ids = tokenizer(format_prompt({"instruction": "is it even?", "input": ""}), return_tensors="pt").input_ids
    patched, tok = build_model(ModelConfig(name=str(out), init="pretrained", device="cpu", dtype="float32"))
    assert tok.eos_token_id == tokenizer.eos_token_id and tok.pad_token_id is not None
    set_top_k(patched, 4)
    with torch.no_grad():
        assert torch.allclose(patched(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


def test_bad_settings_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="top_k: got 9"):
        PretrainConfig(out=str(tmp_path), num_experts=8, top_k=9)
    with pytest.raises(ConfigError, match="hidden_size: got 30"):
        PretrainConfig(out=str(tmp_path), hidden_size=30, num_heads=4)
    with pytest.raises(ConfigError, match="heldout_fraction"):
        PretrainConfig(out=str(tmp_path), heldout_fraction=0.0)


def test_shipped_base_is_a_complete_small_checkpoint():
    """The package's testbed base (src/ubsmoe/testbed_base): loadable, <= ~10 MB, its card complete."""
    from transformers import AutoConfig, AutoTokenizer

    import ubsmoe

    base = Path(ubsmoe.__file__).parent / "testbed_base"
    card = json.loads((base / CARD_FILE).read_text())
    for name in REQUIRED_CARD_FIELDS:
        assert card.get(name) not in (None, "", {}), name
    assert card["command"].startswith("ubsmoe pretrain ")
    assert card["command"] in (base / "README.md").read_text()
    assert sum(p.stat().st_size for p in base.iterdir()) <= 10.5e6
    assert not (base / CHECKPOINT_DIR).exists()
    config = AutoConfig.from_pretrained(base)
    assert (config.model_type, config.num_experts, config.num_experts_per_tok) == ("olmoe", 64, 8)
    assert AutoTokenizer.from_pretrained(base).eos_token == "<|endoftext|>"


def test_cli_rejects_bad_settings_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from ubsmoe.cli import app

    result = CliRunner().invoke(app, ["pretrain", "--out", str(tmp_path / "b"), "--layers", "0"])
    assert result.exit_code == 2
    assert "num_layers: got 0, expected an integer >= 1" in result.output
    assert not (tmp_path / "b").exists()
