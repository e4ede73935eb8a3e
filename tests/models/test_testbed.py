"""The quickstart on the testbed base: the default config resolves the shipped base, round-0
evaluation rows and the round 0 -> final table."""

from __future__ import annotations

import json

import pytest
from conftest import SMALL, run_rounds

from ubsmoe.config import load_config
from ubsmoe.config.model import packaged_base_path
from ubsmoe.errors import ConfigError
from ubsmoe.report import change_table


@pytest.mark.real_default
def test_the_embedded_default_fine_tunes_the_shipped_testbed_base():
    cfg = load_config()
    base = packaged_base_path()
    assert cfg.model.name == str(base) and cfg.model.resolved_init == "pretrained"
    assert (base / "config.json").is_file() and (base / "model.safetensors").is_file()
    assert (base / "tokenizer.json").is_file()
    assert json.loads((base / "config.json").read_text())["num_experts"] == 64
    assert {"loss", "loglik", "generation"} <= set(cfg.eval.protocols) and cfg.eval.before_training
    # the alias works from any config, and the random preset stays reachable
    assert load_config(overrides=["model.name=testbed"]).model.name == str(base)
    tiny = load_config(overrides=["model.name=tiny"]).model
    assert tiny.name == "tiny" and tiny.resolved_init == "random"


def test_before_training_is_off_unless_set_and_validated():
    assert load_config(overrides=SMALL).eval.before_training is False
    with pytest.raises(ConfigError, match="eval.before_training"):
        load_config(overrides=["eval.before_training=maybe"])


def _rows(run_dir, round_idx):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("type") == "eval" and r["round"] == round_idx]


def test_round_zero_rows_for_every_level_and_protocol_and_the_change_table(tmp_path):
    over = [*SMALL, "fl.rounds=1", "eval.protocols=[loglik,loss]", "eval.before_training=true",
            "train.lr=1e-2"]
    cfg = load_config(overrides=over)
    _, summary = run_rounds(cfg, tmp_path / "on", finish=True)
    zero = _rows(tmp_path / "on", 0)
    levels = {(r["budget"], r["top_k"]) for r in zero}
    assert levels == {(0.125, 1), (0.25, 2), (0.5, 4), (1.0, 8)}
    assert sorted(r["protocol"] for r in zero) == sorted(["loglik", "loss"] * 4)
    assert all("utilization" in r for r in zero)
    initial = summary["initial_accuracy"]
    assert len(initial) == 8 and {r["round"] for r in initial} == {0}
    final = {(r["protocol"], r["budget"]): r["average"] for r in summary["accuracy"]}
    before = {(r["protocol"], r["budget"]): r["average"] for r in initial}
    assert final.keys() == before.keys()
    # fine-tuning moved the held-out loss at every level (round 0 is the untrained adapters)
    assert all(final[k] != before[k] for k in final if k[0] == "loss")
    table = change_table(summary)
    assert table is not None and table.row_count == 8
    # off: no round-0 rows, no initial_accuracy, no change table
    off = load_config(overrides=[*SMALL, "fl.rounds=1", "eval.protocols=[loss]"])
    _, summary_off = run_rounds(off, tmp_path / "off", finish=True)
    assert _rows(tmp_path / "off", 0) == [] and "initial_accuracy" not in summary_off
    assert change_table(summary_off) is None
