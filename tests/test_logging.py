"""Logging of a run: TensorBoard/W&B scalars, log routing, one-line failures, ETA, provenance."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from ubsmoe.cli import app, eta_seconds, format_duration
from ubsmoe.config import load_config
from ubsmoe.errors import ConfigError
from ubsmoe.fl.client_runtime import ClientRuntime, shared_setup
from ubsmoe.fl.server import Server
from ubsmoe.io import read_jsonl
from ubsmoe.provenance import git_commit, provenance
from ubsmoe.tracking import TENSORBOARD_DIR, WANDB_ID_FILE, record_scalars

SRC = Path(__file__).resolve().parents[1] / "src"

TINY = [
    "data.tasks=[boolq,piqa]",
    "data.train_examples=80",
    "data.max_length=64",
    "fl.num_clients=2",
    "fl.rounds=2",
    "train.batch_size=8",
    "train.max_local_steps=1",
    "eval.examples_per_task=2",
    "eval.max_new_tokens=2",
    "eval.batch_size=8",
    "eval.protocols=[loglik]",
    "model.tiny.vocab_size=512",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(make_config(*overrides), shared setup)`` for a 2-client, 2-round run."""
    cache = tmp_path_factory.mktemp("cache")

    def make(*extra):
        return load_config(overrides=[*TINY, f"model.tokenizer_cache={cache}", *extra])

    return make, shared_setup(make())


def _run(cfg, setup, run_dir, resume=False, command=None, rounds=None):
    server = Server(cfg, run_dir, setup, resume=resume, command=command)
    runtime = ClientRuntime(cfg, setup)
    for r in range(server.state.round + 1, (rounds or cfg.fl.rounds) + 1):
        updates = [runtime.train_round(c, r, server.top_k[c], server.state.adapters)
                   for c in server.sample_clients(r)]
        server.end_round(r, updates, round_start=time.time())
    return server


def _scalars(run_dir):
    acc = EventAccumulator(str(run_dir / TENSORBOARD_DIR))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


# ----- scalars of a record -------------------------------------------------------------------
def test_record_scalars_flatten_every_numeric_leaf_with_slashes():
    train = {"type": "train", "round": 3, "loss": 2.5, "aggregate_s": 0.1,
             "clients": [{"id": 4, "pid": 99, "loss": 2.0, "top_k": 1, "bytes_up": 10.0, "bytes_down": 7.0},
                         {"id": 1, "pid": 98, "loss": 3.0, "top_k": 8, "bytes_up": 30.0, "bytes_down": 7.0}]}
    assert record_scalars(train) == {
        "train/loss": 2.5, "train/aggregate_s": 0.1,
        "train/clients/4/loss": 2.0, "train/clients/4/top_k": 1.0, "train/clients/4/bytes_up": 10.0,
        "train/clients/4/bytes_down": 7.0,
        "train/clients/1/loss": 3.0, "train/clients/1/top_k": 8.0, "train/clients/1/bytes_up": 30.0,
        "train/clients/1/bytes_down": 7.0,
        "train/bytes_up": 40.0, "train/bytes_down": 14.0}
    diag = {"type": "diagnostics", "round": 3, "entropy": {"per_layer": [1.0, 2.0], "mean": 1.5},
            "utilization": [[0.5, 0.5], [1.0, 0.0]], "phi": {"penalty_acted": True, "max": float("nan")},
            "note": "text"}
    assert record_scalars(diag) == {"diagnostics/entropy/per_layer/0": 1.0,
                                    "diagnostics/entropy/per_layer/1": 2.0,
                                    "diagnostics/entropy/mean": 1.5, "diagnostics/phi/penalty_acted": 1.0}
    ev = {"type": "eval", "round": 3, "budget": 0.125, "top_k": 1, "top_k_mode": "native", "lora_rank": 20,
          "protocol": "loglik", "per_task": {"boolq": 0.5, "piqa": 0.25}, "average": 0.375, "n": {"boolq": 2}}
    assert record_scalars(ev) == {"eval/loglik/native/budget_0.125/average": 0.375,
                                  "eval/loglik/native/budget_0.125/boolq": 0.5,
                                  "eval/loglik/native/budget_0.125/piqa": 0.25,
                                  "eval/loglik/native/budget_0.125/top_k": 1.0,
                                  "eval/loglik/native/budget_0.125/lora_rank": 20.0}


