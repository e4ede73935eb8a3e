"""``train.fused_ops`` (issue 24): the hand-written host functions equal the host modules.

Each function against the transformers / PEFT code it replaces, outputs and gradients,
float32 and bfloat16 (in bfloat16 against a float64 reference: the fused result may
not be further from it than the host's own, plus a little); then whole local steps
with and without the option; then the switch itself (installed for the step only,
state_dict untouched, fewer operations).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from ubsmoe.bench.model_step import StepConfig, _batch, _build
from ubsmoe.config import TinyModelConfig, TrainConfig
from ubsmoe.fl.train import local_train
from ubsmoe.methods import get_method_class
from ubsmoe.models import set_top_k
from ubsmoe.models.fused import apply_rotary, lora_linear, rms_norm
from ubsmoe.models.fused_host import FUSED_NORMS, set_fused_ops

STEP = StepConfig("tiny_fused", TinyModelConfig(), batch_size=2, seq_len=16)

# transformers module of each RMSNorm class in FUSED_NORMS
NORM_MODULES = {"OlmoeRMSNorm": "olmoe", "LlamaRMSNorm": "llama", "MixtralRMSNorm": "mixtral",
                "MistralRMSNorm": "mistral", "Qwen2RMSNorm": "qwen2", "Qwen2MoeRMSNorm": "qwen2_moe"}


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """||a - ref|| / ||ref|| in float64."""
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm().clamp_min(1e-300))


def _grads(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor):
    """(output, gradients of ``inputs``) of ``fn(*inputs)`` for the output gradient ``grad_out``."""
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


def test_fused_norm_classes_are_the_families_rmsnorms():
    assert set(NORM_MODULES) == set(FUSED_NORMS)


@pytest.mark.parametrize("cls_name", FUSED_NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_the_host_module(cls_name, dtype):
    """Output and input gradient of :func:`rms_norm` against the family's own RMSNorm module."""
    module = importlib.import_module(f"transformers.models.{NORM_MODULES[cls_name]}.modeling_"
                                     f"{NORM_MODULES[cls_name]}")
    g = torch.Generator().manual_seed(0)
    norm = getattr(module, cls_name)(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48, generator=g) + 0.5)
    norm.weight.requires_grad_(False)
    x = torch.randn(3, 5, 48, generator=g) * 3
    grad = torch.randn(3, 5, 48, generator=g)
    ref_y, (ref_gx,) = _grads(norm.double(), [x.double()], grad.double())
    norm.to(dtype)
    host_y, (host_gx,) = _grads(norm, [x.to(dtype)], grad)
    fused_y, (fused_gx,) = _grads(lambda t: rms_norm(t, norm.weight, norm.variance_epsilon),
                                  [x.to(dtype)], grad)
    assert fused_y.dtype == host_y.dtype == dtype and fused_gx.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(fused_y, host_y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused_gx, host_gx, rtol=1e-5, atol=1e-6)
    else:  # no further from float64 than the host's own bfloat16 result, plus a little
        assert _err(fused_y, ref_y) <= 1.05 * _err(host_y, ref_y) + 1e-4
        assert _err(fused_gx, ref_gx) <= 1.05 * _err(host_gx, ref_gx) + 1e-4
        assert (fused_y == host_y).float().mean() > 0.95  # the same rounding almost everywhere


