"""Experiment configs, grid expansion, cell naming, `ubsmoe sweep` scheduling and a3smoe_flexlora."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from ubsmoe.cli import app
from ubsmoe.config.model import packaged_base_path
from ubsmoe.errors import ConfigError
from ubsmoe.experiments import (
    SCALES,
    RequirementError,
    available_experiments,
    cell_dir_name,
    config_hash,
    find_cell,
    load_experiment,
    parse_experiment,
    resolve_cell,
)
from ubsmoe.experiments.sweep import CELL_FILE, plan_sweep, run_sweep, sweep_devices, sweep_eta
from ubsmoe.methods import ClientUpdate, get_method_class

REQUIRES: dict[str, str] = {}  # shipped experiment -> its `requires` line (none left since issue 13)
SHIPPED = ("table1", "table2", "table3", "table4", "table5", "table6", "a3smoe_table1", "a3smoe_fig3",
           "a3smoe_fig4", "dynamics", "fleet", "testbed", "testbed_ablation", "testbed_lambda_pg",
           "testbed_phi_lr")
TINY_MODEL = {"fleet": str(packaged_base_path())}  # tiny scale on the shipped testbed base (issue 23)


# ----- shipped configs ---------------------------------------------------------------

def test_every_shipped_experiment_is_listed():
    assert sorted(SHIPPED) == available_experiments()


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("scale", SCALES)
def test_every_shipped_config_validates_at_both_scales(name, scale):
    exp = load_experiment(name)
    cells = exp.cells(scale)
    assert cells and len({c.label for c in cells}) == len(cells)
    if name in REQUIRES:  # a feature other issues build: the one clear line, not the raw error
        with pytest.raises(RequirementError) as e:
            [resolve_cell(exp, c) for c in cells]
        assert str(e.value) == REQUIRES[name]
        return
    cfgs = [resolve_cell(exp, c) for c in cells]
    for cell, cfg in zip(cells, cfgs, strict=True):
        assert cfg.method == cell.method and cfg.train.seed == cell.seed
        dense = name == "table2" and cell.method != "ubsmoe"  # Table 2: dense OLMo-1B for the LoRA methods
        if scale == "paper":
            assert cfg.model.name == ("allenai/OLMo-1B-hf" if dense else "allenai/OLMoE-1B-7B-0924")
            assert cfg.data.train_examples == (0 if name == "table4" else 15000)  # table4: all of TeleQuAD
        elif name.startswith("testbed"):  # the testbed experiments fine-tune the shipped base
            assert cfg.model.name == str(packaged_base_path()) and cfg.model.resolved_init == "pretrained"
            assert cfg.eval.before_training and {"loss", "loglik"} <= set(cfg.eval.protocols)
            assert cfg.eval.utilization and cfg.data.dirichlet_alpha == 0.5 and cfg.fl.num_clients == 8
        else:
            assert cfg.model.name == ("tiny-dense" if dense else TINY_MODEL.get(name, "tiny"))
        if name == "table4":  # generative QA scored by BERTScore F1 over the user's TeleQuAD folder
            assert (cfg.data.name, cfg.data.path, cfg.eval.text_metric, cfg.eval.protocols) == (
                "instruction", "data/telequad", "bertscore_f1", ["generation"])


def test_paper_scale_has_three_seeds_and_tiny_one():
    exp = load_experiment("table1")
    assert len(exp.cells("paper")) == 3 * len(exp.cells("tiny")) == 27


def test_grid_expansion_applies_every_setting():
    exp = load_experiment("a3smoe_table1")
    cells = exp.cells("tiny")
    assert len(cells) == 4 * 2 * 2  # methods x num_clients x dirichlet_alpha
    seen = set()
    for cell in cells:
        cfg = resolve_cell(exp, cell)
        assert cfg.fl.num_clients == cell.values["num_clients"]
        assert cfg.data.dirichlet_alpha == cell.values["dirichlet_alpha"]
        seen.add((cell.method, cfg.fl.num_clients, cfg.data.dirichlet_alpha))
    assert len(seen) == 16
    assert cells[1].label == "fedit-num_clients=8-dirichlet_alpha=0.5-seed0"


def test_named_setting_values_reach_the_method_config():
    exp = load_experiment("table5")
    cfgs = {c.values["ablation"]: resolve_cell(exp, c) for c in exp.cells("tiny")}
    none, full = cfgs["none"].method_config, cfgs["full"].method_config
    assert (none.pg, none.dmr.learn_phi, none.dmr.range_penalty, none.dmr.server_update) == (False,) * 4
    assert (full.pg, full.dmr.learn_phi, full.dmr.range_penalty, full.dmr.server_update) == (True,) * 4
    assert cfgs["pg"].method_config.pg and not cfgs["pg"].method_config.dmr.server_update


def test_gamma_sweep_and_seeds_and_methods_selection():
    exp = load_experiment("a3smoe_fig4")
    gammas = [resolve_cell(exp, c).method_config.gamma for c in exp.cells("tiny")]
    assert gammas == [0.0, 1.0, 2.0, 4.0, 8.0]
    t1 = load_experiment("table1")
    cells = t1.cells("tiny", methods=["ubsmoe", "a3smoe"], seeds=2)
    assert [(c.method, c.seed) for c in cells] == [("a3smoe", 0), ("a3smoe", 1), ("ubsmoe", 0), ("ubsmoe", 1)]
    with pytest.raises(ConfigError, match="--methods"):
        t1.cells("tiny", methods=["nope"])
    with pytest.raises(ConfigError, match="--scale"):
        t1.cells("huge")


def test_config_hash_is_stable_ignores_device_and_follows_the_config():
    exp = load_experiment("table1")
    cell = exp.cells("tiny")[0]
    a, b = resolve_cell(exp, cell), resolve_cell(exp, cell)
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 8
    b.model.device = "cuda:3"
    assert config_hash(a) == config_hash(b)
    c = resolve_cell(exp, cell, ["fl.rounds=7"])
    assert config_hash(c) != config_hash(a)
    assert cell_dir_name(cell, a) == f"fedit-seed0-{config_hash(a)}"
    # every cell of a grid gets its own directory
    names = [cell_dir_name(c, resolve_cell(exp, c)) for c in exp.cells("paper")]
    assert len(set(names)) == len(names)


def test_table1_and_table3_share_run_directories(tmp_path):
    for scale in SCALES:
        d1 = [i.run_dir for i in plan_sweep(load_experiment("table1"), tmp_path, scale)]
        d3 = [i.run_dir for i in plan_sweep(load_experiment("table3"), tmp_path, scale)]
        assert d1 == d3


def _minimal(**extra):
    data = {"description": "d", "paper": "p", "grid": {"methods": ["ubsmoe"]},
            "scales": {"tiny": {}, "paper": {}}}
    data.update(extra)
    return data


@pytest.mark.parametrize("data, field", [
    (_minimal(extra=1), "extra: unknown key"),
    (_minimal(grid={"methods": ["nope"]}), "grid.methods"),
    (_minimal(scales={"tiny": {}}), "scales: expected exactly"),
    (_minimal(grid={"methods": ["ubsmoe"], "settings": {"x": {"key": "fl.rounds"}}}), "grid.settings.x"),
    (_minimal(grid={"methods": ["ubsmoe"], "seeds": [0.5]}), "grid.seeds"),
    (_minimal(requires={"capability": "x"}), "requires"),
    (_minimal(scales={"tiny": {"bogus": 1}, "paper": {}}), "scales.tiny.bogus"),
])
def test_schema_errors_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        parse_experiment(data, "mine")
    assert field in str(e.value) and "experiment mine" in str(e.value)


def test_bad_cell_config_is_reported_by_field():
    exp = parse_experiment(_minimal(base={"fl": {"rounds": 0}}), "mine")
    with pytest.raises(ConfigError, match="fl.rounds"):
        resolve_cell(exp, exp.cells("tiny")[0])


def test_requires_check_passes_once_the_config_validates():
    """`requires` only replaces a failing validation: a valid cell resolves normally."""
    ok = parse_experiment(_minimal(requires={"capability": "x", "message": "needs x"}), "mine")
    assert resolve_cell(ok, ok.cells("tiny")[0]).method == "ubsmoe"
    bad = parse_experiment(_minimal(requires={"capability": "x", "message": "needs x"},
                                    base={"model": {"name": "allenai/OLMo-1B-hf"}}), "mine")
    with pytest.raises(RequirementError, match="^needs x$"):
        resolve_cell(bad, bad.cells("tiny")[0])
    plain = parse_experiment(_minimal(base={"model": {"name": "allenai/OLMo-1B-hf"}}), "mine")
    with pytest.raises(ConfigError, match="method ubsmoe needs a sparse-MoE model; model allenai/OLMo-1B-hf is dense"):
        resolve_cell(plain, plain.cells("tiny")[0])


def test_find_cell_picks_one_cell_by_method_and_settings():
    exp = load_experiment("table6")
    cell, rest = find_cell(exp, "tiny", ["method=ubsmoe", "budget_pattern=long_tail", "fl.rounds=2"])
    assert (cell.method, cell.values, rest) == ("ubsmoe", {"budget_pattern": "long_tail"}, ["fl.rounds=2"])
    cfg = resolve_cell(exp, cell, rest)
    assert (cfg.fl.budget_pattern, cfg.fl.rounds, cfg.fl.num_clients) == ("long_tail", 2, 32)
    with pytest.raises(ConfigError, match="budget_pattern: table6 has several values"):
        find_cell(exp, "tiny", ["method=ubsmoe"])
    with pytest.raises(ConfigError, match="method: required"):
        find_cell(exp, "tiny", ["budget_pattern=uniform"])


# ----- CLI -----------------------------------------------------------------------------

def test_cli_configs_lists_one_line_each():
    result = CliRunner().invoke(app, ["configs"], terminal_width=400)
    assert result.exit_code == 0
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert [ln.split()[0] for ln in lines] == available_experiments()
    assert not any("[needs" in ln for ln in lines)  # every shipped experiment validates


def test_cli_sweep_stops_with_the_requires_line(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump(_minimal(requires={"capability": "x", "message": "mine needs x"},
                                            base={"model": {"name": "allenai/OLMo-1B-hf"}})))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["sweep", "-c", str(mine), "--out", str(out)], terminal_width=400)
    assert result.exit_code == 2
    assert "mine needs x" in result.output
    assert "Traceback" not in result.output and not (out.exists() and any(out.iterdir()))


def test_table4_without_its_data_is_one_line_naming_data_path(tmp_path):
    result = CliRunner().invoke(app, ["run", "-c", "table4", "--scale", "tiny", "method=ubsmoe",
                                      "--out", str(tmp_path / "run")], terminal_width=400)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0] == "error: data.path: 'data/telequad' does not exist or is not a folder"


def test_cli_sweep_dry_run_lists_cells_and_bad_names(tmp_path):
    r = CliRunner().invoke(app, ["sweep", "-c", "table5", "--out", str(tmp_path), "--dry-run"],
                           terminal_width=400)
    assert r.exit_code == 0 and r.output.count("ubsmoe-ablation=") == 6 and "6 queued" in r.output
    r = CliRunner().invoke(app, ["sweep", "-c", "nope"], terminal_width=400)
    assert r.exit_code == 2 and "expected an existing file or one of" in r.output


def test_cli_plan_takes_an_experiment_cell_and_a_plain_file_still_works(tmp_path):
    r = CliRunner().invoke(app, ["plan", "-c", "table6", "method=ubsmoe", "budget_pattern=uniform", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["processes"]
    plain = tmp_path / "run.yaml"
    plain.write_text("fl: {rounds: 2, num_clients: 3}\n", encoding="utf-8")
    r = CliRunner().invoke(app, ["plan", "-c", str(plain), "--json"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["plan", "-c", "table6", "method=ubsmoe"], terminal_width=400)
    assert r.exit_code == 2 and "pick one with budget_pattern=VALUE" in r.output


# ----- sweep scheduling ------------------------------------------------------------------

def _tiny_experiment(tmp_path: Path, methods=("smoe", "a3smoe")) -> Path:
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump({
        "description": "two methods x two seeds, tiny", "paper": "test",
        "base": {"fl": {"num_clients": 2, "rounds": 2}, "data": {"train_examples": 64, "max_length": 64},
                 "train": {"max_local_steps": 1, "batch_size": 4},
                 "eval": {"examples_per_task": 2, "protocols": ["loglik"], "pg_probe_examples": 0}},
        "grid": {"methods": list(methods), "seeds": [0, 1]},
        "scales": {"tiny": {}, "paper": {}}}), encoding="utf-8")
    return path


class _FakeRunner:
    """Stands in for `ubsmoe run`: a checkpoint per round, then summary.json; counts calls."""

    def __init__(self, interrupt_at: int | None = None, delay: float = 0.0) -> None:
        self.calls: list[tuple[str, bool, str | None]] = []
        self.interrupt_at = interrupt_at
        self.delay = delay
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def __call__(self, item):
        with self.lock:
            self.calls.append((item.run_dir.name, item.resume, item.device))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            saved = yaml.safe_load((item.run_dir / "config.yaml").read_text(encoding="utf-8"))
            assert saved["model"]["device"] == ("cuda" if item.device else "auto")  # pinned: its one GPU
            ckpt = item.run_dir / "checkpoints"
            ckpt.mkdir(exist_ok=True)
            (ckpt / "round_0001.pt").write_bytes(b"x")
            if len(self.calls) == self.interrupt_at:
                raise KeyboardInterrupt("stopped in the middle of a run")
            time.sleep(self.delay)
            (item.run_dir / "summary.json").write_text("{}", encoding="utf-8")
            return 0, "done"
        finally:
            with self.lock:
                self.active -= 1


def test_sweep_skips_done_runs_and_resumes_the_interrupted_one(tmp_path):
    exp = load_experiment(_tiny_experiment(tmp_path))
    out = tmp_path / "sweep"
    first = _FakeRunner(interrupt_at=2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan_sweep(exp, out, "tiny"), runner=first)
    assert len(first.calls) == 2
    done = out / first.calls[0][0]
    mtime = (done / "summary.json").stat().st_mtime_ns
    cell = json.loads((done / CELL_FILE).read_text(encoding="utf-8"))
    assert cell == {"experiment": "mini", "scale": "tiny", "label": "smoe-seed0",
                    "settings": {"method": "smoe"}, "seed": 0, "config_hash": done.name.rsplit("-", 1)[1]}
    items = plan_sweep(exp, out, "tiny")
    assert [i.state for i in items] == ["skipped", "queued", "queued", "queued"]
    assert [i.resume for i in items] == [False, True, False, False]
    second = _FakeRunner()
    run_sweep(items, runner=second)
    assert [c[0] for c in second.calls] == [i.run_dir.name for i in items[1:]]  # finished run not redone
    assert second.calls[0][1] is True  # the interrupted run resumed
    assert (done / "summary.json").stat().st_mtime_ns == mtime
    assert all(i.state in ("done", "skipped") for i in items)
    third = _FakeRunner()
    run_sweep(plan_sweep(exp, out, "tiny"), runner=third)
    assert third.calls == []


def test_sweep_marks_a_failed_run_and_goes_on(tmp_path):
    exp = load_experiment(_tiny_experiment(tmp_path))
    calls = []

    def runner(item):
        calls.append(item.cell.label)
        if len(calls) == 1:
            return 1, "error: boom"
        (item.run_dir / "summary.json").write_text("{}", encoding="utf-8")
        return 0, ""

    items = run_sweep(plan_sweep(exp, tmp_path / "s", "tiny"), runner=runner)
    assert [i.state for i in items] == ["failed", "done", "done", "done"]
    assert items[0].message == "exit 1: error: boom"


def test_sweep_runs_one_cell_per_gpu_with_the_device_set(tmp_path):
    exp = load_experiment(_tiny_experiment(tmp_path))
    items = plan_sweep(exp, tmp_path / "s", "tiny")
    hashes = [i.run_dir.name for i in items]
    devices = sweep_devices(items[0].cfg, cuda_count=2)
    assert devices == ["cuda:0", "cuda:1"]
    runner = _FakeRunner(delay=0.3)
    run_sweep(items, runner=runner, devices=devices)
    assert sorted(c[0] for c in runner.calls) == sorted(hashes)
    assert {c[2] for c in runner.calls} == {"cuda:0", "cuda:1"}
    assert runner.max_active == 2  # two at once, never more
    assert all(i.state == "done" for i in items)


def test_visible_device_maps_a_slot_to_the_sweeps_own_visible_list():
    from ubsmoe.experiments.sweep import visible_device

    assert visible_device("cuda:1", {}) == "1"
    assert visible_device("cuda:1", {"CUDA_VISIBLE_DEVICES": "2,3"}) == "3"
    assert visible_device("cuda:0", {"CUDA_VISIBLE_DEVICES": "GPU-aa, GPU-bb"}) == "GPU-aa"
    with pytest.raises(ValueError, match="lists 2"):
        visible_device("cuda:2", {"CUDA_VISIBLE_DEVICES": "2,3"})
    with pytest.raises(ValueError, match="expected cuda:i"):
        visible_device("cpu", {})


def test_subprocess_runner_shows_a_pinned_run_only_its_gpu(tmp_path, monkeypatch):
    """The `ubsmoe run` of slot cuda:1 gets CUDA_VISIBLE_DEVICES=1 (all its processes inherit it)."""
    from ubsmoe.experiments import sweep

    seen = []

    class FakePopen:
        def __init__(self, args, env, **kwargs):
            seen.append((args, env))

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(sweep.subprocess, "Popen", FakePopen)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    exp = load_experiment(_tiny_experiment(tmp_path))
    first, second = plan_sweep(exp, tmp_path / "s", "tiny")[:2]
    sweep.prepare_item(first, "cuda:1")
    sweep.prepare_item(second, None)
    assert sweep.subprocess_runner(first) == (0, "") and sweep.subprocess_runner(second) == (0, "")
    assert seen[0][1]["CUDA_VISIBLE_DEVICES"] == "1"
    assert "CUDA_VISIBLE_DEVICES" not in seen[1][1]  # an unpinned run sees what the sweep sees
    saved = yaml.safe_load((first.run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert saved["model"]["device"] == "cuda" and first.device == "cuda:1"


def test_cli_sweep_over_gpus_needs_a_gpu_share_per_client(tmp_path, monkeypatch):
    """One run per GPU: a run's clients see its GPU only with fl.client_gpus > 0 (else one line, exit 2)."""
    import torch

    from ubsmoe.experiments import sweep

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    started = []
    monkeypatch.setattr(sweep, "run_sweep", lambda items, devices, on_change: started.append(devices))
    mine = _tiny_experiment(tmp_path)
    refused = CliRunner().invoke(app, ["sweep", "-c", str(mine), "--out", str(tmp_path / "a")],
                                 terminal_width=400)
    assert refused.exit_code == 2 and not started, refused.output
    assert refused.output.strip().splitlines()[-1].startswith(
        "error: fl.client_gpus: got 0 with model.device=cuda, expected a share of a GPU per client")
    assert "(each run of this sweep)" in refused.output
    ok = CliRunner().invoke(app, ["sweep", "-c", str(mine), "--out", str(tmp_path / "b"), "fl.client_gpus=0.5"],
                            terminal_width=400)
    assert ok.exit_code == 0, ok.output
    assert started == [["cuda:0", "cuda:1"]]


