"""Heterogeneous-rank LoRA methods (HetLoRA, FlexLoRA, FLoRA, FLoRIST) end to end.

The per-module math is tested in test_lowrank.py against dense references; here: the
methods' aggregation over whole adapter dicts (attention and per-expert LoRA), model
resizing and base merges, what a client of each rank trains and is evaluated with,
the message round trip, and a two-round run with resume.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_and_setup
from typer.testing import CliRunner

from ubsmoe.config import load_config
from ubsmoe.core.lora import energy_rank
from ubsmoe.errors import ConfigError
from ubsmoe.fl.client_runtime import ClientRuntime, sync_base_merges
from ubsmoe.fl.server import Server
from ubsmoe.methods import ClientUpdate, get_method_class
from ubsmoe.methods.flexlora import FlexLoRA
from ubsmoe.methods.flora import FLoRA
from ubsmoe.methods.florist import FLoRIST, FLoRISTConfig
from ubsmoe.methods.hetlora import HetLoRA, HetLoRAConfig, hetlora_regularizer
from ubsmoe.methods.rank_base import lora_pairs
from ubsmoe.models import adapter_state, build_model, load_adapter_state, smoe_layers
from ubsmoe.models.adapters import (
    lora_base_weight,
    lora_rank_scales,
    merge_into_base,
    set_lora_rank,
)

F64 = torch.float64
ATT = "m.layers.0.self_attn.q_proj"
EXP = "m.layers.0.mlp.gate_up_lora"
E, OUT, IN = 3, 6, 5
RANK_METHODS = ("hetlora", "flexlora", "flora", "florist")
SMALL = [
    "data.tasks=[boolq,piqa,ARC-Easy]",
    "data.train_examples=160",
    "data.max_length=96",
    "fl.num_clients=4",
    "fl.rounds=2",
    "train.batch_size=8",
    "train.max_local_steps=1",
    "eval.examples_per_task=4",
    "eval.batch_size=8",
    "eval.protocols=[loglik]",
    "model.tiny.vocab_size=512",
]


# ----- helpers -------------------------------------------------------------------------
# The tests below that pin numbers of the old rule (scale alpha / r, alpha 16) run under it:
# model.lora_scale_rule=fixed_alpha (test_lora_scale.py tests the rank-independent default).
OLD_RULE = "model.lora_scale_rule=fixed_alpha"


def _old(method):
    """``method`` under the old scale rule (scale ``alpha / r``)."""
    method.set_lora_scale("fixed_alpha", 0.8)
    return method


def _adapters(rank, seed, zero_b=False):
    """One attention LoRA [r, IN] / [OUT, r] and one per-expert LoRA [E, r, IN] / [E, OUT, r]."""
    g = torch.Generator().manual_seed(seed)
    out = {
        f"{ATT}.lora_A.default.weight": torch.randn(rank, IN, generator=g),
        f"{ATT}.lora_B.default.weight": torch.randn(OUT, rank, generator=g),
        f"{EXP}.A": torch.randn(E, rank, IN, generator=g),
        f"{EXP}.B": torch.randn(E, OUT, rank, generator=g),
    }
    if zero_b:
        out = {k: torch.zeros_like(v) if k.endswith(("B", "B.default.weight")) else v
               for k, v in out.items()}
    return out


def _update(cid, rank, seed, n=10, zero_b=False):
    return ClientUpdate(client_id=cid, num_examples=n, adapters=_adapters(rank, seed, zero_b),
                        expert_counts=torch.ones(1, E, dtype=F64),
                        token_counts=torch.ones(1, dtype=F64), top_k=8, loss=1.0)


def _factors(adapters, module):
    """(A, B) of a module as [E', r, in] / [E', out, r] (E' = 1 for attention), float64."""
    if module == ATT:
        return (adapters[f"{ATT}.lora_A.default.weight"].double()[None],
                adapters[f"{ATT}.lora_B.default.weight"].double()[None])
    return adapters[f"{EXP}.A"].double(), adapters[f"{EXP}.B"].double()


def _dense_sum(updates, module, alpha=16.0):
    """sum_c p_c s_c B_c A_c per expert, [E', out, in] float64 (the dense reference)."""
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=F64)
    p = n / n.sum()
    total = 0
    for pc, u in zip(p, updates, strict=True):
        A, B = _factors(u.adapters, module)
        total = total + pc * (alpha / A.shape[-2]) * (B @ A)
    return total


