"""The fleet comparison's pieces (issue 23 part 3): the FLOPs cost model of a simulated fleet
(``fl.step_cost=flops``, ``fl.sim_flops_per_s``), the ``top`` budget pattern and the ``fleet``
experiment's three arms. In process (Server + ClientRuntime); the clock is deterministic."""

from __future__ import annotations

import json

import pytest
from conftest import config_and_setup, run_fleet_rounds

from ubsmoe.config.model import packaged_base_path
from ubsmoe.errors import ConfigError

BASE = ["data.tasks=[boolq,piqa]", "data.train_examples=64", "data.max_length=64", "fl.num_clients=2",
        "fl.rounds=20", "train.batch_size=4", "train.max_local_steps=2", "model.tiny.vocab_size=512",
        "eval.every_rounds=0", "fl.step_cost=flops"]


@pytest.fixture(scope="module")
def setup_for(tmp_path_factory):
    return config_and_setup(tmp_path_factory.mktemp("cache"), BASE)


def test_flops_cost_follows_training_flops_per_token():
    from dataclasses import replace

    from ubsmoe.config import load_config
    from ubsmoe.fl.autobudget import flops_step_cost
    from ubsmoe.metrics.flops import training_flops_per_token
    from ubsmoe.metrics.model_shape import load_model_shape

    cfg = load_config(overrides=[*BASE, "fl.sim_flops_per_s=2e9"])
    cost = flops_step_cost(cfg)
    # The tiny preset has the testbed base's shape (BASE sets a 512-token vocabulary).
    shape = replace(load_model_shape(str(packaged_base_path())), vocab_size=512)
    for k in (1, 2, 4, 8):
        flops = training_flops_per_token(shape, k, 8, 64)["total"]
        assert cost(0, k, 8) == pytest.approx(4 * 64 * flops / 2e9)
    steps = [cost(j, k, 8) for j, k in enumerate((1, 2, 4, 8))]
    assert steps == sorted(steps) and steps[0] < 0.8 * steps[-1]  # K matters, the rest is shared
    assert cost(0, 8, 16) > cost(0, 8, 8)  # a higher rank costs more


@pytest.mark.slow
def test_flops_clock_is_deterministic_and_slows_with_speed(setup_for, tmp_path):
    from ubsmoe.fl.autobudget import flops_step_cost

    cfg, setup = setup_for("fl.budget_pattern=auto", "fl.client_speed=[1,4]", "fl.round_deadline_s=1")
    cost = flops_step_cost(cfg)
    server, records = run_fleet_rounds(cfg, setup, tmp_path / "a", rounds=2)
    _, again = run_fleet_rounds(cfg, setup, tmp_path / "b", rounds=2)
    sims = [[e["sim_s"] for e in rec["clients"]] for rec in records]
    assert sims == [[e["sim_s"] for e in rec["clients"]] for rec in again]  # no wall time enters
    first = {e["id"]: e for e in records[0]["clients"]}
    k = [server.level_top_k()[b] for b in cfg.fl.budgets]
    rank = cfg.model.lora_rank
    calibration = sum(cost(j, kj, rank) for j, kj in enumerate(k))  # calibration_steps=2 per level
    for c, speed in ((0, 1), (1, 4)):  # speed x (the round's steps + the calibration) at level 0
        e = first[c]
        assert e["sim_s"] == pytest.approx(speed * (e["steps"] * cost(0, k[0], rank) + 2 * calibration))
    assert server.budgets[1] < server.budgets[0]  # the 4x client picks a lower level
    # A faster assumed device (more FLOP/s) shortens the clock and lets client 1 step up.
    cfg2, _ = setup_for("fl.budget_pattern=auto", "fl.client_speed=[1,4]", "fl.round_deadline_s=1",
                        f"fl.sim_flops_per_s={4e9!r}")
    server2, records2 = run_fleet_rounds(cfg2, setup, tmp_path / "c", rounds=1)
    assert {e["id"]: e for e in records2[0]["clients"]}[1]["sim_s"] == pytest.approx(first[1]["sim_s"] / 4)
    assert server2.budgets[1] > server.budgets[1]


@pytest.mark.slow
def test_top_pattern_puts_every_client_at_the_highest_level(setup_for, tmp_path):
    from ubsmoe.budgets import assign_budgets

    assert assign_budgets(8, [0.125, 0.25, 0.5, 1.0], "top", seed=3) == [1.0] * 8
    cfg, setup = setup_for("fl.budget_pattern=top", "fl.client_speed=[1,4]")
    server, records = run_fleet_rounds(cfg, setup, tmp_path / "run", rounds=1)
    assert server.budgets == [1.0, 1.0] and server.top_k == [8, 8]
    slow = {e["id"]: e for e in records[0]["clients"]}
    assert records[0]["sim_round_s"] == pytest.approx(slow[1]["sim_s"])  # no cut: the slowest sets it


