"""budget=auto clients and the simulated fleet (issue 23): level choice under a deadline and a memory
cap, stepping down and up, the server's checks, bad settings. In process (Server + ClientRuntime),
with an injected cost model so the simulated clock is deterministic on a loaded machine."""

from __future__ import annotations

import json

import pytest
from conftest import config_and_setup, run_fleet_rounds

from ubsmoe.budgets import NodeDeclaration, parse_node_config
from ubsmoe.errors import ConfigError, DeclarationError

BUDGETS = [0.125, 0.25, 0.5, 1.0]
BASE = ["data.tasks=[boolq,piqa]", "data.train_examples=64", "data.max_length=64", "fl.num_clients=2",
        "fl.rounds=20", "train.batch_size=4", "train.max_local_steps=2", "model.tiny.vocab_size=512",
        "eval.every_rounds=0"]


def cost(level, top_k, rank):
    """Seconds per optimizer step at speed 1: 0.1 s per activated expert (K = 1, 2, 4, 8)."""
    return 0.1 * top_k


@pytest.fixture(scope="module")
def setup_for(tmp_path_factory):
    return config_and_setup(tmp_path_factory.mktemp("cache"), BASE)


def run(cfg, setup, run_dir, rounds, step_cost=cost, tamper=None):
    """:func:`conftest.run_fleet_rounds` with the fixed cost model above by default."""
    return run_fleet_rounds(cfg, setup, run_dir, rounds, step_cost, tamper)


def trained(records, client):
    """The budget level ``client`` trained at in each round (None: left out)."""
    return [next((e["budget"] for e in rec["clients"] if e["id"] == client), None) for rec in records]


@pytest.mark.slow
def test_a_4x_slower_client_picks_a_lower_level(setup_for, tmp_path):
    cfg, setup = setup_for("fl.budget_pattern=auto", "fl.client_speed=[1,4]", "fl.round_deadline_s=2")
    server, records = run(cfg, setup, tmp_path / "run", rounds=2)
    # 2 steps; target 2 x 0.9 = 1.8 s. Fast: 2 x 0.8 = 1.6 s at K=8. Slow (4x): 4 x 2 x 0.2 = 1.6 s at K=2.
    assert trained(records, 0) == [0.125, 1.0] and trained(records, 1) == [0.125, 0.25]
    assert server.top_k == [8, 2]
    first = {e["id"]: e for e in records[0]["clients"]}
    assert first[1]["sim_s"] == pytest.approx(4 * (2 * 0.1 + 2 * (0.1 + 0.2 + 0.4 + 0.8)))  # + calibration
    assert first[1]["auto_pred_s.2"] == pytest.approx(4 * 2 * 0.4)
    auto = {row["id"]: row for row in records[0]["auto"]}
    assert auto[1]["next_budget"] == 0.25 and auto[1]["calibrated"]
    assert auto[1]["reason"] == "the next level up does not fit: predicted 3.2 s > target 1.8 s"
    assert auto[0]["reason"].startswith("the top level fits")
    assert records[1]["sim_round_s"] == pytest.approx(1.6)


@pytest.mark.slow
def test_margin_and_deadline_lower_the_level(setup_for, tmp_path):
    levels = {}
    for name, extra in (("base", []), ("margin", ["fl.deadline_margin=0.3"]),
                        ("deadline", ["fl.round_deadline_s=0.5"])):
        cfg, setup = setup_for("fl.budget_pattern=auto", "fl.client_speed=[1,1]", "fl.round_deadline_s=2",
                               *extra)
        server, _ = run(cfg, setup, tmp_path / name, rounds=1)
        levels[name] = server.budgets[1]  # client 1 trains 2 steps a round
    # target 1.8 s: K=8 (1.6 s); 1.4 s: K=4 (0.8 s); 0.45 s: K=2 (0.4 s).
    assert levels == {"base": 1.0, "margin": 0.5, "deadline": 0.25}


def test_a_memory_cap_below_a_levels_peak_excludes_it(setup_for, tmp_path):
    from ubsmoe.metrics.plan import GIB, level_memory

    cfg, setup = setup_for("fl.budget_pattern=auto", "fl.client_speed=[1,1]", "fl.round_deadline_s=100")
    mem = level_memory(cfg)
    assert mem == sorted(mem) and mem[2] < mem[3]
    cap = (mem[2] + mem[3]) / 2 / GIB
    cfg, setup = setup_for("fl.budget_pattern=auto", "fl.client_speed=[1,1]", "fl.round_deadline_s=100",
                           f"fl.client_memory_gib=[0,{cap!r}]")
    server, records = run(cfg, setup, tmp_path / "run", rounds=1)
    assert server.budgets == [1.0, 0.5]  # client 0 has no cap; client 1's excludes the top level
    reason = {row["id"]: row["reason"] for row in records[0]["auto"]}[1]
    assert reason.startswith("the next level up does not fit: planned ") and "GiB > cap" in reason