def _best_rank(dW, r):
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return U[..., :r] @ torch.diag_embed(S[..., :r]) @ Vh[..., :r, :]


def _effective(adapters, module, alpha=16.0):
    A, B = _factors(adapters, module)
    return (alpha / A.shape[-2]) * (B @ A)


# ----- config ------------------------------------------------------------------------
@pytest.mark.parametrize("name", RANK_METHODS)
def test_rank_config_defaults_and_budget_check(name):
    cfg = load_config(overrides=[f"method={name}"])
    assert cfg.method_config.ranks == [12, 16, 24, 40] and cfg.method_config.alpha == 16.0
    with pytest.raises(ConfigError, match=rf"{name}.ranks: .*one rank per fl.budgets level \(2"):
        load_config(overrides=[f"method={name}", "fl.budgets=[0.5,1.0]"])
    ok = load_config(overrides=[f"method={name}", "fl.budgets=[0.5,1.0]", f"{name}.ranks=[4,8]"])
    assert ok.method_config.ranks == [4, 8]


@pytest.mark.parametrize(("override", "message"), [
    ("hetlora.ranks=[0,1,2,3]", "hetlora.ranks"),
    ("hetlora.alpha=0", "hetlora.alpha"),
    ("hetlora.gamma=1.5", "hetlora.gamma"),
    ("hetlora.reg_lambda=-1", "hetlora.reg_lambda"),
])
def test_hetlora_config_rejects_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=["method=hetlora", override])


def test_florist_config_rejects_bad_tau():
    with pytest.raises(ConfigError, match=r"florist.tau: got 0.0, expected a number in \(0, 1\]"):
        FLoRISTConfig(tau=0.0)


def test_rank_methods_run_native_top_k_and_level_ranks():
    m = _old(HetLoRA())
    assert m.client_top_k(1, 8) == 8
    assert [m.client_lora(j, 20, 16.0) for j in range(4)] == [(12, 16.0), (16, 16.0), (24, 16.0),
                                                              (40, 16.0)]
    assert m.global_lora(20, 16.0) == (40, 16.0)
    with pytest.raises(ValueError, match="budget level 4"):
        m.client_lora(4, 20, 16.0)


# ----- method math over adapter dicts ----------------------------------------------------
def test_truncated_distribution_keeps_the_effective_leading_components():
    g = _adapters(8, 0)
    for r in (2, 5, 8):
        c = _old(HetLoRA(HetLoRAConfig(ranks=[2, 5, 8]))).client_adapters(g, r, seed=0)
        assert c[f"{ATT}.lora_A.default.weight"].shape == (r, IN) and c[f"{EXP}.B"].shape == (E, OUT, r)
        for mod in (ATT, EXP):
            A, B = _factors(g, mod)
            torch.testing.assert_close(_effective(c, mod), (16.0 / 8) * B[..., :r] @ A[..., :r, :],
                                       rtol=1e-5, atol=1e-6)


