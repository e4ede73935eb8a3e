"""UB-SMoE and SMoE-LLB wired into the model: DMR, PG, the load-balancing loss, diagnostics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ubsmoe.config import load_config
from ubsmoe.core.pseudo_grad import ProbePseudoGradient, UniversalPseudoGradient
from ubsmoe.core.routing import DMRConfig, phi_range_penalty, target_modulation
from ubsmoe.errors import ConfigError
from ubsmoe.methods import ClientUpdate, get_method_class
from ubsmoe.methods.aggregation import fedavg
from ubsmoe.methods.smoe_llb import SMoELLB, load_balancing_loss
from ubsmoe.methods.ubsmoe import UBSMoE, UBSMoEConfig
from ubsmoe.metrics.diagnostics import (
    gini,
    pearson,
    pg_alignment,
    spearman,
    utilization_entropy,
    utilization_summary,
)
from ubsmoe.models import SMoELayer, adapter_state, build_model, set_top_k, smoe_layers
from ubsmoe.models.build import tiny_olmoe
from ubsmoe.models.patching import patch_smoe


def _layer(num_experts=8, hidden=16, inter=8, top_k=2, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = SMoELayer(
        router_weight=torch.randn(num_experts, hidden, generator=g),
        gate_up_proj=torch.randn(num_experts, 2 * inter, hidden, generator=g) * 0.2,
        down_proj=torch.randn(num_experts, hidden, inter, generator=g) * 0.2,
        act_fn=torch.nn.SiLU(), top_k=top_k, norm_topk_prob=False, lora_rank=rank, lora_alpha=8.0,
    )
    with torch.no_grad():
        layer.gate_up_lora.B.normal_(generator=g)
        layer.down_lora.B.normal_(generator=g)
    return layer


def _batch(tokenizer, n=2, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (n, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


# ----- SMoE-LLB ----------------------------------------------------------------------

def test_smoe_llb_equals_host_models_own_load_balancing_loss_at_k_max(tiny_tokenizer, tiny_model_cfg):
    hf = tiny_olmoe(tiny_model_cfg, len(tiny_tokenizer), tiny_tokenizer.pad_token_id,
                    tiny_tokenizer.eos_token_id).eval()
    patched = copy.deepcopy(hf)
    patch_smoe(patched, 4, 8.0)
    method = SMoELLB()
    method.prepare_model(patched)
    batch = _batch(tiny_tokenizer)
    ref = hf(input_ids=batch["input_ids"], output_router_logits=True)
    patched(input_ids=batch["input_ids"])
    k_max = hf.config.num_experts_per_tok
    ours = load_balancing_loss(patched, k_max)
    torch.testing.assert_close(ours, ref.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(method.extra_loss(patched, k_max), 0.01 * ref.aux_loss)
    # At K_c < K_max the loss counts K_c assignments per token: a different value.
    assert not torch.allclose(load_balancing_loss(patched, 1), ref.aux_loss)


def test_smoe_llb_loss_reaches_the_router_only_when_trainable():
    layer = _layer()
    SMoELLB().prepare_model(torch.nn.ModuleList([layer]))
    layer.router_weight.requires_grad_(True)
    layer(torch.randn(1, 5, 16))
    load_balancing_loss(torch.nn.ModuleList([layer]), 2).backward()
    assert layer.router_weight.grad is not None and layer.router_weight.grad.abs().sum() > 0


def test_smoe_llb_config_rejects_negative_coefficient():
    with pytest.raises(ConfigError, match="smoe_llb.aux_loss_coef"):
        load_config(overrides=["method=smoe_llb", "smoe_llb.aux_loss_coef=-1"])


# ----- UB-SMoE client side --------------------------------------------------------------

def test_dmr_with_zero_phi_keeps_the_patched_model_equal_to_hf(tiny_tokenizer, tiny_model_cfg):
    hf = tiny_olmoe(tiny_model_cfg, len(tiny_tokenizer), tiny_tokenizer.pad_token_id,
                    tiny_tokenizer.eos_token_id).eval()
    patched = copy.deepcopy(hf)
    patch_smoe(patched, 4, 8.0)
    UBSMoE().prepare_model(patched)
    ids = _batch(tiny_tokenizer)["input_ids"]
    torch.testing.assert_close(patched(input_ids=ids).logits, hf(input_ids=ids).logits,
                               atol=1e-5, rtol=1e-5)


def test_prepare_model_adds_one_trainable_phi_per_layer(tiny_tokenizer, tiny_model_cfg):
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer)
    before = set(adapter_state(model))
    UBSMoE().prepare_model(model)
    added = set(adapter_state(model)) - before
    assert len(added) == len(smoe_layers(model)) and all(n.endswith(".phi") for n in added)


def test_phi_changes_routing_and_learns_from_the_gates():
    layer = _layer(top_k=1)
    layer.enable_dmr(2)
    x = torch.randn(1, 20, 16)
    base = layer.route(x.reshape(-1, 16))[2]
    with torch.no_grad():
        layer.phi.fill_(-50.0)  # every token's first candidate is pushed below its second
    shifted = layer.route(x.reshape(-1, 16))[2]
    assert not torch.equal(base, shifted)
    layer.phi.data.zero_()
    layer(x).pow(2).sum().backward()
    assert layer.phi.grad is not None and layer.phi.grad.abs().sum() > 0


def test_gradient_space_pg_fills_only_inactive_experts_and_leaves_active_rows_bitwise_unchanged():
    x = torch.randn(1, 3, 16)  # 3 tokens at top-1: at most 3 of 16 experts active
    plain = _layer(num_experts=16, top_k=1)
    with_pg = copy.deepcopy(plain)
    model_plain, model_pg = torch.nn.ModuleList([plain]), torch.nn.ModuleList([with_pg])
    cfg = UBSMoEConfig(lambda_pg=0.05, pg_space="gradient")
    no_pg = UBSMoE(UBSMoEConfig(pg=False))
    for model, method in ((model_plain, no_pg), (model_pg, UBSMoE(cfg))):
        method.prepare_model(model)
        model[0](x).pow(2).sum().backward()
        method.after_backward(model, top_k=1)
    active = with_pg.batch_expert_counts > 0
    assert 1 <= int(active.sum()) <= 3
    for proj in ("gate_up_lora", "down_lora"):
        for part in ("A", "B"):
            g_plain = getattr(getattr(plain, proj), part).grad
            g_pg = getattr(getattr(with_pg, proj), part).grad
            assert torch.equal(g_pg[active], g_plain[active])
            assert bool((g_plain[~active] == 0).all())
            assert bool((g_pg[~active].flatten(1).norm(dim=1) > 0).all())


def test_gradient_space_pseudo_gradient_grows_as_k_c_shrinks():
    x = torch.randn(1, 3, 16)
    norms = {}
    base = _layer(num_experts=16, top_k=1)
    for k in (1, 2):
        layer = copy.deepcopy(base)
        model = torch.nn.ModuleList([layer])
        method = UBSMoE(UBSMoEConfig(lambda_pg=0.05, pg_space="gradient"))
        method.prepare_model(model)
        layer(x).pow(2).sum().backward()
        method.after_backward(model, top_k=k)  # same batch, only rho_c's K_c differs
        inactive = layer.batch_expert_counts == 0
        norms[k] = float(layer.down_lora.B.grad[inactive].norm())
    assert norms[2] > 0
    assert norms[1] == pytest.approx(2 * norms[2], rel=1e-5)  # rho_c = lambda * M / K_c


def test_frozen_phi_gets_no_gradient_and_range_penalty_has_its_gradient():
    layer = _layer()
    model = torch.nn.ModuleList([layer])
    frozen = UBSMoE(UBSMoEConfig(dmr=DMRConfig(learn_phi=False)))
    frozen.prepare_model(model)
    assert frozen.extra_loss(model, 2) is None
    layer(torch.randn(1, 4, 16)).sum().backward()
    frozen.after_backward(model, 2)
    assert layer.phi.grad is None
    learn = UBSMoE(UBSMoEConfig(dmr=DMRConfig(phi_min=-1.0, phi_max=1.0, penalty_coef=0.5)))
    with torch.no_grad():
        layer.phi.copy_(torch.linspace(-2.0, 2.0, 8))
    layer.phi.grad = None
    learn.extra_loss(model, 2).backward()
    phi = layer.phi.detach()
    expected = torch.where(phi > 1, 2 * 0.5 * (phi - 1), torch.where(phi < -1, 2 * 0.5 * (phi + 1), 0.0))
    torch.testing.assert_close(layer.phi.grad, expected)


# ----- UB-SMoE server side --------------------------------------------------------------

PHI = {"model.layers.0.mlp.phi": 4, "model.layers.1.mlp.phi": 4}


def _phi_update(cid, counts, phi_value=0.0, n=10):
    adapters = {k: torch.full((e,), phi_value) for k, e in PHI.items()}
    adapters["model.layers.0.mlp.down_lora.B"] = torch.full((4, 3, 2), float(cid))
    return ClientUpdate(client_id=cid, num_examples=n, adapters=adapters,
                        expert_counts=counts.to(torch.float64),
                        token_counts=torch.full((2,), 10.0, dtype=torch.float64), top_k=2, loss=1.0)


def test_server_update_pushes_over_used_experts_down_and_under_used_up():
    counts = torch.tensor([[14.0, 4.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0]])  # [L, E], 2 per token
    updates = [_phi_update(0, counts), _phi_update(1, counts)]
    method = UBSMoE(UBSMoEConfig(dmr=DMRConfig(momentum=0.5)))
    out = method.aggregate({k: v.clone() for k, v in updates[0].adapters.items()}, updates)
    phi0 = out["model.layers.0.mlp.phi"]
    # u~ = (1.4, 0.4, 0.2, 0.0) against u* = 2/4 = 0.5: only expert 0 is over-used.
    assert phi0[0] < 0 < phi0[1] < phi0[2] < phi0[3]
    expected = 0.5 * target_modulation(counts[0:1] / 10.0, 2.0)[0].float()
    torch.testing.assert_close(phi0, expected)
    torch.testing.assert_close(out["model.layers.1.mlp.phi"], torch.zeros(4), atol=1e-5, rtol=0)
    assert bool((phi0.abs() <= 1).all())
    # Everything else is FedAvg.
    torch.testing.assert_close(out["model.layers.0.mlp.down_lora.B"], torch.full((4, 3, 2), 0.5))


def test_server_update_switch_off_is_plain_fedavg():
    counts = torch.tensor([[14.0, 4.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    updates = [_phi_update(0, counts, 0.2), _phi_update(1, counts, -0.4, n=30)]
    method = UBSMoE(UBSMoEConfig(dmr=DMRConfig(server_update=False)))
    out = method.aggregate(updates[0].adapters, updates)
    for k, v in fedavg(updates).items():
        assert torch.equal(out[k], v)


def test_ablation_switches_parse_from_overrides():
    cfg = load_config(overrides=["method=ubsmoe", "ubsmoe.pg=false", "ubsmoe.dmr.server_update=false",
                                 "ubsmoe.dmr.range_penalty=false", "ubsmoe.lambda_pg=0.1"])
    c = cfg.method_config
    assert (c.pg, c.lambda_pg, c.dmr.server_update, c.dmr.range_penalty, c.dmr.learn_phi) == (
        False, 0.1, False, False, True)
    with pytest.raises(ConfigError, match="ubsmoe.lambda_pg"):
        load_config(overrides=["method=ubsmoe", "ubsmoe.lambda_pg=-1"])
    with pytest.raises(ConfigError, match="dmr.momentum"):
        load_config(overrides=["method=ubsmoe", "ubsmoe.dmr.momentum=2"])


def test_ubsmoe_is_the_default_method():
    assert load_config().method == "ubsmoe"
    assert get_method_class("ubsmoe") is UBSMoE


# ----- diagnostics -------------------------------------------------------------------

def test_entropy_and_gini_hand_values():
    u = torch.tensor([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(utilization_entropy(u), torch.tensor([math.log(4), 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(gini(u), torch.tensor([0.0, 0.75, 0.0], dtype=torch.float64))
    # [1, 2, 3]: sum |ui - uj| over ordered pairs = 8, 2 * 3 * 6 = 36.
    assert float(gini(torch.tensor([1.0, 2.0, 3.0]))) == pytest.approx(8 / 36)
    with pytest.raises(ValueError, match="utilization"):
        gini(torch.tensor([1.0, -1.0]))


def test_correlations():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert spearman(x, x.pow(3)) == pytest.approx(1.0)
    assert spearman(x, -x.exp()) == pytest.approx(-1.0)
    # Ties share their average rank: ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4).
    ranks = torch.tensor([1.5, 1.5, 3.0, 4.0])
    assert spearman(torch.tensor([5.0, 5.0, 6.0, 7.0]), x) == pytest.approx(pearson(ranks, x))
    assert math.isnan(pearson(torch.ones(3), torch.arange(3.0)))


def test_utilization_summary_fields():
    u = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 1.0, 0.5, 0.5]])
    phi = -u + 1.0
    s = utilization_summary(u, phi)
    assert s["entropy"]["max"] == pytest.approx(math.log(4))
    assert s["entropy"]["mean"] == pytest.approx(float(utilization_entropy(u).mean()))
    assert s["entropy"]["variance"] == pytest.approx(float(utilization_entropy(u).var(unbiased=False)))
    assert s["phi_utilization"]["pearson"] == pytest.approx(-1.0)  # layer 0 is constant: left out
    assert "phi_utilization" not in utilization_summary(u)


def _assert_expert_grad_is_reference(layer, i, x, probs, c, tokens):
    """Expert i's LoRA gradients in ``layer`` equal autograd of ``sum_t pi_ti c_t . expert_i(x_t)``
    over ``tokens`` (the gate-weighted contribution of expert i alone, written out by hand)."""
    gu, dn = layer.gate_up_lora, layer.down_lora
    params = [gu.A, gu.B, dn.A, dn.B]
    ref_loss = 0.0
    for t in tokens:
        w_gu = layer.gate_up_proj[i] + gu.scale * gu.B[i] @ gu.A[i]
        w_dn = layer.down_proj[i] + dn.scale * dn.B[i] @ dn.A[i]
        g, u = (w_gu @ x[t]).chunk(2)
        ref_loss = ref_loss + probs[t, i] * (c[t] @ (w_dn @ (F.silu(g) * u)))
    ref = torch.autograd.grad(ref_loss, params)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad[i], r[i], atol=1e-5, rtol=1e-4)


def test_forced_expert_gradient_matches_a_dense_reference():
    """force_on leaves the output unchanged and gives each forced expert exactly the gradient
    of sum_t p_{t,i} <c_t, expert_i(x_t)> for a linear loss <c, y>."""
    layer = _layer(num_experts=8, top_k=1)
    x = torch.randn(6, 16)
    c = torch.randn(6, 16)
    y0 = layer(x.unsqueeze(0)).squeeze(0)
    active = layer.batch_expert_counts > 0
    layer.force_on = ~active
    y1 = layer(x.unsqueeze(0)).squeeze(0)
    assert torch.equal(y0, y1)
    (y1 * c).sum().backward()
    probs = layer.route(x)[0].detach()  # [N, E]
    for i in (~active).nonzero().squeeze(-1).tolist():
        _assert_expert_grad_is_reference(layer, i, x, probs, c, range(x.shape[0]))


def test_pg_alignment_restores_the_model_and_scores_every_inactive_expert(tiny_tokenizer, tiny_model_cfg):
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer)
    UBSMoE().prepare_model(model)
    for layer in smoe_layers(model):
        with torch.no_grad():
            layer.down_lora.B.normal_(std=0.1)
    set_top_k(model, 8)
    before = {k: v.clone() for k, v in adapter_state(model).items()}
    batch = _batch(tiny_tokenizer, n=2, seq=6)
    res = pg_alignment(model, batch, 1, UniversalPseudoGradient(0.01), _lm_loss)
    layers = smoe_layers(model)
    assert res["top_k"] == 1 and res["n"] > 0
    assert res["n"] == sum(int((m.batch_expert_counts == 0).sum()) for m in layers)
    assert -1.0 <= res["min"] <= res["mean"] <= res["max"] <= 1.0
    assert all(m.top_k == 8 and m.force_on is None for m in layers)
    assert all(p.grad is None for p in model.parameters())
    for k, v in adapter_state(model).items():
        assert torch.equal(v, before[k])


# ----- PG in the space of updates (issue 9) ------------------------------------------

def _pg_train(tiny_tokenizer, tiny_model_cfg, steps=1, max_grad_norm=1e-3, **pg):
    """One tiny model trained ``steps`` steps on one repeated batch at K_c = 1 through
    local_train (Adam, clipping); returns (params before, params after, inactive masks)."""
    from ubsmoe.config import TrainConfig
    from ubsmoe.fl.train import local_train

    torch.manual_seed(0)
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer, seed=0)
    method = UBSMoE(UBSMoEConfig(**pg))
    method.prepare_model(model)
    set_top_k(model, 1)
    batch = _batch(tiny_tokenizer, n=2, seq=6)
    before = {k: v.clone() for k, v in adapter_state(model).items()}
    local_train(model, [batch] * steps, method, TrainConfig(lr=1e-3, max_grad_norm=max_grad_norm), 1)
    inactive = [m.batch_expert_counts == 0 for m in smoe_layers(model)]
    return before, adapter_state(model), inactive


def _expert_change(before, after, inactive, rows):
    """Per layer, ``[E, D]`` parameter change of every expert (all four LoRA tensors)."""
    from ubsmoe.methods.base import expert_layer_of

    layer_of = expert_layer_of(list(after))
    out = []
    for li, mask in enumerate(inactive):
        names = sorted(n for n, l in layer_of.items() if l == li)
        d = torch.cat([(after[n] - before[n]).flatten(1) for n in names], 1)  # [E, D]
        out.append(d[mask if rows == "inactive" else ~mask])
    return out


def test_update_space_pg_doubling_lambda_doubles_an_inactive_experts_move(tiny_tokenizer, tiny_model_cfg):
    """Adam erased lambda_pg in gradient space; in update space it sets the move."""
    changes = {}
    for lam in (0.05, 0.1):
        before, after, inactive = _pg_train(tiny_tokenizer, tiny_model_cfg, lambda_pg=lam)
        assert all(int(m.sum()) > 0 for m in inactive)
        changes[lam] = _expert_change(before, after, inactive, "inactive")
    for small, large in zip(changes[0.05], changes[0.1]):
        norms = small.norm(dim=1)
        assert bool((norms > 0).all())
        torch.testing.assert_close(large, 2 * small, rtol=1e-4, atol=1e-9)


def test_update_space_pg_moves_inactive_experts_relative_to_the_active_ones(tiny_tokenizer, tiny_model_cfg):
    """After one step the inactive experts' mean move / the active experts' pi-weighted mean
    move is rho_c * pi_i / mean_A(pi) (checked on the total norm; the direction is shared)."""
    before, after, inactive = _pg_train(tiny_tokenizer, tiny_model_cfg, lambda_pg=0.1)
    for moved in _expert_change(before, after, inactive, "inactive"):
        rows = moved / moved.norm(dim=1, keepdim=True)
        cos = rows @ rows[0]
        torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-4)  # one direction


def test_update_space_pg_with_lambda_zero_equals_pg_off_bitwise(tiny_tokenizer, tiny_model_cfg):
    _, off, _ = _pg_train(tiny_tokenizer, tiny_model_cfg, steps=3, pg=False)
    _, zero, _ = _pg_train(tiny_tokenizer, tiny_model_cfg, steps=3, lambda_pg=0.0)
    for k in off:
        assert torch.equal(off[k].view(torch.int32), zero[k].view(torch.int32)), k


@pytest.mark.parametrize("space, independent", [("update", True), ("gradient", False)])
def test_real_gradient_clipping_does_not_depend_on_pg(tiny_tokenizer, tiny_model_cfg, space, independent):
    """Clipping binds (max norm 1e-3): after a step with PG in update space every parameter
    but the inactive experts' rows is bitwise as without PG; the gradient-space rule (PG in
    the clipping norm) changes the active experts' steps. (One step: in a second one an
    expert PG moved may become active, and then the runs rightly differ.)"""
    _, off, inactive = _pg_train(tiny_tokenizer, tiny_model_cfg, pg=False)
    _, on, inactive_on = _pg_train(tiny_tokenizer, tiny_model_cfg, lambda_pg=1.0, pg_space=space)
    assert all(torch.equal(a, b) for a, b in zip(inactive, inactive_on))
    from ubsmoe.methods.base import expert_layer_of

    layer_of = expert_layer_of(list(off))
    same = True
    for k in off:
        if k in layer_of:
            act = ~inactive[layer_of[k]]
            same &= torch.equal(off[k][act], on[k][act])
        else:
            same &= torch.equal(off[k], on[k])
    assert same == independent


def test_layer_probe_gives_inactive_experts_their_gradient_on_their_top_tokens_only():
    """Probe on: output unchanged, every other gradient bitwise unchanged, and each inactive
    expert gets the gradient of sum over its n highest-probability tokens t of
    p_{t,i} <c_t, expert_i(x_t)> (dense reference) for a linear loss <c, y>."""
    n = 2
    base = _layer(num_experts=8, top_k=1)
    x0 = torch.randn(5, 16)
    c = torch.randn(5, 16)
    grads = {}
    for probe in (0, n):
        layer = copy.deepcopy(base)
        layer.probe_tokens = probe
        x = x0.clone().requires_grad_(True)
        y = layer(x.unsqueeze(0)).squeeze(0)
        (y * c).sum().backward()
        grads[probe] = (y.detach(), x.grad, layer)
    y_off, gx_off, off = grads[0]
    y_on, gx_on, on = grads[n]
    assert torch.equal(y_off, y_on) and torch.equal(gx_off, gx_on)
    inactive = on.batch_expert_counts == 0
    assert on.batch_probe_slots == n * int(inactive.sum()) > 0
    assert torch.equal(on.router_weight.grad if on.router_weight.grad is not None else torch.zeros(1),
                       off.router_weight.grad if off.router_weight.grad is not None else torch.zeros(1))
    probs = on.route(x0)[0].detach()  # [N, E]
    for proj in ("gate_up_lora", "down_lora"):
        for part in ("A", "B"):
            g_on = getattr(getattr(on, proj), part).grad
            g_off = getattr(getattr(off, proj), part).grad
            assert torch.equal(g_on[~inactive], g_off[~inactive])
    for i in inactive.nonzero().squeeze(-1).tolist():
        _assert_expert_grad_is_reference(on, i, x0, probs, c, probs[:, i].topk(n).indices.tolist())


def test_pg_rule_config_and_probe_wiring(tiny_tokenizer, tiny_model_cfg):
    cfg = load_config(overrides=["ubsmoe.pg_rule=probe", "ubsmoe.pg_probe_tokens=3", "ubsmoe.pg_space=gradient"])
    method = UBSMoE(cfg.method_config)
    assert isinstance(method.pseudo_gradient, ProbePseudoGradient) and method.pseudo_gradient.probe_tokens == 3
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer)
    method.prepare_model(model)
    assert all(m.probe_tokens == 3 for m in smoe_layers(model))
    UBSMoE(UBSMoEConfig(pg=False, pg_rule="probe")).prepare_model(model)
    assert all(m.probe_tokens == 0 for m in smoe_layers(model))
    assert isinstance(UBSMoE().pseudo_gradient, UniversalPseudoGradient)
    for bad, field in (("ubsmoe.pg_space=adam", "ubsmoe.pg_space"), ("ubsmoe.pg_rule=x", "ubsmoe.pg_rule"),
                       ("ubsmoe.pg_probe_tokens=0", "ubsmoe.pg_probe_tokens")):
        with pytest.raises(ConfigError, match=field):
            load_config(overrides=[bad])


def test_probe_rule_aligns_and_the_universal_rule_does_not(tiny_tokenizer, tiny_model_cfg):
    """PG alignment works for both rules: the probe rule's cosine with the forced-on true
    gradient is clearly positive, the universal rule's about 0 (its direction is borrowed)."""
    model, _ = build_model(tiny_model_cfg, tiny_tokenizer)
    UBSMoE().prepare_model(model)
    for layer in smoe_layers(model):
        with torch.no_grad():
            layer.gate_up_lora.B.normal_(std=0.1)
            layer.down_lora.B.normal_(std=0.1)
    batch = _batch(tiny_tokenizer, n=4, seq=8)
    universal = pg_alignment(model, batch, 1, UniversalPseudoGradient(0.01), _lm_loss)
    probe = pg_alignment(model, batch, 1, ProbePseudoGradient(0.01, 4), _lm_loss)
    assert probe["n"] == universal["n"] > 0
    assert abs(universal["mean"]) < 0.1
    assert probe["mean"] > 0.3 and probe["min"] > 0.0
    assert all(m.probe_tokens == 0 for m in smoe_layers(model))
    assert all(p.grad is None for p in model.parameters())