def test_sweep_devices_and_eta():
    exp = load_experiment("table1")
    cfg = resolve_cell(exp, exp.cells("tiny")[0])
    assert sweep_devices(cfg, 0) == [None] and sweep_devices(cfg, 1) == [None]
    cfg.model.device = "cpu"
    assert sweep_devices(cfg, 4) == [None]
    items = plan_sweep(exp, Path("/nonexistent-sweep"), "tiny")
    assert sweep_eta(items, 1) is None
    items[0].state, items[0].seconds = "done", 60.0
    assert sweep_eta(items, 1) == pytest.approx(60.0 * 8)
    assert sweep_eta(items, 2) == pytest.approx(60.0 * 4)


@pytest.mark.e2e
@pytest.mark.slow
def test_real_sweep_interrupted_mid_run_and_restarted_completes(tmp_path):
    """Two methods x two seeds of real `ubsmoe run` processes; the second is killed mid-run."""
    import os
    import signal
    import subprocess
    import sys

    from ubsmoe.experiments.sweep import subprocess_runner
    from ubsmoe.fl.run_dir import latest_checkpoint

    exp = load_experiment(_tiny_experiment(tmp_path))
    out = tmp_path / "sweep"
    calls: list[str] = []

    def interrupting(item):
        calls.append(item.run_dir.name)
        if len(calls) < 2:
            return subprocess_runner(item)
        # Client 0 stalls 60 s in round 2 (the UBSMOE_FAULTS test hook), so the run is surely
        # still in round 2 when it is stopped: a tiny round takes well under a second.
        proc = subprocess.Popen([sys.executable, "-m", "ubsmoe.cli", "run", "-c",
                                 str(item.run_dir / "config.yaml"), "--out", str(item.run_dir), "--force"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2] / "src"),
                                         UBSMOE_FAULTS="0:timeout@2", UBSMOE_FAULT_LATE_S="60"))
        deadline = time.monotonic() + 300
        while latest_checkpoint(item.run_dir) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        raise KeyboardInterrupt("killed in the middle")

    with pytest.raises(KeyboardInterrupt):
        run_sweep(plan_sweep(exp, out, "tiny"), runner=interrupting)
    first = out / calls[0]
    mtime = (first / "summary.json").stat().st_mtime_ns
    items = plan_sweep(exp, out, "tiny")
    assert [i.state for i in items] == ["skipped", "queued", "queued", "queued"] and items[1].resume
    again: list[str] = []

    def counting(item):
        again.append(item.run_dir.name)
        return subprocess_runner(item)

    run_sweep(items, runner=counting)
    assert again == [i.run_dir.name for i in items[1:]]
    assert all(i.state in ("skipped", "done") for i in items), [(i.state, i.message) for i in items]
    assert (first / "summary.json").stat().st_mtime_ns == mtime
    rounds = [json.loads(ln)["round"] for ln in (items[1].run_dir / "metrics.jsonl").read_text().splitlines()
              if json.loads(ln)["type"] == "train"]
    assert rounds == [1, 2]  # resumed after round 1, not restarted