def test_rms_norm_refuses_a_trainable_weight():
    with pytest.raises(ValueError, match="frozen weight"):
        rms_norm(torch.randn(2, 4), nn.Parameter(torch.ones(4)), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_equals_transformers(dtype):
    from transformers.models.olmoe.modeling_olmoe import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 7, 8, generator=g)
    angle = torch.randn(2, 7, 4, generator=g)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)  # [B, T, d]
    grad = torch.randn(2, 3, 7, 8, generator=g)

    def host(t, c=cos, s=sin):
        return apply_rotary_pos_emb(t, t, c.to(t.dtype), s.to(t.dtype))[0]

    ref_y, (ref_gx,) = _grads(lambda t: host(t, cos.double(), sin.double()), [q.double()], grad.double())
    host_y, (host_gx,) = _grads(host, [q.to(dtype)], grad)
    fused_y, (fused_gx,) = _grads(lambda t: apply_rotary(t, cos.to(dtype), sin.to(dtype)), [q.to(dtype)], grad)
    if dtype == torch.float32:
        torch.testing.assert_close(fused_y, host_y, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(fused_gx, host_gx, rtol=1e-6, atol=1e-6)
    else:
        assert _err(fused_y, ref_y) <= 1.05 * _err(host_y, ref_y) + 1e-4
        assert _err(fused_gx, ref_gx) <= 1.05 * _err(host_gx, ref_gx) + 1e-4


@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_equals_peft(bias):
    """Output and the x, A, B gradients of :func:`lora_linear` against a PEFT LoRA ``nn.Linear``."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(2)
    host = nn.Sequential(nn.Linear(12, 10, bias=bias))
    peft = get_peft_model(host, LoraConfig(r=4, lora_alpha=6, target_modules=["0"]))
    layer = peft.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.5, generator=g)
    x = torch.randn(2, 5, 12, generator=g, requires_grad=True)
    grad = torch.randn(2, 5, 10, generator=g)
    y_host = layer(x)
    y_host.backward(grad)
    host_grads = [x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    x2 = x.detach().clone().requires_grad_(True)
    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    base = layer.get_base_layer()
    y = lora_linear(x2, base.weight, base.bias, a, b, layer.scaling["default"])
    y.backward(grad)
    torch.testing.assert_close(y, y_host, rtol=1e-6, atol=1e-6)
    for got, want in zip([x2.grad, a.grad, b.grad], host_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _train(dtype: str, fused: bool, method: str = "smoe", steps: int = 3, top_k: int = 2,
           adapter_dtype: str = "float32"):
    """(losses, adapters) of ``steps`` one-step local_train calls on fixed batches."""
    torch.manual_seed(0)
    model = _build(STEP, 20, 0, dtype=dtype)
    m = get_method_class(method)()
    m.prepare_model(model)
    cfg = TrainConfig(batch_size=STEP.batch_size, fused_ops=fused, adapter_dtype=adapter_dtype)
    set_top_k(model, top_k)
    losses = [local_train(model, [_batch(STEP, i)], m, cfg, top_k)["loss"] for i in range(steps)]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, model


@pytest.mark.parametrize("method", ["smoe", "ubsmoe"])
def test_fused_local_steps_equal_host_in_float32(method):
    """Three local steps of a float32 model: losses within 1e-5 and every adapter within 1e-4
    relative of the host path (only the order of float32 sums differs)."""
    la, aa, _ = _train("float32", False, method)
    lb, ab, _ = _train("float32", True, method)
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-5, atol=1e-6)
    assert aa.keys() == ab.keys()
    for n in aa:
        assert _err(ab[n], aa[n]) < 1e-4 or float((ab[n] - aa[n]).abs().max()) < 1e-6, n


def test_fused_local_steps_in_bfloat16_stay_as_close_as_bfloat16_allows():
    """bfloat16 with compute-dtype adapters: fused losses within 1e-2 of the host path's, and
    each adapter's change no further from the float32 model's than 2.5x the host path's distance
    (or 10% in norm), as for ``train.adapter_dtype`` (tests/core/test_fewer_launches.py)."""
    _, a32, _ = _train("float32", False, adapter_dtype="compute")
    la, aa, _ = _train("bfloat16", False, adapter_dtype="compute")
    lb, ab, _ = _train("bfloat16", True, adapter_dtype="compute")
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-2, atol=1e-3)
    init = _train("float32", False, steps=0)[1]
    for n in aa:
        moved_a, moved_b = aa[n] - init[n], ab[n] - init[n]
        if moved_a.norm() > 0:
            noise = _err(moved_a, a32[n] - init[n])
            assert _err(moved_b, moved_a) < max(0.1, 2.5 * noise), (n, _err(moved_b, moved_a), noise)


def test_fused_ops_are_switched_for_the_step_only():
    """local_train installs the fused forwards for its step and removes them; the classes,
    parameters and state_dict are untouched, and generation (with a KV cache) runs the host."""
    model = _build(STEP, 20, 0, dtype="float32")
    keys = list(model.state_dict())
    assert set_fused_ops(model, True) > 0
    patched = [m for m in model.modules() if "forward" in m.__dict__]
    assert {type(m).__name__ for m in patched} == {"OlmoeRMSNorm", "OlmoeAttention", "OlmoeDecoderLayer"}
    ids = _batch(STEP, 0)["input_ids"][:1, :4]
    with torch.no_grad():
        with_fused = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert set_fused_ops(model, False) == len(patched)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False), with_fused)
    assert list(model.state_dict()) == keys
    _, _, trained = _train("float32", True, steps=1)
    assert not any("forward" in m.__dict__ for m in trained.modules())


def test_fused_ops_launch_fewer_operations():
    """The option does what it is for: a bfloat16 step with compute-dtype adapters launches
    fewer forward + backward operations (the count's exact values are held by the dispatch
    baseline, tests/bench/test_dispatch.py)."""
    from dataclasses import replace

    from ubsmoe.bench.dispatch import count_local_step

    ops = {}
    for fused in (False, True):
        model = _build(STEP, 20, 0, dtype="bfloat16")
        m = get_method_class("smoe")()
        m.prepare_model(model)
        cfg = replace(TrainConfig(), adapter_dtype="compute", fused_ops=fused)
        ops[fused] = count_local_step(model, _batch(STEP, 0), m, 1, cfg)["ops"]
    assert ops[True] < 0.8 * ops[False], ops


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_olmoe_attention_forward_equals_the_host(kv_heads):
    """The fused attention forward against transformers' OlmoeAttention (float32): q and k
    stacked through one norm and one rotary when they have one shape (kv_heads = heads), each
    through its own when they do not (grouped-query attention); output and input gradient."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeAttention, OlmoeRotaryEmbedding

    from ubsmoe.models.fused_host import olmoe_attention_forward

    config = OlmoeConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=kv_heads,
                         intermediate_size=16, num_hidden_layers=1, vocab_size=10)
    config._attn_implementation = "sdpa"
    torch.manual_seed(3)
    attn = OlmoeAttention(config, layer_idx=0).eval()
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.uniform_(0.5, 1.5)
    attn.requires_grad_(False)
    x = torch.randn(2, 6, 32)
    position = OlmoeRotaryEmbedding(config)(x, torch.arange(6)[None].expand(2, -1))
    grad = torch.randn(2, 6, 32)
    want, (want_gx,) = _grads(lambda t: attn(t, position, None)[0], [x], grad)
    got, (got_gx,) = _grads(lambda t: olmoe_attention_forward(attn, t, position, None)[0], [x], grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_gx, want_gx, rtol=1e-5, atol=1e-6)


