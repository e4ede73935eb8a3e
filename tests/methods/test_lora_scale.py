"""One LoRA scale for every method and rank (model.lora_scale_rule, DESIGN.md section 5).

Under ``rank_independent`` (default) every LoRA of every method has scale
``model.lora_scale`` whatever its rank, so a rank-40 client's first local step moves
``s B A`` exactly as far as a rank-12 client's on the same data; ``fixed_alpha`` keeps
the old ``alpha / r``, which damps the rank-40 client by 12 / 40. Export to PEFT
states an alpha that gives PEFT the same scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ubsmoe.config import ModelConfig, load_config
from ubsmoe.config.model import lora_alpha_for
from ubsmoe.errors import ConfigError
from ubsmoe.fl.export import export_adapters
from ubsmoe.fl.train import local_train
from ubsmoe.methods import available_methods, get_method_class
from ubsmoe.methods.rank_base import lora_pairs
from ubsmoe.models import adapter_state, build_model, load_adapter_state
from ubsmoe.models.adapters import lora_rank_scales, set_lora_rank
from ubsmoe.models.build import base_model

RANK_METHODS = ("hetlora", "flexlora", "flora", "florist", "a3smoe_flexlora")


def test_config_defaults_and_validation():
    cfg = ModelConfig()
    assert (cfg.lora_scale_rule, cfg.lora_scale, cfg.lora_rank, cfg.lora_alpha) == (
        "rank_independent", 0.8, 20, 16.0)
    assert cfg.alpha_for(20) == 16.0  # the SMoE methods' default scale 16 / 20 is unchanged
    assert cfg.alpha_for(40) == pytest.approx(32.0)
    assert ModelConfig(lora_scale_rule="fixed_alpha").alpha_for(40) == 16.0
    assert lora_alpha_for("fixed_alpha", 0.8, 7.0, 3) == 7.0
    with pytest.raises(ConfigError, match=r"model.lora_scale_rule: got 'x', expected one of "
                                          r"rank_independent, fixed_alpha"):
        load_config(overrides=["model.lora_scale_rule=x"])
    with pytest.raises(ConfigError, match="model.lora_scale: got 0.0"):
        load_config(overrides=["model.lora_scale=0"])
    with pytest.raises(ValueError, match="lora rank"):
        lora_alpha_for("rank_independent", 0.8, 16.0, 0)


@pytest.mark.parametrize("name", sorted(available_methods()))
def test_every_method_gives_every_level_the_same_scale(name):
    """alpha / r is model.lora_scale at every level's rank, for every method (and the global rank)."""
    cfg = load_config(overrides=[f"method={name}", "model.lora_rank=40", "model.lora_scale=2.0"])
    method = get_method_class(name)(cfg.method_config)
    method.set_lora_scale(cfg.model.lora_scale_rule, cfg.model.lora_scale)
    levels = [method.client_lora(j, cfg.model.lora_rank, cfg.model.lora_alpha)
              for j in range(len(cfg.fl.budgets))]
    levels.append(method.global_lora(cfg.model.lora_rank, cfg.model.lora_alpha))
    assert all(math.isclose(alpha / rank, 2.0, rel_tol=1e-12) for rank, alpha in levels)
    if name in RANK_METHODS:
        assert {r for r, _ in levels} == {12, 16, 24, 40}
        assert all(method.scale(r) == 2.0 for r, _ in levels)  # exactly: no rescaling factors
    # the old rule: alpha fixed (the section's for the rank methods, model.lora_alpha otherwise)
    method.set_lora_scale("fixed_alpha", 2.0)
    old = [method.client_lora(j, 40, 16.0) for j in range(len(cfg.fl.budgets))]
    assert {a for _, a in old} == {16.0}