@pytest.mark.slow
def test_a_slowed_client_steps_down_and_back_up(setup_for, tmp_path):
    cfg, setup = setup_for("fl.budget_pattern=auto", "fl.client_speed=[1,1/1/4/4/1]", "fl.round_deadline_s=2")
    _, records = run(cfg, setup, tmp_path / "run", rounds=6)
    # Slowed 4x in rounds 3-4: round 3 misses its prediction (6.4 s vs 1.6 s), re-measures and reports
    # K=2, used from round 4; round 5 is fast again (0.4 s vs 1.6 s): back to the top level in round 6.
    assert trained(records, 1) == [0.125, 1.0, 1.0, 0.25, 0.25, 1.0]
    assert trained(records, 0) == [0.125] + [1.0] * 5
    calibrated = [{row["id"]: row["calibrated"] for row in rec["auto"]}[1] for rec in records]
    assert calibrated == [True, False, True, False, True, False]


@pytest.mark.slow
def test_a_large_remeasure_fraction_keeps_a_slowed_client_up(setup_for, tmp_path):
    cfg, setup = setup_for("fl.budget_pattern=auto", "fl.client_speed=[1,1/1/4/4/1]", "fl.round_deadline_s=2",
                           "fl.remeasure_fraction=5")
    _, records = run(cfg, setup, tmp_path / "run", rounds=4)
    assert trained(records, 1) == [0.125, 1.0, 1.0, 1.0]  # a 4x miss is within 500%: no re-measure


def test_fixed_levels_are_charged_and_cut_on_the_simulated_clock(setup_for, tmp_path):
    cfg, setup = setup_for("fl.client_speed=linear:1:8", "fl.round_timeout_s=3")
    server, records = run(cfg, setup, tmp_path / "run", rounds=1)
    level = server.budgets  # uniform pattern: two levels
    sims = {c: 2 * 0.1 * server.top_k[c] * (1 + 7 * c) for c in range(2)}
    assert set(level) == {0.125, 0.25}
    failed = {f["client"]: f["reason"] for f in records[0]["failed"]}
    for c, sim in sims.items():
        if sim > 3:
            assert failed[c] == f"simulated timeout: {sim:.3g} s > fl.round_timeout_s=3 s"
        else:
            assert c not in failed
    assert failed  # client 1 (8x) misses the 3 s cut
    assert records[0]["sim_round_s"] == 3.0


def test_a_level_outside_the_configured_ones_is_rejected(setup_for, tmp_path):
    cfg, setup = setup_for("fl.budget_pattern=auto", "fl.client_speed=[1,1]", "fl.round_deadline_s=2")

    def tamper(u):
        if u.client_id == 1:
            u.metrics["auto_budget"] = 0.3
        return u
    server, records = run(cfg, setup, tmp_path / "run", rounds=1, tamper=tamper)
    assert records[0]["failed"] == [{"client": 1, "reason": "rejected: reported budget level 0.3 is not one "
                                                            "of fl.budgets [0.125, 0.25, 0.5, 1]"}]
    assert server.budgets == [1.0, 0.125]  # client 1 keeps its level


def test_a_client_that_is_not_auto_cannot_report_a_level(setup_for, tmp_path):
    cfg, setup = setup_for("fl.client_speed=[1,1]")

    def tamper(u):
        if u.client_id == 1:
            u.metrics["auto_budget"] = 1.0
        return u
    server, records = run(cfg, setup, tmp_path / "run", rounds=1, tamper=tamper)
    assert records[0]["failed"] == [{"client": 1, "reason": (
        "rejected: client 1 reports budget level 1 but does not choose its own (neither budget=auto nor "
        "fl.budget_pattern=auto)")}]
    assert server.budgets[1] != 1.0


def test_rank_methods_pool_measured_step_times_and_choose_by_memory(setup_for, tmp_path):
    """Real timing (no cost model): HetLoRA's levels share K, so times pool and memory decides."""
    from ubsmoe.fl.autobudget import fleet_round
    from ubsmoe.fl.client_runtime import ClientRuntime
    from ubsmoe.fl.server import Server
    from ubsmoe.metrics.plan import GIB, level_memory

    cfg, setup = setup_for("method=hetlora", "fl.budget_pattern=auto", "fl.round_deadline_s=1000")
    mem = level_memory(cfg)
    runtime = ClientRuntime(cfg, setup)
    task = Server(cfg, tmp_path / "run", setup).client_task(0, 1)
    update, state = fleet_round(runtime, task, None, auto=True, cap_bytes=int((mem[1] + mem[2]) / 2))
    assert len(set(state.step_s)) == 1 and state.step_s[0] > 0
    assert state.level == 1 and update.metrics["auto_budget"] == 0.25
    assert update.metrics["auto_mem_gib.2"] == pytest.approx(mem[2] / GIB)


