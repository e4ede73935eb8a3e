"""benchmarks/gpu_check.py: the quick CPU run without Flower, failure isolation, the data subset."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data" / "commonsense"
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no data at {DATA}")


@pytest.fixture(scope="module")
def gpu_check():
    """The script, imported as a module (registered in sys.modules for its dataclasses)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


@pytest.fixture(scope="module")
def subset(gpu_check, tmp_path_factory):
    """A 6-records-per-task copy of the shared commonsense data."""
    if not DATA.is_dir():
        pytest.skip(f"no data at {DATA}")
    dst = tmp_path_factory.mktemp("subset") / "commonsense"
    gpu_check.make_data_subset(DATA, dst, per_task=6)
    return dst


def _block_gpu_machine_absentees(monkeypatch, names):
    """Make ``import name`` (and any submodule) fail, as on the GPU machine."""
    for mod in [m for m in sys.modules if any(m == n or m.startswith(n + ".") for n in names)]:
        monkeypatch.setitem(sys.modules, mod, None)
    for n in names:
        monkeypatch.setitem(sys.modules, n, None)


@pytest.mark.e2e  # the whole script end to end: its command line, every part, a round, the eval sweep
@needs_data
def test_quick_run_without_flower_reports_every_part(gpu_check, subset, tmp_path, monkeypatch):
    _block_gpu_machine_absentees(monkeypatch, gpu_check.BLOCKED)
    with pytest.raises(ImportError):
        import flwr  # noqa: F401
    out = tmp_path / "report.json"
    rc = gpu_check.main(["--quick", "--device", "cpu", "--threads", "1", "--data", str(subset),
                         "--out", str(out)])
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert rc == 0, {n: p["error"] for n, p in parts.items()}
    assert report["schema"] == "ubsmoe-gpu-check/1" and report["quick"] is True
    assert list(parts) == ["layer", "zero_grad", "step", "round", "eval", "dispatch",
                           "fast_step"] == list(report["summary"])
    assert report["summary"]["dispatch"]["k1_total_le_k8"] is True
    assert set(report["summary"]["fast_step"]) == {"eager", "fused", "compiled"}
    assert all("error" not in v for v in report["summary"]["fast_step"].values())
    env = report["environment"]
    for key in ("torch", "transformers", "peft", "cuda_version", "device_name", "device"):
        assert key in env
    for p in parts.values():
        assert p["status"] == "ok" and p["error"] is None and p["wall_s"] > 0
        assert "peak_gpu_memory_mib" in p and p["peak_gpu_memory_mib"] is None  # CPU run

    layer = report["summary"]["layer"]
    assert set(layer["median_ms"]) == {"ubsmoe_k1", "ubsmoe_k8", "reference_k1", "reference_k8"}
    assert all(v > 0 for v in layer["median_ms"].values())
    assert layer["speedup_k1"] == pytest.approx(
        layer["median_ms"]["reference_k1"] / layer["median_ms"]["ubsmoe_k1"])
    assert 0 < layer["flop_ratio_k1_over_k8"] < 1 and layer["k1_over_k8"] > 0
    for k in ("k1", "k8"):  # ours and HF + PEFT compute the same function
        assert layer["max_abs_diff"][k]["output"] < 1e-2
    assert parts["layer"]["benchmark"]["device"] == "cpu"

    zero = parts["zero_grad"]
    assert report["summary"]["zero_grad"]["ok"] is True
    for rows in zero["cases"].values():
        for row in rows:
            assert row["empty_experts"] >= zero["num_experts"] - zero["routable_experts"]
            assert row["gate_up_lora.A"]["max_abs_on_empty"] == 0.0 and row["down_lora.B"]["finite"]

    step = report["summary"]["step"]
    assert list(step["smoe"]) == ["smoe_k1", "smoe_k2", "smoe_k4", "smoe_k8"]
    assert list(step["lora_rank"]) == ["lora_r12", "lora_r16", "lora_r24", "lora_r40"]
    k1 = step["smoe"]["smoe_k1"]
    assert 0 < k1["flop_ratio_analytic"] < 1 and 0 < k1["flop_ratio_measured"] < 1
    assert step["k1_time_over_flop_ratio"] == pytest.approx(k1["time_ratio"] / k1["flop_ratio_analytic"])
    assert parts["step"]["benchmark"]["config"]["dtype"] == "bfloat16"

    rnd = parts["round"]
    assert rnd["model"]["choice"] == "quick" and rnd["setting"]["clients"] == 2
    assert [c["id"] for c in rnd["clients"]] == [0, 1] and all(c["steps"] == 1 for c in rnd["clients"])
    s = report["summary"]["round"]
    assert s["round_s"] > 0 and s["eval_s"] > 0 and s["train_examples_per_s"] > 0
    assert {(r["top_k"], r["protocol"]) for r in s["eval_rows"]} == {
        (k, p) for k in (1, 2, 4, 8) for p in ("generation", "loglik")}
    assert s["eval_examples"] == 4 * 3 * 2  # 4 budgets x 3 tasks x 2 examples
    assert s["eval_examples_per_s"] == pytest.approx(s["eval_examples"] / s["eval_s"])

    ev = parts["eval"]
    names = [c["name"] for c in ev["cases"]]
    assert names == [f"b2_k{k}_{p}" for k in (8, 4, 2, 1) for p in ("generation", "loglik")] + [
        f"b{b}_k8_{p}" for b in (4, 1) for p in ("generation", "loglik")] + ["b2_k8_loglik_separate"]
    n = ev["cases"][0]["examples"]  # at most 4 per task (PIQA's test set is halved for training)
    assert set(n) == {"boolq", "piqa", "ARC-Easy"} and all(1 <= v <= 4 for v in n.values())
    for c in ev["cases"]:
        assert c["examples"] == n and set(c["seconds"]) == set(n)
        assert c["examples_per_s"] == pytest.approx(sum(n.values()) / c["total_s"])
    e = report["summary"]["eval"]
    assert e["skipped"] == [] and e["generation_stops_early"] is False
    assert e["test_examples"] == 22419 and e["target_minutes"] == 10.0
    # Absent tasks run at the rate of the measured ones; HellaSwag is never shipped.
    assert "hellaswag" in e["rate_of_all_tasks_for"] and "boolq" not in e["rate_of_all_tasks_for"]
    expected = sum(size / (n.get(t, sum(n.values())) / c["seconds"].get(t, c["total_s"])) / 60
                   for c in ev["cases"][:8] for t, size in gpu_check.TEST_SET_SIZES.items())
    assert e["projected_minutes_per_method"] == pytest.approx(expected)
    assert e["loglik_shared_prefix_speedup"] == pytest.approx(
        ev["cases"][-1]["total_s"] / ev["cases"][1]["total_s"])


