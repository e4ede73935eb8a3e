"""A mixture of LoRA experts on a dense model's frozen MLP (``model.lora_experts``; beyond the papers).

M experts share the dense MLP's frozen weights (stride-0 views) and differ only by their
LoRA; a new router picks K_c of them per token with renormalised gate weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DENSE_SMALL
from torch.utils.flop_counter import FlopCounterMode
from typer.testing import CliRunner

from ubsmoe.cli import app
from ubsmoe.config import ModelConfig, load_config
from ubsmoe.errors import ConfigError
from ubsmoe.fl.client_runtime import ClientRuntime, shared_setup
from ubsmoe.fl.server import Server
from ubsmoe.methods import get_method_class
from ubsmoe.metrics.flops import (
    lora_params_per_token,
    param_counts,
    register_flop_formulas,
    training_flops_per_token,
)
from ubsmoe.metrics.model_shape import load_model_shape, model_shape_from_config, with_lora_experts
from ubsmoe.models import build_model, set_top_k, smoe_layers
from ubsmoe.models.build import base_model
from ubsmoe.models.patching import distinct_numel

M, K_MAX, RANK = 4, 2, 4

SMALL = [*DENSE_SMALL, "model.lora_experts=4"]  # tests/models/test_dense.py's run, with M = 4 LoRA experts


def _cfg(**kw) -> ModelConfig:
    return ModelConfig(name="tiny-dense", lora_experts=M, lora_experts_top_k=K_MAX, lora_rank=RANK,
                       device="cpu", **kw)


def _shape(model, experts: int = M, top_k: int = K_MAX):
    return with_lora_experts(model_shape_from_config(model.config.to_dict(), "tiny-dense"), experts, top_k)


def test_zero_lora_equals_the_dense_model_at_every_k_and_experts_share_the_mlp(tiny_tokenizer):
    cfg = _cfg()
    model, _ = build_model(cfg, tiny_tokenizer, seed=0)
    dense, _ = base_model(cfg, tiny_tokenizer, seed=0)
    layers = smoe_layers(model)
    assert len(layers) == dense.config.num_hidden_layers
    assert all(m.num_experts == M and m.max_top_k == K_MAX and m.norm_topk_prob for m in layers)
    ids = torch.randint(2, len(tiny_tokenizer), (2, 11))
    with torch.no_grad():
        ref = dense(ids).logits
        for k in (1, 2, M):
            set_top_k(model, k)
            torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)
    # The M experts' frozen weights are stride-0 views of one [2I, H] / [H, I] weight.
    hidden, inter = dense.config.hidden_size, dense.config.intermediate_size
    mlp = dense.model.layers[0].mlp
    layer = layers[0]
    assert layer.gate_up_proj.shape == (M, 2 * inter, hidden) and layer.gate_up_proj.stride()[0] == 0
    assert layer.down_proj.shape == (M, hidden, inter) and layer.down_proj.stride()[0] == 0
    assert layer.gate_up_proj.untyped_storage().nbytes() == 2 * inter * hidden * 4  # not M-fold
    assert layer.down_proj.untyped_storage().nbytes() == hidden * inter * 4
    assert distinct_numel(layer.gate_up_proj) == 2 * inter * hidden
    torch.testing.assert_close(layer.gate_up_proj[M - 1], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    torch.testing.assert_close(layer.down_proj[M - 1], mlp.down_proj.weight)
    # Router W_r [M, H]: seeded (same seed, same router), std = initializer_range.
    again, _ = build_model(cfg, tiny_tokenizer, seed=0)
    other, _ = build_model(cfg, tiny_tokenizer, seed=1)
    assert torch.equal(smoe_layers(again)[0].router_weight, layer.router_weight)
    assert not torch.equal(smoe_layers(other)[0].router_weight, layer.router_weight)
    # No PEFT LoRA on the MLP projections: the experts carry the MLP's LoRA.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(f"mlp.{p}" in n for n in trainable for p in ("gate_proj", "up_proj", "down_proj"))
    assert any("mlp.gate_up_lora" in n for n in trainable) and any("self_attn.q_proj.lora_A" in n
                                                                    for n in trainable)


def test_param_counts_match_the_built_model_counting_shared_storage_once(tiny_tokenizer):
    model, _ = build_model(_cfg(), tiny_tokenizer, seed=0)
    shape = _shape(model)
    lora_names = (".lora_A.", ".lora_B.", "_lora.")
    storages: dict[int, int] = {}
    for n, p in model.named_parameters():
        if not any(s in n for s in lora_names) and not n.endswith(".phi"):
            storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes() // p.element_size()
    assert sum(storages.values()) == param_counts(shape)["total"]
    assert param_counts(shape)["router"] == shape.num_layers * M * shape.hidden_size
    # numel() would count the shared MLP M times; the base model's own count is the same but the router.
    dense, _ = base_model(_cfg(), tiny_tokenizer, seed=0)
    assert param_counts(shape)["total"] - param_counts(shape)["router"] == sum(
        p.numel() for p in dense.parameters())
    lora = lora_params_per_token(shape, RANK, M)  # every expert's LoRA: M-fold
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == lora["attention"] + lora["mlp"] + param_counts(shape)["router"]


def test_k_moves_mlp_compute_as_flops_predicts(tiny_tokenizer):
    model, _ = build_model(_cfg(), tiny_tokenizer, seed=0)
    shape = _shape(model)
    register_flop_formulas()
    batch, seq = 2, 12
    tokens = batch * seq
    ids = torch.randint(2, len(tiny_tokenizer), (batch, seq))
    forward = {}
    for k in (1, K_MAX):
        set_top_k(model, k)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(input_ids=ids)
        forward[k] = counter.get_flop_counts()["Global"][torch.ops.aten._grouped_mm]
        predicted = training_flops_per_token(shape, k, RANK, seq, frozen_backward=False)
        # forward: the frozen MLP (2 FLOPs per weight, K passes) + the K experts' LoRA (2 per parameter)
        assert forward[k] == tokens * (predicted["mlp"] + 2 * lora_params_per_token(shape, RANK, k)["mlp"])
    assert forward[K_MAX] == K_MAX * forward[1]
    dense_mlp = 2 * shape.num_layers * 3 * shape.hidden_size * shape.intermediate_size
    assert training_flops_per_token(shape, 1, RANK, seq, frozen_backward=False)["mlp"] == dense_mlp
    # A whole training step at K_max: grouped matmuls exactly, everything up to test_flops' two terms.
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids).logits.float().pow(2).mean().backward()
    analytic = training_flops_per_token(shape, K_MAX, RANK, seq)
    expert_lora = lora_params_per_token(shape, RANK, K_MAX)["mlp"]
    assert counter.get_flop_counts()["Global"][torch.ops.aten._grouped_mm] == tokens * (
        analytic["mlp"] + 6 * expert_lora)
    h, r = shape.hidden_size, RANK
    layer0_qkv = 3 * 2 * h * (h + r)  # autograd skips layer 0's q/k/v input gradients
    recompute = 2 * seq * shape.num_heads * shape.head_dim * shape.num_layers  # flash-attention backward
    gate_grad = 2 * K_MAX * shape.intermediate_size * shape.num_layers  # gate weights' gradient (a bmm)
    assert counter.get_total_flops() == tokens * (analytic["total"] - layer0_qkv + recompute + gate_grad)


def test_one_experts_lora_changes_only_its_tokens_and_gets_gradient_only_from_them(tiny_tokenizer):
    model, _ = build_model(_cfg(), tiny_tokenizer, seed=0)
    layer = smoe_layers(model)[0]
    layer.set_top_k(1)
    x = torch.randn(1, 12, layer.hidden_size)
    with torch.no_grad():
        before = layer(x)
        layer.gate_up_lora.B[0].normal_(0.0, 1.0)
        layer.down_lora.B[0].normal_(0.0, 1.0)
        after = layer(x)
        _, _, top_index = layer.route(x.reshape(-1, layer.hidden_size))
    routed0 = (top_index == 0).any(-1)  # [N]
    assert 0 < int(routed0.sum()) < routed0.numel()
    changed = (after - before).abs().amax(-1).reshape(-1) > 0  # [N]
    assert torch.equal(changed, routed0)
    # Gradients reach only the LoRA of experts some token was routed to.
    out = layer(x[:, :3])
    counts = torch.bincount(layer.route(x[:, :3].reshape(-1, layer.hidden_size))[2].reshape(-1), minlength=M)
    out.pow(2).sum().backward()
    grad = layer.down_lora.B.grad.abs().sum((1, 2))  # [M]
    assert (counts == 0).any()
    assert torch.equal(grad > 0, counts > 0)


@pytest.mark.parametrize("method", ["ubsmoe", "smoe_llb", "smoe", "a3smoe", "a3smoe_flexlora", "fedit", "hetlora",
                                    "flexlora"])
def test_methods_train_a_dense_model_with_lora_experts_in_process(tmp_path, method):
    cfg = load_config(overrides=[*SMALL, f"method={method}", f"model.tokenizer_cache={tmp_path / 'c'}",
                                 "eval.protocols=[loglik]", "eval.examples_per_task=2"])
    setup = shared_setup(cfg)
    server = Server(cfg, tmp_path / "run", setup)
    runtime = ClientRuntime(cfg, setup)
    # SMoE methods: K_c = clamp(floor(K_max beta), k_min, K_max), K_max = model.lora_experts_top_k;
    # FedIT and the rank methods train every level at the native K = K_max.
    native = get_method_class(method).own_train_top_k == "native"
    assert server.level_top_k() == ({b: K_MAX for b in (0.125, 0.25, 0.5, 1.0)} if native
                                    else {0.125: 1, 0.25: 1, 0.5: 1, 1.0: 2})
    before = {k: v.clone() for k, v in server.state.adapters.items()}
    updates = [runtime.train_round(**server.client_task(c, 1)) for c in server.sample_clients(1)]
    for u in updates:
        assert u.expert_counts.shape == (2, M) and u.token_counts.min() > 0
        assert torch.equal(u.expert_counts.sum(-1).long(), u.top_k * u.token_counts.long())
    server.end_round(1, updates)
    after = server.state.adapters
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".gate_up_lora." in k for k in moved) and any(".router_weight" in k for k in moved)
    assert (method == "ubsmoe") == any(k.endswith(".phi") for k in after)  # DMR's phi
    summary = server.finish()
    assert summary["rounds_completed"] == 1 and torch.isfinite(torch.tensor(summary["train_loss"][0]["loss"]))


@pytest.mark.e2e
def test_ubsmoe_runs_a_dense_model_with_lora_experts_end_to_end_via_cli(tmp_path):
    """`ubsmoe run` (Flower, local SuperLink): summary, checkpoints and the export with its note."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--out", str(out), *SMALL, "method=ubsmoe",
                                      "eval.protocols=[loglik]", "eval.examples_per_task=2",
                                      f"model.tokenizer_cache={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["method"] == "ubsmoe"
    rows = [r for r in summary["accuracy"] if r["protocol"] == "loglik"]
    assert [r["top_k"] for r in rows] == [1, 1, 1, 2]
    adapter = out / "checkpoints" / "adapter"
    info = json.loads((adapter / "ubsmoe_export.json").read_text())
    assert info["peft"] and info["lora_experts"]["experts"] == M and "PEFT cannot express" in \
        info["lora_experts"]["note"]
    from safetensors.torch import load_file

    experts = load_file(str(adapter / "lora_experts.safetensors"))
    assert experts and all("_lora." in k for k in experts)
    peft_keys = load_file(str(adapter / "adapter_model.safetensors"))
    assert peft_keys and all("self_attn" in k for k in peft_keys)
    assert "not in PEFT" in (adapter / "README.md").read_text()