# ----- TensorBoard ---------------------------------------------------------------------------
@pytest.mark.slow
def test_tensorboard_event_files_hold_every_round_scalar_and_resume_does_not_duplicate(tiny, tmp_path):
    make, setup = tiny
    run_dir = tmp_path / "run"
    cfg = make("fl.keep_checkpoints=0")
    server = _run(cfg, setup, run_dir, command="ubsmoe run x=1")
    server.finish()
    records = read_jsonl(run_dir / "metrics.jsonl")
    tb = _scalars(run_dir)
    # Every scalar of every record is there at step = round, with the record's value.
    for rec in records:
        for tag, value in record_scalars(rec).items():
            assert (rec["round"], pytest.approx(value, rel=1e-6)) in tb[tag], tag
    train = [r for r in records if r["type"] == "train"]
    assert tb["train/loss"] == [(r["round"], pytest.approx(r["loss"], rel=1e-6)) for r in train]
    for tag in ("train/round_wall_s", "train/clients/1/top_k", "diagnostics/entropy/mean",
                "diagnostics/gini/mean", "timing/eval_s"):
        assert [s for s, _ in tb[tag]] == ([1, 2] if not tag.startswith("timing") else [2]), tag
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 4
    for r in evals:
        assert tb[f"eval/loglik/budget/budget_{r['budget']:g}/average"] == [(2, pytest.approx(r["average"]))]

    # A crash after round 2 was logged but before its checkpoint: resume from round 1.
    (run_dir / "checkpoints" / "round_0002.pt").unlink()
    resumed = _run(cfg, setup, run_dir, resume=True)
    resumed.finish()
    tb2 = _scalars(run_dir)
    assert [s for s, _ in tb2["train/loss"]] == [1, 2]  # step 2 once: the old one purged
    assert tb2["train/loss"][0] == tb["train/loss"][0]
    assert [s for s, _ in tb2["eval/loglik/budget/budget_1/average"]] == [2]


def test_log_tensorboard_false_writes_no_event_files(tiny, tmp_path):
    make, setup = tiny
    _run(make("log.tensorboard=false", "fl.rounds=1"), setup, tmp_path / "run").finish()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert not (tmp_path / "run" / TENSORBOARD_DIR).exists()


# ----- W&B -----------------------------------------------------------------------------------
class _FakeWandb:
    """Stands in for the ``wandb`` module: records ``init`` arguments and logged scalars."""

    def __init__(self):
        self.inits, self.logged, self.finished = [], [], 0

    def module(self):
        mod = types.ModuleType("wandb")
        mod.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        fake = self

        class Run:
            def log(self, data, step=None):
                fake.logged.append((step, dict(data)))

            def finish(self):
                fake.finished += 1

        def init(**kwargs):
            fake.inits.append(kwargs)
            return Run()

        mod.init = init
        return mod


@pytest.mark.slow
def test_wandb_logs_the_same_scalars_and_resumes_the_same_run(tiny, tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module())
    make, setup = tiny
    cfg = make("log.wandb=true", "log.wandb_project=proj", "log.tensorboard=false", "fl.rounds=1")
    run_dir = tmp_path / "run"
    _run(cfg, setup, run_dir).finish()
    (init,) = fake.inits
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert init == {"project": "proj", "dir": str(run_dir), "config": cfg.to_dict(), "id": run_id,
                    "resume": "allow"}
    assert fake.finished == 1 and not (run_dir / TENSORBOARD_DIR).exists()
    records = read_jsonl(run_dir / "metrics.jsonl")
    expected = [(r["round"], record_scalars(r)) for r in records]
    assert fake.logged == expected
    assert fake.logged[0][1]["train/loss"] == pytest.approx(records[0]["loss"])
    # --resume continues the same W&B run (same id).
    cfg2 = make("log.wandb=true", "log.wandb_project=proj", "log.tensorboard=false", "fl.rounds=2")
    _run(cfg2, setup, run_dir, resume=True).finish()
    assert fake.inits[1]["id"] == run_id and fake.logged[len(expected)][0] == 2