def test_update_space_probe_rule_scales_with_lambda_and_keeps_own_directions(tiny_tokenizer, tiny_model_cfg):
    """With the probe rule in update space each inactive expert moves along its own
    direction (not one shared by all) and lambda still sets the size of the move."""
    changes = {}
    for lam in (0.05, 0.1):
        before, after, inactive = _pg_train(tiny_tokenizer, tiny_model_cfg, lambda_pg=lam, pg_rule="probe")
        changes[lam] = _expert_change(before, after, inactive, "inactive")
    for small, large in zip(changes[0.05], changes[0.1]):
        assert bool((small.norm(dim=1) > 0).all())
        torch.testing.assert_close(large, 2 * small, rtol=1e-4, atol=1e-9)
        rows = small / small.norm(dim=1, keepdim=True)
        assert float((rows @ rows.t()).abs().triu(1).max()) < 0.99  # own directions, not one shared


# ----- phi's own learning rate and the range penalty ------------------------------------

def _phi_train(tokenizer, model_cfg, dmr, steps, phi0=0.0, max_grad_norm=1.0):
    """``steps`` local_train steps of a tiny UB-SMoE model from phi = ``phi0``.

    Returns ``(model before, model after, stats)``; lr 1e-3, PG on, clipping on.
    """
    from ubsmoe.config import TrainConfig
    from ubsmoe.fl.train import local_train

    model, _ = build_model(model_cfg, tokenizer, seed=0)
    method = UBSMoE(UBSMoEConfig(dmr=dmr))
    method.prepare_model(model)
    with torch.no_grad():
        for layer in smoe_layers(model):
            layer.phi.fill_(phi0)
    set_top_k(model, 2)
    start = copy.deepcopy(model)
    batches = [_batch(tokenizer, n=4, seq=16, seed=s) for s in range(steps)]
    stats = local_train(model, batches, method, TrainConfig(lr=1e-3, max_grad_norm=max_grad_norm), 2)
    return start, model, stats