def _first_step_delta(rule: str, name: str, rank: int, tokenizer) -> dict[str, torch.Tensor]:
    """``s (B1 A1 - B0 A0)`` per LoRA module after one local step of a rank-``rank`` client.

    The client starts from ``B = 0`` and the same A's first 12 rows (rows 12.. zero, so
    those components get no gradient): any difference between ranks comes from the scale.
    """
    cfg = load_config(overrides=[f"method={name}", f"model.lora_scale_rule={rule}",
                                 "model.tiny.vocab_size=512", "train.lr=1e-3"])
    method = get_method_class(name)(cfg.method_config)
    method.set_lora_scale(cfg.model.lora_scale_rule, cfg.model.lora_scale)
    model, _ = build_model(cfg.model, tokenizer, seed=0)
    method.prepare_model(model)
    level = cfg.method_config.ranks.index(rank)
    set_lora_rank(model, *method.client_lora(level, cfg.model.lora_rank, cfg.model.lora_alpha))
    g = torch.Generator().manual_seed(0)
    state = adapter_state(model)
    pairs, _ = lora_pairs(list(state))
    for p in pairs:
        A = torch.zeros_like(state[p.a])
        A[..., :12, :] = torch.rand(*A.shape[:-2], 12, A.shape[-1], generator=g) * 0.2 - 0.1
        state[p.a], state[p.b] = A, torch.zeros_like(state[p.b])
    load_adapter_state(model, state)
    ids = torch.randint(2, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    local_train(model, [batch], method, cfg.train, top_k=8)
    (r, s), = lora_rank_scales(model)
    assert r == rank
    after = adapter_state(model)
    return {p.module: s * (after[p.b].double() @ after[p.a].double()) for p in pairs}


@pytest.mark.parametrize("name", ["hetlora", "flora"])  # the scale comes from RankMethod.client_lora
def test_a_clients_first_step_does_not_depend_on_its_rank(name, tiny_tokenizer):
    """Same data and start, ranks 12 and 40: equal effective steps; the old rule damps rank 40 by 12/40."""
    ratios = {}
    for rule in ("rank_independent", "fixed_alpha"):
        d12 = _first_step_delta(rule, name, 12, tiny_tokenizer)
        d40 = _first_step_delta(rule, name, 40, tiny_tokenizer)
        n12 = math.sqrt(sum(float((d ** 2).sum()) for d in d12.values()))
        n40 = math.sqrt(sum(float((d ** 2).sum()) for d in d40.values()))
        assert n12 > 0
        ratios[rule] = n40 / n12
    assert ratios["rank_independent"] == pytest.approx(1.0, rel=1e-3)
    assert ratios["fixed_alpha"] == pytest.approx(12 / 40, rel=1e-2)  # smaller grads: Adam's eps shows


def test_smoe_default_scale_is_unchanged(tiny_tokenizer):
    """rank 20, alpha 16 (fixed_alpha) and rank 20, scale 0.8 (rank_independent) build the same model."""
    new, _ = build_model(ModelConfig(), tiny_tokenizer, seed=0)
    old, _ = build_model(ModelConfig(lora_scale_rule="fixed_alpha"), tiny_tokenizer, seed=0)
    assert lora_rank_scales(new) == lora_rank_scales(old) == {(20, 0.8)}
    assert new.peft_config["default"].lora_alpha == 16.0
    wide, _ = build_model(ModelConfig(lora_rank=40), tiny_tokenizer, seed=0)
    (r, s), = lora_rank_scales(wide)
    assert r == 40 and s == pytest.approx(0.8)


def test_rank_40_export_loads_in_plain_peft_with_our_scale(tiny_tokenizer, tmp_path: Path):
    """PEFT's lora_alpha / r equals our scale (0.8 at rank 40), so its logits equal ours."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig()
    model, tok = build_model(cfg, tiny_tokenizer, seed=3)
    set_lora_rank(model, 40, cfg.alpha_for(40), seed=1)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * (1.0 if "router" in k else 0.05)
             for k, v in adapter_state(model).items()}
    state = {k: (v + adapter_state(model)[k]) if "router" in k else v for k, v in state.items()}
    load_adapter_state(model, state)
    model.eval()
    export_adapters(model, state, [], tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 40 and config["lora_alpha"] / config["r"] == pytest.approx(0.8)
    base, _ = base_model(cfg, tok, seed=3)
    base.save_pretrained(tmp_path / "base")
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32),
        tmp_path / "adapter").eval()
    ids = torch.randint(2, len(tok), (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())


def test_a_run_saved_before_the_setting_loads_with_its_old_rule(tmp_path: Path):
    """A saved config.yaml without model.lora_scale_rule trained at alpha / r: resume / load_run keep that."""
    import yaml

    from ubsmoe.config import load_saved_config, save_config

    save_config(load_config(overrides=["method=hetlora"]), tmp_path / "config.yaml")
    assert load_saved_config(tmp_path / "config.yaml").model.lora_scale_rule == "rank_independent"
    tree = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del tree["model"]["lora_scale_rule"], tree["model"]["lora_scale"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(tree))
    old = load_saved_config(tmp_path / "old.yaml")
    assert old.model.lora_scale_rule == "fixed_alpha" and old.method_config.ranks == [12, 16, 24, 40]
    # a user's config without the field gets the default
    (tmp_path / "user.yaml").write_text("model:\n  lora_rank: 8\n")
    assert load_config(tmp_path / "user.yaml").model.lora_scale_rule == "rank_independent"