def test_hetlora_aggregate_pads_and_weights_by_frobenius_norm():
    ranks, r_g = [2, 3, 5], 5
    updates = [_update(c, r, 10 + c, n=5 + c) for c, r in enumerate(ranks)]
    method = _old(HetLoRA(HetLoRAConfig(ranks=ranks, prune="never", weighting="module")))
    out = method.aggregate(_adapters(r_g, 0), updates)
    s_g = 16.0 / r_g
    for mod in (ATT, EXP):
        A_out, B_out = _factors(out, mod)
        for e in range(A_out.shape[0]):
            norms = torch.stack([torch.linalg.norm(_effective(u.adapters, mod)[e]) for u in updates])
            w = norms / norms.sum()  # S_c / sum S (data sizes do not enter)
            A_ref = torch.zeros(r_g, IN, dtype=F64)
            B_ref = torch.zeros(OUT, r_g, dtype=F64)
            for wc, u, r in zip(w, updates, ranks, strict=True):
                A, B = _factors(u.adapters, mod)
                A_ref[:r] += wc * A[e]
                B_ref[:, :r] += wc * B[e] * (16.0 / r) / s_g  # brought to the global scale
            torch.testing.assert_close(A_out[e], A_ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(B_out[e], B_ref, rtol=1e-5, atol=1e-6)


def test_hetlora_weights_fall_back_to_uniform_for_zero_updates():
    updates = [_update(c, r, c, n=1 + 9 * c, zero_b=True) for c, r in enumerate([2, 4])]
    method = _old(HetLoRA(HetLoRAConfig(ranks=[2, 4], prune="never", weighting="module")))
    out = method.aggregate(_adapters(4, 0), updates)
    A0, A1 = updates[0].adapters[f"{EXP}.A"], updates[1].adapters[f"{EXP}.A"]
    ref = 0.5 * A1
    ref[:, :2] += 0.5 * A0
    torch.testing.assert_close(out[f"{EXP}.A"], ref)


def test_flexlora_global_and_client_adapters_are_truncated_svds_of_the_weighted_update():
    ranks, r_g = [1, 2, 3], 3
    updates = [_update(c, r, 20 + c, n=3 + 4 * c) for c, r in enumerate(ranks)]
    method = _old(FlexLoRA(get_method_class("flexlora").config_class(ranks=ranks)))
    out = method.aggregate(_adapters(r_g, 0), updates)
    for mod in (ATT, EXP):
        dW = _dense_sum(updates, mod)  # [E', OUT, IN], rank <= 6 > r_g
        torch.testing.assert_close(_effective(out, mod), _best_rank(dW, r_g), rtol=1e-4, atol=1e-5)
        for r in ranks:  # redistribution to a client of rank r: its best rank-r approximation
            client = method.client_adapters(out, r, seed=0)
            torch.testing.assert_close(_effective(client, mod), _best_rank(dW, r), rtol=1e-4, atol=1e-5)


def test_flora_merge_is_the_exact_weighted_sum_and_adapters_reset():
    updates = [_update(c, r, 30 + c, n=2 + c) for c, r in enumerate([1, 2, 4])]
    method = _old(FLoRA(get_method_class("flora").config_class(ranks=[1, 2, 4])))
    out = method.aggregate(_adapters(4, 0), updates)
    [(mid, factors)] = method.base_merges()
    assert len(mid) == 64
    for mod in (ATT, EXP):
        A, B = factors[f"{mod}.A"].double(), factors[f"{mod}.B"].double()
        assert A.shape[-2] == 1 + 2 + 4  # R = sum_c r_c
        torch.testing.assert_close((B @ A).reshape(-1, OUT, IN), _dense_sum(updates, mod),
                                   rtol=1e-5, atol=1e-6)
        assert not _factors(out, mod)[1].any()  # B = 0: the update lives in the base


def test_flora_state_round_trips_through_a_checkpoint(tmp_path):
    method = FLoRA()
    for rnd in range(2):
        method.aggregate(_adapters(4, 0), [_update(c, 2 + c, 40 + rnd + c) for c in range(2)])
    torch.save(method.state_dict(), tmp_path / "s.pt")
    back = FLoRA()
    back.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert [m for m, _ in back.base_merges()] == [m for m, _ in method.base_merges()]
    for (_, fa), (_, fb) in zip(back.base_merges(), method.base_merges(), strict=True):
        assert all(torch.equal(fa[k], fb[k]) for k in fb)
    ids = [m for m, _ in method.base_merges()]
    assert len(set(ids)) == 2  # chained: every round's id differs


def test_flora_clients_get_fresh_seeded_factors_at_their_rank():
    g = _adapters(8, 0)
    g["m.layers.0.router_phi"] = torch.arange(3.0)  # not a LoRA factor: passed on unchanged
    method = FLoRA()
    a, b, c = (method.client_adapters(g, 3, seed=s) for s in (1, 1, 2))
    assert a[f"{EXP}.A"].shape == (E, 3, IN) and a[f"{ATT}.lora_B.default.weight"].shape == (OUT, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[f"{EXP}.A"], c[f"{EXP}.A"])
    assert not a[f"{EXP}.B"].any() and not a[f"{ATT}.lora_B.default.weight"].any()
    assert float(a[f"{EXP}.A"].abs().max()) <= 1 / math.sqrt(IN)  # PEFT's Kaiming-uniform bound
    assert torch.equal(a["m.layers.0.router_phi"], g["m.layers.0.router_phi"])


def test_florist_merges_the_smallest_rank_reaching_tau_and_guards_zero_updates():
    updates = [_update(c, r, 50 + c, n=4 + c) for c, r in enumerate([2, 3, 4])]
    method = _old(FLoRIST(FLoRISTConfig(ranks=[2, 3, 4], tau=0.8)))
    method.aggregate(_adapters(4, 0), updates)
    [(_, factors)] = method.base_merges()
    for mod in (ATT, EXP):
        dW = _dense_sum(updates, mod)
        S = torch.linalg.svdvals(dW)  # [E', q]
        ks = [energy_rank(s, 0.8) for s in S]
        A, B = factors[f"{mod}.A"].double(), factors[f"{mod}.B"].double()
        assert A.shape[-2] == max(ks)  # experts zero-padded to the largest k
        for e, k in enumerate(ks):
            ref = _best_rank(dW[e], k)
            got = (B @ A).reshape(-1, OUT, IN)[e]
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    zero = FLoRIST(FLoRISTConfig(ranks=[2, 3]))
    zero.aggregate(_adapters(3, 0), [_update(c, r, c, zero_b=True) for c, r in enumerate([2, 3])])
    assert zero.base_merges()[0][1] == {}  # k = 0 everywhere: nothing merged


def test_hetlora_regulariser_sums_over_modules_and_experts_and_reaches_the_tail(
        tiny_tokenizer, tiny_model_cfg):
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer, seed=0)
    set_lora_rank(model, 12, 16.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_()
    method = HetLoRA(HetLoRAConfig(gamma=0.5, reg_lambda=0.1))
    loss = method.extra_loss(model, 8)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    pairs, _ = lora_pairs(list(params))
    ref = 0.0
    for pair in pairs:
        A, B = params[pair.a].detach(), params[pair.b].detach()
        for e in range(A.shape[0] if A.dim() == 3 else 1):
            a, b = (A[e], B[e]) if A.dim() == 3 else (A, B)
            ref += float(hetlora_regularizer(a, b, 0.5, 0.1))
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    loss.backward()
    expert_a = smoe_layers(model)[0].gate_up_lora.A.grad  # [E, 12, H]
    assert not expert_a[:, :6].any() and expert_a[:, 6:].abs().sum() > 0  # head 0, tail > 0
    att = next(p for n, p in params.items() if n.endswith("q_proj.lora_B.default.weight")).grad
    assert not att[:, :6].any() and att[:, 6:].abs().sum() > 0
    assert HetLoRA(HetLoRAConfig(reg_lambda=0.0)).extra_loss(model, 8) is None


# ----- the model: rank and merges ----------------------------------------------------------
def test_set_lora_rank_resizes_every_lora_and_keeps_the_base(tiny_tokenizer, tiny_model_cfg):
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer, seed=0)
    x = torch.randint(0, len(tiny_tokenizer), (2, 9))
    with torch.no_grad():
        base = model(input_ids=x).logits  # B = 0: the base model
    before = dict(model.named_parameters())
    set_lora_rank(model, 20, 16.0)  # already there: nothing is recreated
    assert all(p is before[n] for n, p in model.named_parameters())
    set_lora_rank(model, 12, 16.0, seed=3)
    state = adapter_state(model)
    pairs, others = lora_pairs(list(state))
    assert len(pairs) == 4 * 2 + 2 * 2  # q/k/v/o and gate_up/down per layer
    assert others == [n for n in state if n.endswith(".mlp.router_weight")] and len(others) == 2
    assert all(state[p.a].shape[-2] == 12 and state[p.b].shape[-1] == 12 for p in pairs)
    assert lora_rank_scales(model) == {(12, 16.0 / 12)}
    assert model.peft_config["default"].r == 12
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in frozen)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, base)
    # the new LoRA is live: a non-zero B changes the output
    layer = smoe_layers(model)[0]
    with torch.no_grad():
        layer.down_lora.B.normal_()
        assert not torch.allclose(model(input_ids=x).logits, base)


