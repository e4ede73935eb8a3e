"""Universal Pseudo-Gradient (DESIGN.md 4.2)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from ubsmoe.core.pg_apply import apply_pseudo_gradients, apply_pseudo_updates, snapshot_before_step
from ubsmoe.core.pseudo_grad import (
    ProbePseudoGradient,
    PseudoGradient,
    UniversalPseudoGradient,
    pg_cosine_alignment,
    pg_scale,
)
from ubsmoe.core.smoe import ExpertLoRA


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a float tensor (bitwise comparison, -0.0 != 0.0)."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16}[t.dtype])


def _hand_example():
    """4 experts, K_c = 1, lambda_pg = 0.5 -> rho = 0.5 * 4 / 1 = 2.

    Active {0, 1} with pi = (0.4, 0.2): weights (2/3, 1/3), mean 0.3.
    A-gradients g0 = [3, 0], g1 = [0, 6] -> G = [2, 2];
    g2 = 2 * (0.3 / 0.3) * G = [4, 4], g3 = 2 * (0.1 / 0.3) * G = [4/3, 4/3].
    B-gradients g0 = [1, 1], g1 = [-2, 4] -> G = [0, 2]; g2 = [0, 4], g3 = [0, 4/3].
    """
    grads = {
        "gate_up.A": torch.tensor([[[3.0, 0.0]], [[0.0, 6.0]], [[0.0, 0.0]], [[7.0, 7.0]]]),
        "gate_up.B": torch.tensor([[1.0, 1.0], [-2.0, 4.0], [0.0, 0.0], [0.0, 0.0]]),
    }
    router_prob = torch.tensor([0.4, 0.2, 0.3, 0.1])
    active = torch.tensor([True, True, False, False])
    expected = {
        "gate_up.A": torch.tensor([[[3.0, 0.0]], [[0.0, 6.0]], [[4.0, 4.0]],
                                   [[4 / 3, 4 / 3]]]),
        "gate_up.B": torch.tensor([[1.0, 1.0], [-2.0, 4.0], [0.0, 4.0], [0.0, 4 / 3]]),
    }
    return grads, router_prob, active, expected


def test_pg_scale_values_and_growth_as_k_shrinks():
    assert pg_scale(0.5, 4, 1) == 2.0
    assert pg_scale(0.1, 64, 8) == pytest.approx(0.8)
    scales = [pg_scale(0.1, 64, k) for k in (8, 4, 2, 1)]
    assert all(a < b for a, b in itertools.pairwise(scales))
    assert scales[-1] == pytest.approx(8 * scales[0])
    assert pg_scale(0.0, 64, 1) == 0.0


@pytest.mark.parametrize("args, field", [((-0.1, 4, 1), "lambda_pg"), ((0.1, 4, 0), "top_k"),
                                         ((0.1, 4, 5), "top_k"), ((0.1, 0, 1), "num_experts")])
def test_pg_scale_rejects_bad_input(args, field):
    with pytest.raises(ValueError, match=field):
        pg_scale(*args)


def test_universal_pg_exact_hand_example():
    grads, pi, active, expected = _hand_example()
    before = {k: v.clone() for k, v in grads.items()}
    out = UniversalPseudoGradient(0.5)(grads, pi, active, top_k=1)
    assert set(out) == set(grads)
    for name in grads:
        assert out[name].shape == grads[name].shape and out[name].dtype == grads[name].dtype
        assert torch.allclose(out[name], expected[name], atol=1e-6), name
        assert torch.equal(grads[name], before[name])  # inputs untouched


def test_universal_pg_scale_invariant_to_pi_multiple():
    grads, pi, active, _ = _hand_example()
    pg = UniversalPseudoGradient(0.5)
    a = pg(grads, pi, active, 1)
    b = pg(grads, pi * 37.0, active, 1)  # e.g. router_prob_sum instead of the mean
    for name in grads:
        assert torch.allclose(a[name], b[name], atol=1e-6)


def test_universal_pg_active_rows_bitwise_unchanged_only_inactive_written():
    g = torch.Generator().manual_seed(0)
    E = 8
    grads = {"gate_up.A": torch.randn(E, 3, 5, generator=g),
             "down.B": torch.randn(E, 4, 3, generator=g).to(torch.bfloat16)}
    active = torch.tensor([True, False, True, True, False, False, True, False])
    for g_in in grads.values():
        g_in[~active] = 0.0
    pi = torch.softmax(torch.randn(E, generator=g), -1)
    out = UniversalPseudoGradient(0.3)(grads, pi, active, top_k=2)
    for name, g_in in grads.items():
        assert out[name] is not g_in
        assert torch.equal(out[name][active], g_in[active])
        assert torch.equal(_bits(out[name][active]), _bits(g_in[active]))
        assert bool((out[name][~active] != 0).any())
        # every inactive row points along the same universal direction G
        rows = out[name][~active].float().flatten(1)
        cos = torch.nn.functional.cosine_similarity(rows, rows[:1].expand_as(rows), dim=-1)
        assert torch.allclose(cos, torch.ones_like(cos), atol=1e-2)


def test_universal_pg_rho_scales_pseudo_gradients():
    grads, pi, active, _ = _hand_example()
    pg = UniversalPseudoGradient(0.5)
    k1 = pg(grads, pi, active, top_k=1)["gate_up.A"]
    k2 = pg(grads, pi, active, top_k=2)["gate_up.A"]
    assert torch.allclose(k1[2:], 2 * k2[2:])  # rho halves when K_c doubles
    zero = UniversalPseudoGradient(0.0)(grads, pi, active, top_k=1)["gate_up.A"]
    assert torch.equal(zero[2:], torch.zeros(2, 1, 2))


def test_universal_pg_no_active_or_all_active_is_unchanged():
    grads, pi, _, _ = _hand_example()
    pg = UniversalPseudoGradient(0.5)
    for active in (torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)):
        out = pg(grads, pi, active, top_k=1)
        for name in grads:
            assert out[name] is grads[name]


def test_universal_pg_validation():
    grads, pi, active, _ = _hand_example()
    with pytest.raises(ValueError, match="lambda_pg"):
        UniversalPseudoGradient(-1.0)
    pg = UniversalPseudoGradient(0.5)
    with pytest.raises(ValueError, match="top_k"):
        pg(grads, pi, active, top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        pg(grads, pi, active, top_k=5)
    with pytest.raises(ValueError, match="active"):
        pg(grads, pi, active.float(), top_k=1)
    with pytest.raises(ValueError, match="active"):
        pg(grads, pi, torch.ones(3, dtype=torch.bool), top_k=1)
    with pytest.raises(ValueError, match="grads"):
        pg({"x": torch.zeros(3, 2)}, pi, active, top_k=1)


def test_universal_pg_implements_the_interface():
    assert isinstance(UniversalPseudoGradient(0.1), PseudoGradient)


def test_apply_pseudo_gradients_writes_grad_in_place():
    torch.manual_seed(0)
    lora = ExpertLoRA(num_experts=4, in_features=2, out_features=3, rank=1, alpha=1.0)
    grads, pi, active, expected = _hand_example()
    lora.A.grad = grads["gate_up.A"].clone()  # [E=4, r=1, in=2]
    grad_obj = lora.A.grad
    assert lora.B.grad is None
    params = {"gate_up.A": lora.A, "gate_up.B": lora.B}
    apply_pseudo_gradients(params, pi, active, top_k=1, pg=UniversalPseudoGradient(0.5))
    assert lora.A.grad is grad_obj  # written in place
    assert torch.allclose(lora.A.grad, expected["gate_up.A"], atol=1e-6)
    # B had no gradient: treated as zeros, so G = 0 and the new .grad is all zeros
    assert lora.B.grad is not None and lora.B.grad.shape == lora.B.shape
    assert torch.equal(lora.B.grad, torch.zeros_like(lora.B))


def test_apply_pseudo_gradients_after_real_backward():
    torch.manual_seed(0)
    E = 4
    A = nn.Parameter(torch.randn(E, 2, 3))
    active = torch.tensor([False, True, False, True])
    (A[active] ** 2).sum().backward()  # only experts 1 and 3 get a gradient
    true = A.grad.clone()
    pi = torch.tensor([0.1, 0.3, 0.2, 0.4])
    apply_pseudo_gradients({"A": A}, pi, active, top_k=2, pg=UniversalPseudoGradient(1.0))
    assert torch.equal(A.grad[active], true[active])
    rho = 1.0 * 4 / 2
    G = (0.3 * true[1] + 0.4 * true[3]) / 0.7
    mean = 0.35
    assert torch.allclose(A.grad[0], rho * 0.1 / mean * G, atol=1e-6)
    assert torch.allclose(A.grad[2], rho * 0.2 / mean * G, atol=1e-6)


def test_pg_cosine_alignment():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(5, 3, 4, generator=g)
    inactive = torch.tensor([True, False, True, True, False])
    pseudo = true.clone()
    pseudo[0] = 2.0 * true[0]  # same direction
    pseudo[2] = -3.0 * true[2]  # opposite
    pseudo[3] = 0.5 * true[3]
    cos = pg_cosine_alignment(pseudo, true, inactive)
    assert cos.shape == (3,) and cos.dtype == torch.float32
    assert torch.allclose(cos, torch.tensor([1.0, -1.0, 1.0]), atol=1e-6)
    # orthogonal rows
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, -1.0]])
    assert torch.allclose(pg_cosine_alignment(a, b, torch.tensor([True, True])),
                          torch.zeros(2), atol=1e-7)
    with pytest.raises(ValueError, match="same shape"):
        pg_cosine_alignment(a, b[:1], torch.tensor([True, True]))
    with pytest.raises(ValueError, match="inactive"):
        pg_cosine_alignment(a, b, torch.tensor([1, 0]))


def test_probe_pg_keeps_own_direction_at_the_universal_norm():
    grads, pi, active, _ = _hand_example()
    # the probe put the inactive experts' own gradients into their rows
    grads["gate_up.A"][2] = torch.tensor([[0.0, -3.0]])
    grads["gate_up.A"][3] = torch.tensor([[1.0, 0.0]])
    grads["gate_up.B"][2] = 0.0  # no own direction -> zero
    grads["gate_up.B"][3] = torch.tensor([0.0, 5.0])
    before = {k: v.clone() for k, v in grads.items()}
    out = ProbePseudoGradient(0.5, probe_tokens=2)(grads, pi, active, top_k=1)
    for name in grads:
        assert torch.equal(out[name][:2], grads[name][:2])
        assert torch.equal(grads[name], before[name])
    # universal norms: row 2 ||[4, 4]|| = 4 sqrt 2, row 3 ||[4/3, 4/3]||
    torch.testing.assert_close(out["gate_up.A"][2], torch.tensor([[0.0, -4 * 2 ** 0.5]]))
    torch.testing.assert_close(out["gate_up.A"][3], torch.tensor([[4 / 3 * 2 ** 0.5, 0.0]]))
    assert torch.equal(out["gate_up.B"][2], torch.zeros(2))
    torch.testing.assert_close(out["gate_up.B"][3], torch.tensor([0.0, 4 / 3]))  # norm 4/3, own dir
    assert isinstance(ProbePseudoGradient(0.1, 1), PseudoGradient)
    assert ProbePseudoGradient(0.1, 3).probe_tokens == 3 and UniversalPseudoGradient(0.1).probe_tokens == 0
    with pytest.raises(ValueError, match="probe_tokens"):
        ProbePseudoGradient(0.1, 0)
    no_active = ProbePseudoGradient(0.5, 2)(grads, pi, torch.zeros(4, dtype=torch.bool), 1)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in no_active.values())


def test_update_space_pg_moves_inactive_rows_by_the_rule_on_the_steps_changes():
    """Hand example in update space: the active rows' change in the "step" plays the part
    of the gradients; the move is added on top of what the step did to inactive rows, and
    the inactive rows' .grad is taken out before the step."""
    grads, pi, active, expected = _hand_example()
    p = torch.nn.Parameter(torch.ones(4, 1, 2))  # "gate_up.A"
    p.grad = torch.full((4, 1, 2), 9.0)  # inactive rows: a probe gradient (here: anything)
    snap = snapshot_before_step({"gate_up.A": p}, pi, active)
    assert torch.equal(p.grad[2:], torch.zeros(2, 1, 2)) and torch.equal(p.grad[:2], torch.full((2, 1, 2), 9.0))
    assert torch.equal(snap.own["gate_up.A"], torch.full((2, 1, 2), -9.0))
    with torch.no_grad():  # the "optimizer step": active rows change by g0, g1; row 3 by momentum
        p[:2] += grads["gate_up.A"][:2]
        p[3] += torch.tensor([[0.5, -0.5]])
    apply_pseudo_updates({"gate_up.A": p}, snap, 1, UniversalPseudoGradient(0.5))
    torch.testing.assert_close(p.detach()[2], 1 + expected["gate_up.A"][2])
    torch.testing.assert_close(p.detach()[3], 1 + torch.tensor([[0.5, -0.5]]) + expected["gate_up.A"][3])
    assert snapshot_before_step({"gate_up.A": p}, pi, torch.ones(4, dtype=torch.bool)) is None
