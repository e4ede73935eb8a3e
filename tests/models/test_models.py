"""SMoE layer and model patching: HF equivalence, FLOP scaling, LoRA math, counters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ubsmoe.config import ModelConfig
from ubsmoe.core.grouped import sort_slots
from ubsmoe.metrics.flops import register_grouped_mm_flops
from ubsmoe.models import (
    SMoELayer,
    adapter_state,
    build_model,
    load_adapter_state,
    routing_mask,
    set_top_k,
    smoe_layers,
)
from ubsmoe.models.build import tiny_olmoe
from ubsmoe.models.patching import patch_smoe


def _hf_tiny(tokenizer, **overrides):
    cfg = ModelConfig()
    for k, v in overrides.items():
        setattr(cfg.tiny, k, v)
    return tiny_olmoe(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id).eval()


def _layer(num_experts=8, hidden=16, inter=8, top_k=2, rank=4, norm=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SMoELayer(
        router_weight=torch.randn(num_experts, hidden, generator=g),
        gate_up_proj=torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.2,
        down_proj=torch.randn(num_experts, hidden, inter, generator=g) * 0.2,
        act_fn=torch.nn.SiLU(),
        top_k=top_k,
        norm_topk_prob=norm,
        lora_rank=rank,
        lora_alpha=8.0,
    )


def test_patched_model_matches_hf_logits(tiny_tokenizer):
    hf = _hf_tiny(tiny_tokenizer)
    ids = torch.randint(0, len(tiny_tokenizer), (3, 21))
    with torch.no_grad():
        ref = hf(ids).logits
        patched = copy.deepcopy(hf)
        patch_smoe(patched, lora_rank=20, lora_alpha=16.0)
        out = patched(ids).logits
    assert len(smoe_layers(patched)) == hf.config.num_hidden_layers
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_build_model_with_attention_lora_matches_hf(tiny_tokenizer, tiny_model_cfg):
    hf = _hf_tiny(tiny_tokenizer)
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer, seed=0)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n or n.endswith(".mlp.router_weight") for n in trainable)
    assert sum(n.endswith(".mlp.router_weight") for n in trainable) == len(smoe_layers(model))
    assert any("q_proj.lora_A" in n for n in trainable)
    assert any("gate_up_lora.A" in n for n in trainable)


def test_renormalised_gates_match_hf(tiny_tokenizer):
    hf = _hf_tiny(tiny_tokenizer)
    hf.config.norm_topk_prob = True
    for layer in hf.model.layers:
        layer.mlp.gate.norm_topk_prob = True
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9))
    with torch.no_grad():
        ref = hf(ids).logits
        patched = copy.deepcopy(hf)
        patch_smoe(patched, 4, 8.0)
        assert all(m.norm_topk_prob for m in smoe_layers(patched))
        torch.testing.assert_close(patched(ids).logits, ref, atol=1e-5, rtol=0)


def _reference_forward(layer: SMoELayer, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop over selected experts with dense per-expert LoRA matrices."""
    probs = torch.softmax(F.linear(x, layer.router_weight), dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, layer.top_k, dim=-1)
    if layer.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    gu, dn = layer.gate_up_lora, layer.down_lora
    for t in range(x.shape[0]):
        for j in range(layer.top_k):
            e = int(idx[t, j])
            w_gu = layer.gate_up_proj[e] + gu.scale * gu.B[e] @ gu.A[e]  # [2I, H]
            w_dn = layer.down_proj[e] + dn.scale * dn.B[e] @ dn.A[e]  # [H, I]
            g, u = (w_gu @ x[t]).chunk(2)
            out[t] += w[t, j] * (w_dn @ (F.silu(g) * u))
    return out


@pytest.mark.parametrize("norm", [False, True])
def test_grouped_experts_equal_per_token_reference_with_lora(norm):
    layer = _layer(top_k=3, norm=norm)
    with torch.no_grad():
        layer.gate_up_lora.B.normal_()
        layer.down_lora.B.normal_()
    x = torch.randn(2, 7, 16)
    out = layer(x)
    ref = _reference_forward(layer, x.reshape(-1, 16)).reshape(2, 7, 16)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_lora_gradients_only_reach_routed_experts():
    layer = _layer(num_experts=16, top_k=1)
    with torch.no_grad():
        layer.gate_up_lora.B.normal_()
    x = torch.randn(1, 3, 16)  # 3 tokens, top-1: at most 3 of 16 experts used
    layer(x).pow(2).sum().backward()
    used = layer.expert_counts > 0
    grad_norm = layer.gate_up_lora.A.grad.flatten(1).norm(dim=1)
    assert int(used.sum()) <= 3
    assert bool((grad_norm[~used] == 0).all())
    assert bool((grad_norm[used] > 0).all())
    assert layer.gate_up_proj.grad is None  # frozen


