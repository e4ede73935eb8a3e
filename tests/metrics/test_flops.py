"""The FLOP / activated-parameter calculator (`ubsmoe flops`) and its cross-checks."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from ubsmoe.cli import app
from ubsmoe.config import ModelConfig
from ubsmoe.metrics.flops import (
    budget_table,
    default_budgets,
    lora_params_per_token,
    param_counts,
    register_flop_formulas,
    training_flops_per_token,
)
from ubsmoe.metrics.model_shape import ModelShape, load_model_shape, model_shape_from_config
from ubsmoe.models import build_model, set_top_k
from ubsmoe.models.presets import shipped_config

OLMOE = "allenai/OLMoE-1B-7B-0924"
OLMO = "allenai/OLMo-1B-hf"
BUDGETS = [0.125, 0.25, 0.5, 1.0]


def _meta_param_count(config: dict) -> int:
    """Parameters of the Hugging Face model built from ``config`` on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
    hf_config = AutoConfig.for_model(**fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", [OLMOE, OLMO])
def test_total_params_equal_the_hf_model_built_from_the_shipped_config(name):
    config = shipped_config(name)
    assert param_counts(model_shape_from_config(config, name))["total"] == _meta_param_count(config)


@pytest.mark.parametrize("config", [
    {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
     "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300, "tie_word_embeddings": False},
    {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
     "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 300, "num_local_experts": 6,
     "num_experts_per_tok": 2, "tie_word_embeddings": True},
])
def test_total_params_equal_hf_for_other_supported_families(config):
    assert param_counts(model_shape_from_config(config, "x"))["total"] == _meta_param_count(config)


def test_olmoe_1b_7b_activated_params_per_budget():
    shape = load_model_shape(OLMOE)
    table = budget_table(shape, default_budgets(shape, BUDGETS, None, 20))
    assert [r["top_k"] for r in table["rows"]] == [1, 2, 4, 8]
    active = [r["activated_params"] for r in table["rows"]]
    # Public figures: about 0.6B / 0.7B / 0.9B / 1.3B active (K = 1/2/4/8), 6.9B total.
    for got, public in zip(active, [0.6e9, 0.7e9, 0.9e9, 1.3e9]):
        assert abs(got - public) < 0.03e9
    assert abs(table["total_params"] - 6.9e9) < 0.025e9
    # Exact: embeddings + untied head + 16 x (attention + qk-norms + norms + router) + K experts.
    per_expert_all_layers = 16 * 3 * 2048 * 1024
    assert active[0] == 577_374_208
    assert [a - active[0] for a in active] == [(k - 1) * per_expert_all_layers for k in (1, 2, 4, 8)]


def test_olmoe_flops_scale_with_k_and_k1_vs_k8():
    shape = load_model_shape(OLMOE)
    flops = [training_flops_per_token(shape, k, 20, 256) for k in (1, 2, 4, 8)]
    totals = [f["total"] for f in flops]
    assert totals == sorted(totals) and len(set(totals)) == 4
    # Only the experts, their LoRA and nothing else change with K, linearly.
    for f, k in zip(flops, (1, 2, 4, 8)):
        assert f["mlp"] == k * flops[0]["mlp"]
        assert f["attention_proj"] == flops[0]["attention_proj"] and f["lm_head"] == flops[0]["lm_head"]
    per_expert = 4 * 16 * 3 * 2048 * 1024 + 6 * 16 * 20 * ((2048 + 2048) + (1024 + 2048))
    assert [t - totals[0] for t in totals] == [(k - 1) * per_expert for k in (1, 2, 4, 8)]
    table = budget_table(shape, default_budgets(shape, BUDGETS, None, 20))
    cmp = table["lowest_vs_highest"]
    # The paper's "45.0%" is the activated-parameter ratio K=1 : K=8 (0.450); counting the
    # training FLOPs (frozen backward, attention at seq 256, LoRA) K = 1 needs 41.2% of K = 8.
    # The router trains by default (model.router_trainable): 6 FLOPs per router parameter.
    assert cmp["activated_params_ratio"] == pytest.approx(0.4504, abs=5e-4)
    assert cmp["flops_ratio"] == pytest.approx(0.4125, abs=5e-4)
    assert cmp["flops_reduction"] == pytest.approx(1 - cmp["flops_ratio"])
    frozen = budget_table(shape, default_budgets(shape, BUDGETS, None, 20), router_trainable=False)
    assert frozen["lowest_vs_highest"]["flops_ratio"] == pytest.approx(0.4120, abs=5e-4)


def test_trainable_router_costs_six_flops_per_parameter_frozen_four_or_two():
    shape = load_model_shape(OLMOE)
    router_params = 16 * 64 * 2048
    trained = training_flops_per_token(shape, 2, 20, 256)
    frozen = training_flops_per_token(shape, 2, 20, 256, router_trainable=False)
    forward_only = training_flops_per_token(shape, 2, 20, 256, frozen_backward=False, router_trainable=False)
    assert (trained["router"], frozen["router"], forward_only["router"]) == (
        6 * router_params, 4 * router_params, 2 * router_params)
    assert trained["total"] - frozen["total"] == 2 * router_params
    assert training_flops_per_token(shape, 2, 20, 256, frozen_backward=False)["router"] == 6 * router_params


def test_olmo_1b_rank_40_vs_12_saves_little():
    shape = load_model_shape(OLMO)
    budgets = default_budgets(shape, BUDGETS, [12, 16, 24, 40], 20)
    assert [b.lora_rank for b in budgets] == [12, 16, 24, 40] and all(b.top_k == 0 for b in budgets)
    full = budget_table(shape, budgets)
    fwd_only = budget_table(shape, budgets, frozen_backward=False)
    assert full["lowest_vs_highest"]["flops_reduction"] == pytest.approx(0.0254, abs=5e-4)
    # Counting the frozen model forward only (2N + 6P) gives the paper's "about 5%".
    assert fwd_only["lowest_vs_highest"]["flops_reduction"] == pytest.approx(0.0493, abs=5e-4)
    assert full["lowest_vs_highest"]["activated_params_ratio"] == 1.0
    rows = full["rows"]
    lora = [r["flops_per_token"]["lora"] for r in rows]
    assert lora == [6 * r * 16 * (4 * (2048 + 2048) + 3 * (2048 + 8192)) for r in (12, 16, 24, 40)]


def test_lora_targets_select_terms():
    shape = load_model_shape(OLMOE)
    both = lora_params_per_token(shape, 8, 2, "all")
    attn = lora_params_per_token(shape, 8, 2, "attention")
    mlp = lora_params_per_token(shape, 8, 2, "mlp")
    assert attn["mlp"] == 0 and mlp["attention"] == 0
    assert both == {"attention": attn["attention"], "mlp": mlp["mlp"]}
    with pytest.raises(ValueError, match="lora_targets"):
        lora_params_per_token(shape, 8, 2, "router")


def _tiny_shape(cfg: ModelConfig, vocab: int) -> ModelShape:
    t = cfg.tiny
    return ModelShape(name="tiny", model_type="olmoe", hidden_size=t.hidden_size,
                      num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
                      num_kv_heads=t.num_attention_heads, head_dim=t.hidden_size // t.num_attention_heads,
                      vocab_size=vocab, tie_word_embeddings=False, intermediate_size=t.intermediate_size,
                      num_experts=t.num_experts, top_k=t.num_experts_per_tok, qk_norm=True)


@pytest.mark.parametrize("k", [1, 8])
def test_analytic_flops_match_flop_counter_on_tiny_model(tiny_tokenizer, tiny_model_cfg, k):
    """Experts exactly; the whole step up to two stated differences."""
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer)
    set_top_k(model, k)
    vocab = len(tiny_tokenizer)
    batch, seq = 2, 12
    ids = torch.randint(2, vocab, (batch, seq))
    register_flop_formulas()
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().pow(2).mean().backward()
    counts = counter.get_flop_counts()["Global"]
    shape = _tiny_shape(tiny_model_cfg, vocab)
    r, tokens = tiny_model_cfg.lora_rank, batch * seq
    analytic = training_flops_per_token(shape, k, r, seq)
    expert_lora = lora_params_per_token(shape, r, k)["mlp"]
    assert counts[torch.ops.aten._grouped_mm] == tokens * (analytic["mlp"] + 6 * expert_lora)
    h = shape.hidden_size
    # Autograd skips layer 0's q/k/v input gradients (base and LoRA A): nothing below needs them.
    layer0_qkv = 3 * 2 * h * (h + r)
    # PyTorch's flash-attention backward formula also counts the recomputed QK^T (+1/2 forward).
    recompute = 2 * seq * shape.num_heads * shape.head_dim * shape.num_layers
    # The gate weights' gradient (trainable router) takes each slot's dot product of the
    # activation gradient and act(gate) * up as a bmm, which the counter counts: 2 K I per token per layer.
    gate_grad = 2 * k * shape.intermediate_size * shape.num_layers
    assert counter.get_total_flops() == tokens * (analytic["total"] - layer0_qkv + recompute + gate_grad)


def test_load_model_shape_from_local_paths_and_errors(tmp_path):
    config = shipped_config(OLMOE)
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_dir, from_file = load_model_shape(str(tmp_path)), load_model_shape(str(tmp_path / "config.json"))
    assert from_dir == replace(from_file, name=str(tmp_path)) == replace(load_model_shape(OLMOE), name=str(tmp_path))
    assert load_model_shape(str(tmp_path)).num_experts == 64
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type: got 'gpt2'.*expected one of olmoe"):
        load_model_shape(str(bad))
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match="hidden_size"):
        load_model_shape(str(missing))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON config"):
        load_model_shape(str(broken))