def test_phi_lr_moves_phi_more_and_leaves_every_other_update_unchanged(tiny_tokenizer, tiny_model_cfg):
    runs = {lr: _phi_train(tiny_tokenizer, tiny_model_cfg, DMRConfig(phi_lr=lr), steps=1,
                           max_grad_norm=1e-3)  # clipping active
            for lr in (1e-3, 1e-1)}
    moved = {}
    for lr, (start, after, _) in runs.items():
        before = dict(start.named_parameters())
        moved[lr] = max(float((after_p - before[n]).abs().max())
                        for n, after_p in after.named_parameters() if n.endswith(".phi"))
    # Adam's first step moves each coordinate by lr * g / (|g| + eps): 100x for 100x the lr.
    assert moved[1e-1] / moved[1e-3] == pytest.approx(100.0, rel=1e-3) and moved[1e-1] > 0.05
    slow, fast = (dict(runs[lr][1].named_parameters()) for lr in (1e-3, 1e-1))
    others = [n for n, p in slow.items() if p.requires_grad and not n.endswith(".phi")]
    assert any(n.endswith("router_weight") for n in others)
    assert all(torch.equal(slow[n], fast[n]) for n in others)
    start = dict(runs[1e-3][0].named_parameters())
    assert sum(not torch.equal(start[n], slow[n]) for n in others) > len(others) // 2  # they did train


