"""Dense backbones (OLMo/Llama, paper Table 2): FedIT and the rank methods, refusal of SMoE methods."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DENSE_SMALL
from typer.testing import CliRunner

from ubsmoe.cli import app
from ubsmoe.config import ModelConfig, load_config
from ubsmoe.errors import ConfigError
from ubsmoe.fl.client_runtime import ClientRuntime, shared_setup
from ubsmoe.fl.server import Server
from ubsmoe.io import read_jsonl
from ubsmoe.metrics.flops import param_counts, training_flops_per_token
from ubsmoe.metrics.model_shape import load_model_shape
from ubsmoe.models import build_model, smoe_layers
from ubsmoe.models.adapters import set_lora_rank

SMALL = DENSE_SMALL



def test_tiny_dense_gets_peft_lora_on_attention_and_mlp(tiny_tokenizer):
    cfg = ModelConfig(name="tiny-dense", attention_lora=True, lora_rank=4)
    model, _ = build_model(cfg, tiny_tokenizer, seed=0)
    assert model.config.model_type == "olmo" and smoe_layers(model) == []
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    projections = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert projections == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # Zero LoRA B: the adapted model equals its base; training moves it.
    ids = torch.randint(0, len(tiny_tokenizer), (1, 8))
    with torch.no_grad(), model.disable_adapter():
        base = model(ids).logits
    torch.testing.assert_close(model(ids).logits, base)


def test_dense_trainable_params_scale_with_each_rank_level(tiny_tokenizer):
    cfg = ModelConfig(name="tiny-dense", attention_lora=True, lora_rank=8)
    model, _ = build_model(cfg, tiny_tokenizer, seed=0)
    counts = {}
    for r in (2, 4, 8):
        set_lora_rank(model, r, 16.0, seed=1)
        counts[r] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # LoRA parameters are r * (in + out) per target: linear in the rank.
    assert counts[2] > 0 and counts[4] == 2 * counts[2] and counts[8] == 4 * counts[2]


def test_olmo_1b_shipped_config_flops_and_params_grow_with_rank():
    shape = load_model_shape("allenai/OLMo-1B-hf")
    assert shape.model_type == "olmo" and not shape.is_moe
    total = [sum(training_flops_per_token(shape, 1, r, 256).values()) for r in (12, 16, 24, 40)]
    assert total == sorted(total) and total[0] < total[-1]
    params = param_counts(shape)
    assert 1.0e9 < params["total"] < 1.3e9


@pytest.mark.parametrize("method", ["ubsmoe", "smoe", "smoe_llb", "a3smoe", "a3smoe_flexlora"])
def test_smoe_methods_are_refused_on_a_dense_model(method):
    with pytest.raises(ConfigError, match=f"method {method} needs a sparse-MoE model; "
                                          "model tiny-dense is dense"):
        load_config(overrides=[f"method={method}", "model.name=tiny-dense"])
    with pytest.raises(ConfigError, match="model allenai/OLMo-1B-hf is dense"):
        load_config(overrides=[f"method={method}", "model.name=allenai/OLMo-1B-hf", "model.init=random"])


def test_cli_refuses_an_smoe_method_on_a_dense_model_in_one_line(tmp_path):
    result = CliRunner().invoke(app, ["run", "--out", str(tmp_path / "run"), *SMALL, "method=ubsmoe"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs a sparse-MoE model" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedit", "hetlora", "flora", "florist"])
def test_lora_methods_train_a_dense_model_in_process(tmp_path, method):
    cfg = load_config(overrides=[*SMALL, f"method={method}", f"model.tokenizer_cache={tmp_path / 'c'}",
                                 "eval.protocols=[loglik]", "eval.examples_per_task=2"])
    setup = shared_setup(cfg)
    server = Server(cfg, tmp_path / "run", setup)
    runtime = ClientRuntime(cfg, setup)
    before = {k: v.clone() for k, v in server.state.adapters.items()}
    mlp_base = {n: p.detach().clone() for n, p in server.model.named_parameters()
                if ".mlp." in n and "base_layer" in n}
    updates = [runtime.train_round(**server.client_task(c, 1)) for c in server.sample_clients(1)]
    assert all(u.top_k == 1 and u.expert_counts.numel() == 0 for u in updates)
    server.end_round(1, updates)
    after = server.state.adapters
    assert any(".mlp." in k for k in after)  # LoRA on the dense MLP
    adapters_moved = any(not torch.equal(before[k], after[k]) for k in before if k in after)
    # FLoRA and FLoRIST merge the round's LoRA into the base weights and restart the adapters.
    base_moved = any(not torch.equal(v, dict(server.model.named_parameters())[n])
                     for n, v in mlp_base.items())
    assert mlp_base and (base_moved if method in ("flora", "florist") else adapters_moved)
    summary = server.finish()
    assert summary["rounds_completed"] == 1 and torch.isfinite(torch.tensor(summary["train_loss"][0]["loss"]))


@pytest.mark.e2e
@pytest.mark.parametrize(("method", "ranks"), [("fedit", [20, 20, 20, 20]), ("flexlora", [12, 16, 24, 40])])
def test_fedit_and_flexlora_run_a_dense_model_end_to_end_via_cli(tmp_path, method, ranks):
    """`ubsmoe run` (Flower, local SuperLink) on tiny-dense with the default commonsense data."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--out", str(out), *SMALL, f"method={method}",
                                      f"model.tokenizer_cache={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["method"] == method
    rows = [r for r in summary["accuracy"] if r["protocol"] == "loglik"]
    # FedIT: one rank for every level; FlexLoRA: one rank per level (its default ranks);
    # a dense model has one MLP per token, so every level runs at K = 1.
    assert [(r["budget"], r["lora_rank"], r["top_k"]) for r in rows] == [
        (b, r, 1) for b, r in zip([0.125, 0.25, 0.5, 1.0], ranks, strict=True)]
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]
    assert len(train[0]["clients"]) == 2 and all(c["top_k"] == 1 for c in train[0]["clients"])


def test_table2_tiny_cells_resolve_dense_lora_methods_to_tiny_dense():
    from ubsmoe.experiments import load_experiment, resolve_cell

    exp = load_experiment("table2")
    models = {c.method: resolve_cell(exp, c).model.name for c in exp.cells("tiny")}
    assert models == {"fedit": "tiny-dense", "hetlora": "tiny-dense", "flexlora": "tiny-dense",
                      "flora": "tiny-dense", "florist": "tiny-dense", "ubsmoe": "tiny"}


@pytest.mark.parametrize("model_type", ["olmo", "llama", "mistral"])
def test_every_dense_family_gets_lora_on_attention_and_mlp_and_trains(model_type):
    from ubsmoe.models.build import prepare_model
    from ubsmoe.models.families import DENSE_FAMILIES

    fam = DENSE_FAMILIES[model_type]
    config = fam.config_cls()(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = prepare_model(fam.model_cls()(config), ModelConfig(attention_lora=True, lora_rank=4))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model(torch.randint(0, 128, (2, 7))).logits.pow(2).mean().backward()
    # LoRA B starts at zero, so only the B factors get a gradient on the first step.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