def test_wandb_true_without_wandb_is_a_one_line_config_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable
    with pytest.raises(ConfigError, match=r"^log\.wandb=true needs `pip install wandb`$"):
        load_config(overrides=["log.wandb=true"])
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "r"), "log.wandb=true"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: log.wandb=true needs `pip install wandb`"]
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="log.wandb_project"):
        load_config(overrides=["log.wandb_project="])


# ----- provenance ----------------------------------------------------------------------------
@pytest.mark.slow
def test_provenance_in_summary_and_provenance_json(tiny, tmp_path):
    make, setup = tiny
    run_dir = tmp_path / "run"
    server = _run(make("fl.rounds=1"), setup, run_dir, command="ubsmoe run fl.rounds=1")
    on_start = json.loads((run_dir / "provenance.json").read_text())
    summary = server.finish()
    prov = summary["provenance"]
    assert set(prov) == {"versions", "git_commit", "device", "command", "python", "platform"}
    assert prov == on_start == json.loads((run_dir / "summary.json").read_text())["provenance"]
    assert prov["command"] == "ubsmoe run fl.rounds=1" and prov["device"] == "cpu"
    import flwr
    import torch

    import ubsmoe
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["flwr"] == flwr.__version__
    assert prov["versions"]["ubsmoe"] == ubsmoe.__version__
    assert prov["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert prov["git_commit"] == git_commit(SRC)


def test_git_commit_is_null_outside_git_and_marks_a_dirty_checkout(tmp_path):
    assert git_commit(tmp_path) is None
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    assert git_commit(repo) == head
    (repo / "a.py").write_text("x = 2\n")
    assert git_commit(repo) == head + "+dirty"
    assert provenance(None, "cpu")["command"] is None


# ----- ETA -----------------------------------------------------------------------------------
def test_eta_is_mean_round_time_times_rounds_left():
    assert eta_seconds([], 0, 10) is None
    assert eta_seconds([30.0], 1, 10) == pytest.approx(270.0)
    # The first round (start-up) is left out once a later one is timed.
    assert eta_seconds([100.0, 10.0, 20.0], 3, 10) == pytest.approx(15.0 * 7)
    assert eta_seconds([5.0, 5.0], 10, 10) == 0.0
    assert eta_seconds([10.0, 10.0], 6, 10) == pytest.approx(40.0)  # resumed: rounds done include old ones
    with pytest.raises(ValueError, match="eta_seconds"):
        eta_seconds([-1.0], 1, 2)
    assert [format_duration(s) for s in (None, 42.4, 185, 3720)] == ["?", "42s", "3m05s", "1h02m"]


# ----- log routing and one-line failures through the CLI ------------------------------------
def test_cli_routes_third_party_warnings_and_logs_to_the_run_log(tmp_path, monkeypatch):
    """The launcher's third-party warnings/logs land in ubsmoe.log, not the console (the
    Flower run itself is replaced by a stand-in that emits them, to keep this fast)."""
    import ubsmoe.fl.simulation as sim

    seen = {}

    def fake_run(cfg, run_dir, resume=False, progress=None, verbose=False, command=None):
        warnings.warn("transformers-style deprecation", FutureWarning, stacklevel=1)
        logging.getLogger("transformers.modeling_utils").warning("a transformers warning")
        logging.getLogger("flwr").info("a Flower banner")
        seen["command"] = command
        seen["handlers"] = list(logging.getLogger("transformers").handlers)
        raise RuntimeError("boom inside the run\nsecond line")

    monkeypatch.setattr(sim, "run_federated", fake_run)
    monkeypatch.setattr(sys, "argv", ["ubsmoe", "run", "fl.rounds=1"])
    out = tmp_path / "run"
    root_before = list(logging.getLogger().handlers)
    result = CliRunner().invoke(app, ["run", "--out", str(out), *TINY, f"model.tokenizer_cache={tmp_path}/c"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and "Warning" not in result.output and "Traceback" not in result.output
    assert result.output.rstrip().endswith(f"log: {out.resolve() / 'ubsmoe.log'}")
    assert "RuntimeError: boom inside the run; second line" in result.output
    log = (out / "ubsmoe.log").read_text()
    for text in ("FutureWarning: transformers-style deprecation", "a transformers warning", "a Flower banner",
                 "Traceback", "RuntimeError: boom inside the run", "ubsmoe run fl.rounds=1"):
        assert text in log, text
    assert seen["command"] == "ubsmoe run fl.rounds=1"
    assert not any(type(h) is logging.StreamHandler for h in seen["handlers"])
    # Afterwards the process's logging and warnings are as they were.
    assert logging.getLogger().handlers == root_before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("after the run", FutureWarning, stacklevel=1)
    assert len(caught) == 1


def test_cli_verbose_keeps_warnings_on_the_console(tmp_path, monkeypatch):
    import ubsmoe.fl.simulation as sim

    def fake_run(cfg, run_dir, resume=False, progress=None, verbose=False, command=None):
        warnings.warn("shown with --verbose", FutureWarning, stacklevel=1)
        raise sim.RunFailed("the ServerApp failed: X")

    def console_showwarning(message, category, filename, lineno, file=None, line=None):
        # Python's default sink (stderr, looked up at call time); pytest's own warning
        # recorder would otherwise swallow the warning before it reaches the console.
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(sim, "run_federated", fake_run)
    monkeypatch.setattr(warnings, "showwarning", console_showwarning)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, ["run", "--verbose", "--out", str(out), *TINY,
                                          f"model.tokenizer_cache={tmp_path}/c"])
    assert result.exit_code == 1
    assert "FutureWarning: shown with --verbose" in result.output
    assert result.output.rstrip().endswith(f"the ServerApp failed: X; log: {out.resolve() / 'ubsmoe.log'}")


def _cli(args, cwd):
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin:" + str(Path(sys.executable).parent),
           "HOME": str(cwd)}
    return subprocess.run([sys.executable, "-m", "ubsmoe.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600, check=False)


@pytest.mark.e2e
@pytest.mark.slow
def test_flower_run_console_is_clean_and_third_party_output_is_in_the_log(tmp_path):
    out = tmp_path / "run"
    done = _cli(["run", "--out", str(out), *TINY, "fl.rounds=1", f"model.tokenizer_cache={tmp_path}/c"],
                tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    console = done.stdout + done.stderr
    for banned in ("Warning", "WARNING", "INFO", "Starting Flower", "SuperLink", "Tip:"):
        assert banned not in console, banned
    assert "round 1: train loss" in console and "ETA" in console
    log = (out / "ubsmoe.log").read_text()
    assert "Starting Flower Simulation" in log and "FutureWarning" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["command"].endswith(f"model.tokenizer_cache={tmp_path}/c")
    assert "train/loss" in _scalars(out)


@pytest.mark.e2e
@pytest.mark.slow
def test_failing_flower_run_prints_one_line_ending_with_the_log_path(tmp_path):
    from ubsmoe.config import save_config

    out = tmp_path / "run"
    # Fails inside the ServerApp: --resume from a corrupt checkpoint.
    save_config(load_config(overrides=[*TINY, "fl.rounds=1", f"model.tokenizer_cache={tmp_path}/c"]),
                out / "config.yaml")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "round_0001.pt").write_bytes(b"not a checkpoint")
    done = _cli(["run", "--resume", str(out)], tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    console = done.stdout + done.stderr
    assert "Traceback" not in console and "Warning" not in console
    errors = [ln for ln in console.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "the ServerApp failed" in errors[0]
    assert console.rstrip().endswith(f"log: {out.resolve() / 'ubsmoe.log'}")
    assert "UnpicklingError" in (out / "ubsmoe.log").read_text() + (out / "server_error.log").read_text()