@pytest.mark.parametrize("override, message", [
    ("fl.step_cost=wall", "fl.step_cost: got 'wall', expected one of measured, flops"),
    ("fl.sim_flops_per_s=0", "fl.sim_flops_per_s: got 0.0, expected FLOP/s > 0"),
])
def test_bad_cost_settings_get_one_line(override, message):
    from ubsmoe.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fleet_experiment_has_the_three_arms():
    from ubsmoe.experiments import load_experiment, resolve_cell

    exp = load_experiment("fleet")
    cfgs = {c.values["arm"]: resolve_cell(exp, c) for c in exp.cells("tiny")}
    assert set(cfgs) == {"fixed", "top", "auto"}
    for cfg in cfgs.values():
        assert cfg.fl.num_clients == 8 and cfg.fl.step_cost == "flops"
        assert [cfg.fl.fleet_speed(c, 1) for c in range(8)] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
        assert cfg.model.name == str(packaged_base_path()) and cfg.eval.protocols == ["loss", "loglik"]
    assert (cfgs["fixed"].fl.budget_pattern, cfgs["fixed"].fl.round_timeout_s) == ("uniform", 20)
    assert (cfgs["top"].fl.budget_pattern, cfgs["top"].fl.round_timeout_s) == ("top", 0)
    assert (cfgs["auto"].fl.budget_pattern, cfgs["auto"].fl.round_deadline_s,
            cfgs["auto"].fl.round_timeout_s) == ("auto", 20, 20)


def test_a_relative_model_folder_is_made_absolute_for_the_superlink(monkeypatch):
    """The ServerApp and ClientApps run elsewhere: a relative local model.name becomes absolute."""
    from pathlib import Path

    from ubsmoe.config import load_config
    from ubsmoe.fl.simulation import absolute_model_path

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    cfg = load_config(overrides=["model.name=src/ubsmoe/testbed_base", "model.init=pretrained"])
    assert absolute_model_path(cfg).model.name == str(root / "src/ubsmoe/testbed_base")
    tiny = load_config()
    assert absolute_model_path(tiny) is tiny  # a preset (or hub) name is left alone


def test_fleet_report_tables_and_figure(tmp_path):
    """The comparison's report reads each arm's train and eval records (a synthetic sweep)."""
    from ubsmoe.config import load_config, save_config
    from ubsmoe.io import append_jsonl
    from ubsmoe.report.fleet import arm_runs, arm_summary, figure, markdown

    cfg = load_config(overrides=["fl.num_clients=2"])
    for arm, levels, failed, sim in (("top", [1.0, 1.0], [], 8.0), ("auto", [1.0, 0.25], [1], 4.0)):
        run = tmp_path / f"ubsmoe-arm={arm}-seed0-0000"
        run.mkdir()
        (run / "cell.json").write_text(json.dumps({"settings": {"method": "ubsmoe", "arm": arm}}))
        save_config(cfg, run / "config.yaml")
        for r in (1, 2):
            append_jsonl(run / "metrics.jsonl", {
                "type": "train", "round": r, "sim_round_s": sim,
                "clients": [{"id": c, "budget": b} for c, b in enumerate(levels) if c not in failed],
                "failed": [{"client": c, "reason": "simulated timeout"} for c in failed]})
        for beta, loss in ((0.125, 0.9), (1.0, 0.5)):
            for protocol, value in (("loss", loss), ("loglik", 0.3)):
                append_jsonl(run / "metrics.jsonl", {"type": "eval", "round": 2, "budget": beta,
                                                     "top_k_mode": "budget", "protocol": protocol,
                                                     "average": value})
    runs = arm_runs(tmp_path)
    assert list(runs) == ["top", "auto"]
    summaries = {arm: arm_summary(d) for arm, d in runs.items()}
    assert summaries["auto"]["sim_total_s"] == 8.0 and summaries["auto"]["rounds"][0]["left_out"] == [1]
    assert summaries["top"]["loss"] == {0.125: 0.9, 1.0: 0.5}
    text = markdown(summaries, 2)
    assert "| auto | 1 | 4.0 | 1 | 1 x |" in text and "| top | 16.0 | 0.9000 / 0.300 | 0.5000 / 0.300 |" in text
    assert figure(summaries, 2, [0.125, 0.25, 0.5, 1.0], tmp_path / "fleet.png").stat().st_size > 0