def test_budget_validation():
    shape = load_model_shape(OLMOE)
    with pytest.raises(ValueError, match="top_k"):
        training_flops_per_token(shape, 65, 20, 256)
    with pytest.raises(ValueError, match="ranks"):
        default_budgets(load_model_shape(OLMO), BUDGETS, None, 20)
    with pytest.raises(ValueError, match="ranks"):
        default_budgets(shape, BUDGETS, [12, 40], 20)
    with pytest.raises(ValueError, match="fl.budgets"):
        default_budgets(shape, [0.0, 1.0], None, 20)


def test_flops_cli_json_and_errors():
    result = CliRunner().invoke(app, ["flops", "--json"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)
    assert [r["top_k"] for r in table["rows"]] == [1, 2, 4, 8]
    assert [round(r["activated_params"] / 1e9, 1) for r in table["rows"]] == [0.6, 0.7, 0.9, 1.3]
    assert table["settings"]["router_trainable"] is True
    result = CliRunner().invoke(app, ["flops", "--json", "--frozen-router"])
    frozen = json.loads(result.output)
    assert frozen["settings"]["router_trainable"] is False
    assert [r["flops_per_token"]["router"] * 3 for r in frozen["rows"]] == \
        [r["flops_per_token"]["router"] * 2 for r in table["rows"]]  # 4 vs 6 per parameter
    result = CliRunner().invoke(app, ["flops", "allenai/OLMo-1B-hf"])
    assert result.exit_code == 0 and "r=12 vs r=40" in result.output and "reduction 2.5%" in result.output
    result = CliRunner().invoke(app, ["flops", "--budgets", "0.5,x"])
    assert result.exit_code == 2 and "--budgets" in result.output
    result = CliRunner().invoke(app, ["flops", "--lora-targets", "router"])
    assert result.exit_code == 2 and "lora_targets: got 'router'" in result.output


def test_pg_probe_flops_match_flop_counter_on_a_layer():
    """The probe's extra FLOPs (probe on minus off, forward + backward of one SMoE layer) are
    exactly slots * pg_probe_flops_per_slot."""
    from ubsmoe.core.smoe import SMoELayer
    from ubsmoe.metrics.flops import pg_probe_flops_per_slot

    register_flop_formulas()
    g = torch.Generator().manual_seed(0)
    E, H, I, r = 16, 24, 12, 4
    layer = SMoELayer(torch.randn(E, H, generator=g), torch.randn(E, 2 * I, H, generator=g),
                      torch.randn(E, H, I, generator=g), torch.nn.SiLU(), top_k=1,
                      norm_topk_prob=False, lora_rank=r, lora_alpha=8.0)
    x = torch.randn(1, 5, H, generator=g, requires_grad=True)
    flops = {}
    for probe in (0, 3):
        layer.probe_tokens = probe
        with FlopCounterMode(display=False) as counter:
            layer(x).pow(2).sum().backward()
        flops[probe] = counter.get_total_flops()
    slots = layer.batch_probe_slots
    assert slots == 3 * int((layer.batch_expert_counts == 0).sum()) > 0
    shape = ModelShape(name="t", model_type="olmoe", hidden_size=H, num_layers=1, num_heads=1,
                       num_kv_heads=1, head_dim=H, vocab_size=8, tie_word_embeddings=False,
                       intermediate_size=I, num_experts=E, top_k=1)
    assert flops[3] - flops[0] == slots * pg_probe_flops_per_slot(shape, r)


def test_flops_cli_pg_probe_bound():
    result = CliRunner().invoke(app, ["flops", "--json", "--pg-probe-tokens", "4", "--tokens-per-step", "1024"])
    assert result.exit_code == 0, result.output
    table = json.loads(result.output)
    assert table["settings"]["pg_probe_tokens"] == 4
    rows = table["rows"]
    assert [r["pg_probe"]["max_inactive"] for r in rows] == [63, 62, 60, 56]
    r0 = rows[0]["pg_probe"]
    assert r0["max_flops_per_token"] == pytest.approx(16 * 63 * 4 * r0["flops_per_slot"] / 1024)
    # doubling the tokens per step halves the per-token bound
    table2 = json.loads(CliRunner().invoke(
        app, ["flops", "--json", "--pg-probe-tokens", "4", "--tokens-per-step", "2048"]).output)
    assert table2["rows"][0]["pg_probe"]["max_flops_per_token"] == pytest.approx(r0["max_flops_per_token"] / 2)
    assert "pg_probe" not in json.loads(CliRunner().invoke(app, ["flops", "--json"]).output)["rows"][0]
    assert "PG probe" in CliRunner().invoke(app, ["flops", "--pg-probe-tokens", "4"]).output
