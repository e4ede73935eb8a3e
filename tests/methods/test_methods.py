"""Method registry contract suite and A3SMoE's aggregation weights."""

from __future__ import annotations

import pytest
import torch

from ubsmoe.errors import ConfigError
from ubsmoe.methods import ClientUpdate, available_methods, get_method_class
from ubsmoe.methods.a3smoe import A3SMoE, A3SMoEConfig, a3smoe_expert_weights
from ubsmoe.methods.aggregation import fedavg
from ubsmoe.methods.base import expert_layer_of

E, L = 4, 2
NAMES = {
    "model.layers.0.self_attn.q_proj.lora_A.default.weight": (3, 6),
    "model.layers.0.self_attn.q_proj.lora_B.default.weight": (6, 3),
    "model.layers.0.mlp.gate_up_lora.A": (E, 3, 6),
    "model.layers.0.mlp.gate_up_lora.B": (E, 8, 3),
    "model.layers.0.mlp.down_lora.A": (E, 3, 4),
    "model.layers.0.mlp.down_lora.B": (E, 6, 3),
    "model.layers.1.mlp.gate_up_lora.A": (E, 3, 6),
    "model.layers.1.mlp.gate_up_lora.B": (E, 8, 3),
    "model.layers.1.mlp.down_lora.A": (E, 3, 4),
    "model.layers.1.mlp.down_lora.B": (E, 6, 3),
    # Trainable routers (model.router_trainable): plain dense tensors, never LoRA factors.
    "model.layers.0.mlp.router_weight": (E, 6),
    "model.layers.1.mlp.router_weight": (E, 6),
}
ROUTERS = [n for n in NAMES if n.endswith(".mlp.router_weight")]
# Methods whose aggregate returns new factors of the aggregated update (an SVD, or a
# merge into the base weights) rather than a mean of the clients' factors: the
# contract holds for the effective update s*B@A (+ base merges), not the raw tensors.
EFFECTIVE_ONLY = {"flexlora", "flora", "florist", "a3smoe_flexlora"}
# Contract settings: FLoRIST at tau = 1 keeps every singular value (exact, like FLoRA);
# its default tau = 0.9 is lossy by design (tests/methods/test_rank_methods.py). HetLoRA without
# self-pruning: a client whose tail shrank drops it by design (tests/methods/test_hetlora_paper.py).
CONTRACT_CONFIG = {"florist": {"tau": 1.0}, "hetlora": {"prune": "never"}}


def _method(name):
    cls = get_method_class(name)
    return cls(cls.config_class(**CONTRACT_CONFIG.get(name, {})))


def _effective(method, adapters):
    """Dense effective update per LoRA module: s*B@A plus the method's base merges."""
    from ubsmoe.methods.rank_base import lora_pairs

    alpha = getattr(method.config, "alpha", 16.0)
    pairs, others = lora_pairs(list(adapters))
    out = {n: adapters[n].double() for n in others}
    for p in pairs:
        A, B = adapters[p.a].double(), adapters[p.b].double()
        # the rank methods' scale (model.lora_scale_rule), else the old alpha / r
        scale = method.scale(A.shape[-2]) if hasattr(method, "scale") else alpha / A.shape[-2]
        out[p.module] = scale * (B @ A)
    for _, factors in method.base_merges():
        for p in pairs:
            if f"{p.module}.A" in factors:
                out[p.module] = out[p.module] + factors[f"{p.module}.B"].double() @ factors[f"{p.module}.A"].double()
    return out


def _update(cid, seed, counts=None, n=10, k=2):
    g = torch.Generator().manual_seed(seed)
    adapters = {name: torch.randn(shape, generator=g) for name, shape in NAMES.items()}
    if counts is None:
        counts = torch.full((L, E), float(k * 8 / E))
    return ClientUpdate(client_id=cid, num_examples=n, adapters=adapters,
                        expert_counts=counts.to(torch.float64), token_counts=torch.full((L,), 8.0, dtype=torch.float64),
                        top_k=k, loss=1.0)


def _global(seed=99):
    return _update(-1, seed).adapters


