"""`ubsmoe plan` and the run pre-flight (metrics/plan.py, cli.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from ubsmoe.config import load_config
from ubsmoe.metrics import plan as plan_mod
from ubsmoe.metrics.plan import PlanError, activation_bytes, check_plan, plan

OLMOE = "allenai/OLMoE-1B-7B-0924"
GIB = 1024 ** 3


@pytest.fixture(scope="module")
def olmoe_plan():
    """The plan of the paper's model on CUDA with the embedded run's settings."""
    return plan(load_config(None, [f"model.name={OLMOE}", "model.init=random", "model.device=cuda"]))


def test_olmoe_plan_params_and_activated_per_budget(olmoe_plan):
    p = olmoe_plan
    assert p["params"]["total"] == 6_919_161_856
    assert [r["top_k"] for r in p["params"]["per_budget"]] == [1, 2, 4, 8]
    activated = [round(r["activated_params"] / 1e9, 3) for r in p["params"]["per_budget"]]
    assert activated == [0.577, 0.678, 0.879, 1.282]
    assert p["model"]["dtype"] == "bfloat16" and p["model"]["device"] == "cuda"


def test_olmoe_plan_memory_terms(olmoe_plan):
    p = olmoe_plan
    client = p["memory"]["client_process"]
    # Base weights: frozen parameters x 2 bytes (UB-SMoE's phi and, with model.router_trainable,
    # the routers W_r [64, 2048] of the 16 layers are trainable: adapters, float32).
    router = 16 * 64 * 2048
    assert client["base_weights"] == 2 * (6_919_161_856 - router)
    trainable = p["params"]["trainable_per_client"]
    assert p["params"]["frozen_in_model"] == 6_919_161_856 - router
    assert client["adapters"] == 4 * trainable == client["gradients"]
    assert client["optimizer"] == 8 * trainable  # Adam: two float32 states
    assert client["total"] == sum(v for k, v in client.items() if k != "total")
    workers = p["processes"]["workers"]["at_once"]
    assert p["memory"]["device_total"] == p["memory"]["server_process"]["total"] + workers * client["total"]
    assert p["disk"]["total"] == p["disk"]["checkpoint_bytes"] * (p["disk"]["kept_checkpoints"] + 1)


def test_activations_scale_with_batch_and_drop_with_checkpointing(olmoe_plan):
    from ubsmoe.metrics.model_shape import load_model_shape

    s = load_model_shape(OLMOE)
    one = activation_bytes(s, 1, 256, 8, 20, 2)
    assert activation_bytes(s, 16, 256, 8, 20, 2) == 16 * one
    assert activation_bytes(s, 1, 256, 1, 20, 2) < one
    assert activation_bytes(s, 1, 256, 8, 20, 2, checkpointing=True) < one / 4
    assert olmoe_plan["memory"]["client_process"]["activations"] == activation_bytes(s, 16, 256, 8, 20, 2)


def test_plan_flops_per_round_sum_levels(olmoe_plan):
    p = olmoe_plan
    tokens = p["assumptions"]["tokens_per_client_round"]
    assert tokens == 12 * 16 * 256  # embedded run: 12 steps of 16 x 256
    expect = sum(r["clients_per_round"] * tokens * r["flops_per_token"] for r in p["params"]["per_budget"])
    assert p["flops_per_round"] == pytest.approx(expect)
    assert p["flops_per_round"] > 0
    from ubsmoe.metrics.flops import training_flops_per_token
    from ubsmoe.metrics.model_shape import load_model_shape

    shape = load_model_shape(OLMOE)  # the router trains (model.router_trainable): counted at 6 FLOPs
    assert [r["flops_per_token"] for r in p["params"]["per_budget"]] == [
        training_flops_per_token(shape, k, 20, 256, router_trainable=True)["total"] for k in (1, 2, 4, 8)]


def test_plan_follows_accumulation_gpus_and_kept_checkpoints():
    """grad accumulation divides the micro-batch; fl.client_gpus bounds the workers at once;
    fl.keep_checkpoints sets the checkpoint disk (0: every round's checkpoint is kept)."""
    base = plan(load_config(None, ["model.name=medium", "fl.client_cpus=1", "fl.rounds=5"]))
    acc = plan(load_config(None, ["model.name=medium", "fl.client_cpus=1", "fl.rounds=5",
                                  "train.grad_accumulation_steps=4", "fl.client_gpus=0.5"]))
    assert acc["assumptions"]["micro_batch"] == 4
    assert acc["memory"]["client_process"]["activations"] * 4 == base["memory"]["client_process"]["activations"]
    assert acc["processes"]["workers"]["at_once"] == 2  # floor(1 GPU / 0.5)
    disk = {k: plan(load_config(None, ["model.name=medium", "fl.rounds=5", f"fl.keep_checkpoints={k}"]))["disk"]
            for k in (1, 2, 0)}
    assert [disk[k]["kept_checkpoints"] for k in (1, 2, 0)] == [1, 2, 5]
    assert disk[0]["total"] == 6 * disk[0]["checkpoint_bytes"]  # 5 rounds + the final adapters


def test_check_plan_refuses_a_run_that_does_not_fit():
    cfg = load_config(None, ["model.name=medium", "model.device=cpu"])
    p = check_plan(cfg, free_bytes=10 ** 15)
    need = p["memory"]["device_total"]
    check_plan(cfg, free_bytes=int(need / 0.9) + 1)
    with pytest.raises(PlanError, match=r"^plan: the run needs .* GiB on cpu .* but 90% of its free "
                                        r"memory is .*: .*, or pass --force$"):
        check_plan(cfg, free_bytes=int(need / 0.9) - 1024)


def test_cli_plan_json_full_size_offline():
    from ubsmoe.cli import app

    result = CliRunner().invoke(app, ["plan", f"model.name={OLMOE}", "model.init=random", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["params"]["total"] == 6_919_161_856
    assert out["model"]["init"] == "random"


def test_cli_plan_table_and_bad_key():
    from ubsmoe.cli import app

    ok = CliRunner().invoke(app, ["plan", "model.name=medium"])
    assert ok.exit_code == 0 and "memory per process" in ok.stdout
    bad = CliRunner().invoke(app, ["plan", "model.device=tpu"])
    assert bad.exit_code == 2 and "model.device" in bad.output


def test_run_preflight_exits_2_and_force_overrides(monkeypatch, tmp_path):
    """`ubsmoe run` stops on the plan (one line, exit 2); --force goes past it."""
    from ubsmoe import cli
    from ubsmoe.fl import client_runtime

    monkeypatch.setattr(plan_mod, "free_memory", lambda device: 1024 ** 2)
    reached = {}

    def stop(cfg):
        reached["setup"] = True
        raise OSError("stopped after the pre-flight")

    monkeypatch.setattr(client_runtime, "shared_setup", stop)
    args = ["run", "model.name=medium", "model.device=cpu", "--out", str(tmp_path / "r")]
    refused = CliRunner().invoke(cli.app, args)
    assert refused.exit_code == 2
    assert "plan: the run needs" in refused.output and "--force" in refused.output
    assert "setup" not in reached
    forced = CliRunner().invoke(cli.app, [*args, "--force"])
    assert reached.get("setup") and "stopped after the pre-flight" in forced.output


@pytest.mark.parametrize(("overrides", "cpus", "gpus", "message"), [
    (["fl.client_cpus=4"], 2, 0, r"^fl\.client_cpus: got 4, expected at most 2 \(the CPUs this machine offers"),
    (["fl.client_gpus=0.5"], 16, 0, r"^fl\.client_gpus: got 0\.5, expected 0 \(no CUDA device is visible"),
    (["fl.client_gpus=2"], 16, 1, r"^fl\.client_gpus: got 2, expected at most 1 \(the CUDA devices visible\)$"),
    (["model.device=cuda"], 16, 1, r"^fl\.client_gpus: got 0 with model\.device=cuda, expected a share of a GPU"),
    (["model.device=cuda:1", "fl.client_gpus=0.5"], 16, 2,
     r"^model\.device: got 'cuda:1', expected auto or cuda with fl\.client_gpus > 0 \(a simulated client"),
], ids=["cpus", "gpus without cuda", "more gpus than visible", "cuda clients without a gpu share",
        "a gpu index clients cannot see"])
def test_check_resources_refuses_clients_the_simulation_cannot_place(overrides, cpus, gpus, message):
    from ubsmoe.errors import ConfigError
    from ubsmoe.metrics.plan import check_resources

    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        check_resources(cfg, cpus=cpus, gpus=gpus)


def test_check_resources_accepts_what_fits_and_warns_of_cpu_clients_on_a_gpu_box():
    from ubsmoe.metrics.plan import check_resources

    assert check_resources(load_config(None, ["fl.client_cpus=2"]), cpus=2, gpus=0) == []
    assert check_resources(load_config(None, ["fl.client_gpus=0.5", "model.device=cuda"]), cpus=16, gpus=1) == []
    assert check_resources(load_config(None, ["fl.client_gpus=1"]), cpus=16, gpus=1) == []
    assert check_resources(load_config(None, ["fl.client_gpus=1", "model.device=cuda:0"]), cpus=16, gpus=2) == []
    # The default (auto device, no GPU share) on a GPU box: the server uses the GPU, clients the CPU.
    [warning] = check_resources(load_config(None, []), cpus=16, gpus=1)
    assert warning.startswith("clients train on the CPU: fl.client_gpus=0") and "fl.client_gpus, e.g. 0.5" in warning
    assert check_resources(load_config(None, ["model.device=cpu"]), cpus=16, gpus=1) == []


def test_run_refuses_a_gpu_share_without_cuda_before_starting_flower(monkeypatch, tmp_path):
    """`ubsmoe run fl.client_gpus=0.5` on a machine without CUDA: one line, exit 2, no run folder."""
    import torch

    from ubsmoe import cli
    from ubsmoe.fl import client_runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(client_runtime, "shared_setup", lambda cfg: pytest.fail("the run started"))
    out = tmp_path / "r"
    result = CliRunner().invoke(cli.app, ["run", "--out", str(out), "fl.client_gpus=0.5"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("error: fl.client_gpus: got 0.5, expected 0 (no CUDA device is visible")
    assert not out.exists()