def test_failed_part_is_recorded_and_the_report_is_rewritten_after_each_part(
        gpu_check, tmp_path, monkeypatch):
    out = tmp_path / "report.json"
    seen = {}

    def broken(check):
        raise RuntimeError("simulated CUDA failure")

    def probe(check):
        seen.update(json.loads(out.read_text()))  # on disk before this part started
        return gpu_check.part_zero_grad(check)

    monkeypatch.setitem(gpu_check.PARTS, "layer", broken)
    monkeypatch.setitem(gpu_check.PARTS, "zero_grad", probe)
    rc = gpu_check.main(["--quick", "--device", "cpu", "--parts", "layer,zero_grad", "--out", str(out)])
    assert rc == 1
    assert seen["parts"]["layer"]["status"] == "error" and "zero_grad" not in seen["parts"]
    report = json.loads(out.read_text())
    layer = report["parts"]["layer"]
    assert layer["error"] == "RuntimeError: simulated CUDA failure"
    assert "Traceback" in layer["traceback"] and "broken" in layer["traceback"]
    assert layer["wall_s"] >= 0 and report["summary"]["layer"] == {"error": layer["error"]}
    assert report["parts"]["zero_grad"]["status"] == "ok"
    assert report["summary"]["zero_grad"]["ok"] is True


@pytest.mark.parametrize("argv", [["--parts", "layer,bogus"], ["--parts", "round"], ["--parts", "eval"],
                                  []])
def test_bad_usage_exits_2_and_writes_nothing(gpu_check, tmp_path, argv):
    out = tmp_path / "report.json"
    rc = gpu_check.main([*argv, "--quick", *(["--out", str(out)] if argv else [])])
    assert rc == 2 and not out.exists()


@pytest.mark.parametrize(("argv", "named", "not_named"), [
    (["--quick"], ["--out", "--data"], ["--parts"]),  # the default parts include round and eval
    (["--quick", "--parts", "layer,step"], ["--out"], ["--parts", "--data"]),
    (["--quick", "--parts", "round,eval"], ["--out", "--data"], ["--parts"]),
    (["--quick", "--parts", "layer,bogus", "--out", "r.json"], ["--parts"], ["--out", "--data"]),
])
def test_bad_usage_names_each_missing_argument(gpu_check, tmp_path, capsys, argv, named, not_named):
    """Each error line names the argument that is missing or bad, and only those (issue 21 part 5)."""
    monkey_out = [a if a != "r.json" else str(tmp_path / "r.json") for a in argv]
    assert gpu_check.main(monkey_out) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == len(named) and all(line.startswith("error: ") for line in lines)
    for arg in named:
        assert any(line.startswith(f"error: {arg}:") for line in lines), (arg, lines)
    for arg in not_named:
        assert not any(line.startswith(f"error: {arg}:") for line in lines), (arg, lines)
    assert not (tmp_path / "r.json").exists()


@needs_data
def test_make_data_subset_keeps_at_most_n_records_per_task_and_split(gpu_check, tmp_path):
    from ubsmoe.config import DataConfig
    from ubsmoe.data.commonsense import load_commonsense

    dst = tmp_path / "sub"
    info = gpu_check.make_data_subset(DATA, dst, per_task=5)
    assert set(info["tasks"]) == {p.name for p in DATA.iterdir() if (p / "test.json").is_file()}
    for task, splits in info["tasks"].items():
        for split, n in splits.items():
            full = json.loads((DATA / task / f"{split}.json").read_text())
            kept = json.loads((dst / task / f"{split}.json").read_text())
            assert n == len(kept) == min(5, len(full))
            positions = [full.index(r) for r in kept]
            assert positions == sorted(positions)  # a sample in file order
    assert info["bytes"] < 2 * 2**20
    data = load_commonsense(DataConfig(path=str(dst), train_examples=0), seed=0)
    assert data.train and all(len(v) <= 5 for v in data.test.values())
    with pytest.raises(ValueError, match="--per-task"):
        gpu_check.make_data_subset(DATA, tmp_path / "none", per_task=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_data
def test_quick_run_on_cuda(gpu_check, subset, tmp_path):
    out = tmp_path / "report.json"
    rc = gpu_check.main(["--quick", "--device", "cuda", "--data", str(subset), "--out", str(out)])
    report = json.loads(out.read_text())
    assert rc == 0, {n: p["error"] for n, p in report["parts"].items()}
    assert report["summary"]["zero_grad"]["ok"] is True
    assert all(p["peak_gpu_memory_mib"] > 0 for p in report["parts"].values())