@pytest.mark.parametrize("name", available_methods())
def test_identical_updates_leave_adapters_unchanged(name):
    method = _method(name)
    u = _update(0, 1)
    same = [ClientUpdate(**{**u.__dict__, "client_id": c, "num_examples": 5 + c}) for c in range(3)]
    out = method.aggregate(_global(), same)
    assert set(out) == set(NAMES) and all(out[k].shape == v.shape for k, v in u.adapters.items())
    if name not in EFFECTIVE_ONLY:
        for k, v in u.adapters.items():
            torch.testing.assert_close(out[k], v, atol=1e-6, rtol=1e-6)
    got, want = _effective(method, out), _effective(_method(name), u.adapters)
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", available_methods())
def test_aggregate_is_a_convex_combination(name):
    """Weights are normalised: aggregating constant tensors c_k gives a value inside [min, max].

    In the effective space: client c's update s*B@A is constant s*r*c^2, so the
    aggregated effective update must lie within [s*r*1, s*r*25].
    """
    method = _method(name)
    updates = []
    for c, val in enumerate([1.0, 2.0, 5.0]):
        u = _update(c, c)
        u.adapters = {k: torch.full_like(v, val) for k, v in u.adapters.items()}
        updates.append(u)
    out = method.aggregate(_global(), updates)
    if name not in EFFECTIVE_ONLY:
        for v in out.values():
            assert float(v.min()) >= 1.0 - 1e-6 and float(v.max()) <= 5.0 + 1e-6
    lo = _effective(_method(name), updates[0].adapters)
    hi = _effective(_method(name), updates[-1].adapters)
    for k, v in _effective(method, out).items():
        assert float(v.min()) >= float(lo[k].min()) * (1 - 1e-6)
        assert float(v.max()) <= float(hi[k].max()) * (1 + 1e-6)


@pytest.mark.parametrize("name", available_methods())
def test_aggregate_is_deterministic_and_order_free(name):
    method = _method(name)
    updates = [_update(c, 10 + c, n=3 + c) for c in range(4)]
    a = method.aggregate(_global(), updates)
    other = _method(name)
    b = other.aggregate(_global(), updates)
    for k in a:
        assert torch.equal(a[k], b[k])
    assert [mid for mid, _ in method.base_merges()] == [mid for mid, _ in other.base_merges()]


@pytest.mark.parametrize("name", available_methods())
def test_payload_survives_flower_record_round_trip(name):
    from ubsmoe.fl.messages import update_from_content, update_to_content

    u = _update(3, 5)
    u.metrics = {"steps": 4.0}
    received = {k: v.clone() for k, v in u.adapters.items()}
    received["model.layers.0.mlp.gate_up_lora.A"][1] += 1.0  # the client changed expert 1 only
    back = update_from_content(update_to_content(u, received), received)
    assert back.client_id == 3 and back.top_k == u.top_k and back.num_examples == u.num_examples
    sent = 1 * 3 * 6 * 4 + 8 + u.expert_counts.numel() * 8 + u.token_counts.numel() * 8
    assert back.metrics == {"steps": 4.0, "bytes_up": float(sent)}  # one row, its index, stats
    for k, v in u.adapters.items():
        assert torch.equal(back.adapters[k], v)
    assert torch.equal(back.expert_counts, u.expert_counts)
    out = _method(name).aggregate(_global(), [back])
    assert set(out) == set(NAMES)


def test_unknown_method_lists_choices():
    with pytest.raises(ConfigError, match="expected one of .*a3smoe.*fedit.*smoe"):
        get_method_class("fedprox")


def test_fedit_runs_native_top_k_and_smoe_runs_k_c():
    assert get_method_class("fedit")().client_top_k(1, 8) == 8
    assert get_method_class("smoe")().client_top_k(1, 8) == 1
    assert get_method_class("a3smoe")().client_top_k(2, 8) == 2
    # explicit modes (train.top_k=budget, eval.top_k=native) override the method's own choice
    assert get_method_class("fedit")().client_top_k(1, 8, "budget") == 1
    assert get_method_class("smoe")().client_top_k(1, 8, "native") == 8
    assert {name: get_method_class(name).own_train_top_k for name in available_methods()} == {
        "fedit": "native", "hetlora": "native", "flexlora": "native", "flora": "native",
        "florist": "native", "smoe": "budget", "smoe_llb": "budget", "a3smoe": "budget",
        "ubsmoe": "budget", "a3smoe_flexlora": "budget"}


def test_fedavg_weights_by_examples():
    u1, u2 = _update(0, 1, n=1), _update(1, 2, n=3)
    out = fedavg([u1, u2])
    for k in NAMES:
        torch.testing.assert_close(out[k], 0.25 * u1.adapters[k] + 0.75 * u2.adapters[k])