def test_merge_into_base_adds_b_at_a_to_attention_and_expert_weights(tiny_tokenizer, tiny_model_cfg):
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer, seed=0)
    att = "base_model.model.model.layers.1.self_attn.v_proj"
    exp = "base_model.model.model.layers.0.mlp.down_lora"
    W_att = lora_base_weight(model, att).detach().clone()  # [64, 64]
    W_exp = lora_base_weight(model, exp).detach().clone()  # [E, H, I] = [64, 64, 32]
    g = torch.Generator().manual_seed(0)
    f = {f"{att}.A": torch.randn(3, 64, generator=g), f"{att}.B": torch.randn(64, 3, generator=g),
         f"{exp}.A": torch.randn(64, 2, 32, generator=g), f"{exp}.B": torch.randn(64, 64, 2, generator=g)}
    merge_into_base(model, f)
    torch.testing.assert_close(lora_base_weight(model, att), W_att + f[f"{att}.B"] @ f[f"{att}.A"])
    torch.testing.assert_close(lora_base_weight(model, exp), W_exp + f[f"{exp}.B"] @ f[f"{exp}.A"])
    with pytest.raises(KeyError, match="not a LoRA module"):
        lora_base_weight(model, "base_model.model.model.layers.0.mlp")


def test_sync_base_merges_applies_new_merges_and_flags_a_foreign_history(tiny_tokenizer, tiny_model_cfg):
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer, seed=0)
    att = "base_model.model.model.layers.0.self_attn.q_proj"
    W0 = lora_base_weight(model, att).detach().clone()
    m1 = ("a", {f"{att}.A": torch.ones(1, 64), f"{att}.B": torch.ones(64, 1)})
    m2 = ("b", {f"{att}.A": torch.ones(1, 64), f"{att}.B": 2 * torch.ones(64, 1)})
    applied: list[str] = []
    assert sync_base_merges(model, applied, [m1]) and applied == ["a"]
    assert sync_base_merges(model, applied, [m1, m2]) and applied == ["a", "b"]
    assert sync_base_merges(model, applied, [m1, m2])  # nothing new: unchanged
    torch.testing.assert_close(lora_base_weight(model, att), W0 + 3.0)
    assert not sync_base_merges(model, applied, [("c", m1[1])])  # another run's history
    assert not sync_base_merges(model, applied, [])
    torch.testing.assert_close(lora_base_weight(model, att), W0 + 3.0)