def test_fused_step_does_the_host_steps_matmul_work():
    """FLOPs of one local step (float32, K = 2): the fused path's matmuls (mm, addmm, addmm_)
    sum to exactly the host path's, the grouped matmuls and attention are the same, and the
    only extra counted FLOPs are the norms' row dot products (baddbmm, bmm): no input gradient
    formed that autograd would have skipped (a first layer's q/k/v)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ubsmoe.metrics.flops import register_flop_formulas

    register_flop_formulas()
    flops = {}
    for fused in (False, True):
        model = _build(STEP, 20, 0, dtype="float32")
        m = get_method_class("smoe")()
        m.prepare_model(model)
        set_top_k(model, 2)
        with FlopCounterMode(display=False) as counter:
            local_train(model, [_batch(STEP, 0)], m, TrainConfig(batch_size=STEP.batch_size, fused_ops=fused), 2)
        flops[fused] = {str(k).removeprefix("aten."): v for k, v in counter.get_flop_counts()["Global"].items()}
    host, fused = flops[False], flops[True]
    matmul = sum(fused.get(op, 0) for op in ("mm", "addmm", "addmm_"))
    assert matmul == host["mm"] and "addmm_" in fused
    for op in ("_grouped_mm", "_scaled_dot_product_flash_attention_for_cpu",
               "_scaled_dot_product_flash_attention_for_cpu_backward"):
        assert fused[op] == host[op], op
    h, tokens = STEP.sizes.hidden_size, STEP.batch_size * STEP.seq_len
    extra = fused["baddbmm"] + fused["bmm"] - host["bmm"]
    assert 0 < extra and extra % (2 * h * tokens) == 0  # whole 2 H dot products per token and norm pass


def test_fused_ops_with_activation_checkpointing_equal_without():
    """train.fused_ops under train.activation_checkpointing (the decoder layers' forwards,
    fused ones included, recomputed in the backward): the same losses and adapters."""
    def run(checkpointing: bool):
        torch.manual_seed(0)
        model = _build(STEP, 20, 0, dtype="float32")
        m = get_method_class("ubsmoe")()
        m.prepare_model(model)
        set_top_k(model, 2)
        cfg = TrainConfig(batch_size=STEP.batch_size, fused_ops=True, activation_checkpointing=checkpointing)
        losses = [local_train(model, [_batch(STEP, i)], m, cfg, 2)["loss"] for i in range(2)]
        return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    (la, aa), (lb, ab) = run(False), run(True)
    torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-6, atol=1e-7)
    for n in aa:
        torch.testing.assert_close(ab[n], aa[n], rtol=1e-5, atol=1e-7)
