"""Federated rounds: library-level determinism, the Flower end-to-end run, CLI errors."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from conftest import SMALL, make_and_setup, run_rounds
from typer.testing import CliRunner

from ubsmoe.cli import app
from ubsmoe.config import load_config
from ubsmoe.errors import ConfigError
from ubsmoe.fl.client_runtime import ClientRuntime, shared_setup
from ubsmoe.fl.run_dir import latest_checkpoint
from ubsmoe.fl.server import Server
from ubsmoe.fl.simulation import federation_config
from ubsmoe.fl.state import ServerState
from ubsmoe.fl.train import batch_indices, causal_lm_loss, client_seed
from ubsmoe.io import read_jsonl
from ubsmoe.models import adapter_state, load_adapter_state

SRC = Path(__file__).resolve().parents[2] / "src"


# Mean training loss per round of the Flower run below (method=a3smoe, seed 0),
# recorded from a CPU run; the tolerance absorbs thread-count rounding.
RECORDED_LOSS = [6.5805, 6.3434]  # with the trained router (model.router_trainable); frozen: 6.5849, 6.3598


def _cfg(tmp_path, *extra):
    return load_config(overrides=[*SMALL, f"model.tokenizer_cache={tmp_path / 'cache'}", *extra])


def test_causal_lm_loss_ignores_unlabelled_tokens():
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), -100)
    assert float(causal_lm_loss(logits, labels)) == 0.0
    labels[0, 3] = 4
    expected = torch.nn.functional.cross_entropy(logits[0, 2:3], torch.tensor([4]))
    assert float(causal_lm_loss(logits, labels)) == pytest.approx(float(expected), rel=1e-6)
    # with the labelled count given (local_train counts on the host): same values, nothing read back
    assert float(causal_lm_loss(logits, labels, 1)) == float(causal_lm_loss(logits, labels))
    assert float(causal_lm_loss(logits, torch.full((2, 5), -100), 0)) == 0.0


@pytest.mark.slow
def test_rounds_are_deterministic_and_write_the_run_directory(tmp_path):
    cfg = _cfg(tmp_path, "method=a3smoe", "eval.protocols=[loglik]")
    a = run_rounds(cfg, tmp_path / "a", reverse=True)
    b = run_rounds(cfg, tmp_path / "b", reverse=True)
    assert a.state.train_loss == b.state.train_loss
    for k in a.state.adapters:
        assert torch.equal(a.state.adapters[k], b.state.adapters[k])
    changed = [k for k, v in a.state.adapters.items() if "lora_B" in k or "_lora.B" in k]
    assert changed and any(float(a.state.adapters[k].abs().sum()) > 0 for k in changed)
    summary = a.finish()
    run = tmp_path / "a"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints"}
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["round"] for r in records if r["type"] == "train"] == [1, 2]
    assert {(r["budget"], r["top_k"]) for r in records if r["type"] == "eval"} == {
        (0.125, 1), (0.25, 2), (0.5, 4), (1.0, 8)}
    assert summary["data"]["test_examples_scored"] == {"boolq": 4, "piqa": 4, "ARC-Easy": 4}
    assert summary["data"]["train_carved_from_test"]["piqa"] > 0
    assert summary["data"]["duplicates_dropped"] == {"ARC-Easy": {"train_in_test": 2}}
    ckpt = latest_checkpoint(run)
    state = ServerState.from_state_dict(torch.load(ckpt, weights_only=True))
    assert state.round == 2 and all(torch.equal(state.adapters[k], v) for k, v in a.state.adapters.items())
    assert (run / "checkpoints" / "adapter" / "adapter_config.json").is_file()
    # Atomic writes give files the mode open() would (not mkstemp's 0600): a shared box's
    # group can read the results.
    umask = os.umask(0o022)
    os.umask(umask)
    for f in (run / "summary.json", run / "config.yaml", ckpt):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_client_utilization_matches_its_top_k(tmp_path):
    cfg = _cfg(tmp_path)
    setup = shared_setup(cfg)
    runtime = ClientRuntime(cfg, setup)
    server = Server(cfg, tmp_path / "run", setup)
    update = runtime.train_round(0, 1, 2, server.state.adapters)
    # every routed (non-padding) token activates exactly K_c = 2 experts in every layer
    torch.testing.assert_close(update.expert_counts.sum(-1), 2 * update.token_counts)
    # p_c counts the distinct examples trained on: 2 capped steps of 8 from a larger partition
    assert len(setup.partitions[0]) > 16 and update.num_examples == 16


@pytest.mark.slow
def test_num_examples_counts_distinct_examples_trained_on(tmp_path):
    """p_c's count: capped by max_local_steps, not multiplied by local epochs."""
    cfg = _cfg(tmp_path, "data.train_examples=48", "train.batch_size=4", "train.local_epochs=2",
               "train.max_local_steps=0")
    setup = shared_setup(cfg)
    runtime = ClientRuntime(cfg, setup)
    adapters = Server(cfg, tmp_path / "run", setup).state.adapters
    client = max(range(cfg.fl.num_clients), key=lambda c: len(setup.partitions[c]))
    size = len(setup.partitions[client])
    assert size > 8  # so that both caps end the round early
    update = runtime.train_round(client, 1, 2, adapters)
    assert update.metrics["steps"] == 2 * math.ceil(size / 4)  # both epochs ran
    assert update.num_examples == size  # not 2 * size
    for cap in (1, 2):
        capped = replace(cfg, train=replace(cfg.train, max_local_steps=cap))
        update = ClientRuntime(capped, setup).train_round(client, 2, 2, adapters)
        indices = batch_indices(size, 4, 2, cap, client_seed(cfg.train.seed, client, 2))
        assert len(indices) == cap and update.metrics["steps"] == cap
        assert update.num_examples == len({i for idx in indices for i in idx}) == min(4 * cap, size)