def test_train_message_round_trip_carries_rank_and_merges():
    from ubsmoe.fl.messages import train_content, train_task_from_content

    cfg = load_config(overrides=["method=flora"])
    merges = [("id1", {"x.A": torch.ones(2, 3), "x.B": torch.zeros(4, 2)}), ("id2", {"x.A": torch.ones(1, 3),
                                                                                  "x.B": torch.ones(4, 1)})]
    adapters = _adapters(3, 0)
    content = train_content(cfg, adapters, round_idx=3, client_id=2, top_k=8, lora_rank=3,
                            lora_alpha=16.0, base_merges=merges)
    back_cfg, task = train_task_from_content(content)
    assert back_cfg.to_dict() == cfg.to_dict()
    assert (task["client_id"], task["round_idx"], task["top_k"], task["lora_rank"], task["lora_alpha"]) == (
        2, 3, 8, 3, 16.0)
    assert [m for m, _ in task["base_merges"]] == ["id1", "id2"]
    for (_, fa), (_, fb) in zip(task["base_merges"], merges, strict=True):
        assert set(fa) == set(fb) and all(torch.equal(fa[k], fb[k]) for k in fb)
    assert all(torch.equal(task["global_adapters"][k], v) for k, v in adapters.items())
    plain = train_task_from_content(train_content(cfg, adapters, 1, 0, 2))[1]
    assert plain["lora_rank"] is None and plain["base_merges"] == []


# ----- server and client runtime on the tiny model -------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """``(make_config(*overrides), shared setup)`` for the small data/model of these tests."""
    return make_and_setup(tmp_path_factory.mktemp("cache"), SMALL, "hetlora")


