"""Dynamic Modulated Routing (DESIGN.md 4.1): client modulation and server update."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ubsmoe.core.routing import (
    DMRConfig,
    candidate_mask,
    dmr_route,
    global_utilization,
    mean_top_k,
    modulate_logits,
    phi_range_penalty,
    server_phi_update,
    target_modulation,
)
from ubsmoe.core.smoe import SMoELayer

TANH_HALF = 0.46211715726000974  # tanh(0.5)
TANH_ONE = 0.7615941559557649  # tanh(1)


# --- client side: candidate set and modulation --------------------------------------


def test_modulate_logits_exact_values():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0],
                           [4.0, 0.0, 1.0, 2.0]])
    phi = torch.tensor([0.5, -0.25, 0.75, 9.0])
    m = modulate_logits(logits, phi, num_candidates=2)
    # token 0: candidates {1, 2}; token 1: candidates {0, 3}
    expected = torch.tensor([[1.0, 2.75, 2.75, 0.0],
                             [4.5, 0.0, 1.0, 11.0]])
    assert torch.equal(m, expected)


def test_non_candidate_is_never_modulated_even_with_huge_phi():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    for big in (1e4, 1e30, math.inf):
        phi = torch.tensor([0.0, 0.0, big, big])  # experts 2, 3 are outside T = {0, 1}
        m = modulate_logits(logits, phi, num_candidates=2)
        assert torch.equal(m, logits)
        _, _, top_index = dmr_route(logits, phi, top_k=1)
        assert top_index.tolist() == [[0]]


def test_large_phi_on_second_candidate_changes_selection():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    _, _, plain = dmr_route(logits, torch.zeros(4), top_k=1)
    assert plain.tolist() == [[0]]
    probs, weights, top_index = dmr_route(logits, torch.tensor([0.0, 2.0, 0.0, 0.0]), top_k=1)
    assert top_index.tolist() == [[1]]
    # m = [3, 4, 1, 0]; gate weight is the raw softmax probability (OLMoE)
    m = torch.tensor([3.0, 4.0, 1.0, 0.0])
    assert torch.allclose(probs[0], torch.softmax(m, -1))
    assert torch.allclose(weights[0, 0], torch.softmax(m, -1)[1])


def test_candidate_mask_counts():
    logits = torch.randn(7, 6)
    for n_p in range(1, 7):
        mask = candidate_mask(logits, n_p)
        assert mask.dtype == torch.bool
        assert mask.sum(-1).tolist() == [n_p] * 7
        # every candidate's affinity is >= every non-candidate's
        lo = torch.where(mask, logits, torch.full_like(logits, math.inf)).amin(-1)
        hi = torch.where(mask, torch.full_like(logits, -math.inf), logits).amax(-1)
        assert bool((lo >= hi).all())


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_phi_equals_plain_routing(norm, dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 8, generator=g).to(dtype)
    probs, weights, index = dmr_route(logits, torch.zeros(8), top_k=3, norm_topk_prob=norm)
    ref_probs = torch.softmax(logits, -1, dtype=torch.float32)
    ref_w, ref_i = torch.topk(ref_probs, 3, -1)
    if norm:
        ref_w = ref_w / ref_w.sum(-1, keepdim=True)
    assert probs.dtype == torch.float32
    assert weights.dtype == dtype
    assert torch.equal(probs, ref_probs)
    assert torch.equal(index, ref_i)
    assert torch.equal(weights, ref_w.to(dtype))
    p2, w2, i2 = dmr_route(logits, None, top_k=3, norm_topk_prob=norm)
    assert torch.equal(p2, probs) and torch.equal(w2, weights) and torch.equal(i2, index)


@pytest.mark.parametrize("norm", [False, True])
def test_zero_phi_matches_smoe_layer_route(norm):
    torch.manual_seed(1)
    E, H, Iw = 8, 6, 4
    layer = SMoELayer(torch.randn(E, H), torch.randn(E, 2 * Iw, H), torch.randn(E, H, Iw),
                      nn.SiLU(), top_k=2, norm_topk_prob=norm, lora_rank=2, lora_alpha=4.0)
    x = torch.randn(9, H)
    ref = layer.route(x)
    got = dmr_route(layer.router_logits(x), torch.zeros(E), top_k=2, norm_topk_prob=norm)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)


def test_renormalised_weights_sum_to_one_with_modulation():
    logits = torch.randn(5, 6)
    phi = torch.randn(6)
    _, w, _ = dmr_route(logits, phi, top_k=3, norm_topk_prob=True)
    assert torch.allclose(w.sum(-1), torch.ones(5))


def test_gradient_reaches_phi_only_through_candidates():
    # every token's candidates lie in {0, 1, 2}; expert 3 is never a candidate
    logits = torch.tensor([[3.0, 2.0, 0.0, -1.0],
                           [1.0, 0.0, 2.0, -2.0],
                           [0.5, 2.5, 1.5, 0.0]], requires_grad=True)
    phi = torch.zeros(4, requires_grad=True)
    _, weights, _ = dmr_route(logits, phi, top_k=2, num_candidates=2)
    (weights * torch.tensor([1.0, 2.0])).sum().backward()
    assert phi.grad is not None and logits.grad is not None
    assert phi.grad[3].item() == 0.0
    assert bool((phi.grad[:3] != 0).all())
    assert bool((logits.grad != 0).any())
    # phi's gradient is the candidate-masked sum of the logits' gradient over tokens
    mask = candidate_mask(logits, 2)
    assert torch.allclose(phi.grad, (logits.grad * mask).sum(0))


@pytest.mark.parametrize("n_p", [0, 5, 2.0])
def test_modulate_rejects_bad_num_candidates(n_p):
    with pytest.raises(ValueError, match="num_candidates"):
        modulate_logits(torch.zeros(2, 4), torch.zeros(4), n_p)


def test_modulate_and_route_reject_bad_shapes():
    with pytest.raises(ValueError, match="phi"):
        modulate_logits(torch.zeros(2, 4), torch.zeros(3))
    with pytest.raises(ValueError, match="logits"):
        modulate_logits(torch.zeros(2, 3, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="top_k"):
        dmr_route(torch.zeros(2, 4), torch.zeros(4), top_k=5)
    with pytest.raises(ValueError, match="top_k"):
        dmr_route(torch.zeros(2, 4), torch.zeros(4), top_k=0)


# --- server side: utilization and phi update ----------------------------------------


def test_global_utilization_hand_example():
    # client 0: K=1, 4 tokens, all to expert 0; client 1: K=2, 2 tokens
    counts = torch.tensor([[[4.0, 0.0, 0.0, 0.0]],
                           [[0.0, 2.0, 1.0, 1.0]]])  # [C=2, L=1, E=4]
    tokens = torch.tensor([[4.0], [2.0]])  # [C, L]
    u = global_utilization(counts, tokens, torch.tensor([3.0, 1.0]))
    assert u.shape == (1, 4) and u.dtype == torch.float64
    expected = torch.tensor([[0.75, 0.25, 0.125, 0.125]], dtype=torch.float64)
    assert torch.allclose(u, expected, atol=1e-12)
    assert u.sum().item() == pytest.approx(mean_top_k([1, 2], [3.0, 1.0]))


def test_global_utilization_sums_to_k_bar_per_layer():
    g = torch.Generator().manual_seed(3)
    C, L, E = 3, 4, 8
    ks = [1, 2, 4]
    weights = [10.0, 30.0, 60.0]
    counts = torch.zeros(C, L, E)
    tokens = torch.zeros(C, L)
    for c, k in enumerate(ks):
        for layer in range(L):
            n = int(torch.randint(5, 50, (1,), generator=g))
            idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(n)])  # [n, k]
            counts[c, layer] = torch.bincount(idx.reshape(-1), minlength=E).float()
            tokens[c, layer] = n
    u = global_utilization(counts, tokens, weights)
    k_bar = mean_top_k(ks, weights)
    assert k_bar == pytest.approx(0.1 * 1 + 0.3 * 2 + 0.6 * 4)
    assert torch.allclose(u.sum(-1), torch.full((L,), k_bar, dtype=torch.float64))


def test_global_utilization_zero_token_layer_contributes_zero():
    counts = torch.tensor([[[2.0, 2.0], [4.0, 0.0]],
                           [[0.0, 4.0], [0.0, 0.0]]])  # client 1 saw no tokens at layer 1
    tokens = torch.tensor([[4.0, 4.0], [4.0, 0.0]])
    u = global_utilization(counts, tokens, [1.0, 1.0])
    assert torch.allclose(u, torch.tensor([[0.25, 0.75], [0.5, 0.0]], dtype=torch.float64))
    assert bool(torch.isfinite(u).all())


def test_global_utilization_rejects_bad_input():
    with pytest.raises(ValueError, match="token_counts"):
        global_utilization(torch.zeros(2, 3, 4), torch.ones(2, 2), [1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        global_utilization(torch.zeros(2, 3, 4), torch.ones(2, 3), [1.0])
    with pytest.raises(ValueError, match="weights"):
        global_utilization(torch.zeros(2, 3, 4), torch.ones(2, 3), [0.0, 0.0])
    with pytest.raises(ValueError, match="weights"):
        global_utilization(torch.zeros(2, 3, 4), torch.ones(2, 3), [-1.0, 2.0])
    with pytest.raises(ValueError, match="expert_counts"):
        global_utilization(torch.zeros(2, 4), torch.ones(2, 3), [1.0, 1.0])


def test_mean_top_k():
    assert mean_top_k([1, 2, 4, 8], [1, 1, 1, 1]) == pytest.approx(3.75)
    assert mean_top_k([1, 2], torch.tensor([3.0, 1.0])) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="top_ks"):
        mean_top_k([], [])
    with pytest.raises(ValueError, match="top_ks"):
        mean_top_k([0, 2], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        mean_top_k([1, 2], [1.0])


def test_target_modulation_four_expert_example():
    # K_bar = 1, M = 4 -> u* = 0.25
    u = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    phi_t = target_modulation(u, k_bar=1.0)
    expected = torch.tensor([[-TANH_HALF, 0.0, TANH_ONE, TANH_ONE]], dtype=torch.float64)
    assert torch.allclose(phi_t, expected, atol=1e-5)
    assert phi_t[0, 0] < 0  # over-used
    assert phi_t[0, 2] > 0 and phi_t[0, 3] > 0  # under-used


def test_target_modulation_is_bounded_by_tanh():
    u = torch.tensor([[0.0, 1e-9, 0.1, 0.5, 4.0, 100.0]])
    phi_t = target_modulation(u, k_bar=2.0)
    assert bool((phi_t.abs() <= 1).all())
    assert phi_t[0, 5] > -TANH_ONE  # over-use saturates above -tanh(1)
    assert phi_t[0, 0] > 0.999  # an unused expert gets about +1
    assert bool((phi_t[0, 2:].abs() < 1).all())  # strict away from tanh's saturation


def test_server_phi_update_momentum_mixing_exact():
    u = torch.tensor([[0.5, 0.25, 0.125, 0.125]])
    phi_agg = torch.tensor([[0.2, -0.1, 0.0, 0.4]])
    new = server_phi_update(phi_agg, u, k_bar=1.0, momentum=0.9)
    expected = torch.tensor([[0.18 - 0.1 * TANH_HALF, -0.09, 0.1 * TANH_ONE,
                              0.36 + 0.1 * TANH_ONE]])
    assert new.dtype == torch.float32 and new.shape == (1, 4)
    assert torch.allclose(new, expected, atol=1e-6)
    assert torch.allclose(new, torch.tensor([[0.133788284, -0.09, 0.0761594156, 0.4361594156]]),
                          atol=1e-6)
    # zeta = 1 keeps phi_agg; zeta = 0 jumps to phi~
    assert torch.allclose(server_phi_update(phi_agg, u, 1.0, momentum=1.0), phi_agg)
    assert torch.allclose(server_phi_update(phi_agg, u, 1.0, momentum=0.0),
                          target_modulation(u, 1.0).float())


def test_server_phi_update_signs_on_balanced_and_skewed_layers():
    u = torch.tensor([[2.0, 0.0, 1.0, 1.0],  # K_bar = 4 / M = 4 -> u* = 1
                      [1.0, 1.0, 1.0, 1.0]])
    new = server_phi_update(torch.zeros(2, 4), u, k_bar=4.0, momentum=0.5)
    assert new[0, 0] < 0 and new[0, 1] > 0
    assert torch.allclose(new[0, 2:], torch.zeros(2), atol=1e-5)
    assert torch.allclose(new[1], torch.zeros(4), atol=1e-5)  # balanced: no push


def test_server_phi_update_ablation_returns_phi_agg():
    phi_agg = torch.tensor([[0.3, -0.7]])
    out = server_phi_update(phi_agg, torch.tensor([[1.5, 0.5]]), k_bar=2.0,
                            utilization_aware=False)
    assert out is phi_agg


def test_server_phi_update_rejects_bad_input():
    phi = torch.zeros(1, 4)
    u = torch.full((1, 4), 0.25)
    with pytest.raises(ValueError, match="momentum"):
        server_phi_update(phi, u, 1.0, momentum=1.5)
    with pytest.raises(ValueError, match="utilization"):
        server_phi_update(phi, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="k_bar"):
        server_phi_update(phi, u, 0.0)
    with pytest.raises(ValueError, match="eps"):
        server_phi_update(phi, u, 1.0, eps=-1.0)


# --- range penalty -------------------------------------------------------------------


def test_phi_range_penalty_value_and_gradient():
    phi = torch.tensor([-1.5, 0.0, 0.5, 1.25, -1.0, 1.0], requires_grad=True)
    loss = phi_range_penalty(phi, -1.0, 1.0, coef=0.01)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(0.01 * (0.25 + 0.0625))
    loss.backward()
    # below: 2*lambda*(phi - phi_min); inside and on the bounds: 0;
    # above: 2*lambda*(phi - phi_max)
    expected = torch.tensor([2 * 0.01 * (-0.5), 0.0, 0.0, 2 * 0.01 * 0.25, 0.0, 0.0])
    assert torch.allclose(phi.grad, expected)


def test_phi_range_penalty_zero_inside_and_2d():
    phi = torch.tensor([[-0.9, 0.9], [0.0, 0.3]], requires_grad=True)
    loss = phi_range_penalty(phi)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(phi.grad, torch.zeros(2, 2))
    assert phi_range_penalty(torch.tensor([[3.0], [-3.0]]), coef=1.0).item() == pytest.approx(8.0)


def test_phi_range_penalty_rejects_bad_bounds():
    with pytest.raises(ValueError, match="phi_min"):
        phi_range_penalty(torch.zeros(3), 1.0, -1.0)
    with pytest.raises(ValueError, match="coef"):
        phi_range_penalty(torch.zeros(3), coef=-0.1)


# --- config --------------------------------------------------------------------------


def test_dmr_config_defaults():
    cfg = DMRConfig()
    assert (cfg.num_candidates, cfg.momentum, cfg.phi_min, cfg.phi_max) == (2, 0.9, -1.0, 1.0)
    assert cfg.penalty_coef == 1e-2
    assert cfg.range_penalty and cfg.server_update and cfg.learn_phi


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"momentum": 1.5}, "dmr.momentum: got 1.5, expected a number in [0, 1]"),
        ({"momentum": -0.1}, "dmr.momentum"),
        ({"num_candidates": 0}, "dmr.num_candidates: got 0, expected an integer >= 1"),
        ({"num_candidates": 1.5}, "dmr.num_candidates"),
        ({"phi_min": 1.0, "phi_max": -1.0}, "dmr.phi_max"),
        ({"phi_max": math.inf}, "dmr.phi_max: got inf"),
        ({"penalty_coef": -1.0}, "dmr.penalty_coef"),
        ({"learn_phi": "yes"}, "dmr.learn_phi"),
    ],
)
def test_dmr_config_validation(kwargs, message):
    with pytest.raises(ValueError) as exc:
        DMRConfig(**kwargs)
    assert message in str(exc.value)


def test_dmr_config_reports_all_errors_together():
    with pytest.raises(ValueError) as exc:
        DMRConfig(momentum=2.0, penalty_coef=-1.0, num_candidates=0)
    lines = str(exc.value).splitlines()
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {
        "dmr.momentum", "dmr.penalty_coef", "dmr.num_candidates"}