BAD = [
    (["model.name=tiny", "model.lora_experts=4"],
     r"model.lora_experts: got 4, expected 0 for the sparse-MoE model tiny \(olmoe\); LoRA experts are for dense"),
    (["model.name=tiny-dense", "model.lora_experts=-1"], "model.lora_experts: got -1, expected an integer >= 0"),
    (["model.name=tiny-dense", "model.lora_experts=4", "model.lora_experts_top_k=5"],
     r"model.lora_experts_top_k: got 5, expected an integer in \[1, model.lora_experts=4\]"),
    (["model.name=tiny-dense", "model.lora_experts=4", "model.lora_experts_top_k=0"],
     r"model.lora_experts_top_k: got 0, expected an integer in \[1, model.lora_experts=4\]"),
    (["model.name=tiny-dense", "model.lora_experts=4", "method=flora"],
     "model.lora_experts: got 4, expected 0 for method flora"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_lora_expert_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(overrides=overrides)
    assert "\n" not in str(info.value)


def test_flops_refuses_lora_experts_on_a_moe_model_and_counts_olmo_1b_offline():
    with pytest.raises(ValueError, match="model.lora_experts: got 8, expected 0 for the sparse-MoE model"):
        load_model_shape("allenai/OLMoE-1B-7B-0924", 8, 2)
    dense = load_model_shape("allenai/OLMo-1B-hf")
    shape = load_model_shape("allenai/OLMo-1B-hf", 8, 2)
    f1, f2 = (training_flops_per_token(shape, k, 20, 256) for k in (1, 2))
    dense_f = training_flops_per_token(dense, 1, 20, 256)
    assert f1["mlp"] == dense_f["mlp"] and f2["mlp"] == 2 * dense_f["mlp"]
    assert param_counts(shape)["total"] == param_counts(dense)["total"] + param_counts(shape)["router"]
    result = CliRunner().invoke(app, ["flops", "allenai/OLMo-1B-hf", "--lora-experts", "8",
                                      "--lora-experts-top-k", "2", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert [r["top_k"] for r in rows] == [1, 1, 1, 2]
    assert rows[-1]["flops_per_token"]["total"] == f2["total"]


def test_k_max_and_m_move_the_plan_through_the_config():
    from ubsmoe.metrics.plan import plan

    def run(*extra):
        return plan(load_config(overrides=["model.name=tiny-dense", "method=ubsmoe", "model.lora_experts=4",
                                           *extra]))

    k2, k4, m8 = run(), run("model.lora_experts_top_k=4"), run("model.lora_experts=8")
    assert [r["top_k"] for r in k2["params"]["per_budget"]] == [1, 1, 1, 2]
    assert [r["top_k"] for r in k4["params"]["per_budget"]] == [1, 1, 2, 4]
    top2, top4 = (p["params"]["per_budget"][-1]["flops_per_token"] for p in (k2, k4))
    assert top4 > top2  # two more MLP passes per token
    # M moves the trainable parameters (M-fold expert LoRA + router), not the frozen ones.
    assert m8["params"]["trainable_per_client"] > k2["params"]["trainable_per_client"]
    assert m8["params"]["frozen_in_model"] == k2["params"]["frozen_in_model"]  # shared MLP; routers train
    assert k2["memory"]["client_process"]["base_weights"] == m8["memory"]["client_process"]["base_weights"]


# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` when loading (PEFT's code).
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("attention_lora", [True, False])
def test_export_writes_what_peft_can_hold_and_the_experts_beside_it(tiny_tokenizer, tmp_path, attention_lora):
    from peft import PeftModel
    from safetensors.torch import load_file

    from ubsmoe.fl.export import export_adapters
    from ubsmoe.models.adapters import adapter_state

    model, _ = build_model(_cfg(attention_lora=attention_lora), tiny_tokenizer, seed=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.1)
    adapters = adapter_state(model)
    final = export_adapters(model, adapters, [], tmp_path / "adapter")
    info = json.loads((final / "ubsmoe_export.json").read_text())
    assert info["peft"] is attention_lora and info["lora_experts"]["experts"] == M
    experts = load_file(str(final / "lora_experts.safetensors"))
    assert set(experts) == {k for k in adapters if "_lora." in k}
    assert (final / "router.safetensors").is_file()
    assert (final / "adapter_config.json").is_file() is attention_lora
    if attention_lora:  # the attention LoRA loads with plain transformers + PEFT
        dense, _ = base_model(_cfg(), tiny_tokenizer, seed=0)
        loaded = PeftModel.from_pretrained(dense, str(final))
        q = dict(loaded.named_parameters())["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]
        torch.testing.assert_close(q, adapters["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"])
