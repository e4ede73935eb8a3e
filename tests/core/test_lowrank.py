"""Tests for the LoRA algebra (ubsmoe.core.lora) and the HetLoRA, FlexLoRA, FLoRIST aggregation math."""

from __future__ import annotations

import math

import pytest
import torch

from ubsmoe.core.lora import (
    energy_rank,
    factored_svd,
    lora_frobenius_norm,
    merge_into_weight,
    pad_lora,
    stack_lora,
    truncate_lora,
)
from ubsmoe.methods.flexlora import flexlora_aggregate, flexlora_redistribute
from ubsmoe.methods.florist import florist_aggregate
from ubsmoe.methods.hetlora import hetlora_aggregate, hetlora_regularizer, hetlora_weights

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clients(ranks, out_features, in_features, seed=0, dtype=F64):
    g = _gen(seed)
    As = [torch.randn(r, in_features, generator=g, dtype=dtype) for r in ranks]
    Bs = [torch.randn(out_features, r, generator=g, dtype=dtype) for r in ranks]
    scales = [16.0 / r for r in ranks]
    w = torch.rand(len(ranks), generator=g, dtype=F64) + 0.1
    weights = (w / w.sum()).tolist()
    return As, Bs, scales, weights


def _dense_update(As, Bs, scales, weights):
    return sum(p * s * (B @ A) for A, B, s, p in zip(As, Bs, scales, weights))


def _best_rank(dW, r):
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


# ----- truncate / pad ----------------------------------------------------------------
def test_pad_then_truncate_round_trip():
    g = _gen(1)
    A, B = torch.randn(5, 7, generator=g), torch.randn(6, 5, generator=g)
    A_p, B_p = pad_lora(A, B, 9)
    assert A_p.shape == (9, 7) and B_p.shape == (6, 9)
    assert torch.equal(A_p[5:], torch.zeros(4, 7)) and torch.equal(B_p[:, 5:], torch.zeros(6, 4))
    assert torch.allclose(B_p @ A_p, B @ A)
    A_t, B_t = truncate_lora(A_p, B_p, 5)
    assert torch.equal(A_t, A) and torch.equal(B_t, B)


def test_truncate_takes_leading_components_and_copies():
    g = _gen(2)
    A, B = torch.randn(8, 4, generator=g), torch.randn(3, 8, generator=g)
    A_t, B_t = truncate_lora(A, B, 3)
    assert torch.equal(A_t, A[:3]) and torch.equal(B_t, B[:, :3])
    A_t.zero_()
    assert A.abs().sum() > 0  # truncation returned a copy


def test_truncate_of_padded_zero_rows_is_zero():
    g = _gen(3)
    A, B = torch.randn(2, 4, generator=g), torch.randn(3, 2, generator=g)
    A_p, B_p = pad_lora(A, B, 6)
    A_t, B_t = truncate_lora(A_p, B_p, 4)
    assert torch.equal(A_t[:2], A) and torch.equal(A_t[2:], torch.zeros(2, 4))
    assert torch.equal(B_t[:, 2:], torch.zeros(3, 2))


def test_pad_zero_rank_gives_zero_factors():
    A_p, B_p = pad_lora(torch.zeros(0, 4), torch.zeros(3, 0), 1)
    assert A_p.shape == (1, 4) and B_p.shape == (3, 1)
    assert not A_p.any() and not B_p.any()


@pytest.mark.parametrize("rank", [0, -1, 9, 2.0, True])
def test_truncate_invalid_rank(rank):
    with pytest.raises(ValueError, match="rank"):
        truncate_lora(torch.zeros(8, 4), torch.zeros(3, 8), rank)


@pytest.mark.parametrize("rank_max", [4, 0, 5.0])
def test_pad_invalid_rank(rank_max):
    with pytest.raises(ValueError, match="rank_max"):
        pad_lora(torch.zeros(5, 4), torch.zeros(3, 5), rank_max)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="rank mismatch"):
        pad_lora(torch.zeros(5, 4), torch.zeros(3, 6), 8)


