"""Client-level DP (issue 25): clipping, noise, counts, accounting and the settings' checks."""

from __future__ import annotations

import math

import pytest
import torch

from ubsmoe.config import PrivacyConfig, load_config
from ubsmoe.core.accountant import (
    PrivacyAccountant,
    calibrate_noise_multiplier,
    combined_noise_multiplier,
)
from ubsmoe.core.privacy import (
    add_gaussian_noise,
    clip_counts,
    clip_update,
    counts_histogram,
    counts_sensitivity,
    noise_counts,
    noise_generator,
    noise_std_on_mean,
    param_group,
    privatise_local,
    select_groups,
    signal_to_noise,
)
from ubsmoe.errors import ConfigError
from ubsmoe.methods.base import EXPERT_PARAM_RE, PHI_PARAM_RE, ROUTER_PARAM_RE
from ubsmoe.methods.registry import available_methods, get_method_class

NAMES = ["model.layers.0.self_attn.q_proj.lora_A.default.weight",
         "model.layers.0.mlp.gate_up_lora.A", "model.layers.0.mlp.down_lora.B",
         "model.layers.0.mlp.router_weight", "model.layers.0.mlp.phi"]


def _update(scale: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A": torch.randn(8, 16, generator=g) * scale,
            "b.gate_up_lora.A": torch.randn(4, 3, 5, generator=g) * scale}


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


# ---------------------------------------------------------------- accountant