# ----- a3smoe_flexlora -------------------------------------------------------------------

E, IN, OUT, L = 4, 6, 5, 2
ATT = "model.layers.0.self_attn.q_proj"


def _names():
    return [f"model.layers.{l}.mlp.gate_up_lora" for l in range(L)]


def _update(c: int, rank: int, top_k: int, counts: torch.Tensor, n: int, shared_A=None) -> ClientUpdate:
    g = torch.Generator().manual_seed(100 + c)
    ad = {f"{ATT}.lora_A.default.weight": torch.randn(rank, IN, generator=g, dtype=torch.float64),
          f"{ATT}.lora_B.default.weight": torch.randn(OUT, rank, generator=g, dtype=torch.float64)}
    for mod in _names():
        ad[f"{mod}.A"] = (shared_A.clone() if shared_A is not None
                          else torch.randn(E, rank, IN, generator=g, dtype=torch.float64))
        ad[f"{mod}.B"] = torch.randn(E, OUT, rank, generator=g, dtype=torch.float64)
    return ClientUpdate(client_id=c, num_examples=n, adapters=ad, expert_counts=counts,
                        token_counts=torch.full((L,), 10.0 * n), top_k=top_k, loss=0.0)


def _global(rank: int):
    ad = {f"{ATT}.lora_A.default.weight": torch.zeros(rank, IN, dtype=torch.float64),
          f"{ATT}.lora_B.default.weight": torch.zeros(OUT, rank, dtype=torch.float64)}
    for mod in _names():
        ad[f"{mod}.A"] = torch.zeros(E, rank, IN, dtype=torch.float64)
        ad[f"{mod}.B"] = torch.zeros(E, OUT, rank, dtype=torch.float64)
    return ad