# ----- Frobenius norm and HetLoRA weights -------------------------------------------
@pytest.mark.parametrize("r,out_f,in_f", [(1, 5, 3), (4, 9, 7), (12, 6, 20)])
def test_lora_frobenius_norm_matches_dense(r, out_f, in_f):
    g = _gen(r)
    A, B = torch.randn(r, in_f, generator=g, dtype=F64), torch.randn(out_f, r, generator=g,
                                                                      dtype=F64)
    got = lora_frobenius_norm(A, B, 0.75)
    want = torch.linalg.norm(0.75 * B @ A)
    assert got.shape == () and torch.allclose(got, want, rtol=1e-12)


def test_lora_frobenius_norm_zero_and_dtype():
    A, B = torch.randn(3, 4), torch.zeros(5, 3)
    got = lora_frobenius_norm(A, B, 2.0)
    assert got.dtype == torch.float32 and got.item() == 0.0


def test_hetlora_weights_follow_norms():
    As, Bs, scales, _ = _clients([2, 4, 8], 6, 5, seed=4)
    norms = torch.stack([lora_frobenius_norm(A, B, s) for A, B, s in zip(As, Bs, scales)])
    w = hetlora_weights(norms)
    dense = torch.stack([torch.linalg.norm(s * B @ A) for A, B, s in zip(As, Bs, scales)])
    assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-12)
    assert torch.allclose(w / w[0], dense / dense[0], rtol=1e-10)
    assert torch.allclose(w, dense / dense.sum(), rtol=1e-10)


def test_hetlora_weights_uniform_when_all_zero():
    w = hetlora_weights(torch.zeros(4, dtype=F64))
    assert torch.equal(w, torch.full((4,), 0.25, dtype=F64))


@pytest.mark.parametrize("bad", [torch.tensor([1.0, -0.5]), torch.tensor([float("nan")]),
                                 torch.zeros(0), torch.ones(2, 2)])
def test_hetlora_weights_invalid(bad):
    with pytest.raises(ValueError):
        hetlora_weights(bad)


# ----- HetLoRA regulariser ------------------------------------------------------------
def test_hetlora_regularizer_value_and_grads():
    g = _gen(5)
    r = 10
    A = torch.randn(r, 6, generator=g, dtype=F64, requires_grad=True)
    B = torch.randn(4, r, generator=g, dtype=F64, requires_grad=True)
    gamma, coef = 0.7, 0.3  # k = floor(7.000000000000001) = 7
    loss = hetlora_regularizer(A, B, gamma, coef)
    with torch.no_grad():
        want = coef * math.sqrt((B[:, 7:] ** 2).sum().item()) * math.sqrt((A[7:] ** 2).sum().item())
    assert math.isclose(loss.item(), want, rel_tol=1e-12)
    loss.backward()
    assert torch.all(A.grad[:7] == 0) and torch.all(B.grad[:, :7] == 0)
    assert torch.all(A.grad[7:].abs().sum(dim=1) > 0)
    assert torch.all(B.grad[:, 7:].abs().sum(dim=0) > 0)


def test_hetlora_regularizer_floor_tolerance_and_gamma_one():
    A, B = torch.ones(100, 2), torch.ones(3, 100)
    # 0.29 * 100 = 28.999999999999996 in floating point; the tail is rows 29..99.
    got = hetlora_regularizer(A, B, 0.29, 1.0)
    assert math.isclose(got.item(), math.sqrt(3 * 71) * math.sqrt(71 * 2), rel_tol=1e-6)
    assert hetlora_regularizer(A, B, 1.0, 1.0).item() == 0.0


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5])
def test_hetlora_regularizer_invalid_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        hetlora_regularizer(torch.ones(4, 2), torch.ones(3, 4), gamma, 1.0)


# ----- HetLoRA aggregation ------------------------------------------------------------
def test_hetlora_aggregate_pads_and_weights():
    ranks = [2, 3, 5]
    As, Bs, scales, _ = _clients(ranks, 6, 4, seed=6)
    A, B = hetlora_aggregate(As, Bs, scales, 8)
    assert A.shape == (8, 4) and B.shape == (6, 8)
    dense = torch.stack([torch.linalg.norm(s * Bc @ Ac) for Ac, Bc, s in zip(As, Bs, scales)])
    w = dense / dense.sum()
    want_A = sum(wc * pad_lora(Ac, Bc, 8)[0] for wc, Ac, Bc in zip(w, As, Bs))
    want_B = sum(wc * pad_lora(Ac, Bc, 8)[1] for wc, Ac, Bc in zip(w, As, Bs))
    assert torch.allclose(A, want_A) and torch.allclose(B, want_B)
    assert torch.equal(A[5:], torch.zeros(3, 4))


