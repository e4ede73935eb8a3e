"""`ubsmoe bench` (quick mode: structure, not timings) and `ubsmoe flops` through the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from ubsmoe.bench import BenchOptions, interleaved_timings, ratio_stats, run_bench
from ubsmoe.cli import app

TIMING = {"median_s", "min_s", "max_s", "times_s"}
RATIO = {"of_medians", "paired_median", "paired_min", "paired_max"}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """One quick run of every suite through the CLI (1 thread: per-expert matmuls open an
    OpenMP region each, which crawls when the test machine's cores are oversubscribed).
    Its federated suite starts a SuperLink, so every test using this is marked e2e."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--quick", "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "SMoE layer" in result.output and "local training step" in result.output
    return json.loads(out.read_text())


@pytest.mark.e2e
def test_quick_report_top_level_fields(quick_report):
    r = quick_report
    assert r["schema"] == "ubsmoe-bench/1" and r["quick"] is True
    assert r["command"].startswith("ubsmoe bench --quick --threads 1 --out ")
    assert set(r["suites"]) == {"layer", "model_step", "server_memory", "federated", "dispatch",
                                "base", "eval"} == set(r["summary"])
    env = r["environment"]
    assert env["torch_threads"] == 1
    for key in ("python", "torch", "transformers", "peft", "cpu_count", "torch_interop_threads",
                "cpu_capability", "load_average", "env"):
        assert key in env
    for suite in r["suites"].values():
        assert suite["wall_s"] > 0 and set(suite["load_average"]) == {"before", "after"}
        assert suite["description"]


@pytest.mark.e2e
def test_quick_report_layer_fields(quick_report):
    layer = quick_report["suites"]["layer"]
    assert set(layer["shape"]) == {"hidden", "intermediate", "num_experts", "num_tokens", "lora_rank",
                                   "lora_alpha"}
    assert layer["ks"] == [1, 8] and layer["timing"]["repeats"] == 2
    assert set(layer["dtypes"]) == {"float32", "bfloat16"}
    for dtype, entry in layer["dtypes"].items():
        assert set(entry["cases"]) == {"ubsmoe_k1", "ubsmoe_k8", "reference_k1", "reference_k8"}
        for case in entry["cases"].values():
            assert TIMING <= set(case) and len(case["times_s"]) == 2
            assert case["flops"]["total"] >= case["flops"]["grouped_mm"] > 0
        assert set(entry["ratios"]) == {"speedup_vs_reference_k1", "speedup_vs_reference_k8",
                                        "ubsmoe_k1_over_k8", "reference_k1_over_k8"}
        assert all(set(v) == RATIO for v in entry["ratios"].values())
        # Ours never forms frozen-weight gradients: fewer FLOPs than the reference at every K.
        for k in (1, 8):
            assert entry["cases"][f"ubsmoe_k{k}"]["flops"]["total"] < entry["cases"][f"reference_k{k}"]["flops"]["total"]
        assert 0 < entry["flop_ratio"]["ubsmoe_k1_over_k8"] < 0.2
        # Both implementations compute the same function (same weights and LoRA factors).
        tol = 1e-4 if dtype == "float32" else 0.5
        for diffs in entry["max_abs_diff"].values():
            assert set(diffs) == {"output", "input_grad", "gate_up_proj_lora_A_grad", "gate_up_proj_lora_B_grad",
                                  "down_proj_lora_A_grad", "down_proj_lora_B_grad"}
            assert all(v < tol for v in diffs.values()), diffs
        summary = quick_report["summary"]["layer"][dtype]
        assert set(summary["targets_met"]) == {"speedup_k1", "speedup_k8", "k1_over_k8"}
    assert quick_report["summary"]["layer"]["targets"] == {"speedup_k1": 2.0, "speedup_k8": 1.3, "k1_over_k8": 0.2}


@pytest.mark.e2e
def test_quick_report_model_step_fields(quick_report):
    models = quick_report["suites"]["model_step"]["models"]
    assert list(models) == ["tiny_quick"]
    res = models["tiny_quick"]
    assert res["tokens_per_step"] == res["config"]["batch_size"] * res["config"]["seq_len"]
    expected = ({f"smoe_k{k}" for k in (1, 2, 4, 8)} | {f"lora_r{r}" for r in (12, 16, 24, 40)}
                | {"pg_universal_k1", "pg_probe_k1"})
    assert set(res["cases"]) == expected
    # the probe rule's extra measured FLOPs are exactly its analytic count (same routing)
    universal, probe = res["cases"]["pg_universal_k1"], res["cases"]["pg_probe_k1"]
    assert universal["pg_probe"]["slots"] == 0 < probe["pg_probe"]["slots"]
    assert probe["flops_measured"] - universal["flops_measured"] == probe["pg_probe"]["flops_analytic"]
    pg_summary = quick_report["suites"]["model_step"]["summary"]["tiny_quick"]["pg_probe_vs_universal"]
    assert pg_summary["flops_ratio"] > 1.0 and pg_summary["probe_slots"] == probe["pg_probe"]["slots"]
    for case in res["cases"].values():
        assert TIMING <= set(case)
        assert case["flops_measured"] > 0 and case["flops_analytic"] > 0
        assert set(case["flops_analytic_terms"]) == {"attention_proj", "attention_scores", "router", "mlp",
                                                     "lm_head", "lora"}
    for group, ref in (("smoe", "smoe_k8"), ("lora_rank", "lora_r40")):
        assert res[group]["reference_case"] == ref
        for row in res[group]["budgets"].values():
            assert set(row) == {"time_ratio", "flops_ratio", "time_saving", "flops_saving"}
            assert set(row["time_ratio"]) == RATIO
    flops = [res["cases"][f"smoe_k{k}"]["flops_measured"] for k in (1, 2, 4, 8)]
    assert flops == sorted(flops) and len(set(flops)) == 4
    assert res["smoe"]["budgets"]["smoe_k8"]["flops_ratio"] == 1.0


def test_interleaved_timings_alternate_order_and_ratio_stats():
    calls = []
    times = interleaved_timings({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    stats = ratio_stats([2.0, 4.0, 6.0], [1.0, 1.0, 2.0])
    assert stats == {"of_medians": 4.0, "paired_median": 3.0, "paired_min": 2.0, "paired_max": 4.0}


def test_bench_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="suites: got \\['nope'\\], expected one or more of layer"):
        run_bench(["nope"], BenchOptions(quick=True))
    with pytest.raises(ValueError, match="repeats"):
        BenchOptions(repeats=0)
    result = CliRunner().invoke(app, ["bench", "--suite", "nope", "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 2 and "--suite: got nope" in result.output
    assert not (tmp_path / "b.json").exists()
    result = CliRunner().invoke(app, ["bench", "--threads", "0"])
    assert result.exit_code == 2 and "threads" in result.output


@pytest.mark.e2e
def test_quick_report_base_fields(quick_report):
    """suites.base: the shipped base's held-out loss per K, paired K-drop with z, throughput."""
    base = quick_report["suites"]["base"]
    held = base["heldout"]
    assert held["digest_matches"] is True and held["sequences"] == 16 and held["seq_len"] == 256
    assert list(held["loss"]) == ["8", "4", "2", "1"] and list(held["k_drop"]) == ["4", "2", "1"]
    for d in held["k_drop"].values():
        assert d["se"] > 0 and d["z"] == pytest.approx(d["mean"] / d["se"])
    # the shipped base was pretrained at top-8: dropping to one expert costs loss
    assert held["k_drop"]["1"]["mean"] > held["k_drop"]["4"]["mean"] > 0
    assert base["pretrain_throughput"]["tokens_per_s"] > 0 and base["card"]["steps"] > 0
    s = quick_report["summary"]["base"]
    assert s["k_drop_k1"] == held["k_drop"]["1"]["mean"] and s["targets"] == {"k_drop_k1": 0.05, "z": 3.0}
    assert s["meets_target"] == (s["k_drop_k1"] >= 0.05 and s["k_drop_k1_z"] > 3)


@pytest.mark.e2e
def test_quick_report_dispatch_fields(quick_report):
    """suites.dispatch.models.<shape>.<dtype>.<method>.<K> holds ops, optimizer_ops, by_component."""
    disp = quick_report["suites"]["dispatch"]
    assert list(disp["models"]) == ["tiny_quick"]
    per_dtype = disp["models"]["tiny_quick"]
    # bfloat16_compute: bfloat16 with train.adapter_dtype=compute (issue 24 part 2)
    assert set(per_dtype) == {"float32", "bfloat16", "bfloat16_compute", "bfloat16_compute_fused"}
    for per_method in per_dtype.values():
        assert set(per_method) == {"smoe", "ubsmoe"}
        for per_k in per_method.values():
            assert set(per_k) == {"1", "8"}
            for case in per_k.values():
                assert case["ops"] > 0 and case["optimizer_ops"] > 0 and case["reproducible"] is True
                assert sum(case["by_component"].values()) == case["ops"]
    casts = disp["summary"]["tiny_quick"]["bfloat16"]["smoe"]["1"]["casts"]
    assert casts > disp["summary"]["tiny_quick"]["float32"]["smoe"]["1"]["casts"]


@pytest.mark.e2e
def test_quick_report_server_memory_fields(quick_report):
    mem = quick_report["suites"]["server_memory"]
    assert [r["num_clients"] for r in mem["runs"]] == [2, 8]
    for run in mem["runs"]:
        assert run["peak_rss_mib"] > 0 and run["adapter_mib"] > 0 and run["max_buffered_replies"] == 0
    growth = mem["summary"]["peak_rss_growth_8_vs_2"]
    assert growth == mem["runs"][1]["peak_rss_mib"] / mem["runs"][0]["peak_rss_mib"]


@pytest.mark.e2e
def test_quick_report_federated_fields(quick_report):
    fed = quick_report["suites"]["federated"]
    assert [r["round"] for r in fed["rounds"]] == [1]
    for rnd in fed["rounds"]:
        assert 0.0 <= rnd["overhead_share"] <= 1.0 and rnd["round_wall_s"] >= rnd["overhead_s"]
        assert len(rnd["clients"]) == 4
        for c in rnd["clients"]:
            assert c["bytes_down"] > 0 and 0 < c["bytes_up"] and c["train_s"] > 0
    uploads = fed["smoe_upload_per_k"]
    assert set(uploads) == {"k1", "k8"}
    for u in uploads.values():
        assert 0 < u["sparse_bytes"] <= u["dense_bytes"]
    # Naive SMoE at K_c = 1 leaves more experts untouched than at K_c = 8: a smaller upload.
    assert uploads["k1"]["sparse_bytes"] < uploads["k8"]["sparse_bytes"]


@pytest.mark.e2e
def test_quick_report_eval_fields(quick_report):
    ev = quick_report["suites"]["eval"]
    assert ev["examples"] == 8 and ev["prompt_tokens"]["max"] > ev["prompt_tokens"]["min"]
    assert set(ev["cases"]) == {"generation_before", "generation", "generation_answering",
                                "loglik_separate", "loglik"}
    for case in ev["cases"].values():
        assert TIMING <= set(case) and case["examples_per_s"] > 0
        assert case["examples_per_s"] == pytest.approx(ev["examples"] / case["median_s"])
    # The label-biased model stops early; the random one runs to max_new_tokens.
    assert ev["cases"]["generation_answering"]["mean_response_tokens"] < \
        ev["cases"]["generation"]["mean_response_tokens"]
    assert set(ev["summary"]) == {"generation_before_ex_per_s", "generation_ex_per_s",
                                  "generation_answering_ex_per_s", "loglik_separate_ex_per_s",
                                  "loglik_ex_per_s", "generation_speedup", "loglik_speedup"}
    assert ev["summary"]["loglik_speedup"] == pytest.approx(
        ev["cases"]["loglik"]["examples_per_s"] / ev["cases"]["loglik_separate"]["examples_per_s"])

def test_interleaved_timings_syncs_around_every_timed_call_only():
    from ubsmoe.bench import device_sync

    events = []
    cases = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    times = interleaved_timings(cases, repeats=2, warmup=1, sync=lambda: events.append("sync"))
    assert events == ["a", "b",  # warm-up: no sync
                      "sync", "a", "sync", "sync", "b", "sync",
                      "sync", "b", "sync", "sync", "a", "sync"]
    assert {k: len(v) for k, v in times.items()} == {"a": 2, "b": 2}
    assert device_sync("cpu") is None and device_sync(torch.device("cpu")) is None
    assert callable(device_sync("cuda:0"))  # built lazily: no CUDA call until it runs


def test_layer_and_step_models_are_built_on_the_requested_device_and_dtype():
    from ubsmoe.bench.layer import QUICK_SHAPE, build_layers
    from ubsmoe.bench.model_step import QUICK, _build

    ours, reference, _ = build_layers(QUICK_SHAPE, 8, torch.bfloat16, 0, device="meta")
    assert {p.device.type for p in [*ours.parameters(), *reference.parameters()]} == {"meta"}
    model = _build(QUICK, 4, 0, device="meta", dtype="bfloat16")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.e2e
def test_flexlora_svd_benchmark_runs_as_a_module_and_as_a_script():
    """`python -m ubsmoe.bench.flexlora_svd` and benchmarks/flexlora_svd.py (moved from metrics/) answer --help."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "flexlora_svd.py"
    for cmd in ([sys.executable, "-m", "ubsmoe.bench.flexlora_svd", "--help"], [sys.executable, str(script), "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "--out" in proc.stdout and "--repeats" in proc.stdout
