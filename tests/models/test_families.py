"""Model-family table: every sparse-MoE family's patch is exact, K_c-adaptive and counted.

One row per family of :data:`ubsmoe.models.families.MOE_FAMILIES`, each on its tiny
random preset (``tiny``, ``tiny-mixtral``, ``tiny-qwen2-moe``, ``tiny-qwen3-moe``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ubsmoe.config import ModelConfig
from ubsmoe.methods.smoe_llb import load_balancing_loss
from ubsmoe.metrics.flops import register_grouped_mm_flops
from ubsmoe.models import set_top_k
from ubsmoe.models.build import lora_targets, tiny_olmoe
from ubsmoe.models.families import MOE_FAMILIES, family, moe_family_of
from ubsmoe.models.patching import patch_smoe
from ubsmoe.models.presets import PRESET_MODEL_TYPES

FAMILY_PRESETS = [("olmoe", "tiny"), ("mixtral", "tiny-mixtral"), ("qwen2_moe", "tiny-qwen2-moe"),
                  ("qwen3_moe", "tiny-qwen3-moe")]


def test_table_covers_every_registered_family():
    assert sorted(t for t, _ in FAMILY_PRESETS) == sorted(MOE_FAMILIES)
    for model_type, preset in FAMILY_PRESETS:
        assert PRESET_MODEL_TYPES[preset] == model_type


def _hf(preset, tokenizer):
    cfg = ModelConfig(name=preset)
    return tiny_olmoe(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).eval()


@pytest.mark.parametrize("model_type,preset", FAMILY_PRESETS)
def test_patched_logits_equal_unpatched(model_type, preset, tiny_tokenizer):
    hf = _hf(preset, tiny_tokenizer)
    assert hf.config.model_type == model_type
    assert hf.dtype == torch.float32
    ids = torch.randint(0, len(tiny_tokenizer), (2, 17), generator=torch.Generator().manual_seed(1))
    patched = copy.deepcopy(hf)
    layers = patch_smoe(patched, lora_rank=4, lora_alpha=8.0)  # B = 0: zero LoRA
    assert len(layers) == hf.config.num_hidden_layers
    fam = MOE_FAMILIES[model_type]
    assert moe_family_of(patched) is fam
    assert all(m.norm_topk_prob == (fam.always_norm_topk or bool(hf.config.norm_topk_prob))
               for m in layers)
    if fam.shared_expert:
        assert all(m.shared_expert is not None for m in layers)
    with torch.no_grad():
        ref = hf(ids).logits
        out = patched(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type,preset", [r for r in FAMILY_PRESETS if r[0] != "mixtral"])
def test_norm_topk_prob_follows_the_config(model_type, preset, tiny_tokenizer):
    """Flipping ``norm_topk_prob`` changes the host output and the patch follows it exactly."""
    cfg = ModelConfig(name=preset)
    hf = tiny_olmoe(cfg, len(tiny_tokenizer), tiny_tokenizer.pad_token_id,
                    tiny_tokenizer.eos_token_id).eval()
    flipped = copy.deepcopy(hf)
    for mod in flipped.modules():
        if isinstance(mod, MOE_FAMILIES[model_type].block_type()):
            mod.gate.norm_topk_prob = not mod.gate.norm_topk_prob
    ids = torch.randint(0, len(tiny_tokenizer), (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, ref_flipped = hf(ids).logits, flipped(ids).logits
        patch_smoe(flipped, lora_rank=4, lora_alpha=8.0)
        out = flipped(ids).logits
    assert (ref - ref_flipped).abs().max() > 1e-4
    torch.testing.assert_close(out, ref_flipped, atol=1e-5, rtol=0)


def _grouped_mm_flops(model, ids) -> int:
    register_grouped_mm_flops()
    with FlopCounterMode(display=False) as counter:
        model(ids).logits.float().pow(2).mean().backward()
    return int(counter.get_flop_counts()["Global"][torch.ops.aten._grouped_mm])


@pytest.mark.parametrize("model_type,preset", FAMILY_PRESETS)
def test_reduced_top_k_trains_scales_flops_and_counts(model_type, preset, tiny_tokenizer):
    model = _hf(preset, tiny_tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = patch_smoe(model, lora_rank=4, lora_alpha=8.0)
    native = layers[0].max_top_k
    assert native >= 2
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(3))
    tokens = ids.numel()
    flops = {}
    for k in (1, native):
        set_top_k(model, k)
        for m in layers:
            m.reset_stats()
        model.zero_grad()
        flops[k] = _grouped_mm_flops(model, ids)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.grad is not None for p in trainable)
        for m in layers:
            assert float(m.token_count) == tokens
            assert float(m.expert_counts.sum()) == k * tokens
    # Routed-expert FLOPs (the grouped expert matmuls) scale exactly with K_c.
    assert flops[1] > 0 and flops[1] * native == flops[native]


@pytest.mark.parametrize("model_type,preset", FAMILY_PRESETS)
def test_llb_loss_is_the_family_function_at_k_c(model_type, preset, tiny_tokenizer):
    model = _hf(preset, tiny_tokenizer)
    layers = patch_smoe(model, lora_rank=4, lora_alpha=8.0)
    for m in layers:
        m.keep_router_logits = True
    set_top_k(model, 1)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9), generator=torch.Generator().manual_seed(4))
    model(ids)
    loss_k1 = load_balancing_loss(model, 1)
    func = MOE_FAMILIES[model_type].load_balancing_loss()
    ref = func(tuple(m.router_logits_out for m in layers), layers[0].num_experts, 1, None)
    torch.testing.assert_close(loss_k1, ref)
    assert not torch.allclose(loss_k1, load_balancing_loss(model, 2))


@pytest.mark.parametrize("model_type,preset", FAMILY_PRESETS)
def test_shared_expert_gets_peft_lora_only_in_qwen2_moe(model_type, preset, tiny_tokenizer):
    model = _hf(preset, tiny_tokenizer)
    targets = lora_targets(model, attention_lora=False)
    assert bool(targets) == family(model_type).shared_expert


@pytest.mark.parametrize("preset", [p for _, p in FAMILY_PRESETS] + ["tiny-dense"])
def test_flops_shape_counts_every_parameter_and_routed_flops_scale_with_k(preset, tiny_tokenizer):
    from ubsmoe.metrics.flops import param_counts, training_flops_per_token
    from ubsmoe.metrics.model_shape import model_shape_from_config

    model = _hf(preset, tiny_tokenizer)
    shape = model_shape_from_config(model.config.to_dict(), preset)
    assert param_counts(shape)["total"] == sum(p.numel() for p in model.parameters())
    if not shape.is_moe:
        assert preset == "tiny-dense"
        return
    assert shape.top_k == model.config.num_experts_per_tok
    mlp = {k: training_flops_per_token(shape, k, 4, 16)["mlp"] for k in (1, shape.top_k)}
    per_expert = 4 * shape.num_layers * 3 * shape.hidden_size * shape.intermediate_size
    assert mlp[shape.top_k] - mlp[1] == (shape.top_k - 1) * per_expert
    assert (mlp[1] > per_expert) == (shape.shared_expert_size > 0)  # the shared expert always runs