def _method(name, **kw):
    cls = get_method_class(name)
    return cls(cls.config_class(**kw))


def _effective(ad, mod, scale):
    return scale * ad[f"{mod}.B"] @ ad[f"{mod}.A"]  # [E, OUT, IN]


def test_a3smoe_flexlora_at_gamma_zero_equals_flexlora():
    counts = [torch.randint(1, 20, (L, E), generator=torch.Generator().manual_seed(c)).double() for c in range(3)]
    updates = [_update(c, r, k, counts[c], n) for c, (r, k, n) in enumerate([(2, 1, 5), (3, 2, 9), (4, 4, 3)])]
    ranks = [2, 3, 4]
    ours = _method("a3smoe_flexlora", ranks=ranks, gamma=0.0).aggregate(_global(4), updates)
    flex = _method("flexlora", ranks=ranks).aggregate(_global(4), updates)
    assert ours.keys() == flex.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], flex[name], rtol=1e-9, atol=1e-12)
    # and gamma > 0 with uneven activation does change the experts (the knob acts)
    g4 = _method("a3smoe_flexlora", ranks=ranks, gamma=4.0).aggregate(_global(4), updates)
    mod = _names()[0]
    assert not torch.allclose(_effective(g4, mod, 4.0), _effective(flex, mod, 4.0))
    torch.testing.assert_close(g4[f"{ATT}.lora_B.default.weight"] @ g4[f"{ATT}.lora_A.default.weight"],
                               flex[f"{ATT}.lora_B.default.weight"] @ flex[f"{ATT}.lora_A.default.weight"])


