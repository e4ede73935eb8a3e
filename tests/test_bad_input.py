"""Bad input to ``ubsmoe run``: one line naming the field or file, exit 2, nothing left behind.

Every case the "Bad input" table of docs/failures.md lists is one row of ``CASES``; each runs the real
command (typer's CliRunner, in process) and checks the whole contract: exactly one
non-empty output line, starting ``error:`` and containing the expected text, exit code
2, and no run folder (or, for an existing run, its files untouched).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import DATA
from typer.testing import CliRunner

from ubsmoe.cli import app

QUICK = ["fl.rounds=1", "train.max_local_steps=1", "eval.examples_per_task=2", "data.tasks=[boolq]"]


def _corrupt_data(root: Path) -> Path:
    (root / "boolq").mkdir(parents=True)
    (root / "boolq" / "train.json").write_text("{not json", encoding="utf-8")
    (root / "boolq" / "test.json").write_text((DATA / "boolq" / "test.json").read_text(encoding="utf-8"))
    return root


def _fieldless_data(root: Path) -> Path:
    (root / "boolq").mkdir(parents=True)
    (root / "boolq" / "train.json").write_text(json.dumps([{"instruction": "q"}]), encoding="utf-8")
    (root / "boolq" / "test.json").write_text((DATA / "boolq" / "test.json").read_text(encoding="utf-8"))
    return root


# (case id, arguments after `ubsmoe run --out OUT`; {tmp} is the test's folder, expected text)
CASES = [
    ("unknown key", ["fl.foo=1"], "fl.foo: unknown key (allowed: aggregation,"),
    ("unknown section", ["optim.lr=1"], "optim: unknown key (allowed: data, eval, fl, log, method, model, privacy, train)"),
    ("wrong type", ["fl.rounds=abc"], "fl.rounds: got 'abc', expected an integer"),
    ("unknown method", ["method=fedsgd"], "method: got 'fedsgd', expected one of"),
    ("budget 0", ["fl.budgets=[0.0,1.0]"], ("fl.budgets: got [0.0, 1.0], expected a non-empty list of "
                                            "numbers in (0, 1]")),
    ("budget above 1", ["fl.budgets=[0.5,2.0]"], "fl.budgets: got [0.5, 2.0]"),
    ("K above the experts", ["model.tiny.num_experts_per_tok=99"],
     "model.tiny.num_experts_per_tok: got 99, expected an integer in [1, model.tiny.num_experts=64]"),
    ("k_min above K_max", [*QUICK, "model.k_min=99"], "model.k_min: got 99, expected an integer in [1, 8]"),
    ("robust rule for a rank method", ["method=flexlora", "fl.aggregation=median"],
     "fl.aggregation: got 'median', method flexlora supports only mean"),
    ("rank 0", ["model.lora_rank=0"], "model.lora_rank: got 0, expected an integer >= 1"),
    ("LoRA experts on a sparse-MoE model", ["model.lora_experts=4"],
     ("model.lora_experts: got 4, expected 0 for the sparse-MoE model tiny (olmoe); LoRA experts are for "
     "dense backbones")),
    ("negative LoRA experts", ["model.name=tiny-dense", "model.lora_experts=-1"],
     "model.lora_experts: got -1, expected an integer >= 0 (0: off)"),
    ("LoRA-expert K above M", ["model.name=tiny-dense", "model.lora_experts=4", "model.lora_experts_top_k=5"],
     "model.lora_experts_top_k: got 5, expected an integer in [1, model.lora_experts=4]"),
    ("negative rank", ["model.lora_rank=-4"], "model.lora_rank: got -4, expected an integer >= 1"),
    ("missing data folder", [*QUICK, "data.path={tmp}/nowhere"], "data.path: '{tmp}/nowhere' does not exist"),
    ("data file not JSON", [*QUICK, "data.path={tmp}/corrupt"],
     "data.path: cannot read '{tmp}/corrupt/boolq/train.json' (Expecting property name"),
    ("records without fields", [*QUICK, "data.path={tmp}/fieldless"],
     ("data.path: '{tmp}/fieldless/boolq/train.json' is not a JSON list of records with 'instruction' "
     "and 'output'")),
    ("more clients than examples", [*QUICK, "fl.num_clients=64", "data.train_examples=16"],
     ("fl.num_clients: 64 clients but only 16 training records; lower fl.num_clients or raise "
     "data.train_examples")),
    ("more CPUs per client than the machine has", [*QUICK, "fl.client_cpus=100000"],
     "fl.client_cpus: got 100000, expected at most "),
    ("model not loadable offline", [*QUICK, "model.name=allenai/OLMoE-1B-7B-0924", "--force"],
     "model.name: could not load the tokenizer of 'allenai/OLMoE-1B-7B-0924'"),
    ("no config for a hub name offline", [*QUICK, "model.name=nobody/no-model", "model.init=random"],
     "model.name: no config for 'nobody/no-model'"),
]


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(args, message, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the model rows: as without network, without the retries
    # huggingface_hub reads the variable once, at import: once an earlier test has imported it, only
    # the constant switches it off (else each model row spends 20-50 s on retries in the full suite).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("UBSMOE_CACHE", str(tmp_path / "cache"))
    _corrupt_data(tmp_path / "corrupt")
    _fieldless_data(tmp_path / "fieldless")
    out = tmp_path / "run"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(app, ["run", "--out", str(out), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message.replace("{tmp}", str(tmp_path)) in lines[0], lines[0]
    assert not out.exists()


def _existing_run(run_dir: Path) -> dict[str, bytes]:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "round_0003.pt").write_bytes(b"checkpoint")
    (run_dir / "summary.json").write_text('{"rounds_completed": 3}', encoding="utf-8")
    (run_dir / "metrics.jsonl").write_text('{"type": "train", "round": 3}\n', encoding="utf-8")
    return {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_fresh_run_refuses_a_folder_holding_another_run(tmp_path):
    run_dir = tmp_path / "run"
    before = _existing_run(run_dir)
    result = CliRunner().invoke(app, ["run", "--out", str(run_dir), *QUICK])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == (f"error: --out: {str(run_dir)!r} already holds a run (summary.json, round_0003.pt); "
                        f"continue it with `ubsmoe run --resume {run_dir}` or choose a new --out")
    assert {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(("config_text", "message"), [
    (None, "--resume: '{dir}' has no config.yaml"),
    ("fl: [\n", "config file '{dir}/config.yaml': not valid YAML"),
    ("fl:\n  rounds: many\n", "fl.rounds: got 'many', expected an integer"),
], ids=["no config", "corrupt config", "bad value in config"])
def test_resume_of_a_folder_that_is_not_a_run_is_one_line(config_text, message, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine", encoding="utf-8")
    if config_text is not None:
        (run_dir / "config.yaml").write_text(config_text, encoding="utf-8")
    before = sorted(p.name for p in run_dir.iterdir())
    result = CliRunner().invoke(app, ["run", "--resume", str(run_dir)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert message.replace("{dir}", str(run_dir)) in lines[0], lines[0]
    assert sorted(p.name for p in run_dir.iterdir()) == before  # no log, no checkpoint added
