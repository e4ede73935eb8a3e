"""Evaluation protocol ``loss``: held-out next-token loss of the reference response per budget level."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from conftest import SMALL
from torch import nn

from ubsmoe.config import ModelConfig, load_config
from ubsmoe.data.prompts import collate, tokenize_example
from ubsmoe.errors import ConfigError
from ubsmoe.eval.loss import LOSS_METRIC, evaluate_loss, loss_row_fields, loss_stats, response_nll
from ubsmoe.fl.train import causal_lm_loss
from ubsmoe.models import build_model, routing_mask, set_top_k


def _records(n: int) -> list[dict[str, str]]:
    """LLM-Adapters-style records of varied prompt and response length."""
    out = []
    for i in range(n):
        words = " ".join(["sky", "blue", "question", "true"][j % 4] for j in range(2 + (i * 5) % 11))
        out.append({"instruction": f"Question {i}: is the {words}?", "input": "" if i % 2 else "context",
                    "output": "the correct answer is " + ("true" if i % 2 else "false answer1 " * (i % 3))})
    return out


class FixedLogits(nn.Module):
    """A fake causal LM: the same logits at every position (zeros, plus ``bias`` on some tokens)."""

    def __init__(self, vocab: int, bias: dict[int, float] | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))  # gives the model a device
        self.row = torch.zeros(vocab)
        for token, value in (bias or {}).items():
            self.row[token] = value
        self.kept: list[int] = []

    def forward(self, input_ids, attention_mask, use_cache, logits_to_keep):
        self.kept.append(len(logits_to_keep))
        logits = self.row.expand(input_ids.shape[0], len(logits_to_keep), -1).clone()
        return types.SimpleNamespace(logits=logits)  # [B, kept, vocab]


def test_uniform_logits_give_log_vocab_per_token(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    records = _records(5)
    model = FixedLogits(vocab)
    nats, tokens = response_nll(model, tiny_tokenizer, records, batch_size=2, max_length=128)
    # Each response is scored on its own tokens plus eos, nothing of the prompt.
    want_tokens = [len(tiny_tokenizer(r["output"], add_special_tokens=False)["input_ids"]) + 1 for r in records]
    assert tokens == want_tokens
    assert nats == pytest.approx([t * math.log(vocab) for t in want_tokens], rel=1e-6)
    assert len(model.kept) == 3  # 5 examples, 2 per forward
    model.kept.clear()
    stats = evaluate_loss(model, tiny_tokenizer, records, batch_size=3, max_length=128)
    assert stats["loss"] == pytest.approx(math.log(vocab), rel=1e-6)
    assert stats["stderr"] == pytest.approx(0.0, abs=1e-6)  # every example has the same per-token loss
    assert stats["tokens"] == sum(want_tokens) and stats["n"] == 5
    assert len(model.kept) == 2  # batched: 5 examples, 3 per forward


def test_hand_computed_loss_with_one_favoured_token(tiny_tokenizer):
    # Logit ln 3 on eos, 0 elsewhere: p(eos) = 3 / (V + 2), any other token 1 / (V + 2).
    vocab, eos = len(tiny_tokenizer), tiny_tokenizer.eos_token_id
    model = FixedLogits(vocab, {eos: math.log(3.0)})
    records = _records(4)
    nats, tokens = response_nll(model, tiny_tokenizer, records, batch_size=4, max_length=128)
    for r, x, t in zip(records, nats, tokens):
        body = len(tiny_tokenizer(r["output"], add_special_tokens=False)["input_ids"])
        assert eos not in tiny_tokenizer(r["output"], add_special_tokens=False)["input_ids"]
        assert t == body + 1
        assert x == pytest.approx(body * math.log(vocab + 2) + math.log((vocab + 2) / 3), rel=1e-6)


def test_truncation_follows_the_training_labels(tiny_tokenizer):
    model = FixedLogits(len(tiny_tokenizer))
    long = {"instruction": "q", "input": "", "output": " ".join(["true false answer1"] * 40)}
    short = _records(1)[0]
    nats, tokens = response_nll(model, tiny_tokenizer, [long, short], batch_size=2, max_length=16)
    # The long response fills all 16 tokens (prompt and eos cut): 15 of them have a prediction.
    assert tokens[0] == 15
    # The short one keeps its whole response + eos; only its prompt is cut from the left.
    labels = tokenize_example(tiny_tokenizer, short, 16)["labels"]
    assert tokens[1] == sum(1 for x in labels[1:] if x != -100)
    assert nats == pytest.approx([t * math.log(len(tiny_tokenizer)) for t in tokens], rel=1e-6)


def test_ratio_standard_error_by_hand():
    stats = loss_stats([2.0, 3.0, 7.0], [1, 2, 3])
    assert stats["loss"] == 2.0 and stats["tokens"] == 6 and stats["n"] == 3
    # residuals x - L t: 0, -1, 1; SE = sqrt(2 / (3 * 2)) / mean(t) = sqrt(1/3) / 2
    assert stats["stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert loss_stats([4.0], [2])["stderr"] is None  # one example: no standard error
    assert loss_stats([], [])["loss"] is None
    with pytest.raises(ValueError, match="tokens"):
        loss_stats([1.0], [1, 2])
    row = loss_row_fields({"a": {"loss_stderr": 0.3, "loss_tokens": 10}, "b": {"loss_stderr": 0.4, "loss_tokens": 7}},
                          {"a": 2.0, "b": 3.0})
    assert row["stderr"] == pytest.approx(0.25)  # sqrt(0.09 + 0.16) / 2
    assert row["metric"] == LOSS_METRIC and row["lower_is_better"] is True
    assert row["per_task_tokens"] == {"a": 10, "b": 7}


def test_real_model_loss_equals_the_training_loss_and_sees_k(tiny_tokenizer):
    model, tokenizer = build_model(ModelConfig(), tiny_tokenizer, seed=0)
    model.train()
    records = _records(5)
    nats, tokens = response_nll(model, tokenizer, records, batch_size=2, max_length=128)
    assert model.training and tokenizer.padding_side == "right"  # state restored
    model.eval()
    with torch.no_grad():
        for r, x, t in zip(records, nats, tokens):  # unbatched, as a training step of one example
            batch = collate([tokenize_example(tokenizer, r, 128)], tokenizer.pad_token_id)
            with routing_mask(model, batch["attention_mask"]):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            assert x / t == pytest.approx(float(causal_lm_loss(logits, batch["labels"])), rel=1e-4)
    set_top_k(model, 1)
    try:
        at_k1 = evaluate_loss(model, tokenizer, records, batch_size=4, max_length=128)["loss"]
    finally:
        set_top_k(model, 8)
    assert at_k1 != pytest.approx(sum(nats) / sum(tokens), rel=1e-6)


def test_loss_is_an_allowed_protocol_and_bad_ones_name_the_field(tmp_path):
    cfg = load_config(overrides=["eval.protocols=[loss]"])
    assert cfg.eval.protocols == ["loss"]
    with pytest.raises(ConfigError, match="eval.protocols.*generation, loglik, loss"):
        load_config(overrides=["eval.protocols=[perplexity]"])


@pytest.fixture(scope="module")
def loss_run(tmp_path_factory):
    """A one-round commonsense run scored with loglik and loss at every level; its summary."""
    from ubsmoe.fl.client_runtime import ClientRuntime, shared_setup
    from ubsmoe.fl.server import Server

    tmp = tmp_path_factory.mktemp("loss_run")
    cfg = load_config(overrides=[*SMALL, f"model.tokenizer_cache={tmp / 'cache'}", "fl.rounds=1",
                                 "eval.protocols=[loglik,loss]", "eval.pg_probe_examples=0"])
    setup = shared_setup(cfg)
    server = Server(cfg, tmp / "run", setup)
    runtime = ClientRuntime(cfg, setup)
    server.end_round(1, [runtime.train_round(**server.client_task(c, 1)) for c in server.sample_clients(1)])
    return tmp / "run", server.finish(), server


def test_loss_rows_in_summary_for_every_level(loss_run):
    run_dir, summary, server = loss_run
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["accuracy"] == summary["accuracy"]
    rows = [r for r in on_disk["accuracy"] if r["protocol"] == "loss"]
    assert [(r["budget"], r["top_k"], r["lora_rank"]) for r in rows] == [
        (b, k, 20) for b, k in zip((0.125, 0.25, 0.5, 1.0), (1, 2, 4, 8))]
    tasks = set(server.test_sets)
    for r in rows:
        assert set(r["per_task"]) == tasks and r["metric"] == LOSS_METRIC and r["lower_is_better"]
        assert all(0 < v < 2 * math.log(512) for v in r["per_task"].values())
        assert r["average"] == pytest.approx(sum(r["per_task"].values()) / len(tasks))
        assert all(se is not None and se > 0 for se in r["per_task_stderr"].values())
        assert r["stderr"] == pytest.approx(math.sqrt(sum(se ** 2 for se in r["per_task_stderr"].values()))
                                            / len(tasks))
        assert all(n > 0 for n in r["per_task_tokens"].values())
    # The loss rows score the same examples as loglik, at the same K.
    ll = [r for r in on_disk["accuracy"] if r["protocol"] == "loglik"]
    assert [(r["budget"], r["top_k"]) for r in ll] == [(r["budget"], r["top_k"]) for r in rows]
    # Equal to scoring the level's model directly on its test records.
    server.set_level(0, 1)
    task = min(tasks)
    direct = evaluate_loss(server.model, server.tokenizer, server.test_sets[task], 8, 128)
    assert direct["loss"] == pytest.approx(rows[0]["per_task"][task], rel=1e-5)
    # The adapter's model card shows loss in nats, not percent.
    card = (run_dir / "checkpoints" / "adapter" / "README.md").read_text()
    assert "nats/token" in card


def test_printed_table_says_lower_is_better(loss_run):
    from rich.console import Console

    from ubsmoe.report import accuracy_table

    _, summary, _ = loss_run
    console = Console(width=80, record=True)
    console.print(accuracy_table(summary, "loss", "budget"))
    text = console.export_text()
    assert "lower is better" in text and "±" in text and "K=1 budget" in text and "K=8 budget" in text
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80  # fits a log uncut


def test_ubsmoe_eval_protocol_loss_reproduces_the_summary(loss_run):
    from typer.testing import CliRunner

    from ubsmoe.cli import app

    run_dir, summary, _ = loss_run
    result = CliRunner().invoke(app, ["eval", str(run_dir), "--protocol", "loss"])
    assert result.exit_code == 0, result.output
    assert "lower is better" in result.output
    written = json.loads(next(run_dir.glob("eval_*.json")).read_text())
    rows = [{k: v for k, v in r.items() if k != "n"} for r in written["accuracy"]]
    assert rows == [r for r in summary["accuracy"] if r["protocol"] == "loss"]


@pytest.mark.slow
def test_report_has_loss_tables_and_figure(loss_run, tmp_path):
    from ubsmoe.report.build import build_report

    run_dir, _, _ = loss_run
    report = build_report([run_dir], tmp_path / "report")
    loss_tables = [t for t in report.tables if t.protocol == "loss"]
    assert {t.kind for t in loss_tables} == {"tasks", "budgets"}
    assert all("lower is better" in t.title for t in loss_tables)
    assert all(not c["paper"] for t in loss_tables for row in t.rows for c in row["cells"].values())
    fig = next(f for f in report.figures if f.name == "loss_per_budget")
    assert fig.path is not None and fig.path.is_file()
    md = report.markdown.read_text()
    assert "protocol loss" in md and "nats per token" in md