def test_budget_auto_declarations(setup_for, tmp_path):
    from ubsmoe.fl.server import Server

    d = parse_node_config({"partition-id": 1, "budget": "auto", "memory-gib": 2})
    assert d.auto_budget and d.budget is None and d.memory_gib == 2.0
    assert (d.budget_key, d.budget_value) == ("budget", "auto")
    assert NodeDeclaration.from_dict(d.to_dict()) == d
    cfg, setup = setup_for()
    server = Server(cfg, tmp_path / "run", setup)
    logged = server.declare_nodes({1: d}, {1: 7})
    assert logged[1] == {"declared": "budget", "value": "auto", "level": 0, "node": 7}
    assert server.auto_clients == {1} and server.budgets[1] == 0.125


def test_client_app_keeps_the_auto_state_in_the_context(setup_for, tmp_path):
    from flwr.app import Context, RecordDict

    from ubsmoe.fl import client_app
    from ubsmoe.fl.client_runtime import ClientRuntime
    from ubsmoe.fl.server import Server

    cfg, setup = setup_for("fl.budget_pattern=auto", "fl.round_deadline_s=1000")
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    runtime = ClientRuntime(cfg, setup)
    task = Server(cfg, tmp_path / "run", setup).client_task(0, 1)
    update = client_app._train(runtime, task, cfg, parse_node_config({"partition-id": 0}), context)
    state = json.loads(str(context.state[client_app.AUTO_STATE]["json"]))
    assert state["calibrations"] == 1 and len(state["step_s"]) == 4 and update.metrics["auto_calibrated"] == 1
    assert update.metrics["auto_cap_gib"] > 0  # no declared cap: the device's free memory


@pytest.mark.parametrize("override, message", [
    ("fl.client_speed=[1,2,3]", "fl.client_speed: got ['1', '2', '3'], expected 2 entries (fl.num_clients) or one"),
    ("fl.client_speed=linear:1", "fl.client_speed: got ['linear:1'], expected a number or per-round numbers"),
    ("fl.client_speed=uniform:1:8", "fl.client_speed: got ['uniform:1:8'], expected a number"),
    ("fl.client_speed=[0]", "fl.client_speed: got ['0'], expected"),
    ("fl.client_memory_gib=[-1]", "fl.client_memory_gib: got ['-1'], expected"),
    ("fl.round_deadline_s=-1", "fl.round_deadline_s: got -1.0, expected seconds >= 0 (0: no target)"),
    ("fl.deadline_margin=1", "fl.deadline_margin: got 1.0, expected a share in [0, 1)"),
    ("fl.remeasure_fraction=0", "fl.remeasure_fraction: got 0.0, expected a share > 0"),
    ("fl.calibration_steps=0", "fl.calibration_steps: got 0, expected an integer >= 1"),
    ("fl.budget_pattern=fast", ("fl.budget_pattern: got 'fast', expected one of uniform, long_tail, "
                               "reverse_long_tail, auto")),
])
def test_bad_settings_get_one_line(override, message):
    from ubsmoe.config import load_config

    with pytest.raises(ConfigError) as e:
        load_config(overrides=["fl.num_clients=2", override])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("node_config, message", [
    ({"partition-id": 0, "memory-gib": 2}, "node 5: memory-gib= is used only with budget=auto"),
    ({"partition-id": 0, "budget": "auto", "memory-gib": 0}, "node 5: memory-gib=0 is not a number of GiB > 0"),
    ({"partition-id": 0, "budget": "fast"}, "node 5: budget='fast' is not a number in (0, 1] or auto"),
])
def test_bad_auto_declarations_get_one_line(node_config, message):
    with pytest.raises(DeclarationError) as e:
        parse_node_config(node_config, node=5)
    assert str(e.value) == message


def test_fleet_tables():
    from ubsmoe.config import load_config

    fl = load_config(overrides=["fl.num_clients=8", "fl.client_speed=linear:1:8",
                                "fl.client_memory_gib=uniform:1:3:7"]).fl
    assert [fl.fleet_speed(c, 1) for c in range(8)] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    caps = [fl.fleet_memory_bytes(c) for c in range(8)]
    assert all(2 ** 30 <= b <= 3 * 2 ** 30 for b in caps) and len(set(caps)) == 8
    assert caps == [load_config(overrides=["fl.num_clients=8", "fl.client_memory_gib=uniform:1:3:7"]
                                ).fl.fleet_memory_bytes(c) for c in range(8)]  # seeded
    fl = load_config(overrides=["fl.num_clients=2", "fl.client_speed=[2,1/3]"]).fl
    assert [fl.fleet_speed(1, r) for r in (1, 2, 9)] == [1.0, 3.0, 3.0] and fl.fleet_speed(0, 5) == 2.0
    assert load_config().fl.fleet_speed(3, 1) == 1.0 and load_config().fl.fleet_memory_bytes(3) is None