def test_a3smoe_flexlora_expert_weighting_equals_a3smoe_at_one_k_and_rank():
    """Same K and rank for all clients: the expert update is sum_c w_{c,i} s B_c A_c with
    A3SMoE's own weights w (read off A3SMoE's aggregator on one-hot probe tensors)."""
    r, k, gamma = 3, 2, 2.0
    g = torch.Generator().manual_seed(7)
    counts = [torch.randint(0, 30, (L, E), generator=g).double() for _ in range(3)]
    counts[0][0, 1] = counts[1][0, 1] = counts[2][0, 1] = 0  # expert 1 of layer 0: unused by all
    shared_A = torch.randn(E, r, IN, generator=g, dtype=torch.float64)  # keeps sum_c w B_c A rank <= r
    updates = [_update(c, r, k, counts[c], n, shared_A) for c, n in enumerate([4, 7, 2])]
    glob = _global(r)
    glob[f"{_names()[0]}.A"] = torch.randn(E, r, IN, generator=g, dtype=torch.float64)
    glob[f"{_names()[0]}.B"] = torch.randn(E, OUT, r, generator=g, dtype=torch.float64)
    ours = _method("a3smoe_flexlora", ranks=[r], gamma=gamma).aggregate(glob, updates)
    # A3SMoE's weights: aggregate one-hot probes [E, C] through A3SMoE's own aggregator.
    a3 = _method("a3smoe", gamma=gamma)
    probe_names = [f"{m}.A" for m in _names()]
    probes = [ClientUpdate(u.client_id, u.num_examples,
                           {n: torch.nn.functional.one_hot(torch.full((E,), c), 3).double() for n in probe_names},
                           u.expert_counts, u.token_counts, u.top_k, 0.0) for c, u in enumerate(updates)]
    w = a3.aggregate({n: torch.zeros(E, 3, dtype=torch.float64) for n in probe_names}, probes)
    s = 16.0 / r
    for l, mod in enumerate(_names()):
        expected = sum(w[f"{mod}.A"][:, c].view(E, 1, 1) * s * updates[c].adapters[f"{mod}.B"] @ shared_A
                       for c in range(3))  # [E, OUT, IN]
        got = _effective(ours, mod, s)
        used = torch.stack(counts).sum(0)[l] > 0
        torch.testing.assert_close(got[used], expected[used], rtol=1e-8, atol=1e-10)
        # an expert no participant used keeps its previous global factors (as in A3SMoE)
        for name in (f"{mod}.A", f"{mod}.B"):
            torch.testing.assert_close(ours[name][~used], glob[name][~used])
    assert not (torch.stack(counts).sum(0)[0] > 0)[1]