def _opacus_epsilon(noise_multiplier: float, q: float, steps: int, delta: float) -> float:
    """Opacus's own RDP computation, bypassing the wrapper."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as analysis

    alphas = RDPAccountant.DEFAULT_ALPHAS
    rdp = analysis.compute_rdp(q=q, noise_multiplier=noise_multiplier, steps=steps, orders=alphas)
    return float(analysis.get_privacy_spent(orders=alphas, rdp=rdp, delta=delta)[0])


@pytest.mark.slow
def test_accountant_matches_opacus_central_with_counts():
    acc = PrivacyAccountant("central", 1.1, 2.0, sample_rate=0.5, delta=1e-5)
    sigma_eff = (1.1 ** -2 + 2.0 ** -2) ** -0.5
    assert acc.noise_multiplier == pytest.approx(sigma_eff, rel=1e-15)
    for _ in range(7):
        rec = acc.step()
    assert rec["rounds"] == 7
    assert rec["epsilon"] == pytest.approx(_opacus_epsilon(sigma_eff, 0.5, 7, 1e-5), rel=1e-12)
    assert rec["epsilon_round"] == pytest.approx(_opacus_epsilon(sigma_eff, 0.5, 1, 1e-5), rel=1e-12)
    assert 0 < rec["epsilon_round"] < rec["epsilon"]


def test_accountant_local_halves_sigma_without_amplification():
    acc = PrivacyAccountant("local", 4.0, None, sample_rate=0.25, delta=1e-6)
    assert acc.sample_rate == 1.0 and acc.noise_multiplier == 2.0
    for _ in range(3):
        acc.step()
    assert acc.epsilon() == pytest.approx(_opacus_epsilon(2.0, 1.0, 3, 1e-6), rel=1e-12)


def test_accountant_edge_cases_and_resume():
    acc = PrivacyAccountant("central", 1.0, None, sample_rate=1.0, delta=1e-5)
    assert acc.epsilon() == 0.0  # nothing released yet
    eps = [acc.step()["epsilon"] for _ in range(4)]
    assert eps == sorted(eps) and eps[0] < eps[-1]
    again = PrivacyAccountant("central", 1.0, None, sample_rate=1.0, delta=1e-5)
    again.load_state_dict(acc.state_dict())
    assert again.rounds == 4 and again.epsilon() == acc.epsilon()
    other = PrivacyAccountant("central", 2.0, None, sample_rate=1.0, delta=1e-5)
    with pytest.raises(ValueError, match="noise_multiplier"):
        other.load_state_dict(acc.state_dict())
    free = PrivacyAccountant("central", 0.0, None, sample_rate=1.0, delta=1e-5)
    assert free.step()["epsilon"] == math.inf
    with pytest.raises(ValueError, match="mode"):
        PrivacyAccountant("off", 1.0, None, 1.0, 1e-5)


def test_from_config_uses_counts_only_when_released():
    cfg = PrivacyConfig(mode="central", noise_multiplier=3.0, counts_noise_multiplier=4.0)
    assert PrivacyAccountant.from_config(cfg, 0.5, counts_released=True).noise_multiplier == \
        pytest.approx(combined_noise_multiplier(3.0, 4.0))
    assert PrivacyAccountant.from_config(cfg, 0.5, counts_released=False).noise_multiplier == 3.0


def test_combined_noise_multiplier():
    assert combined_noise_multiplier(3.0) == 3.0
    assert combined_noise_multiplier(2.0, 2.0) == pytest.approx(2.0 / math.sqrt(2.0))
    assert combined_noise_multiplier(0.0, 5.0) == 0.0
    with pytest.raises(ValueError):
        combined_noise_multiplier(-1.0)


def test_calibrated_sigma_reaches_the_issue_example():
    # Issue 25: 20 rounds, full participation, epsilon 8, delta 1e-5 -> sigma about 3.
    sigma = calibrate_noise_multiplier(8.0, 1e-5, rounds=20, sample_rate=1.0)
    assert 2.5 < sigma < 3.2
    acc = PrivacyAccountant("central", sigma, None, sample_rate=1.0, delta=1e-5)
    for _ in range(20):
        acc.step()
    assert 7.9 < acc.epsilon() <= 8.0


# ---------------------------------------------------------------- clipping


def test_huge_update_is_clipped_and_moves_the_mean_by_at_most_c_over_n():
    c, n = 0.5, 5
    small = [_update(1e-3, seed) for seed in range(n - 1)]
    huge = _update(1e6, 99)
    clipped, scale, norm = clip_update(huge, c)
    assert norm == pytest.approx(_norm(huge))
    assert scale == pytest.approx(c / norm)
    assert _norm(clipped) == pytest.approx(c, rel=1e-6)
    assert all(clipped[k].dtype == huge[k].dtype for k in huge)

    def mean(updates):
        return {k: sum(u[k].double() for u in updates) / n for k in updates[0]}

    without = mean([clip_update(u, c)[0] for u in small] + [{k: torch.zeros_like(t) for k, t in huge.items()}])
    with_huge = mean([clip_update(u, c)[0] for u in small] + [clipped])
    moved = _norm({k: with_huge[k] - without[k] for k in without})
    assert moved <= c / n * (1 + 1e-6)
    assert moved > 0.99 * c / n  # the bound is tight: the clipped update keeps its full norm C


def test_small_update_is_not_touched():
    u = _update(1e-3, 0)
    clipped, scale, _ = clip_update(u, 1.0)
    assert scale == 1.0 and all(clipped[k] is u[k] for k in u)


def test_clip_refuses_non_finite_and_bad_norm():
    u = _update(1.0, 0)
    u["a.lora_A"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="a.lora_A"):
        clip_update(u, 1.0)
    with pytest.raises(ValueError, match="clipping_norm"):
        clip_update(_update(1.0, 0), 0.0)


def test_sigma_zero_and_no_clipping_is_bitwise_identity():
    u = _update(1e4, 3)
    clipped, scale, _ = clip_update(u, math.inf)
    assert scale == 1.0
    noised = add_gaussian_noise(clipped, 0.0, math.inf, 4, noise_generator(0, 1))
    local, _, _ = privatise_local(u, math.inf, 0.0, noise_generator(0, 1))
    for out in (clipped, noised, local):
        assert out.keys() == u.keys()
        assert all(out[k] is u[k] for k in u)
    PrivacyConfig(mode="central", noise_multiplier=0.0, clipping_norm=math.inf)  # allowed


# ---------------------------------------------------------------- noise


def _check_std(samples: torch.Tensor, expected: float) -> None:
    """Sample std within 5 standard errors (SE of a Gaussian sample std: s / sqrt(2 d))."""
    d = samples.numel()
    s = float(samples.double().std())
    assert abs(s / expected - 1) < 5 / math.sqrt(2 * d)
    assert abs(float(samples.double().mean())) < 5 * expected / math.sqrt(d)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_central_noise_std_matches_sigma_c(reduction):
    sigma, c, n = 1.7, 0.5, 4
    zeros = {"x": torch.zeros(400, 500), "y": torch.zeros(1000)}
    noisy = add_gaussian_noise(zeros, sigma, c, n, noise_generator(7, 3, -1), reduction)
    expected = sigma * c / (n if reduction == "mean" else 1)
    assert expected == pytest.approx(noise_std_on_mean("central", sigma, c, n) * (n if reduction == "sum" else 1))
    _check_std(torch.cat([noisy["x"].flatten(), noisy["y"]]), expected)
    assert noisy["x"].dtype == torch.float32


def test_local_noise_on_each_update_and_on_the_mean():
    sigma, c, n = 2.0, 0.25, 16
    zeros = {"x": torch.zeros(50_000, dtype=torch.float64)}
    replies = [privatise_local(zeros, c, sigma, noise_generator(5, 1, cid))[0]["x"] for cid in range(n)]
    _check_std(replies[0], sigma * c)
    _check_std(torch.stack(replies).mean(0), noise_std_on_mean("local", sigma, c, n))
    assert noise_std_on_mean("local", sigma, c, n) == pytest.approx(sigma * c / 4)


def test_generators_are_deterministic_under_a_seed():
    def draw(g):
        return torch.randn(5, generator=g)

    assert torch.equal(draw(noise_generator(3, 2, 1)), draw(noise_generator(3, 2, 1)))
    assert not torch.equal(draw(noise_generator(3, 2, 1)), draw(noise_generator(3, 2, 2)))
    assert not torch.equal(draw(noise_generator(3, 2, 1)), draw(noise_generator(4, 2, 1)))
    assert not torch.equal(draw(noise_generator(None, 2, 1)), draw(noise_generator(None, 2, 1)))
    a = add_gaussian_noise({"p": torch.zeros(3), "q": torch.zeros(2)}, 1.0, 1.0, 1, noise_generator(1))
    b = add_gaussian_noise({"q": torch.zeros(2), "p": torch.zeros(3)}, 1.0, 1.0, 1, noise_generator(1))
    assert all(torch.equal(a[k], b[k]) for k in a)  # dict order does not matter


def test_signal_to_noise_issue_arithmetic():
    std = noise_std_on_mean("central", 3.0, 1.0, 8)
    assert std == pytest.approx(0.375)
    snr = signal_to_noise(1.0, std, 600_000)
    assert snr == pytest.approx(1.0 / (0.375 * math.sqrt(600_000)))
    assert snr < 0.004
    assert signal_to_noise(0.5, 0.0, 10) == math.inf


# ---------------------------------------------------------------- counts


def _routed_counts(num_tokens: int, num_layers: int, num_experts: int, top_k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(num_layers, num_experts, dtype=torch.long)
    for layer in range(num_layers):
        chosen = torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=-1).indices
        counts[layer] = torch.bincount(chosen.flatten(), minlength=num_experts)
    return counts, torch.full((num_layers,), num_tokens)


def test_histogram_rows_sum_to_k_and_stay_within_the_sensitivity():
    num_layers, num_experts, k = 3, 16, 4
    counts, tokens = _routed_counts(200, num_layers, num_experts, k, 0)
    h = counts_histogram(counts, tokens)
    assert h.dtype == torch.float64 and bool((h >= 0).all()) and bool((h <= 1).all())
    assert torch.allclose(h.sum(-1), torch.full((num_layers,), float(k), dtype=torch.float64))
    bound = counts_sensitivity(num_layers, k)
    assert float(h.norm()) <= bound
    clipped, scale = clip_counts(h, bound)
    assert scale == 1.0 and clipped is h
    # The bound is reached: every token goes to the same K experts.
    worst = torch.zeros(num_layers, num_experts, dtype=torch.long)
    worst[:, :k] = 200
    assert float(counts_histogram(worst, tokens).norm()) == pytest.approx(bound)
    # A dishonest report is clipped back to the bound.
    clipped, scale = clip_counts(counts_histogram(worst * 10, tokens), bound)
    assert scale < 1 and float(clipped.norm()) == pytest.approx(bound)
    # A layer that saw no tokens contributes zeros.
    assert float(counts_histogram(counts, torch.tensor([200, 0, 200]))[1].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="negative"):
        counts_histogram(-counts, tokens)


@pytest.mark.parametrize("num_clients", [1, 6])
def test_counts_noised_at_the_stated_scale(num_clients):
    sigma_k, num_layers, k = 1.3, 16, 8
    bound = counts_sensitivity(num_layers, k)
    mean_h = torch.zeros(num_layers * 50, 64, dtype=torch.float64)
    noisy = noise_counts(mean_h, sigma_k, bound, num_clients, noise_generator(2, 9, -1))
    _check_std(noisy, sigma_k * bound / num_clients)
    clamped = noise_counts(mean_h, sigma_k, bound, num_clients, noise_generator(2, 9, -1),
                           clamp_nonnegative=True)
    assert bool((clamped >= 0).all()) and torch.equal(clamped, noisy.clamp_min(0))


# ---------------------------------------------------------------- groups


def test_param_groups_agree_with_the_method_patterns():
    for name in NAMES:
        group = param_group(name)
        assert (group == "experts") == bool(EXPERT_PARAM_RE.search(name))
        assert (group == "router") == bool(ROUTER_PARAM_RE.search(name))
        assert (group == "phi") == bool(PHI_PARAM_RE.search(name))
    assert select_groups(NAMES, ["all"]) == (NAMES, [])
    private, public = select_groups(NAMES, ["router", "phi"])
    assert private == NAMES[3:] and public == NAMES[:3]


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize(("field", "value", "message"), [
    ("mode", "global", "privacy.mode: got 'global', expected one of off, central, local"),
    ("noise_multiplier", -1, "privacy.noise_multiplier: got -1, expected a finite number >= 0"),
    ("noise_multiplier", float("nan"), "privacy.noise_multiplier: got nan"),
    ("clipping_norm", 0, "privacy.clipping_norm: got 0, expected a number > 0"),
    ("clipping_norm", math.inf, "privacy.clipping_norm: got inf, expected a finite number > 0 when"),
    ("delta", 1.0, "privacy.delta: got 1.0, expected a number in (0, 1)"),
    ("groups", ["experts", "attention"], "privacy.groups: got ['experts', 'attention']"),
    ("groups", [], "privacy.groups: got []"),
    ("counts_noise_multiplier", -0.5, "privacy.counts_noise_multiplier: got -0.5"),
    ("noise_seed", -3, "privacy.noise_seed: got -3"),
])
def test_bad_setting_gives_one_line(field, value, message):
    with pytest.raises(ConfigError) as err:
        PrivacyConfig(mode="central", **{field: value}) if field != "mode" else PrivacyConfig(mode=value)
    text = str(err.value)
    assert text.startswith(message) and "\n" not in text


def test_all_bad_settings_reported_together():
    with pytest.raises(ConfigError) as err:
        PrivacyConfig(mode="x", noise_multiplier=-1, clipping_norm=0, delta=0)
    lines = str(err.value).splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "privacy.mode", "privacy.noise_multiplier", "privacy.clipping_norm", "privacy.delta"]


def test_defaults_are_off_and_groups_normalise():
    cfg = PrivacyConfig()
    assert not cfg.enabled and cfg.groups == ["all"] and cfg.noise_seed == -1 and cfg.seed is None
    assert PrivacyConfig(mode="local", groups="phi").groups == ["phi"]


def test_every_registered_method_states_its_privacy_modes():
    supported = {m: get_method_class(m).privacy_modes for m in available_methods()}
    assert supported["fedit"] == supported["smoe"] == supported["smoe_llb"] == ("central", "local")
    assert supported["ubsmoe"] == ("central", "local") and supported["a3smoe"] == ("local",)
    for method, modes in supported.items():
        if modes != ("central", "local"):  # a refused mode needs its reason
            assert get_method_class(method).privacy_refusal != "no privacy analysis for it", method


def _load(*overrides):
    return load_config(overrides=list(overrides))


def test_compatibility_through_load_config():
    off = _load("method=flora", "train.top_k=native", "fl.aggregation=mean", "fl.reject_norm_multiple=3")
    assert not off.privacy.enabled
    for method in ("fedit", "smoe", "smoe_llb", "ubsmoe"):
        for mode in ("central", "local"):
            assert _load(f"method={method}", f"privacy.mode={mode}").privacy.mode == mode
    assert _load("method=a3smoe", "privacy.mode=local").privacy.mode == "local"
    assert _load("privacy.mode=off").privacy.mode == "off"  # YAML's bare off reads as false
    cases = [
        (["method=a3smoe", "privacy.mode=central"],
         "privacy.mode: got 'central', expected 'local' or 'off' for method a3smoe (A3SMoE weights"),
        (["method=hetlora", "train.top_k=native", "privacy.mode=local"],
         "privacy.mode: got 'local', expected 'off' for method hetlora (HetLoRA weights"),
        (["method=flora", "train.top_k=native", "privacy.mode=central"],
         "privacy.mode: got 'central', expected 'off' for method flora"),
        (["method=fedit", "privacy.mode=central", "fl.aggregation=median"],
         "fl.aggregation: got 'median', expected 'mean' with privacy.mode=central"),
        (["method=smoe", "privacy.mode=local", "fl.aggregation=trimmed_mean"],
         "fl.aggregation: got 'trimmed_mean', expected 'mean' with privacy.mode=local"),
        (["method=smoe", "privacy.mode=central", "fl.reject_norm_multiple=3.0"],
         "fl.reject_norm_multiple: got 3.0, expected 0 with privacy.mode=central"),
        (["method=ubsmoe", "privacy.mode=central", "privacy.counts_noise_multiplier=0"],
         "privacy.counts_noise_multiplier: got 0.0, expected a number > 0 for method ubsmoe"),
        (["privacy.mode=central", "privacy.noise_multiplier=-1"],
         "privacy.noise_multiplier: got -1.0, expected a finite number >= 0"),
        (["privacy.mode=central", "privacy.clipping_norm=0"],
         "privacy.clipping_norm: got 0.0, expected a number > 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError) as err:
            _load(*overrides)
        text = str(err.value)
        assert text.startswith(message) and "\n" not in text, text
    # FedIT does not use the counts: withholding them (0) is allowed.
    assert _load("method=fedit", "privacy.mode=central", "privacy.counts_noise_multiplier=0").privacy.enabled