def test_hetlora_aggregate_identical_clients_unchanged():
    As, Bs, _, _ = _clients([4], 5, 3, seed=7)
    A, B = hetlora_aggregate(As * 3, Bs * 3, [4.0] * 3, 4)
    assert torch.allclose(A, As[0]) and torch.allclose(B, Bs[0])


def test_hetlora_aggregate_invalid_rank_max():
    As, Bs, scales, _ = _clients([2, 5], 4, 3)
    with pytest.raises(ValueError, match="rank_max"):
        hetlora_aggregate(As, Bs, scales, 4)


# ----- FLoRA stacking and merge -------------------------------------------------------
def test_stack_equals_weighted_sum_mixed_ranks():
    As, Bs, scales, weights = _clients([1, 3, 6, 2], 7, 5, seed=8)
    A_st, B_st = stack_lora(As, Bs, scales, torch.tensor(weights, dtype=F64))
    assert A_st.shape == (12, 5) and B_st.shape == (7, 12)
    assert torch.allclose(B_st @ A_st, _dense_update(As, Bs, scales, weights), rtol=1e-12)


def test_stack_mismatched_lists():
    As, Bs, scales, weights = _clients([2, 3], 4, 3)
    with pytest.raises(ValueError, match="weights"):
        stack_lora(As, Bs, scales, weights[:1])
    with pytest.raises(ValueError, match="module shape"):
        stack_lora([As[0], torch.zeros(3, 9)], Bs, scales, weights)


def test_merge_into_weight_equals_dense_and_does_not_modify_w():
    g = _gen(9)
    W = torch.randn(6, 5, generator=g, dtype=F64)
    W0 = W.clone()
    A, B = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)
    merged = merge_into_weight(W, A, B, 0.5)
    assert torch.allclose(merged, W0 + 0.5 * B @ A, rtol=1e-12)
    assert torch.equal(W, W0)


def test_merge_into_weight_keeps_low_precision_dtype():
    W = torch.zeros(4, 3, dtype=torch.bfloat16)
    merged = merge_into_weight(W, torch.ones(2, 3), torch.ones(4, 2), 2.0)
    assert merged.dtype == torch.bfloat16 and torch.all(merged == 4.0)


# ----- factored SVD -------------------------------------------------------------------
@pytest.mark.parametrize(
    "ranks,out_f,in_f",
    [([2, 3, 5], 20, 16), ([4, 4], 6, 30), ([3, 5, 8], 9, 7), ([12, 16, 24, 40], 64, 48)],
)
def test_factored_svd_matches_dense(ranks, out_f, in_f):
    As, Bs, scales, weights = _clients(ranks, out_f, in_f, seed=sum(ranks))
    A_st, B_st = stack_lora(As, Bs, scales, weights)
    dW = B_st @ A_st
    U, S, Vh = factored_svd(B_st, A_st)
    q = min(out_f, in_f, sum(ranks))
    assert U.shape == (out_f, q) and S.shape == (q,) and Vh.shape == (q, in_f)
    U_d, S_d, Vh_d = torch.linalg.svd(dW, full_matrices=False)
    assert torch.allclose(S, S_d[:q], rtol=1e-10, atol=1e-10 * S_d[0])
    assert torch.allclose(U @ torch.diag(S) @ Vh, dW, atol=1e-10 * S_d[0])
    # The product and projectors are basis-independent; raw vectors are not (sign).
    for r in sorted({1, 3, q}):
        if r < q and S_d[r - 1] - S_d[r] < 1e-8 * S_d[0]:
            continue  # projector undefined inside a repeated singular value
        assert torch.allclose(U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], _best_rank(dW, r),
                              atol=1e-9 * S_d[0])
        assert torch.allclose(U[:, :r] @ U[:, :r].T, U_d[:, :r] @ U_d[:, :r].T, atol=1e-9)
        assert torch.allclose(Vh[:r].T @ Vh[:r], Vh_d[:r].T @ Vh_d[:r], atol=1e-9)
    assert torch.allclose(U.T @ U, torch.eye(q, dtype=F64), atol=1e-10)
    assert torch.allclose(Vh @ Vh.T, torch.eye(q, dtype=F64), atol=1e-10)