def test_a_client_trains_rank_r_lora_at_its_level(small, tmp_path):
    make, setup = small
    cfg = make("method=hetlora", OLD_RULE)
    server = Server(cfg, tmp_path / "run", setup)
    runtime = ClientRuntime(cfg, setup)
    assert {r for r, _ in server.lora} == {12, 16, 24, 40}
    for c in range(2):
        rank = server.lora[c][0]
        task = server.client_task(c, 1)
        assert task["lora_rank"] == rank and task["top_k"] == 8
        update = runtime.train_round(**task)
        assert lora_rank_scales(runtime.model) == {(rank, 16.0 / rank)}
        pairs, _ = lora_pairs(list(update.adapters))
        assert len(pairs) == 12
        for p in pairs:
            A, B = update.adapters[p.a], update.adapters[p.b]
            assert A.shape[-2] == rank and B.shape[-1] == rank
            # HetLoRA: the client started from the global A truncated to its rank
            assert torch.equal(task["global_adapters"][p.a], server.state.adapters[p.a][..., :rank, :])
        assert any(update.adapters[p.b].any() for p in pairs)  # it trained
        torch.testing.assert_close(update.expert_counts.sum(-1), 8 * update.token_counts)


def test_each_budget_level_is_evaluated_with_its_rank(small, tmp_path, monkeypatch):
    import ubsmoe.eval.commonsense as ev

    make, setup = small
    cfg = make("method=flexlora", OLD_RULE)
    server = Server(cfg, tmp_path / "run", setup)
    g = torch.Generator().manual_seed(0)
    server.state.adapters = {k: torch.randn(v.shape, generator=g) * 0.01
                             for k, v in server.state.adapters.items()}
    seen = []

    def fake_evaluate_task(model, tokenizer, task, records, protocols, batch_size, max_new_tokens):
        seen.append((lora_rank_scales(model), adapter_state(model), smoe_layers(model)[0].top_k))
        return {"loglik": 0.5, "n": len(records)}

    monkeypatch.setattr(ev, "evaluate_task", fake_evaluate_task)
    rows = server.evaluate(1)
    assert [(r["budget"], r["lora_rank"], r["top_k"]) for r in rows] == [
        (0.125, 12, 1), (0.25, 16, 2), (0.5, 24, 4), (1.0, 40, 8)]  # level j at r_j and K_j
    tasks = len(server.test_sets)
    assert len(seen) == 4 * tasks
    for level, (rank, k_j) in enumerate([(12, 1), (16, 2), (24, 4), (40, 8)]):
        scales, state, k = seen[level * tasks]
        assert scales == {(rank, 16.0 / rank)} and k == k_j
        want = server.method.client_adapters(server.state.adapters, rank, seed=0)
        assert set(state) == set(want) and all(torch.equal(state[n], want[n]) for n in want)
    # FLoRA's adapters are B = 0 at every rank: at one K, one evaluation serves all levels
    flora = Server(make("method=flora", "eval.top_k=[native]"), tmp_path / "flora", setup)
    seen.clear()
    rows = flora.evaluate(1)
    assert len(seen) == tasks and [r["lora_rank"] for r in rows] == [12, 16, 24, 40]
    assert {(r["top_k"], r["top_k_mode"]) for r in rows} == {(8, "native")}


def test_flora_merged_base_after_a_round_equals_base_plus_weighted_stack(small, tmp_path):
    make, setup = small
    cfg = make("method=flora", "fl.rounds=3", OLD_RULE)
    server = Server(cfg, tmp_path / "run", setup)
    names = ["base_model.model.model.layers.0.self_attn.q_proj",
             "base_model.model.model.layers.1.mlp.gate_up_lora"]
    W0 = {n: lora_base_weight(server.model, n).detach().double().clone() for n in names}
    updates = []
    g = torch.Generator().manual_seed(0)
    for c in range(4):
        task = server.client_task(c, 1)
        adapters = {k: (torch.randn(v.shape, generator=g) * 0.05 if ".B" in k or "lora_B" in k else v)
                    for k, v in task["global_adapters"].items()}
        updates.append(ClientUpdate(client_id=c, num_examples=len(setup.partitions[c]), adapters=adapters,
                                    expert_counts=torch.zeros(2, 64, dtype=F64),
                                    token_counts=torch.zeros(2, dtype=F64), top_k=8, loss=1.0))
    server.end_round(1, updates)
    server.sync_base()
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=F64)
    p = n / n.sum()
    pairs, _ = lora_pairs(list(updates[0].adapters))
    for name in names:
        pair = next(q for q in pairs if q.module == name)
        ref = W0[name].clone()
        for pc, u, (r, _) in zip(p, updates, server.lora, strict=True):
            ref += pc * (16.0 / r) * (u.adapters[pair.b].double() @ u.adapters[pair.a].double())
        torch.testing.assert_close(lora_base_weight(server.model, name).double(), ref, rtol=1e-5, atol=1e-6)
    # a client runtime given the history reaches the same base weights
    runtime = ClientRuntime(cfg, setup)
    runtime.train_round(**server.client_task(0, 2))
    for name in names:
        assert torch.equal(lora_base_weight(runtime.model, name), lora_base_weight(server.model, name))