def test_expert_layer_of_orders_layers_numerically():
    names = ["m.layers.10.mlp.down_lora.A", "m.layers.2.mlp.down_lora.A", "m.layers.2.self_attn.q.lora_A"]
    assert expert_layer_of(names) == {"m.layers.2.mlp.down_lora.A": 0, "m.layers.10.mlp.down_lora.A": 1}


def test_a3smoe_weights_normalised_per_expert_and_follow_formula():
    counts = [torch.tensor([[8.0, 0.0, 4.0, 4.0], [2.0, 2.0, 2.0, 10.0]]),
              torch.tensor([[4.0, 0.0, 8.0, 4.0], [4.0, 4.0, 4.0, 4.0]])]
    updates = [_update(0, 0, counts[0], n=10, k=2), _update(1, 1, counts[1], n=30, k=2)]
    w, used = a3smoe_expert_weights(updates, gamma=2.0)
    assert w.shape == (2, L, E)
    assert used.tolist() == [[True, False, True, True], [True, True, True, True]]
    sums = w.sum(0)
    torch.testing.assert_close(sums[used], torch.ones(int(used.sum()), dtype=torch.float64))
    assert float(sums[0, 1]) == 0.0
    # layer 0, expert 0: u_0 = 0.25*(8/8/2)^2, u_1 = 0.75*(4/8/2)^2
    u0, u1 = 0.25 * (0.5) ** 2, 0.75 * (0.25) ** 2
    assert float(w[0, 0, 0]) == pytest.approx(u0 / (u0 + u1))


def test_a3smoe_gamma_zero_equals_fedavg():
    updates = [_update(c, c, torch.rand(L, E) * 4 + 0.5, n=5 + 7 * c) for c in range(3)]
    out = A3SMoE(A3SMoEConfig(gamma=0.0)).aggregate(_global(), updates)
    ref = fedavg(updates)
    for k in NAMES:
        torch.testing.assert_close(out[k], ref[k])


def test_a3smoe_unused_expert_keeps_previous_value():
    counts = torch.tensor([[4.0, 0.0, 4.0, 8.0], [4.0, 4.0, 4.0, 4.0]])
    updates = [_update(0, 0, counts), _update(1, 1, counts)]
    prev = _global()
    out = A3SMoE().aggregate(prev, updates)
    for name in ("model.layers.0.mlp.gate_up_lora.A", "model.layers.0.mlp.down_lora.B"):
        assert torch.equal(out[name][1], prev[name][1])  # expert 1 unused in layer 0
        assert not torch.equal(out[name][0], prev[name][0])
    name = "model.layers.1.mlp.gate_up_lora.A"
    assert not torch.equal(out[name][1], prev[name][1])  # used in layer 1


def test_a3smoe_favours_the_client_that_used_an_expert_more():
    counts_a = torch.tensor([[12.0, 1.0, 1.0, 2.0]] * L)
    counts_b = torch.tensor([[1.0, 5.0, 5.0, 5.0]] * L)
    updates = [_update(0, 0, counts_a), _update(1, 1, counts_b)]
    w, _ = a3smoe_expert_weights(updates, gamma=4.0)
    assert float(w[0, 0, 0]) > 0.99 and float(w[1, 0, 1]) > 0.99


def test_a3smoe_config_rejects_negative_gamma():
    with pytest.raises(ConfigError, match="a3smoe.gamma"):
        A3SMoEConfig(gamma=-1.0)


def test_a3smoe_config_rejects_unknown_weighting():
    with pytest.raises(ConfigError, match="a3smoe.weighting: got 'eq7', expected one of flame, literal"):
        A3SMoEConfig(weighting="eq7")


def _mixed_k_updates():
    """Client 0 at K = 1, client 1 at K = 3; 8 routed tokens per layer each."""
    counts0 = torch.tensor([[5.0, 1.0, 2.0, 0.0], [2.0, 2.0, 2.0, 2.0]])  # sums 8 = 8 tokens x K 1
    counts1 = torch.tensor([[8.0, 6.0, 6.0, 4.0], [6.0, 6.0, 6.0, 6.0]])  # sums 24 = 8 tokens x K 3
    return [_update(0, 0, counts0, n=10, k=1), _update(1, 1, counts1, n=30, k=3)]