def _worker_builds(run_dir):
    """pid -> runtime builds of every ClientApp process, from the run's client metrics."""
    clients = [c for r in read_jsonl(run_dir / "metrics.jsonl") if r["type"] == "train"
               for c in r["clients"]]
    builds: dict[int, int] = {}
    for c in clients:
        pid = int(c["pid"])
        builds[pid] = max(builds.get(pid, 0), int(c["runtime_builds"]))
    return clients, builds


def _superlink_port(run_dir):
    text = (run_dir / "superlink.log").read_text()
    return int(re.search(r"HTTP API on 127\.0\.0\.1:(\d+)", text).group(1))


def _port_is_free(port):
    """Nothing listens on 127.0.0.1:port (SO_REUSEADDR: closed connections in TIME_WAIT don't count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.e2e
def test_flower_end_to_end_run_via_cli(tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--out", str(out), *SMALL, "method=a3smoe",
                                      f"model.tokenizer_cache={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["method"] == "a3smoe"
    losses = [r["loss"] for r in summary["train_loss"]]
    assert losses == pytest.approx(RECORDED_LOSS, abs=1e-3)
    rows = summary["accuracy"]
    assert {(r["budget"], r["protocol"]) for r in rows} == {
        (b, p) for b in (0.125, 0.25, 0.5, 1.0) for p in ("generation", "loglik")}
    for r in rows:
        assert set(r["per_task"]) == {"boolq", "piqa", "ARC-Easy"}
        assert all(0.0 <= v <= 1.0 for v in r["per_task"].values())
    assert "hellaswag" not in summary["data"]["tasks_scored"]
    assert "accuracy (loglik)" in result.output and "round 2: train loss" in result.output
    # It went through a local SuperLink and `flwr run` (their logs are in the run directory).
    assert "Successfully started run" in (out / "ubsmoe.log").read_text()
    # One model per ClientApp worker process, reused for every client and round it served.
    clients, builds = _worker_builds(out)
    assert len(clients) == 8 and set(builds.values()) == {1} and len(builds) < len(clients)
    # Every process of the run is gone: the workers, and nothing holds the SuperLink port.
    assert not any(psutil.pid_exists(pid) for pid in builds)
    assert psutil.Process().children(recursive=True) == []
    assert _port_is_free(_superlink_port(out))


@pytest.mark.e2e
def test_cli_by_absolute_path_runs_without_an_activated_environment(tmp_path):
    """`/path/to/venv/bin/ubsmoe run` with a PATH lacking the environment (cron, systemd, a kernel).

    The Flower programs (flower-superlink, flwr, and flower-superexec that the
    SuperLink starts by name) are found next to the interpreter (issue 21 part 5).
    """
    bin_dir = Path(sys.executable).parent
    script = bin_dir / "ubsmoe"
    if not script.is_file():
        pytest.skip(f"no ubsmoe console script next to {sys.executable} (not an installed environment)")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != bin_dir.resolve())
    found = shutil.which("flower-superexec", path=path)
    if found is not None:
        pytest.skip(f"flower-superexec is on PATH outside the environment ({found}); nothing to check")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PATH", "PYTHONPATH")}
    env.update(PATH=path, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    out = tmp_path / "run"
    proc = subprocess.run([str(script), "run", "--out", str(out), *SMALL, "fl.rounds=1",
                           f"model.tokenizer_cache={tmp_path / 'cache'}"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((out / "summary.json").read_text())["rounds_completed"] == 1


@pytest.mark.e2e
@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_the_run_resumes(tmp_path):
    """SIGINT to `ubsmoe run`'s process group mid-run (as Ctrl-C in a terminal)."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ubsmoe.cli", "run", "--out", str(out), *SMALL, "fl.rounds=3",
         "method=fedit", "eval.protocols=[loglik]", f"model.tokenizer_cache={tmp_path / 'cache'}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while not (out / "checkpoints" / "round_0001.pt").exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    tree = psutil.Process(proc.pid).children(recursive=True)
    names = " ".join(" ".join(p.cmdline()) for p in tree)
    assert "flower-superlink" in names and "flwr" in names and len(tree) > 3
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, output
    assert "error: interrupted" in output and f"--resume {out}" in output.replace("\n", "")
    _, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == [], [p.cmdline() for p in alive]
    assert _port_is_free(_superlink_port(out))
    assert not (out / "summary.json").exists()
    result = CliRunner().invoke(app, ["run", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert [r["round"] for r in summary["train_loss"]] == [1, 2, 3]
    assert psutil.Process().children(recursive=True) == []


def test_federation_config_carries_the_client_resources(tmp_path):
    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    cfg = _cfg(tmp_path, "fl.client_cpus=2", "fl.client_gpus=0.25")
    # Parsed as `flwr run --federation-config` parses it, into Flower's SimulationConfig.
    parsed = parse_config_args([federation_config(cfg)])
    sim = simulation_config_from_json({k.replace("-", "_"): v for k, v in parsed.items()})
    assert (sim.num_supernodes, sim.client_resources_num_cpus, sim.client_resources_num_gpus) == (4, 2, 0.25)
    assert sim.init_args_logging_level == "ERROR" and sim.init_args_log_to_driver is False


@pytest.mark.slow
@pytest.mark.parametrize("keep", [1, 2, 0])
def test_keep_checkpoints_prunes_old_rounds_and_resume_still_works(tmp_path, keep):
    # Checkpoint files and resume do not depend on the run's size: 2 clients of 1 step, 1 example per task.
    cfg = _cfg(tmp_path, "method=fedit", "fl.rounds=3", "eval.protocols=[loglik]",
               f"fl.keep_checkpoints={keep}", "fl.num_clients=2", "train.max_local_steps=1",
               "eval.examples_per_task=1")
    server = run_rounds(cfg, tmp_path / "run", reverse=True)
    server.finish()
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("round_*.pt"))
    expected = ["round_0001.pt", "round_0002.pt", "round_0003.pt"]
    assert ckpts == (expected[-keep:] if keep else expected)
    assert (tmp_path / "run" / "checkpoints" / "adapter" / "adapter_config.json").is_file()
    resumed = Server(cfg, tmp_path / "run", shared_setup(cfg), resume=True)
    assert resumed.state.round == 3 and all(
        torch.equal(resumed.state.adapters[k], v) for k, v in server.state.adapters.items())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ubsmoe", "smoe_llb"])
def test_method_runs_end_to_end_and_writes_diagnostics(tmp_path, method):
    cfg = _cfg(tmp_path, f"method={method}", "eval.protocols=[loglik]", "eval.pg_probe_examples=2")
    server = run_rounds(cfg, tmp_path / "run", reverse=True)
    summary = server.finish()
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    diags = [r for r in records if r["type"] == "diagnostics"]
    trained = {r["round"]: r["clients"] for r in records if r["type"] == "train"}
    assert [d["round"] for d in diags] == [1, 2]
    for d in diags:
        num_layers, num_experts = len(d["utilization"]), len(d["utilization"][0])
        assert len(d["entropy"]["per_layer"]) == num_layers
        assert 0.0 < d["entropy"]["mean"] <= d["entropy"]["max"] + 1e-9
        assert d["entropy"]["max"] == pytest.approx(torch.log(torch.tensor(float(num_experts))).item())
        assert 0.0 <= d["gini"]["mean"] < 1.0
        # u~ sums to K_bar = sum_c p_c K_c per layer, p_c from the round's examples trained on.
        clients = trained[d["round"]]
        k_bar = sum(c["top_k"] * c["examples"] for c in clients) / sum(c["examples"] for c in clients)
        assert [sum(row) for row in d["utilization"]] == pytest.approx([k_bar] * num_layers)
    if method == "ubsmoe":
        assert -1.0 <= diags[-1]["phi_utilization"]["spearman"] < 0.0  # over-used experts pushed down
        assert [p["top_k"] for p in diags[-1]["pg_alignment"]] == [1, 2, 4, 8]
        assert all(p["n"] > 0 for p in diags[-1]["pg_alignment"])
        assert any(k.endswith(".phi") for k in server.state.adapters)
        phi = server.global_phi()  # [L, E], after the last aggregation
        assert diags[-1]["phi"]["outside_share"] == pytest.approx(float((phi.abs() > 1.0).double().mean()))
        train = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["type"] == "train"]
        client_max = max(c["phi_penalty_max"] for c in train[-1]["clients"])
        assert diags[-1]["phi"]["penalty_max"] == client_max
        assert diags[-1]["phi"]["penalty_acted"] is (client_max > 0)
    else:
        assert "pg_alignment" not in diags[-1] and "phi_utilization" not in diags[-1]
    assert summary["diagnostics"]["round"] == 2
    from safetensors.torch import load_file

    routers = load_file(str(tmp_path / "run" / "checkpoints" / "adapter" / "router.safetensors"))
    assert sorted(routers) == sorted(k for k in server.state.adapters if k.endswith(".mlp.router_weight"))
    assert len(routers) == 2 and all(torch.equal(v, server.state.adapters[k]) for k, v in routers.items())