def _empty_expert_case(device="cpu"):
    """A 16-expert top-1 layer on 3 tokens (at most 3 experts used), float32 on ``device``."""
    layer = _layer(num_experts=16, top_k=1).to(device)
    with torch.no_grad():
        layer.gate_up_lora.B.normal_()
        layer.down_lora.B.normal_()
    x = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(5)).to(device)
    return layer, x


def _lora_grads(layer, x):
    """Forward output and the four LoRA gradients of ``sum(out^2)``."""
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out.pow(2).sum().backward()
    grads = [p.grad.clone() for p in (layer.gate_up_lora.A, layer.gate_up_lora.B,
                                       layer.down_lora.A, layer.down_lora.B)]
    return out.detach(), grads


def _assert_empty_experts_exactly_zero(used, grads, ref_grads=None):
    assert 1 <= int(used.sum()) <= 3
    for i, g in enumerate(grads):
        assert bool(torch.isfinite(g).all()), f"gradient {i} holds NaN/inf"
        assert bool((g[~used] == 0).all()), f"gradient {i}: a no-token expert got a non-zero gradient"
        assert bool((g[used].flatten(1).norm(dim=1) > 0).all())
        if ref_grads is not None:
            torch.testing.assert_close(g, ref_grads[i], atol=0, rtol=0)


def test_no_token_experts_get_exact_zero_grad_when_grouped_mm_leaves_garbage(monkeypatch):
    """CUDA's grouped_mm does not promise to write the block of an empty group: simulate
    that with NaN; the layer must still give those experts a gradient of exactly 0."""
    import ubsmoe.core.grouped as smoe_mod

    layer, x = _empty_expert_case()
    ref_out, ref_grads = _lora_grads(layer, x)
    real = smoe_mod.F.grouped_mm
    poisoned = []

    def nan_for_empty_groups(a, b, *args, offs=None, **kwargs):
        out = real(a, b, *args, offs=offs, **kwargs)
        if out.dim() == 3 and offs is not None:  # 2D x 2D: one block per group
            counts = torch.diff(offs, prepend=offs.new_zeros(1))
            poisoned.append(int((counts == 0).sum()))
            out = out.masked_fill((counts == 0)[:, None, None], float("nan"))
        return out

    monkeypatch.setattr(smoe_mod.F, "grouped_mm", nan_for_empty_groups)
    layer.reset_stats()
    out, grads = _lora_grads(layer, x)
    assert poisoned and min(poisoned) >= 13  # every weight gradient had >= 13 empty experts poisoned
    assert bool(torch.isfinite(out).all())
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    _assert_empty_experts_exactly_zero(layer.expert_counts > 0, grads, ref_grads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_token_experts_get_exact_zero_grad_on_cuda():
    """Unpatched CUDA grouped_mm: empty experts' LoRA gradients are exactly 0, the rest
    match the CPU run, and neither outputs nor gradients hold NaN."""
    layer, x = _empty_expert_case()
    ref_out, ref_grads = _lora_grads(layer, x)
    used = layer.expert_counts > 0
    for dtype in (torch.float32, torch.bfloat16):
        cuda = copy.deepcopy(layer).to("cuda", dtype)
        for numel in (1 << 12, 1 << 16, 1 << 20):  # leave NaN in blocks the allocator hands out next
            torch.full((numel,), float("nan"), device="cuda", dtype=dtype)
        out, grads = _lora_grads(cuda, x.cuda().to(dtype))
        assert bool(torch.isfinite(out).all())
        assert torch.equal(cuda.expert_counts.cpu() > 0, used)
        _assert_empty_experts_exactly_zero(used, [g.float().cpu() for g in grads])
        tol = 1e-4 if dtype == torch.float32 else 1e-1
        torch.testing.assert_close(out.float().cpu(), ref_out, atol=tol * ref_out.abs().max(), rtol=tol)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g.float().cpu(), r, atol=tol * r.abs().max(), rtol=tol)


