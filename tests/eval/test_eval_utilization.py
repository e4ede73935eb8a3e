"""Expert utilization at evaluation time: per budget level, at its K, over the same tokens for every method."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SMALL

from ubsmoe.config import ModelConfig, load_config
from ubsmoe.data.prompts import tokenize_example
from ubsmoe.eval.utilization import eval_expert_counts, level_utilization, utilization_stats
from ubsmoe.models import build_model, set_top_k, smoe_layers


def _records(n: int) -> list[dict[str, str]]:
    return [{"instruction": f"Question {i}: is the sky " + "blue " * (i % 5) + "?", "input": "",
             "output": "the correct answer is " + ("true" if i % 2 else "false")} for i in range(n)]


def test_counts_cover_every_real_token_at_k_and_restore_the_counters(tiny_tokenizer):
    model, tokenizer = build_model(ModelConfig(), tiny_tokenizer, seed=0)
    records = _records(5)
    real = sum(len(tokenize_example(tokenizer, r, 128)["input_ids"]) for r in records)
    before = [layer.expert_counts.clone() for layer in smoe_layers(model)]
    for k in (1, 8):
        set_top_k(model, k)
        counts, tokens = eval_expert_counts(model, tokenizer, records, batch_size=2, max_length=128)
        assert counts.shape == (len(smoe_layers(model)), 64) and tokens.tolist() == [real] * counts.shape[0]
        assert counts.sum(dim=1).tolist() == [k * real] * counts.shape[0]  # each token at K experts
    set_top_k(model, 8)
    assert all(torch.equal(b, layer.expert_counts) for b, layer in zip(before, smoe_layers(model)))
    # Batching does not change which experts a token reaches.
    one, _ = eval_expert_counts(model, tokenizer, records, batch_size=1, max_length=128)
    five, _ = eval_expert_counts(model, tokenizer, records, batch_size=5, max_length=128)
    assert torch.equal(one, five)


def test_utilization_stats_by_hand():
    uniform = utilization_stats(torch.full((2, 4), 3.0), torch.tensor([6.0, 6.0]))  # u = 0.5 each, K = 2
    assert uniform["entropy"]["mean"] == pytest.approx(math.log(4)) and uniform["gini"]["mean"] == pytest.approx(0)
    assert uniform["tokens"] == 6 and uniform["entropy"]["max"] == pytest.approx(math.log(4))
    one = utilization_stats(torch.tensor([[5.0, 0.0, 0.0, 0.0]]), torch.tensor([5.0]))
    assert one["entropy"]["mean"] == pytest.approx(0) and one["gini"]["mean"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="tokens"):
        utilization_stats(torch.ones(1, 4), torch.zeros(1))


def test_no_records_give_none(tiny_tokenizer):
    model, tokenizer = build_model(ModelConfig(), tiny_tokenizer, seed=0)
    assert level_utilization(model, tokenizer, {"a": []}, 4, 128) is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedit", "hetlora", "ubsmoe"])
def test_every_level_of_every_method_is_measured_on_the_same_tokens(tmp_path, method):
    from ubsmoe.fl.client_runtime import shared_setup
    from ubsmoe.fl.server import Server

    cfg = load_config(overrides=[*SMALL, f"model.tokenizer_cache={tmp_path / 'cache'}", f"method={method}",
                                 "eval.protocols=[loglik]", "eval.pg_probe_examples=0"])
    server = Server(cfg, tmp_path / "run", shared_setup(cfg))
    rows = server.evaluate(0)
    assert [r["top_k"] for r in rows] == [1, 2, 4, 8]
    real = sum(len(tokenize_example(server.tokenizer, r, cfg.data.max_length)["input_ids"])
               for task in sorted(server.test_sets) for r in server.test_sets[task])
    for r in rows:
        u = r["utilization"]
        assert u["tokens"] == real  # the same tokens at every level, whatever the method
        assert 0 < u["entropy"]["mean"] <= math.log(64) + 1e-9 and 0 <= u["gini"]["mean"] < 1
        assert len(u["entropy"]["per_layer"]) == len(smoe_layers(server.model))
    server.last_eval = rows
    assert all("utilization" in a for a in server.summary()["accuracy"])
    off = Server(load_config(overrides=[*SMALL, f"model.tokenizer_cache={tmp_path / 'cache'}", f"method={method}",
                                        "eval.protocols=[loglik]", "eval.utilization=false"]),
                 tmp_path / "off", server.setup)
    assert all("utilization" not in r for r in off.score_levels(0, levels=[0]))


def test_training_diagnostics_name_the_k_they_were_measured_at(tmp_path):
    from ubsmoe.fl.client_runtime import ClientRuntime, shared_setup
    from ubsmoe.fl.server import Server

    cfg = load_config(overrides=[*SMALL, f"model.tokenizer_cache={tmp_path / 'cache'}", "fl.rounds=1",
                                 "eval.protocols=[loglik]", "eval.pg_probe_examples=0"])
    setup = shared_setup(cfg)
    server = Server(cfg, tmp_path / "run", setup)
    runtime = ClientRuntime(cfg, setup)
    sampled = server.sample_clients(1)
    updates = [runtime.train_round(**server.client_task(c, 1)) for c in sampled]
    record = server.diagnostics(1, updates)
    assert record["utilization_top_k"] == sorted({server.top_k[c] for c in sampled})