def test_phi_lr_is_its_own_optimizer_group():
    from ubsmoe.methods.base import Method

    model = torch.nn.ModuleList([_layer(), _layer(seed=1)])
    for layer in model:
        layer.gate_up_lora.A.requires_grad_(True)
    UBSMoE().prepare_model(model)
    groups = UBSMoE(UBSMoEConfig(dmr=DMRConfig(phi_lr=0.3))).param_groups(model, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 0.3]
    assert [id(p) for p in groups[1]["params"]] == [id(m.phi) for m in model]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in trainable)
    assert Method().param_groups(model, 1e-3) == [{"params": trainable, "lr": 1e-3}]
    with pytest.raises(ConfigError, match="dmr.phi_lr"):
        DMRConfig(phi_lr=0.0)


def test_large_phi_lr_makes_the_penalty_act_and_keep_phi_nearer_the_range(tiny_tokenizer, tiny_model_cfg):
    """Synthetic: phi_lr 1.5 pushes phi out of [-1, 1] in one step; coef 1 makes the penalty count."""
    out = {}
    for penalty in (True, False):
        dmr = DMRConfig(phi_lr=1.5, penalty_coef=1.0, range_penalty=penalty)
        _, after, stats = _phi_train(tiny_tokenizer, tiny_model_cfg, dmr, steps=4)
        phi = torch.stack([m.phi.detach() for m in smoe_layers(after)])  # [L, E]
        out[penalty] = (stats["phi_penalty_max"], float(phi_range_penalty(phi, -1.0, 1.0, 1.0)))
    (acted, dist_on), (off, dist_off) = out[True], out[False]
    assert acted > 0 and off == 0.0  # penalty_acted only with the penalty on
    assert dist_off > 0 and dist_on < 0.5 * dist_off