def test_a3smoe_flexlora_trains_at_k_j_and_rank_r_j():
    m = _method("a3smoe_flexlora")
    assert m.client_top_k(2, 8) == 2 and m.client_lora(0, 20, 16.0) == (12, pytest.approx(0.8 * 12))
    m.set_lora_scale("fixed_alpha", 0.8)  # the old rule: the section's alpha at every rank
    assert m.client_lora(0, 20, 16.0) == (12, 16.0)
    assert _method("flexlora").client_top_k(2, 8) == 8
    with pytest.raises(ConfigError, match="a3smoe_flexlora.gamma"):
        get_method_class("a3smoe_flexlora").config_class(gamma=-1.0)


# ----- diagnostics ----------------------------------------------------------------------

def test_global_entropy_over_layer_expert_pairs_exceeds_log_m():
    from ubsmoe.metrics.diagnostics import utilization_summary

    uniform = utilization_summary(torch.ones(16, 64))["entropy"]
    assert uniform["global"] == pytest.approx(math.log(16 * 64)) == pytest.approx(uniform["global_max"])
    assert uniform["global"] > math.log(64) == pytest.approx(uniform["mean"])
    skewed = torch.ones(16, 64)
    skewed[:, :8] = 50.0
    s = utilization_summary(skewed)["entropy"]
    assert s["global"] < uniform["global"]
    # the same per-layer profiles with one layer busier: per-layer mean unchanged, global lower
    uneven = torch.ones(2, 64)
    uneven[1] *= 9.0
    u = utilization_summary(uneven)["entropy"]
    assert u["mean"] == pytest.approx(math.log(64)) and u["global"] < math.log(128)