def test_factored_svd_returns_input_dtype():
    As, Bs, scales, weights = _clients([2, 3], 10, 8, dtype=torch.float32)
    A_st, B_st = stack_lora(As, Bs, scales, weights)
    U, S, Vh = factored_svd(B_st, A_st)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert torch.allclose(U @ torch.diag(S) @ Vh, B_st @ A_st, atol=1e-4)


def test_factored_svd_zero_inner_size():
    U, S, Vh = factored_svd(torch.zeros(5, 0), torch.zeros(0, 4))
    assert U.shape == (5, 0) and S.shape == (0,) and Vh.shape == (0, 4)


def test_factored_svd_shape_error():
    with pytest.raises(ValueError, match="factored_svd"):
        factored_svd(torch.zeros(5, 3), torch.zeros(2, 4))


# ----- FlexLoRA redistribution --------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 4, 7])
def test_flexlora_redistribute_is_best_rank_approximation(rank):
    As, Bs, scales, weights = _clients([3, 5, 2], 12, 9, seed=10)
    A_st, B_st = stack_lora(As, Bs, scales, weights)
    dW = B_st @ A_st
    U, S, Vh = factored_svd(B_st, A_st)
    scale = 16.0 / rank
    A, B = flexlora_redistribute(U, S, Vh, rank, scale)
    assert A.shape == (rank, 9) and B.shape == (12, rank)
    assert torch.allclose(scale * B @ A, _best_rank(dW, rank), atol=1e-10)
    assert torch.allclose(A, Vh[:rank])  # A = V_r^T, B carries the singular values


def test_flexlora_redistribute_pads_past_q():
    As, Bs, scales, weights = _clients([2, 1], 6, 5, seed=11)
    A_st, B_st = stack_lora(As, Bs, scales, weights)
    U, S, Vh = factored_svd(B_st, A_st)  # q = 3
    A, B = flexlora_redistribute(U, S, Vh, 5, 2.0)
    assert A.shape == (5, 5) and B.shape == (6, 5)
    assert torch.equal(A[3:], torch.zeros(2, 5)) and torch.equal(B[:, 3:], torch.zeros(6, 2))
    assert torch.allclose(2.0 * B @ A, B_st @ A_st, atol=1e-10)


def test_flexlora_redistribute_invalid():
    U, S, Vh = torch.eye(3), torch.ones(3), torch.eye(3)
    with pytest.raises(ValueError, match="rank"):
        flexlora_redistribute(U, S, Vh, 0, 1.0)
    with pytest.raises(ValueError, match="scale"):
        flexlora_redistribute(U, S, Vh, 2, 0.0)


def test_flexlora_aggregate_matches_dense_per_rank():
    ranks = [2, 3, 5, 3]
    As, Bs, scales, weights = _clients(ranks, 14, 11, seed=12)
    dW = _dense_update(As, Bs, scales, weights)
    alpha = 16.0
    out = flexlora_aggregate(As, Bs, scales, weights, [2, 3, 5], lambda r: alpha / r)
    out_list = flexlora_aggregate(As, Bs, scales, weights, [2, 3, 5], [8.0, 16 / 3, 3.2])
    for (A, B), (A2, B2), r in zip(out, out_list, [2, 3, 5]):
        assert A.shape == (r, 11) and B.shape == (14, r)
        assert torch.allclose(alpha / r * B @ A, _best_rank(dW, r), atol=1e-10)
        assert torch.allclose(A, A2) and torch.allclose(B, B2)
    with pytest.raises(ValueError, match="scales"):
        flexlora_aggregate(As, Bs, scales, weights, [2, 3], [1.0])


def test_flexlora_identical_full_rank_clients_recover_update():
    As, Bs, _, _ = _clients([4], 8, 6, seed=13)
    out = flexlora_aggregate(As * 3, Bs * 3, [2.0] * 3, [1 / 3] * 3, [4], [2.0])
    A, B = out[0]
    assert torch.allclose(B @ A, Bs[0] @ As[0], atol=1e-10)


