"""Gradient accumulation and activation checkpointing in local training (docs/concepts.md, "Memory for long runs").

The model is float32 (grouped matmuls have no float64 CPU kernel): micro-batching
only changes the summation order. The accumulated gradient equals the full-batch one
to float32 rounding (checked directly); Adam normalises each element, so rounding
noise in elements whose gradient is ~0 turns into steps of order lr. The rounds
below therefore use lr = 1e-4 and compare adapters to atol 1e-6; routing counts,
integers, agree exactly.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TEXTS

from ubsmoe.config import TrainConfig
from ubsmoe.data.prompts import collate
from ubsmoe.errors import ConfigError
from ubsmoe.fl.train import local_train, split_batch
from ubsmoe.methods import get_method_class
from ubsmoe.models import adapter_state, build_model, set_top_k, smoe_layers

TOP_K = 2


@pytest.fixture
def small_model_cfg():
    """The tiny preset shrunk to 16 experts, rank 4 (fast; same code paths)."""
    from ubsmoe.config import ModelConfig, TinyModelConfig

    return ModelConfig(lora_rank=4, lora_alpha=8.0,
                       tiny=TinyModelConfig(num_experts=16, num_experts_per_tok=4, vocab_size=512))


def _examples(tokenizer, n=16):
    """Variable-length examples whose second half is labelled (the "response")."""
    out = []
    for i in range(n):
        ids = tokenizer(TEXTS[i] + " " + TEXTS[i + 50][: 10 + 7 * i], add_special_tokens=False)["input_ids"]
        half = len(ids) // 2
        out.append({"input_ids": ids, "labels": [-100] * half + ids[half:]})
    return out


def _batches(tokenizer, batch_size=8, steps=2):
    ex = _examples(tokenizer, batch_size * steps)
    return [collate(ex[i:i + batch_size], tokenizer.pad_token_id)
            for i in range(0, len(ex), batch_size)]


def _train(tokenizer, model_cfg, method_name, hooks=None, grads=None, **train):
    """One local round from a fixed init; returns (adapters, expert_counts, token_counts, stats, method).

    ``hooks`` collects every layer's ``batch_expert_counts`` and ``grads`` every
    trainable gradient, each time the method's gradient hook runs.
    """
    model, _ = build_model(model_cfg, tokenizer, seed=0)
    method = get_method_class(method_name)()
    method.prepare_model(model)
    set_top_k(model, TOP_K)
    for layer in smoe_layers(model):
        layer.reset_stats()
    if hooks is not None or grads is not None:
        original = method.after_backward

        def spy(m, k):
            if hooks is not None:
                hooks.append([layer.batch_expert_counts.clone() for layer in smoe_layers(m)])
            if grads is not None:
                grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
            original(m, k)

        method.after_backward = spy
    torch.manual_seed(1)
    cfg = TrainConfig(lr=1e-4, batch_size=8, **train)
    stats = local_train(model, _batches(tokenizer), method, cfg, TOP_K)
    layers = smoe_layers(model)
    counts = torch.stack([m.expert_counts.clone() for m in layers])
    tokens = torch.stack([m.token_count.clone() for m in layers])
    return adapter_state(model), counts, tokens, stats, method


def _assert_adapters_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=atol, msg=name)


def test_config_rejects_accumulation_that_does_not_divide_the_batch():
    assert TrainConfig(batch_size=16, grad_accumulation_steps=4).grad_accumulation_steps == 4
    with pytest.raises(ConfigError, match="train.grad_accumulation_steps: got 3, expected a divisor"):
        TrainConfig(batch_size=16, grad_accumulation_steps=3)
    with pytest.raises(ConfigError, match="train.grad_accumulation_steps: got 0"):
        TrainConfig(grad_accumulation_steps=0)
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        TrainConfig(activation_checkpointing="yes")


def test_split_batch_keeps_rows_and_drops_all_padding_columns(tiny_tokenizer):
    batch = _batches(tiny_tokenizer, 8, 1)[0]
    parts = split_batch(batch, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 2, 2]
    for i, p in enumerate(parts):
        width = p["input_ids"].shape[1]
        assert width == int(batch["attention_mask"][2 * i:2 * i + 2].sum(1).max())
        torch.testing.assert_close(p["labels"], batch["labels"][2 * i:2 * i + 2, :width])


@pytest.mark.parametrize("steps", [2, 4])
def test_accumulation_gives_the_full_batch_update_for_smoe(tiny_tokenizer, small_model_cfg, steps):
    full_grads, acc_grads = [], []
    full = _train(tiny_tokenizer, small_model_cfg, "smoe", grads=full_grads)
    acc = _train(tiny_tokenizer, small_model_cfg, "smoe", grads=acc_grads, grad_accumulation_steps=steps)
    first, first_acc = full_grads[0], acc_grads[0]  # same parameters: the gradients themselves
    assert first.keys() == first_acc.keys() and first
    for name in first:
        scale = float(first[name].abs().max())
        torch.testing.assert_close(first_acc[name], first[name], rtol=1e-4, atol=1e-5 * scale + 1e-12,
                                   msg=name)
    _assert_adapters_close(full[0], acc[0])
    assert torch.equal(full[1], acc[1]) and torch.equal(full[2], acc[2])
    assert acc[3]["steps"] == full[3]["steps"] == 2
    assert acc[3]["loss"] == pytest.approx(full[3]["loss"], rel=1e-5)
    assert acc[3]["tokens"] == full[3]["tokens"]


def test_pg_sees_the_full_batch_active_set_with_accumulation(tiny_tokenizer, small_model_cfg):
    full_hooks, acc_hooks = [], []
    full = _train(tiny_tokenizer, small_model_cfg, "ubsmoe", hooks=full_hooks)
    acc = _train(tiny_tokenizer, small_model_cfg, "ubsmoe", hooks=acc_hooks, grad_accumulation_steps=4)
    assert len(acc_hooks) == len(full_hooks) == 2  # once per optimizer step, not per micro-batch
    for f, a in zip(full_hooks, acc_hooks):
        for f_layer, a_layer in zip(f, a):
            assert torch.equal(f_layer, a_layer)
    _assert_adapters_close(full[0], acc[0])
    assert torch.equal(full[1], acc[1])


@pytest.mark.parametrize("method", ["smoe", "ubsmoe", "smoe_llb"])
def test_activation_checkpointing_keeps_updates_and_counts(tiny_tokenizer, small_model_cfg, method):
    plain = _train(tiny_tokenizer, small_model_cfg, method)
    ckpt = _train(tiny_tokenizer, small_model_cfg, method, activation_checkpointing=True)
    _assert_adapters_close(plain[0], ckpt[0])
    assert torch.equal(plain[1], ckpt[1])  # the recompute counts no token twice
    assert torch.equal(plain[2], ckpt[2])
    assert plain[3]["loss"] == pytest.approx(ckpt[3]["loss"], rel=1e-6)


def test_activation_checkpointing_recomputes_and_is_switched_off_after(tiny_tokenizer, small_model_cfg):
    from transformers.modeling_layers import GradientCheckpointingLayer

    model, _ = build_model(small_model_cfg, tiny_tokenizer, seed=0)
    method = get_method_class("smoe_llb")()
    method.prepare_model(model)
    calls = []
    layer = smoe_layers(model)[0]
    layer.register_forward_pre_hook(lambda m, i: calls.append(m.recomputing))
    local_train(model, _batches(tiny_tokenizer, 8, 1), method,
                TrainConfig(batch_size=8, activation_checkpointing=True), TOP_K)
    assert calls == [False, True]  # forward, then the backward's recomputation
    assert not any(m.gradient_checkpointing for m in model.modules()
                   if isinstance(m, GradientCheckpointingLayer))
    assert layer.router_logits_out is not None and layer.router_logits_out.shape[0] > 0


def _saved_bytes(model, part):
    """Bytes of tensors autograd saves for backward during one training forward."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    from ubsmoe.models import routing_mask

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            routing_mask(model, part["attention_mask"]):
        model(input_ids=part["input_ids"], attention_mask=part["attention_mask"])
    return total[0]


def test_memory_knobs_shrink_what_a_forward_keeps(tiny_tokenizer, small_model_cfg):
    from ubsmoe.models.runtime import set_activation_checkpointing

    model, _ = build_model(small_model_cfg, tiny_tokenizer, seed=0)
    model.train()
    batch = _batches(tiny_tokenizer, 8, 1)[0]
    plain = _saved_bytes(model, batch)
    set_activation_checkpointing(model, True)
    ckpt = _saved_bytes(model, batch)
    set_activation_checkpointing(model, False)
    assert ckpt < 0.5 * plain  # only each decoder layer's inputs are kept
    # Accumulation: the model only ever sees micro-batches of batch_size / steps rows.
    rows = []
    model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape[0]),
                                    with_kwargs=True)
    method = get_method_class("smoe")()
    local_train(model, [batch], method, TrainConfig(batch_size=8, grad_accumulation_steps=4), TOP_K)
    assert rows == [2, 2, 2, 2]
    assert _saved_bytes(model, split_batch(batch, 2)[0]) < 0.5 * plain