def _rounds(server, runtime, rounds):
    for r in rounds:
        server.end_round(r, [runtime.train_round(**server.client_task(c, r))
                             for c in server.sample_clients(r)])
    return server


@pytest.mark.slow
def test_flora_two_rounds_then_resume_from_round_one_with_a_reused_runtime(small, tmp_path):
    import shutil

    make, setup = small
    # At the native K every level evaluates the one merged model (at budget K they differ in K).
    cfg = make("method=flora", "fl.num_clients=2", "eval.top_k=[native]")
    runtime = ClientRuntime(cfg, setup)
    full = _rounds(Server(cfg, tmp_path / "a", setup), runtime, [1, 2])
    summary = full.finish()
    assert [(r["budget"], r["lora_rank"]) for r in summary["accuracy"]] == [
        (0.125, 12), (0.25, 16), (0.5, 24), (1.0, 40)]
    assert len({r["average"] for r in summary["accuracy"]}) == 1  # one merged model for all levels
    assert (tmp_path / "a" / "checkpoints" / "adapter" / "base_merges.safetensors").is_file()
    # Resume a copy of the run from its round-1 checkpoint. The runtime still holds the
    # two merges of run a, which are not a prefix of the resumed history [m1]: it must
    # start again from the pretrained base and reach the same round 2.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "checkpoints" / "round_0002.pt").unlink()
    resumed = _rounds(Server(cfg, tmp_path / "b", setup, resume=True), runtime, [2])
    ids = [m for m, _ in full.method.base_merges()]
    assert len(ids) == 2 and [m for m, _ in resumed.method.base_merges()] == ids
    assert resumed.state.train_loss == full.state.train_loss
    assert [r["average"] for r in resumed.last_eval] == [r["average"] for r in full.last_eval]
    # the runtime trained round 2 on the pretrained base + m1, as a fresh model would be
    after_m1, _ = build_model(cfg.model, setup.tokenizer, seed=cfg.train.seed)
    name = "base_model.model.model.layers.0.self_attn.o_proj"
    pretrained = lora_base_weight(after_m1, name).detach().clone()
    assert sync_base_merges(after_m1, [], full.method.base_merges()[:1])
    assert not torch.equal(lora_base_weight(after_m1, name), pretrained)
    for n in (name, "base_model.model.model.layers.1.mlp.down_lora"):
        assert torch.equal(lora_base_weight(resumed.model, n), lora_base_weight(full.model, n))
        assert torch.equal(lora_base_weight(runtime.model, n), lora_base_weight(after_m1, n))


def test_resize_then_load_round_trips_adapters(small, tmp_path):
    make, setup = small
    server = Server(make("method=florist"), tmp_path / "run", setup)
    state = server.method.client_adapters(server.state.adapters, 16, seed=5)
    set_lora_rank(server.model, 16, 16.0)
    load_adapter_state(server.model, state)
    assert all(torch.equal(v, state[k]) for k, v in adapter_state(server.model).items())


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("name", RANK_METHODS)
def test_flower_run_via_cli_writes_per_budget_accuracy(name, tmp_path):
    from ubsmoe.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--out", str(out), *SMALL, f"method={name}",
                                      f"model.tokenizer_cache={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["method"] == name
    assert [(r["budget"], r["lora_rank"], r["top_k"]) for r in summary["accuracy"]] == [
        (0.125, 12, 1), (0.25, 16, 2), (0.5, 24, 4), (1.0, 40, 8)]
    assert {c["lora_rank"] for c in summary["clients"]} == {12, 16, 24, 40}
