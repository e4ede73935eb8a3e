"""Failures, bad updates and robust aggregation: validation, the fold, the round loop, Flower runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import SMALL as CONFTEST_SMALL
from conftest import make_and_setup

from ubsmoe.config import load_config
from ubsmoe.errors import ConfigError
from ubsmoe.fl.client_runtime import ClientRuntime, shared_setup
from ubsmoe.fl.fold import LeftOut, OrderedFold, RoundIncomplete
from ubsmoe.fl.run_dir import latest_checkpoint
from ubsmoe.fl.server import Server
from ubsmoe.fl.server_app import _replies
from ubsmoe.fl.state import ServerState
from ubsmoe.fl.validate import (
    RejectedUpdate,
    check_update,
    check_upload,
    norm_outliers,
    update_norm,
)
from ubsmoe.io import read_jsonl
from ubsmoe.methods import ClientUpdate, get_method_class
from ubsmoe.methods.aggregation import FedAvgAggregator, fedavg
from ubsmoe.methods.robust import coordinate_median, trimmed_mean

SRC = Path(__file__).resolve().parents[2] / "src"
SMALL = [*CONFTEST_SMALL, "eval.protocols=[loglik]"]

E, L = 4, 2
SENT = {"a.mlp.gate_up_lora.A": torch.zeros(E, 3, 5), "a.q_proj.lora_B.default.weight": torch.zeros(6, 3)}


def _update(cid=0, top_k=2, **changes):
    g = torch.Generator().manual_seed(cid)
    counts = torch.zeros(L, E)
    counts[:, :2] = 5.0  # 5 tokens per layer, each routed to 2 experts
    base = {"client_id": cid, "num_examples": 4 + cid,
            "adapters": {k: torch.randn(v.shape, generator=g) for k, v in SENT.items()},
            "expert_counts": counts, "token_counts": torch.full((L,), 5.0), "top_k": top_k, "loss": 1.0}
    return ClientUpdate(**(base | changes))


# ----- validation (pure) -----------------------------------------------------------------------
def test_a_good_update_passes_and_a_bf16_one_is_cast_not_rejected():
    good = _update()
    assert check_update(good, SENT, 2, (L, E)) is good
    bf16 = _update(adapters={k: v.to(torch.bfloat16) for k, v in good.adapters.items()})
    out = check_update(bf16, SENT, 2, (L, E))
    assert all(v.dtype == torch.float32 for v in out.adapters.values())
    assert torch.equal(out.adapters["a.q_proj.lora_B.default.weight"],
                       good.adapters["a.q_proj.lora_B.default.weight"].to(torch.bfloat16).float())


def _with(name, value):
    u = _update()
    return _update(adapters={**u.adapters, name: value})


@pytest.mark.parametrize(("update", "reason"), [
    (_with("a.mlp.gate_up_lora.A", torch.full((E, 3, 5), float("nan"))), "NaN or Inf"),
    (_with("a.mlp.gate_up_lora.A", torch.full((E, 3, 5), float("inf"))), "NaN or Inf"),
    (_with("a.mlp.gate_up_lora.A", torch.zeros(E + 1, 3, 5)), "shape (5, 3, 5), sent (4, 3, 5)"),
    (_with("a.mlp.gate_up_lora.A", torch.zeros(E, 3, 5, dtype=torch.int32)), "expected a floating dtype"),
    (_with("extra.weight", torch.zeros(2)), "extra adapters ['extra.weight']"),
    (_update(adapters={"a.mlp.gate_up_lora.A": torch.zeros(E, 3, 5)}), "missing adapters"),
    (_update(top_k=3), "reported K_c=3, was sent K_c=2"),
    (_update(expert_counts=torch.ones(L, E)), "expert counts of layer 0 sum to 4, expected K_c x tokens = 2 x 5"),
    (_update(expert_counts=torch.ones(L + 1, E)), "expert_counts (3, 4)"),
    (_update(token_counts=torch.full((L,), -1.0)), "negative or non-finite"),
    (_update(loss=float("nan")), "loss nan"),
])
def test_bad_updates_are_rejected_with_a_reason(update, reason):
    with pytest.raises(RejectedUpdate) as e:
        check_update(update, SENT, 2, (L, E))
    assert reason in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("upload", "reason"), [
    ({"a.mlp.gate_up_lora.A": torch.zeros(1, 3, 5), "a.mlp.gate_up_lora.A.rows": torch.tensor([0.0])},
     "expected an integer dtype"),
    ({"b.weight": torch.zeros(2)}, "extra tensor 'b.weight'"),
    ({"a.q_proj.lora_B.default.weight": torch.zeros(6, 3, dtype=torch.int64)}, "floating dtype"),
    ({"a.q_proj.lora_B.default.weight": torch.full((6, 3), float("nan"))}, "NaN or Inf"),
])
def test_bad_uploads_are_rejected_before_unpacking(upload, reason):
    with pytest.raises(RejectedUpdate, match=reason.replace("(", r"\(").replace("'", "'")):
        check_upload(upload, SENT)
    check_upload({"a.mlp.gate_up_lora.A": torch.zeros(1, 3, 5),
                  "a.mlp.gate_up_lora.A.rows": torch.tensor([2])}, SENT)  # a good row upload passes


def test_norm_check_rejects_only_norms_beyond_the_multiple_of_the_median():
    assert norm_outliers([1.0, 1.2, 0.9, 10.0], 3.0) == [3]
    assert norm_outliers([1.0, 1.2, 0.9, 10.0], 0.0) == []  # off
    assert norm_outliers([1.0, 1.2, 0.9, 10.0], 20.0) == []
    u = _update()
    expected = sum(float(v.double().pow(2).sum()) for v in u.adapters.values()) ** 0.5
    assert update_norm(u.adapters, SENT) == pytest.approx(expected)


# ----- robust aggregation (pure) -----------------------------------------------------------------
def test_coordinate_median_and_trimmed_mean_match_hand_computation():
    stack = torch.tensor([[1.0, 10.0], [2.0, -4.0], [3.0, 0.0], [100.0, 1.0]])
    assert torch.equal(coordinate_median(stack), torch.tensor([2.5, 0.5]))
    assert torch.equal(coordinate_median(stack[:3]), torch.tensor([2.0, 0.0]))
    assert torch.equal(trimmed_mean(stack, 0.25), torch.tensor([2.5, 0.5]))  # drop 1 each end
    assert torch.equal(trimmed_mean(stack, 0.0), stack.mean(0))
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(stack, 0.5)


def test_robust_fedavg_ignores_an_outlier_the_weighted_mean_follows():
    ups = [_update(c) for c in range(4)]
    bad = ups[3].adapters["a.q_proj.lora_B.default.weight"] * 1e6
    ups[3] = _update(3, adapters={**ups[3].adapters, "a.q_proj.lora_B.default.weight": bad})
    name = "a.q_proj.lora_B.default.weight"
    mean = fedavg(ups)[name]
    agg = FedAvgAggregator(list(SENT), robust=("median", 0.1))
    for u in ups:
        agg.add(u)
    med = agg.result()[name]
    expected = coordinate_median(torch.stack([u.adapters[name] for u in ups]).double()).float()
    assert torch.equal(med, expected)
    assert float(mean.abs().max()) > 1e4 and float(med.abs().max()) < 10


@pytest.mark.parametrize("method", ["hetlora", "flexlora", "flora"])
def test_robust_aggregation_is_refused_by_methods_that_aggregate_factors(method):
    with pytest.raises(ConfigError, match=f"fl.aggregation: got 'median', method {method} supports only mean"):
        get_method_class(method)().set_robust("median")


@pytest.mark.parametrize(("key", "value"), [
    ("fl.min_replies", 0), ("fl.min_reply_fraction", 0), ("fl.min_reply_fraction", 1.5),
    ("fl.round_retries", -1), ("fl.round_timeout_s", -1), ("fl.reject_norm_multiple", -2),
    ("fl.aggregation", "mode"), ("fl.trim_fraction", 0.5)])
def test_failure_settings_are_validated(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=[f"{key}={value}"])


# ----- the fold and the reply stream ---------------------------------------------------------------
def test_fold_skips_a_left_out_client_in_id_order_and_equals_the_good_ones_alone():
    ups = [_update(c) for c in range(4)]
    fold = OrderedFold(FedAvgAggregator(list(SENT)), [0, 1, 2, 3])
    fold.add(ups[2])
    fold.add(ups[0])
    assert [u.client_id for u in fold.folded] == [0]
    fold.skip(1)  # client 1 failed: 2 is folded now, in order
    assert [u.client_id for u in fold.folded] == [0, 2]
    fold.add(ups[3])
    got = fold.result()
    want = fedavg([ups[0], ups[2], ups[3]])  # p_c renormalized over the good replies
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="unexpected reply from client 1"):
        fold.skip(1)


class _FakeGrid:
    """Replies by message id: ``script[round of pulls]`` lists (message index, error) pairs."""

    def __init__(self, script, late=()):
        self.script, self.late, self.pulls = list(script), list(late), 0
        self.ids = []

    def push_messages(self, messages):
        base = 100 * (len(self.ids) + 1)
        self.ids.append([base + i for i in range(len(messages))])
        return self.ids[-1]

    def pull_messages(self, ids):
        step = self.script.pop(0) if self.script else []
        out = [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid)) for mid in self.late]
        for i, err in step:
            out.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=self.ids[-1][i])))
        for r, (_, err) in zip(out[len(self.late):], step):
            r.has_error = (lambda e=err: e is not None)
            r.error = SimpleNamespace(reason=err)
        for r in out[:len(self.late)]:
            r.has_error, r.error = (lambda: False), None
        self.late = []
        return out


def test_replies_yield_errors_and_timeouts_and_discard_late_replies_by_message_id():
    grid = _FakeGrid([[(0, None)], [(2, "node 7 is offline")], [], []], late=[999])
    got = [(i, reply is not None, err) for i, reply, err in _replies(grid, ["m0", "m1", "m2"], 0.12)]
    # the reply to message id 999 (an earlier push) is dropped; message 1 never answers
    assert got[:2] == [(0, True, None), (2, False, "error: node 7 is offline")]
    assert got[2] == (1, False, "timeout after 0.12 s") and len(got) == 3


# ----- the round (library level: Server + ClientRuntime, no Flower) --------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    make, setup = make_and_setup(tmp_path_factory.mktemp("cache"), SMALL, "a3smoe")
    return make, setup, ClientRuntime(make("method=a3smoe"), setup)


def _round_updates(server, runtime, r):
    return {c: runtime.train_round(**server.client_task(c, r)) for c in server.sample_clients(r)}


def test_left_out_clients_do_not_enter_the_global_model(small, tmp_path):
    make, setup, runtime = small
    server = Server(make("method=a3smoe"), tmp_path / "a", setup)
    ups = _round_updates(server, runtime, 1)
    items = [ups[0], LeftOut(1, "error: boom"), ups[2], LeftOut(3, "timeout after 5 s")]
    record = server.end_round(1, reversed(items), clients=[0, 1, 2, 3])
    ref = Server(make("method=a3smoe"), tmp_path / "b", setup)
    ref.end_round(1, [ups[0], ups[2]], clients=[0, 2])  # the good replies alone
    assert all(torch.equal(server.state.adapters[k], v) for k, v in ref.state.adapters.items())
    full = Server(make("method=a3smoe"), tmp_path / "c", setup)
    full.end_round(1, list(ups.values()), clients=[0, 1, 2, 3])
    assert any(not torch.equal(full.state.adapters[k], v) for k, v in ref.state.adapters.items())
    assert record["failed"] == [{"client": 1, "reason": "error: boom"},
                                {"client": 3, "reason": "timeout after 5 s"}]
    assert [c["id"] for c in record["clients"]] == [0, 2] and record["try"] == 1


@pytest.mark.slow
def test_too_few_replies_commit_nothing(small, tmp_path):
    make, setup, runtime = small
    server = Server(make("method=fedit", "fl.min_replies=3"), tmp_path / "run", setup)
    ups = _round_updates(server, runtime, 1)
    server.end_round(1, list(ups.values()), clients=[0, 1, 2, 3])
    before = {k: v.clone() for k, v in server.state.adapters.items()}
    ups2 = _round_updates(server, runtime, 2)
    with pytest.raises(RoundIncomplete, match=r"round 2: 2 good replies, 3 needed \(client 0: x; client 1: y\)"):
        server.end_round(2, [LeftOut(0, "x"), LeftOut(1, "y"), ups2[2], ups2[3]], clients=[0, 1, 2, 3])
    assert server.state.round == 1 and all(torch.equal(server.state.adapters[k], v) for k, v in before.items())
    ckpt = ServerState.from_state_dict(torch.load(latest_checkpoint(tmp_path / "run"), weights_only=True))
    assert ckpt.round == 1 and all(torch.equal(ckpt.adapters[k], v) for k, v in before.items())
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert recs[-1] == {"type": "round_incomplete", "round": 2, "try": 1, "replies": 2, "needed": 3,
                        "failed": [{"client": 0, "reason": "x"}, {"client": 1, "reason": "y"}]}
    # the same replies with fl.min_replies=2 complete the round: the knob decides
    server.cfg.fl.min_replies = 2
    assert server.end_round(2, [LeftOut(0, "x"), LeftOut(1, "y"), ups2[2], ups2[3]],
                            clients=[0, 1, 2, 3])["round"] == 2


@pytest.mark.parametrize(("sampled", "min_replies", "fraction", "needed"),
                         [(4, 1, 0.5, 2), (4, 3, 0.5, 3), (4, 1, 1.0, 4), (5, 1, 0.5, 3), (2, 5, 0.5, 2)])
def test_required_replies(small, tmp_path, sampled, min_replies, fraction, needed):
    make, setup, _ = small
    server = Server(make("method=fedit", f"fl.min_replies={min_replies}", f"fl.min_reply_fraction={fraction}"),
                    tmp_path, setup)
    assert server.required_replies(sampled) == needed


def test_norm_check_and_median_buffer_the_round_and_act(small, tmp_path):
    make, setup, runtime = small
    default = Server(make("method=fedit"), tmp_path / "d", setup)
    ups = _round_updates(default, runtime, 1)
    sent = default.state.adapters
    for u in ups.values():
        u.metrics["update_norm"] = update_norm(u.adapters, sent)
    # client 3 sends a blown-up update
    name = next(k for k in sent if k.endswith("lora_B.default.weight"))
    ups[3].adapters[name] = sent[name] + 1000.0
    ups[3].metrics["update_norm"] = update_norm(ups[3].adapters, sent)
    rec = default.end_round(1, list(ups.values()), clients=[0, 1, 2, 3])
    assert rec["failed"] == [] and rec["max_buffered_replies"] == 0  # streaming: nothing held
    assert float(default.state.adapters[name].abs().max()) > 100  # the mean followed client 3

    norm = Server(make("method=fedit", "fl.reject_norm_multiple=5"), tmp_path / "n", setup)
    rec = norm.end_round(1, list(ups.values()), clients=[0, 1, 2, 3])
    assert rec["max_buffered_replies"] == 4 and [f["client"] for f in rec["failed"]] == [3]
    assert "update norm" in rec["failed"][0]["reason"] and "x the round's median" in rec["failed"][0]["reason"]
    good = fedavg([ups[c] for c in (0, 1, 2)])
    assert all(torch.equal(norm.state.adapters[k], good[k]) for k in good)

    med = Server(make("method=fedit", "fl.aggregation=median"), tmp_path / "m", setup)
    rec = med.end_round(1, list(ups.values()), clients=[0, 1, 2, 3])
    assert rec["failed"] == [] and rec["max_buffered_replies"] == 4
    assert float(med.state.adapters[name].abs().max()) < 100
    stack = torch.stack([ups[c].adapters[name] for c in range(4)]).double()
    assert torch.equal(med.state.adapters[name], coordinate_median(stack).to(sent[name].dtype))

    # fl.trim_fraction moves the trimmed mean: 0 keeps client 3 (unweighted mean, follows
    # the blow-up), 0.25 cuts one reply at each end per coordinate (ignores it).
    trimmed = {}
    for trim in (0.0, 0.25):
        t = Server(make("method=fedit", "fl.aggregation=trimmed_mean", f"fl.trim_fraction={trim}"),
                   tmp_path / f"t{trim}", setup)
        assert t.end_round(1, list(ups.values()), clients=[0, 1, 2, 3])["max_buffered_replies"] == 4
        trimmed[trim] = t.state.adapters[name]
        assert torch.equal(trimmed[trim], trimmed_mean(stack, trim).to(sent[name].dtype))
    assert float(trimmed[0.0].abs().max()) > 100 and float(trimmed[0.25].abs().max()) < 100


# ----- through Flower (ubsmoe run: local SuperLink, simulation runtime, ClientApp workers) --------------
def _cli(tmp_path, out, faults, *extra):
    env = dict(os.environ, UBSMOE_FAULTS=faults, UBSMOE_FAULT_LATE_S="5",
               PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "ubsmoe.cli", "run", "--out", str(out), *SMALL,
                           f"model.tokenizer_cache={tmp_path / 'cache'}", *extra],
                          check=False, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.e2e
def test_flower_run_survives_raise_timeout_nan_and_wrong_shapes(tmp_path):
    """One four-client run: round 1 client 1 raises and 2 times out; round 2 client 3 sends NaN and 0 wrong shapes."""
    out = tmp_path / "run"
    proc = _cli(tmp_path, out, "1:raise@1,2:timeout@1,3:nan@2,0:shape@2", "method=fedit",
                "fl.round_timeout_s=20")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trains = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "train"]
    failed = {r["round"]: {f["client"]: f["reason"] for f in r["failed"]} for r in trains}
    assert set(failed[1]) == {1, 2} and set(failed[2]) == {0, 3}
    assert "InjectedFault" in failed[1][1] or "injected failure" in failed[1][1]
    assert failed[1][2] == "timeout after 20 s"
    assert failed[2][3].startswith("rejected:") and "NaN or Inf" in failed[2][3]
    assert failed[2][0].startswith("rejected:") and "shape" in failed[2][0]
    assert [[c["id"] for c in r["clients"]] for r in trains] == [[0, 3], [1, 2]]
    for line in ("round 1: client 1 left out: error:", "round 1: client 2 left out: timeout after 20 s",
                 "round 2: client 3 left out: rejected:", "round 2: client 0 left out: rejected:"):
        assert line in proc.stdout, proc.stdout
    # The global model is the aggregate of the good replies alone: replay the rounds in-process.
    cfg = load_config(overrides=[*SMALL, f"model.tokenizer_cache={tmp_path / 'cache'}", "method=fedit",
                                 "fl.round_timeout_s=20"])
    setup = shared_setup(cfg)
    server = Server(cfg, tmp_path / "replay", setup)
    runtime = ClientRuntime(cfg, setup)
    for r, good in ((1, [0, 3]), (2, [1, 2])):
        ups = [runtime.train_round(**server.client_task(c, r)) for c in good]
        server.end_round(r, ups + [LeftOut(c, "x") for c in {0, 1, 2, 3} - set(good)], clients=[0, 1, 2, 3])
    ckpt = ServerState.from_state_dict(torch.load(latest_checkpoint(out), weights_only=True))
    assert ckpt.round == 2
    # Worker processes and this one may order float32 reductions differently (thread
    # counts), and Adam turns that into ~1e-6 differences after two rounds; a left-out
    # client counted by mistake moves the average by its own 1/3-1/2 share (>> 1e-5).
    for k, v in server.state.adapters.items():
        torch.testing.assert_close(ckpt.adapters[k], v, rtol=1e-4, atol=1e-5)
    assert json.loads((out / "summary.json").read_text())["rounds_completed"] == 2


@pytest.mark.e2e
def test_flower_run_stops_cleanly_when_a_round_stays_short_of_replies(tmp_path):
    out = tmp_path / "run"
    proc = _cli(tmp_path, out, "0:raise@2,1:raise@2,2:nan@2", "method=fedit", "fl.min_replies=2",
                "fl.round_retries=1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), proc.stderr
    assert "round 2: 1 good replies, 2 needed" in err[0] and "after 2 tries" in err[0]
    assert "last complete round is 1 (round_0001.pt" in err[0]
    recs = read_jsonl(out / "metrics.jsonl")
    assert [(r["round"], r["try"]) for r in recs if r["type"] == "round_incomplete"] == [(2, 1), (2, 2)]
    assert latest_checkpoint(out).name == "round_0001.pt" and not (out / "summary.json").exists()
    assert "retrying the round" in proc.stdout
