"""Client-level DP wired into the round (issue 25): in-process Server + ClientRuntime, no Flower run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SMALL, run_rounds

from ubsmoe.config import load_config

# Round 1 of 2: no evaluation (it runs after the last round only); iid partitions and
# 2 local steps of 8, so every client trains 16 distinct examples (equal data weights).
BASE = [*SMALL, "fl.rounds=2", "data.partition=iid"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from ubsmoe.fl.client_runtime import shared_setup

    cache = tmp_path_factory.mktemp("cache")
    return shared_setup(_cfg(cache)), cache


def _cfg(cache, *extra):
    return load_config(overrides=[*BASE, f"model.tokenizer_cache={cache}", *extra])


def _norm(tensors):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def _diff(a, b, names=None):
    return {n: a[n].double() - b[n].double() for n in (names or a)}


@pytest.mark.slow
def test_dp_off_leaves_the_round_untouched_and_sigma0_no_clip_equals_it(setup, tmp_path):
    shared, cache = setup
    off = run_rounds(_cfg(cache, "method=fedit"), tmp_path / "off", shared, rounds=1)
    assert off.accountant is None and off.method.release is None
    assert off.state.privacy_state == {} and "privacy_state" not in off.state.state_dict()
    records = [json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert not any("privacy" in r for r in records) and "privacy" not in off.summary()
    free = run_rounds(_cfg(cache, "method=fedit", "privacy.mode=central", "privacy.noise_multiplier=0",
                           "privacy.clipping_norm=inf", "privacy.counts_noise_multiplier=0"),
                      tmp_path / "free", shared, rounds=1)
    assert off.state.adapters.keys() == free.state.adapters.keys()
    for name, x in off.state.adapters.items():
        assert torch.equal(x, free.state.adapters[name]), name
    record = next(json.loads(line) for line in (tmp_path / "free" / "metrics.jsonl").read_text().splitlines()
              if '"type": "train"' in line)
    assert record["privacy"]["epsilon"] is None and record["privacy"]["snr"] is None  # no noise: inf
    assert [c["examples"] for c in record["clients"]] == [1, 1, 1, 1]  # uniform weights under DP


@pytest.mark.slow
def test_huge_update_moves_the_global_adapters_by_at_most_its_clipped_share(setup, tmp_path):
    from ubsmoe.fl.client_runtime import ClientRuntime
    from ubsmoe.fl.privacy import privatise_update
    from ubsmoe.fl.server import Server

    shared, cache = setup
    clip = 0.05
    cfg = _cfg(cache, "method=smoe", "privacy.mode=central", "privacy.noise_multiplier=0",
               f"privacy.clipping_norm={clip}", "privacy.counts_noise_multiplier=0")
    runtime = ClientRuntime(cfg, shared)
    servers = [Server(cfg, tmp_path / name, shared) for name in ("huge", "still")]
    sent = servers[0].state.adapters
    tasks = [servers[0].client_task(c, 1) for c in range(4)]
    others = [runtime.train_round(**t) for t in tasks[1:]]
    assert all(_norm(_diff(u.adapters, sent)) <= clip * (1 + 1e-5) for u in others)
    clean = runtime.train_round(**tasks[0])
    g = torch.Generator().manual_seed(0)
    huge = {n: sent[n] + 1e4 * torch.randn(sent[n].shape, generator=g) for n in sent}
    blown = privatise_update(type(clean)(**{**clean.__dict__, "adapters": huge}), sent, cfg.privacy,
                             1, servers[0].k_max)
    still = privatise_update(type(clean)(**{**clean.__dict__, "adapters": dict(sent)}), sent,
                             cfg.privacy, 1, servers[0].k_max)
    servers[0].end_round(1, [blown, *others])
    servers[1].end_round(1, [still, *others])
    moved = _norm(_diff(servers[0].state.adapters, servers[1].state.adapters))
    assert moved <= clip / 4 * (1 + 1e-4)
    assert moved > 0.99 * clip / 4  # the bound is reached: the huge update keeps norm C


@pytest.mark.slow
def test_central_noise_on_the_mean_and_epsilon_in_summary(setup, tmp_path):
    shared, cache = setup
    sigma, clip = 2.0, 0.1
    cfg = _cfg(cache, "method=ubsmoe", "privacy.mode=central", f"privacy.noise_multiplier={sigma}",
               f"privacy.clipping_norm={clip}", "privacy.counts_noise_multiplier=3", "privacy.noise_seed=1",
               "fl.rounds=1", "eval.protocols=[loss]", "eval.examples_per_task=2")
    from ubsmoe.core.accountant import PrivacyAccountant
    from ubsmoe.fl.server import Server

    sent = dict(Server(cfg, tmp_path / "probe", shared).state.adapters)
    server, summary = run_rounds(cfg, tmp_path / "run", shared, finish=True)
    record = next(json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"type": "train"' in line)
    dp = record["privacy"]
    assert dp["noise_std"] == pytest.approx(sigma * clip / 4)
    assert dp["signal_norm"] <= clip * (1 + 1e-5)
    d = dp["coordinates"]
    assert d == sum(t.numel() for t in sent.values())
    # The noise dominates: the global move is about noise_std * sqrt(d) (phi also moves by DMR).
    names = [n for n in sent if not n.endswith(".phi")]
    moved = _norm(_diff(server.state.adapters, sent, names))
    expected = dp["noise_std"] * math.sqrt(sum(sent[n].numel() for n in names))
    assert 0.9 * expected < moved < 1.1 * expected + clip
    assert dp["snr"] == pytest.approx(dp["signal_norm"] / (dp["noise_std"] * math.sqrt(d)))
    acc = PrivacyAccountant("central", sigma, 3.0, sample_rate=1.0, delta=1e-5)
    acc.step()
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["privacy"]["epsilon"] == pytest.approx(acc.epsilon()) == summary["privacy"]["epsilon"]
    assert dp["epsilon"] == pytest.approx(acc.epsilon()) and on_disk["privacy"]["mode"] == "central"
    assert server.state.state_dict()["privacy_state"]["rounds"] == 1
    resumed = Server(cfg, tmp_path / "run", shared, resume=True)  # the checkpoint keeps the accountant
    assert resumed.accountant.rounds == 1 and resumed.accountant.epsilon() == pytest.approx(acc.epsilon())


def test_local_mode_clients_send_noisy_dense_updates_and_histograms(setup, tmp_path):
    from ubsmoe.fl.client_runtime import ClientRuntime
    from ubsmoe.fl.messages import update_from_content, update_to_content
    from ubsmoe.fl.server import Server
    from ubsmoe.fl.validate import check_update

    shared, cache = setup
    sigma, clip = 1.0, 0.01
    cfg = _cfg(cache, "method=ubsmoe", "privacy.mode=local", f"privacy.noise_multiplier={sigma}",
               f"privacy.clipping_norm={clip}", "privacy.counts_noise_multiplier=0.5")
    server = Server(cfg, tmp_path / "run", shared)
    task = server.client_task(1, 1)
    sent = task["global_adapters"]
    # As the ClientApp packs its reply (ubsmoe.fl.client_app.train).
    content = update_to_content(ClientRuntime(cfg, shared).train_round(**task), sent,
                                dense=cfg.privacy.enabled)
    upload = content["adapters"].to_torch_state_dict()
    assert set(upload) == set(sent)  # dense: every tensor whole, no row lists
    assert all(upload[n].shape == sent[n].shape for n in sent)
    update = check_update(update_from_content(content, sent), sent, task["top_k"],
                          server.counts_shape, private_counts=True)
    delta = torch.cat([(update.adapters[n].double() - sent[n].double()).flatten() for n in sent])
    assert abs(float(delta.std()) / (sigma * clip) - 1) < 0.05  # the noise of sigma C per coordinate
    assert update.num_examples == 1
    assert torch.equal(update.token_counts, torch.ones(2, dtype=torch.float64))
    num_layers, _ = server.counts_shape
    bound = math.sqrt(num_layers * server.k_max)
    assert float(update.expert_counts.std()) == pytest.approx(0.5 * bound, rel=0.2)  # noisy histogram
    assert bool((update.expert_counts < 0).any())
    # Without DP the same client's upload is sparse (expert rows it did not use are left out).
    plain = _cfg(cache, "method=ubsmoe")
    clean = ClientRuntime(plain, shared).train_round(**task)
    sparse = update_to_content(clean, sent, dense=plain.privacy.enabled)["adapters"]
    assert any(n.endswith(".rows") for n in sparse.to_torch_state_dict())


def test_display_and_report_show_epsilon():
    from ubsmoe.cli.progress import RunDisplay, dp_text
    from ubsmoe.report.runs import RunRecord, group_key, privacy_text

    assert dp_text({"round": 1, "loss": 2.0}) == ""
    line = dp_text({"round": 2, "loss": 2.0, "epsilon": 3.14159, "epsilon_round": 2.0, "snr": 0.00123})
    assert line == ", DP epsilon 3.14 (round 2), SNR 0.0012"
    assert dp_text({"epsilon": None, "epsilon_round": None, "snr": None}) == ", DP epsilon inf (round inf)"
    display = RunDisplay(3)
    display("round_end", {"round": 1, "loss": 2.5, "epsilon": 1.5, "epsilon_round": 1.5, "snr": 0.1})
    assert "| eps 1.5 |" in display.rounds_text()
    display("round_end", {"round": 2, "loss": 2.4})
    assert "eps" not in display.rounds_text()
    dp = {"mode": "central", "noise_multiplier": 2.0, "clipping_norm": 0.1, "counts_noise_multiplier": 3.0,
          "groups": ["all"], "epsilon": 7.91, "delta": 1e-5}
    assert privacy_text({"privacy": dp}) == "central, epsilon 7.91 at delta 1e-05"
    assert privacy_text({"method": "fedit"}) == "off" and privacy_text(None) == "off"
    assert privacy_text({"privacy": {**dp, "epsilon": None}}).startswith("central, epsilon inf")
    # A DP run and a run without DP are never averaged as seeds of one setting.
    base = {"method": "fedit", "model": "tiny", "clients": [{}], "rounds_completed": 2}
    keys = {group_key(RunRecord(path=None, summary=s))[1] for s in (base, {**base, "privacy": dp})}
    assert len(keys) == 2


@pytest.mark.slow
def test_local_dp_rounds_aggregate_noisy_histograms_and_log_only_released_utilization(setup, tmp_path):
    """Local DP with UB-SMoE: the noisy histograms (negative entries included) feed DMR's
    server update and the diagnostics as their clamped mean; central DP logs the noised
    utilization DMR used, not the clients' clean mean."""
    from ubsmoe.methods.aggregation import round_utilization

    shared, cache = setup
    dp = ["method=ubsmoe", "privacy.noise_multiplier=0.5", "privacy.clipping_norm=0.05",
          "privacy.counts_noise_multiplier=2", "privacy.noise_seed=2"]
    server = run_rounds(_cfg(cache, *dp, "privacy.mode=local"), tmp_path / "local", shared, rounds=1)
    diag = server.last_diagnostics
    u = torch.tensor(diag["utilization"], dtype=torch.float64)  # [L, E]
    assert bool((u >= 0).all()) and bool((u == 0).any())  # clamped after averaging noisy histograms
    assert server.state.round == 1 and all(torch.isfinite(x).all() for x in server.state.adapters.values())

    captured = {}
    central = _cfg(cache, *dp, "privacy.mode=central")
    from ubsmoe.fl.server import Server

    original = Server.diagnostics

    def spy(self, round_idx, updates, release=None):
        captured["clean"] = round_utilization(updates)
        return original(self, round_idx, updates, release)

    Server.diagnostics = spy
    try:
        server = run_rounds(central, tmp_path / "central", shared, rounds=1)
    finally:
        Server.diagnostics = original
    logged = torch.tensor(server.last_diagnostics["utilization"], dtype=torch.float64)
    assert not torch.allclose(logged, captured["clean"], atol=1e-3)  # the noise of sigma_k B / n