# ----- energy rank and FLoRIST --------------------------------------------------------
@pytest.mark.parametrize(
    "S,tau,k",
    [
        ([1.0, 1.0, 1.0, 1.0], 0.5, 2),  # exactly at threshold: 2/4 == 0.5
        ([1.0, 1.0, 1.0, 1.0], 0.5000001, 3),
        ([1.0, 1.0, 1.0, 1.0], 0.25, 1),
        ([1.0, 1.0, 1.0, 1.0], 0.2499999, 1),
        ([4.0, 3.0], 0.64, 1),  # 16/25 == 0.64 exactly at threshold
        ([4.0, 3.0], 0.6400001, 2),
        ([3.0, 2.0, 1.0, 0.0], 13 / 14, 2),  # (9+4)/14, threshold hit exactly
        ([3.0, 2.0, 1.0, 0.0], 0.93, 3),
        ([3.0, 2.0, 1.0, 0.0], 1.0, 3),  # trailing zero singular value adds no energy
        ([5.0, 0.0, 0.0], 0.9, 1),
        ([2.0, 1.0], 1e-12, 1),
    ],
)
def test_energy_rank_smallest_k(S, tau, k):
    assert energy_rank(torch.tensor(S, dtype=F64), tau) == k
    assert energy_rank(torch.tensor(S, dtype=torch.float32), tau) == k


def test_energy_rank_tau_one_is_full_rank():
    S = torch.linspace(3.0, 0.1, 17, dtype=F64)
    assert energy_rank(S, 1.0) == 17


def test_energy_rank_zero_and_empty():
    assert energy_rank(torch.zeros(5), 0.9) == 0
    assert energy_rank(torch.zeros(0), 0.9) == 0


@pytest.mark.parametrize("tau", [0.0, -0.5, 1.01, float("nan")])
def test_energy_rank_invalid_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        energy_rank(torch.ones(3), tau)


def test_energy_rank_invalid_s():
    with pytest.raises(ValueError):
        energy_rank(torch.tensor([1.0, -1.0]), 0.5)
    with pytest.raises(ValueError):
        energy_rank(torch.ones(2, 2), 0.5)


def test_florist_aggregate_energy_and_product():
    As, Bs, scales, weights = _clients([3, 5, 4], 16, 12, seed=14)
    dW = _dense_update(As, Bs, scales, weights)
    S_d = torch.linalg.svdvals(dW)
    tau = 0.9
    A, B, k = florist_aggregate(As, Bs, scales, weights, tau, 0.5)
    energy = torch.cumsum(S_d**2, 0) / (S_d**2).sum()
    assert energy[k - 1] >= tau and (k == 1 or energy[k - 2] < tau)
    assert A.shape == (k, 12) and B.shape == (16, k)
    assert torch.allclose(0.5 * B @ A, _best_rank(dW, k), atol=1e-10)


def test_florist_zero_update_guard():
    ranks = [2, 3]
    As, _, scales, weights = _clients(ranks, 6, 5, seed=15)
    Bs = [torch.zeros(6, r, dtype=F64) for r in ranks]  # fresh LoRA: B = 0, so dW = 0
    A, B, k = florist_aggregate(As, Bs, scales, weights, 0.9, 1.0)
    assert k == 0 and A.shape == (0, 5) and B.shape == (6, 0)
    assert torch.isfinite(A).all() and torch.isfinite(B).all()
    W = torch.randn(6, 5, dtype=F64)
    assert torch.equal(merge_into_weight(W, A, B, 1.0), W)
    A1, B1 = pad_lora(A, B, 1)  # rank-1 zeros, for a caller that needs a real adapter
    assert A1.shape == (1, 5) and not B1.any()


def test_florist_invalid_args():
    As, Bs, scales, weights = _clients([2], 4, 3)
    with pytest.raises(ValueError, match="tau"):
        florist_aggregate(As, Bs, scales, weights, 0.0, 1.0)
    with pytest.raises(ValueError, match="scale"):
        florist_aggregate(As, Bs, scales, weights, 0.9, float("inf"))


def test_hetlora_regularizer_finite_grads_at_peft_init():
    # PEFT initialises B = 0; the penalty must not produce NaN gradients there.
    A = torch.randn(8, 4, requires_grad=True)
    B = torch.zeros(3, 8, requires_grad=True)
    loss = hetlora_regularizer(A, B, 0.5, 1.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all()