def test_utilization_counters_sum_to_k_times_tokens():
    layer = _layer(top_k=3)
    layer(torch.randn(4, 5, 16))
    layer(torch.randn(1, 6, 16))
    assert float(layer.token_count) == 26
    assert float(layer.expert_counts.sum()) == 3 * 26
    layer.reset_stats()
    assert float(layer.expert_counts.sum()) == 0 and float(layer.token_count) == 0


def _expert_flops(layer: SMoELayer, x: torch.Tensor) -> int:
    register_grouped_mm_flops()
    with FlopCounterMode(display=False) as counter:
        layer(x).pow(2).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    return int(counts[torch.ops.aten._grouped_mm])


def test_expert_flops_at_k1_are_one_eighth_of_k8():
    layer = _layer(num_experts=64, hidden=32, inter=16, top_k=8)
    x = torch.randn(2, 32, 32)
    flops_k8 = _expert_flops(layer, x)
    layer.set_top_k(1)
    flops_k1 = _expert_flops(layer, x)
    assert flops_k8 > 0
    assert flops_k1 * 8 == flops_k8
    # Forward alone: every routed (token, expert) pair runs base + LoRA projections once.
    register_grouped_mm_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer.set_top_k(8)
        layer(x)
    h, i, r, pairs = 32, 16, 4, 8 * 64
    per_pair = 2 * (h * 2 * i + i * h) + 2 * (h * r + r * 2 * i + i * r + r * h)
    assert counter.get_flop_counts()["Global"][torch.ops.aten._grouped_mm] == pairs * per_pair


def test_routing_mask_skips_padding_without_changing_real_tokens(tiny_tokenizer, tiny_model_cfg):
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer)
    ids = torch.randint(2, len(tiny_tokenizer), (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        for layer in smoe_layers(model):
            layer.reset_stats()
        with routing_mask(model, mask):
            masked = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(masked[real], full[real], atol=1e-5, rtol=0)
    assert all(float(layer.token_count) == int(mask.sum()) for layer in smoe_layers(model))
    assert all(layer.token_mask is None for layer in smoe_layers(model))


def test_set_top_k_validates_range(tiny_tokenizer, tiny_model_cfg):
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer)
    set_top_k(model, 1)
    assert all(layer.top_k == 1 for layer in smoe_layers(model))
    with pytest.raises(ValueError, match="top_k"):
        set_top_k(model, 65)


def test_adapter_state_round_trip_and_errors(tiny_tokenizer, tiny_model_cfg):
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer)
    state = adapter_state(model)
    new = {k: torch.randn_like(v) for k, v in state.items()}
    load_adapter_state(model, new)
    for k, v in adapter_state(model).items():
        assert torch.equal(v, new[k])
    with pytest.raises(KeyError):
        load_adapter_state(model, {k: v for k, v in list(new.items())[1:]})
    key = next(iter(new))
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(model, {**new, key: torch.zeros(1)})