@pytest.mark.e2e
def test_local_dp_through_a_flower_run(tmp_path):
    """`ubsmoe run` with privacy.mode=local: the ClientApps clip and noise, Flower carries dense
    uploads, and the summary's epsilon is the accountant's for the rounds run."""
    from typer.testing import CliRunner

    from ubsmoe.cli import app
    from ubsmoe.core.accountant import PrivacyAccountant

    out = tmp_path / "run"
    sigma, sigma_k, clip = 1.5, 2.0, 0.05
    result = CliRunner().invoke(app, ["run", "--out", str(out), *SMALL, "method=ubsmoe", "fl.rounds=2",
                                      "eval.protocols=[loss]", "eval.examples_per_task=4", "privacy.mode=local",
                                      f"privacy.noise_multiplier={sigma}", f"privacy.clipping_norm={clip}",
                                      f"privacy.counts_noise_multiplier={sigma_k}", "privacy.noise_seed=3",
                                      f"model.tokenizer_cache={tmp_path / 'cache'}"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    acc = PrivacyAccountant("local", sigma, sigma_k, sample_rate=1.0, delta=summary["privacy"]["delta"])
    acc.step()
    acc.step()
    assert summary["rounds_completed"] == 2 and summary["privacy"]["mode"] == "local"
    assert summary["privacy"]["epsilon"] == pytest.approx(acc.epsilon())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["round"] for r in train] == [1, 2]
    for r in train:
        # Dense uploads: every client sends every tensor whole, whatever experts it used
        # (without DP the sparse upload's size differs by K_c and by the experts touched).
        assert len({c["bytes_up"] for c in r["clients"]}) == 1, [c["bytes_up"] for c in r["clients"]]
        assert r["privacy"]["epsilon"] > 0 and r["privacy"]["noise_std"] > 0
    assert train[1]["privacy"]["epsilon"] > train[0]["privacy"]["epsilon"]
    assert "DP epsilon" in result.output