def test_ubsmoe_with_every_switch_off_trains_exactly_like_naive_smoe(tmp_path):
    off = ["ubsmoe.pg=false", "ubsmoe.dmr.learn_phi=false", "ubsmoe.dmr.server_update=false"]
    results = []
    for extra in (["method=smoe"], ["method=ubsmoe", *off]):
        cfg = _cfg(tmp_path, *extra)
        runtime = ClientRuntime(cfg, shared_setup(cfg))
        results.append(runtime.train_round(0, 1, 1, adapter_state(runtime.model)))
    smoe, none = results
    assert smoe.loss == none.loss
    for k, v in smoe.adapters.items():
        assert torch.equal(none.adapters[k], v)
    phis = [v for k, v in none.adapters.items() if k.endswith(".phi")]
    assert phis and all(bool((p == 0).all()) for p in phis)


def test_sparse_upload_reconstructs_the_same_global_model(tmp_path):
    from ubsmoe.fl.messages import update_from_content, update_to_content

    cfg = _cfg(tmp_path, "method=smoe", "train.batch_size=1", "train.max_local_steps=1")
    setup = shared_setup(cfg)
    runtime = ClientRuntime(cfg, setup)
    server = Server(cfg, tmp_path / "run", setup)
    sent = server.state.adapters
    dense = [runtime.train_round(c, 1, 1, sent) for c in range(2)]
    contents = [update_to_content(u, sent) for u in dense]
    rebuilt = [update_from_content(c, sent) for c in contents]
    expert = "_lora.A"
    rows = [c["adapters"].to_torch_state_dict() for c in contents]
    # K_c = 1 on one short example: most experts get no token and are not uploaded.
    assert any(k.endswith(".rows") and v.numel() < 64 for r in rows for k, v in r.items())
    assert all(rb.metrics["bytes_up"] < sum(v.nbytes for v in u.adapters.values())
               for rb, u in zip(rebuilt, dense))
    a = server.method.aggregate(sent, dense)
    b = server.method.aggregate(sent, rebuilt)
    assert any(expert in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    routers = [k for k in sent if k.endswith(".mlp.router_weight")]
    assert routers and all(k in r and k not in [n[:-5] for n in r if n.endswith(".rows")]
                           for r in rows for k in routers)  # a changed router is sent whole


# ----- per-level K: evaluation (eval.top_k) and training (train.top_k) -------------------------
@pytest.fixture(scope="module")
def small_setup(tmp_path_factory):
    """``(make_config(*overrides), shared setup)`` for the small data/model of these tests."""
    return make_and_setup(tmp_path_factory.mktemp("cache"), SMALL, "fedit")


def _recorded_evaluate(server, monkeypatch):
    """Run ``server.evaluate(1)`` with a fake scorer; returns (rows, [(K, rank) per scorer call])."""
    import ubsmoe.eval.commonsense as ev
    from ubsmoe.models import smoe_layers

    seen = []

    def fake_evaluate_task(model, tokenizer, task, records, protocols, batch_size, max_new_tokens):
        seen.append(smoe_layers(model)[0].top_k)
        return {p: 0.5 for p in protocols} | {"n": len(records)}

    monkeypatch.setattr(ev, "evaluate_task", fake_evaluate_task)
    g = torch.Generator().manual_seed(0)  # non-zero B so levels of different rank do not coincide
    server.state.adapters = {k: torch.randn(v.shape, generator=g) * 0.01
                             for k, v in server.state.adapters.items()}
    return server.evaluate(1), seen


@pytest.mark.slow
@pytest.mark.parametrize(("method", "ranks"), [("fedit", [20, 20, 20, 20]), ("hetlora", [12, 16, 24, 40])])
def test_every_method_evaluates_each_level_at_its_own_k(small_setup, tmp_path, monkeypatch, method, ranks):
    make, setup = small_setup
    server = Server(make(f"method={method}", "eval.protocols=[loglik]"), tmp_path / "a", setup)
    rows, seen = _recorded_evaluate(server, monkeypatch)
    assert [(r["budget"], r["top_k"], r["top_k_mode"], r["lora_rank"]) for r in rows] == [
        (b, k, "budget", r) for b, k, r in zip((0.125, 0.25, 0.5, 1.0), (1, 2, 4, 8), ranks)]
    tasks = len(server.test_sets)
    assert seen == [k for k in (1, 2, 4, 8) for _ in range(tasks)]
    evals = [r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if r["type"] == "eval"]
    assert [(r["top_k"], r["top_k_mode"]) for r in evals] == [(1, "budget"), (2, "budget"), (4, "budget"),
                                                             (8, "budget")]

    both = Server(make(f"method={method}", "eval.protocols=[loglik]", "eval.top_k=[budget,native]"),
                  tmp_path / "b", setup)
    rows, seen = _recorded_evaluate(both, monkeypatch)
    assert [(r["budget"], r["top_k"], r["top_k_mode"], r["lora_rank"]) for r in rows] == [
        (b, k, "budget", r) for b, k, r in zip((0.125, 0.25, 0.5, 1.0), (1, 2, 4, 8), ranks)] + [
        (b, 8, "native", r) for b, r in zip((0.125, 0.25, 0.5, 1.0), ranks)]
    # (K, rank) pairs already scored are reused: FedIT's native rows all equal its K = 8 level
    distinct = len({(k, r) for k, r in zip([1, 2, 4, 8] + [8] * 4, ranks + ranks)})
    assert len(seen) == distinct * tasks
    both.last_eval = rows
    summary = both.summary()
    assert [(a["top_k"], a["top_k_mode"], a["lora_rank"]) for a in summary["accuracy"]] == [
        (r["top_k"], r["top_k_mode"], r["lora_rank"]) for r in rows]


def test_report_table_says_which_k_a_row_ran_at(small_setup, tmp_path, monkeypatch):
    from rich.console import Console

    from ubsmoe.report import accuracy_table

    make, setup = small_setup
    server = Server(make("method=fedit", "eval.protocols=[loglik]", "eval.top_k=[budget,native]"),
                    tmp_path / "run", setup)
    server.last_eval, _ = _recorded_evaluate(server, monkeypatch)
    console = Console(width=200, record=True)
    console.print(accuracy_table(server.summary(), "loglik"))
    text = console.export_text()
    assert text.count(" budget ") == 4 and text.count(" native ") == 4
    assert "K=1 budget" in text and "K=8 native" in text
    # One K mode per table (as `ubsmoe run` prints them): fits an 80-column log uncut.
    narrow = Console(width=80, record=True)
    narrow.print(accuracy_table(server.summary(), "loglik", "native"))
    text = narrow.export_text()
    assert text.count(" native ") == 4 and " budget " not in text and "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_train_top_k_budget_trains_fedit_at_k_c(small_setup, tmp_path):
    make, setup = small_setup
    auto = Server(make("method=fedit"), tmp_path / "auto", setup)
    budget = Server(make("method=fedit", "train.top_k=budget"), tmp_path / "budget", setup)
    k_c = [{0.125: 1, 0.25: 2, 0.5: 4, 1.0: 8}[b] for b in budget.budgets]
    assert [auto.client_task(c, 1)["top_k"] for c in range(4)] == [8] * 4  # auto: FedIT's native K
    assert [budget.client_task(c, 1)["top_k"] for c in range(4)] == k_c
    assert [c["top_k"] for c in budget.summary()["clients"]] == k_c
    assert [c["top_k"] for c in auto.summary()["clients"]] == [8] * 4
    assert budget.summary()["train_top_k"] == "budget"
    c = k_c.index(1)
    runtime = ClientRuntime(make("method=fedit", "train.top_k=budget"), setup)
    update = runtime.train_round(**budget.client_task(c, 1))
    assert update.top_k == 1
    torch.testing.assert_close(update.expert_counts.sum(-1), 1 * update.token_counts)
    native = runtime.train_round(**auto.client_task(c, 1))
    assert native.top_k == 8
    torch.testing.assert_close(native.expert_counts.sum(-1), 8 * native.token_counts)
    # the knob reaches the trained weights: K = 1 and K = 8 give different expert LoRA
    assert any(not torch.equal(update.adapters[k], native.adapters[k])
               for k in update.adapters if "_lora.B" in k)


@pytest.mark.parametrize("method", ["ubsmoe", "smoe", "smoe_llb", "a3smoe"])
def test_smoe_methods_reject_training_at_the_native_k(method):
    with pytest.raises(ConfigError, match=rf"^train.top_k: got 'native', expected one of auto, budget "
                                          rf"for method '{method}'$"):
        load_config(overrides=[f"method={method}", "train.top_k=native"])


def test_top_k_settings_are_validated():
    assert load_config(overrides=["method=hetlora", "train.top_k=native"]).train.top_k == "native"
    assert load_config().eval.top_k == ["budget"] and load_config().train.top_k == "auto"
    with pytest.raises(ConfigError, match="eval.top_k: got .*'all'.*expected a non-empty list"):
        load_config(overrides=["eval.top_k=[all]"])
    with pytest.raises(ConfigError, match="train.top_k: got 'max', expected one of auto, budget, native"):
        load_config(overrides=["train.top_k=max"])



def _router_round(tmp_path, method, *extra, clients=(0, 1)):
    """One local round of ``clients`` at K = 1 from the initial adapters; returns (runtime, sent, updates)."""
    cfg = _cfg(tmp_path, f"method={method}", "train.max_local_steps=3", *extra)
    runtime = ClientRuntime(cfg, shared_setup(cfg))
    sent = adapter_state(runtime.model)
    return runtime, sent, [runtime.train_round(c, 1, 1, sent) for c in clients]


@pytest.mark.slow
def test_trainable_router_moves_under_smoe_llb_and_changes_utilization(tmp_path):
    _, sent, (llb, _) = _router_round(tmp_path, "smoe_llb")
    routers = [k for k in sent if k.endswith(".mlp.router_weight")]
    assert len(routers) == 2 and all(sent[k].dtype == torch.float32 for k in routers)
    assert all(not torch.equal(llb.adapters[k], sent[k]) for k in routers)
    _, _, (smoe, _) = _router_round(tmp_path, "smoe")
    # Same seed, data and K = 1: the load-balancing loss reaches the router and moves tokens.
    # Measured: 186 token-expert counts differ; with model.router_trainable=false (the
    # loss reaches routing only through upstream hidden states) only 4 do.
    assert llb.token_counts.tolist() == smoe.token_counts.tolist()
    assert float((llb.expert_counts - smoe.expert_counts).abs().sum()) >= 50


def test_frozen_router_stays_bitwise_unchanged_through_training_and_aggregation(tmp_path):
    runtime, sent, updates = _router_round(tmp_path, "smoe_llb", "model.router_trainable=false")
    assert not any(k.endswith("router_weight") for k in sent)
    cfg = runtime.cfg
    fresh = ClientRuntime(cfg, runtime.setup)  # the untouched initial model
    before = {n: p for n, p in fresh.model.named_parameters() if n.endswith(".mlp.router_weight")}
    after = {n: p for n, p in runtime.model.named_parameters() if n.endswith(".mlp.router_weight")}
    assert len(before) == 2 and all(torch.equal(after[n], before[n]) for n in before)
    server = Server(cfg, tmp_path / "run", runtime.setup)
    server.end_round(1, updates)
    load_adapter_state(server.model, server.state.adapters)
    srv = {n: p for n, p in server.model.named_parameters() if n.endswith(".mlp.router_weight")}
    assert all(torch.equal(srv[n], before[n]) for n in before)


@pytest.mark.parametrize("method", ["a3smoe", "hetlora"])  # every method: tests/methods/test_methods.py
def test_global_router_is_the_data_weighted_mean_of_the_trained_routers(tmp_path, method):
    cfg = _cfg(tmp_path, f"method={method}", "train.max_local_steps=1", "eval.pg_probe_examples=0")
    setup = shared_setup(cfg)
    server = Server(cfg, tmp_path / "run", setup)
    runtime = ClientRuntime(cfg, setup)
    updates = [runtime.train_round(**server.client_task(c, 1)) for c in (0, 1, 2)]
    routers = [k for k in server.state.adapters if k.endswith(".mlp.router_weight")]
    server.end_round(1, updates)
    n = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    for k in routers:
        expected = sum(nc * u.adapters[k].double() for nc, u in zip(n / n.sum(), updates))
        assert not torch.equal(updates[0].adapters[k], updates[1].adapters[k])
        torch.testing.assert_close(server.state.adapters[k].double(), expected, atol=1e-6, rtol=0)
    assert routers