def test_model_init_is_deterministic(tiny_tokenizer, tiny_model_cfg):
    a, _ = build_model(tiny_model_cfg, tiny_tokenizer, seed=3)
    b, _ = build_model(tiny_model_cfg, tiny_tokenizer, seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_layer_backward_is_bitwise_deterministic_with_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        results = []
        for _ in range(3):
            torch.manual_seed(0)
            layer = _layer(num_experts=64, hidden=32, inter=16, top_k=4, rank=4)
            with torch.no_grad():
                layer.gate_up_lora.B.normal_()
            x = torch.randn(1, 200, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
            layer(x).pow(2).sum().backward()
            results.append((x.grad.clone(), layer.gate_up_lora.A.grad.clone()))
        for other in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    finally:
        torch.set_num_threads(threads)


def _dense_experts(layer: SMoELayer, x: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
                   act=F.silu) -> torch.Tensor:
    """Plain-autograd reference of ``experts_forward``: a loop over (token, choice) slots."""
    gu, dn = layer.gate_up_lora, layer.down_lora
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(index.shape[1]):
            e = int(index[t, j])
            g, u = (x[t] @ layer.gate_up_proj[e].T + gu.scale * (x[t] @ gu.A[e].T) @ gu.B[e].T).chunk(2)
            h = act(g) * u
            acc = acc + weights[t, j] * (h @ layer.down_proj[e].T + dn.scale * (h @ dn.A[e].T) @ dn.B[e].T)
        rows.append(acc)
    return torch.stack(rows)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_experts_backward_matches_autograd_reference(act):
    """The hand-written backward gives the gradients plain autograd gives, for every input."""
    layer = _layer(num_experts=8, top_k=3, rank=4)
    if act == "gelu":
        layer.act_fn = torch.nn.GELU()
    with torch.no_grad():
        layer.gate_up_lora.B.normal_()
        layer.down_lora.B.normal_()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, 16, generator=g, requires_grad=True)
    weights = torch.rand(11, 3, generator=g, requires_grad=True)
    index = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(11)])  # [N, K] distinct
    grad_out = torch.randn(11, 16, generator=g)
    params = [x, weights, layer.gate_up_lora.A, layer.gate_up_lora.B, layer.down_lora.A, layer.down_lora.B]

    out = layer.experts_forward(x, weights, index)
    ours = torch.autograd.grad(out, params, grad_out)
    ref_out = _dense_experts(layer, x, weights, index, act=layer.act_fn)
    ref = torch.autograd.grad(ref_out, params, grad_out)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, a, b in zip(["x", "weights", "gate_up A", "gate_up B", "down A", "down B"], ours, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_sort_slots_groups_by_expert_and_inverts():
    index = torch.tensor([[3, 0], [1, 3], [0, 2]])  # 3 tokens, K = 2, 4 experts
    r = sort_slots(index, num_experts=5)
    flat = index.reshape(-1)
    assert torch.equal(flat[r.order], torch.tensor([0, 0, 1, 2, 3, 3]))  # stable: token order kept
    assert torch.equal(r.token, torch.tensor([0, 2, 1, 2, 0, 1]))
    assert torch.equal(r.offsets, torch.tensor([2, 3, 4, 6, 6], dtype=torch.int32))  # expert 4 empty
    assert torch.equal(r.order[r.inverse.reshape(-1)], torch.arange(6))


def test_bfloat16_with_rank_not_a_multiple_of_eight_runs_and_tracks_float32():
    """grouped_mm needs 16-byte rows; rank 20 in bfloat16 (40 bytes) is padded internally."""
    layer = _layer(num_experts=8, hidden=64, inter=32, top_k=2, rank=20)
    with torch.no_grad():
        layer.gate_up_lora.B.normal_(0, 0.1)
        layer.down_lora.B.normal_(0, 0.1)
    bf16 = copy.deepcopy(layer).to(torch.bfloat16)
    x = torch.randn(1, 24, 64)
    ref = layer(x)
    out = bf16(x.bfloat16())
    ref.pow(2).sum().backward()
    out.float().pow(2).sum().backward()
    assert bf16.gate_up_lora.A.grad.shape == (8, 20, 64) and bf16.down_lora.B.grad.shape == (8, 64, 20)
    scale = ref.detach().abs().max()
    assert float((out.detach().float() - ref.detach()).abs().max()) < 0.05 * float(scale)
    rel = (bf16.down_lora.B.grad.float() - layer.down_lora.B.grad).norm() / layer.down_lora.B.grad.norm()
    assert float(rel) < 0.05


def test_trainable_router_trains_in_float32_on_a_bfloat16_model(tiny_tokenizer, tiny_model_cfg):
    import dataclasses

    cfg = dataclasses.replace(tiny_model_cfg, dtype="bfloat16")
    model, _ = build_model(cfg, tiny_tokenizer, seed=0)
    layers = smoe_layers(model)
    assert all(m.router_weight.dtype == torch.float32 and m.router_weight.requires_grad for m in layers)
    assert all(m.gate_up_proj.dtype == torch.bfloat16 for m in layers)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 9))
    out = model(input_ids=ids).logits
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(m.router_weight.grad is not None and m.router_weight.grad.dtype == torch.float32
               and m.router_weight.grad.abs().sum() > 0 for m in layers)
    frozen, _ = build_model(dataclasses.replace(cfg, router_trainable=False), tiny_tokenizer, seed=0)
    assert all(m.router_weight.dtype == torch.bfloat16 and not m.router_weight.requires_grad
               for m in smoe_layers(frozen))