@pytest.mark.parametrize(("weighting", "u0", "u1"), [
    # FLAME: u = n_c (a / (n_tok K_c))^2; layer 0, expert 0
    ("flame", 10 * (5 / 8 / 1) ** 2, 30 * (8 / 8 / 3) ** 2),
    # Eq. 7 as printed: u = n_c (p / K_c)^2, p = a / sum_j a_j
    ("literal", 10 * (5 / 8 / 1) ** 2, 30 * (8 / 24 / 3) ** 2),
])
def test_a3smoe_weightings_follow_their_formulas_with_different_k(weighting, u0, u1):
    updates = _mixed_k_updates()
    w, _ = a3smoe_expert_weights(updates, gamma=2.0, weighting=weighting)
    assert float(w[0, 0, 0]) == pytest.approx(u0 / (u0 + u1))
    assert float(w[1, 0, 0]) == pytest.approx(u1 / (u0 + u1))
    # layer 1, expert 3: client 0 (2/8 at K 1) vs client 1 (6/8 or 6/24 at K 3)
    v0 = 10 * (2 / 8) ** 2
    v1 = 30 * ((6 / 8 if weighting == "flame" else 6 / 24) / 3) ** 2
    assert float(w[0, 1, 3]) == pytest.approx(v0 / (v0 + v1))
    # the aggregated expert is that weighted mean of the clients' expert tensors
    out = A3SMoE(A3SMoEConfig(gamma=2.0, weighting=weighting)).aggregate(_global(), updates)
    name = "model.layers.0.mlp.gate_up_lora.A"
    ref = (u0 * updates[0].adapters[name][0] + u1 * updates[1].adapters[name][0]) / (u0 + u1)
    torch.testing.assert_close(out[name][0], ref)


def test_a3smoe_weightings_differ_only_when_k_differs():
    updates = _mixed_k_updates()
    flame = A3SMoE(A3SMoEConfig(gamma=2.0)).aggregate(_global(), updates)
    literal = A3SMoE(A3SMoEConfig(gamma=2.0, weighting="literal")).aggregate(_global(), updates)
    name = "model.layers.0.mlp.gate_up_lora.A"
    assert (flame[name] - literal[name]).abs().max() > 1e-2
    # literal divides the K = 3 client's weight by a further 3**gamma: it leans to client 0
    assert (literal[name][0] - updates[0].adapters[name][0]).norm() < \
        (flame[name][0] - updates[0].adapters[name][0]).norm()
    attn = "model.layers.0.self_attn.q_proj.lora_A.default.weight"
    torch.testing.assert_close(flame[attn], literal[attn])  # non-expert tensors: FedAvg in both
    # one K for everyone (counts summing to 8 tokens x K = 2): the extra 1 / K cancels per expert
    same_k = [_update(0, 0, torch.tensor([[6.0, 4.0, 4.0, 2.0], [8.0, 0.0, 4.0, 4.0]]), n=5, k=2),
              _update(1, 1, torch.tensor([[2.0, 2.0, 4.0, 8.0], [4.0, 4.0, 4.0, 4.0]]), n=12, k=2)]
    a = A3SMoE(A3SMoEConfig(gamma=2.0)).aggregate(_global(), same_k)
    b = A3SMoE(A3SMoEConfig(gamma=2.0, weighting="literal")).aggregate(_global(), same_k)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("name", available_methods())
def test_router_is_the_data_weighted_mean_of_the_clients_routers(name):
    """Every method (FedAvg, A3SMoE's non-expert part, UB-SMoE, the rank methods) averages W_r with p_c."""
    method = _method(name)
    counts = torch.tensor([[6.0, 2.0, 0.0, 0.0], [1.0, 1.0, 3.0, 3.0]])  # uneven: A3SMoE weights differ
    updates = [_update(c, 10 + c, counts=counts.roll(c, -1), n=n) for c, n in enumerate([3, 5, 12])]
    out = method.aggregate(_global(), updates)
    p = torch.tensor([3.0, 5.0, 12.0], dtype=torch.float64) / 20.0
    for r in ROUTERS:
        expected = sum(pc * u.adapters[r].double() for pc, u in zip(p, updates))
        torch.testing.assert_close(out[r].double(), expected, atol=1e-6, rtol=1e-6)
        assert out[r].dtype == updates[0].adapters[r].dtype
    sent = method.client_adapters(_global(), 2, seed=0)  # rank methods: truncated / fresh LoRA
    assert all(torch.equal(sent[r], _global()[r]) for r in ROUTERS)  # the router is passed on as is
