"""model.device, model.dtype=auto, model.init and the presets: where and how models are built."""

from __future__ import annotations

import pytest
import torch

from ubsmoe.config import ModelConfig, TrainConfig
from ubsmoe.errors import ConfigError
from ubsmoe.models import adapter_state, build_model, load_adapter_state
from ubsmoe.models.devices import resolve_device, resolve_dtype
from ubsmoe.models.presets import MEDIUM
from ubsmoe.models.runtime import smoe_layers


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_resolve_device_cpu_and_auto_without_cuda(monkeypatch):
    _no_cuda(monkeypatch)
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")


def test_resolve_device_cuda_without_cuda_is_a_config_error(monkeypatch):
    _no_cuda(monkeypatch)
    with pytest.raises(ConfigError, match=r"^model.device: got 'cuda', expected auto or cpu "
                                          r"\(no CUDA device visible\)$"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="no CUDA device visible"):
        resolve_device("cuda:0")


def test_resolve_device_index_beyond_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"model.device: got 'cuda:3', expected .*cuda:0..cuda:1 "
                                          r"\(2 CUDA devices visible\)"):
        resolve_device("cuda:3")


def test_resolve_dtype_auto_and_names():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ConfigError, match="model.dtype"):
        resolve_dtype("int8", torch.device("cpu"))


def test_model_config_validates_device_init_dtype():
    assert ModelConfig().device == "auto" and ModelConfig().dtype == "auto"
    for kwargs, field in [({"device": "gpu"}, "model.device"), ({"device": "cuda:x"}, "model.device"),
                          ({"init": "zeros"}, "model.init"), ({"dtype": "fp8"}, "model.dtype")]:
        with pytest.raises(ConfigError, match=field):
            ModelConfig(**kwargs)
    with pytest.raises(ConfigError, match="model.init: got 'pretrained', expected random or auto "
                                          "for the preset 'medium'"):
        ModelConfig(name="medium", init="pretrained")
    assert ModelConfig(name="medium").resolved_init == "random"
    assert ModelConfig(name="allenai/OLMoE-1B-7B-0924").resolved_init == "pretrained"
    assert ModelConfig(name="allenai/OLMoE-1B-7B-0924", init="random").resolved_init == "random"


@pytest.fixture
def adams(monkeypatch):
    """The Adam optimizers local_train creates, recorded (torch.optim.Adam wrapped)."""
    made = []

    class Recorded(torch.optim.Adam):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "Adam", Recorded)
    return made


@pytest.mark.slow
def test_medium_preset_builds_random_and_trains_one_local_step(tiny_tokenizer, adams):
    """model.init=random on `medium`: bench shapes, CPU, float32; one local step moves the LoRA."""
    from ubsmoe.fl.train import local_train
    from ubsmoe.methods import get_method_class

    cfg = ModelConfig(name="medium", device="cpu", lora_rank=4)
    model, tok = build_model(cfg, tiny_tokenizer, seed=0)
    assert tok is tiny_tokenizer
    layers = smoe_layers(model)
    assert len(layers) == MEDIUM.num_hidden_layers
    assert layers[0].gate_up_proj.shape == (64, 2 * 256, 512)
    assert layers[0].max_top_k == 8
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    before = adapter_state(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, len(tiny_tokenizer), (1, 8), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    stats = local_train(model, [batch], get_method_class("smoe")(), TrainConfig(lr=1e-3), top_k=2)
    assert stats["steps"] == 1 and stats["loss"] > 0
    assert len(adams) == 1 and not adams[0].defaults["fused"]  # torch's default Adam on CPU
    after = adapter_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_bfloat16_base_keeps_lora_float32_and_trains(tiny_tokenizer):
    """Under a bfloat16 base, expert and attention LoRA stay float32 (an lr-sized step survives)."""
    from ubsmoe.fl.train import local_train
    from ubsmoe.methods import get_method_class

    cfg = ModelConfig(dtype="bfloat16", device="cpu")
    model, _ = build_model(cfg, tiny_tokenizer, seed=0)
    layer = smoe_layers(model)[0]
    assert layer.gate_up_proj.dtype == torch.bfloat16
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    state = adapter_state(model)
    for n in state:
        if n.endswith("gate_up_lora.B"):
            state[n] = torch.full_like(state[n], 0.01)  # B != 0, so A gets a gradient
    load_adapter_state(model, state)
    before = adapter_state(model)
    ids = torch.randint(2, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    local_train(model, [batch], get_method_class("smoe")(), TrainConfig(lr=1e-5), top_k=8)
    # Adam moves A by ~lr = 1e-5, below bfloat16's resolution at |A| ~ 0.1: float32 keeps it.
    moved = [n for n in before if n.endswith("gate_up_lora.A")
             and not torch.equal(before[n], adapter_state(model)[n])]
    assert moved


def test_adapter_state_is_cpu_and_loads_onto_the_model_device(tiny_tokenizer):
    model, _ = build_model(ModelConfig(device="cpu"), tiny_tokenizer, seed=0)
    state = adapter_state(model)
    assert all(t.device.type == "cpu" for t in state.values())
    p = next(p for p in model.parameters() if p.requires_grad)
    name = next(n for n, q in model.named_parameters() if q is p)
    state[name] = torch.full_like(state[name], 0.5)
    load_adapter_state(model, state)
    assert torch.all(p == 0.5)
    # adapter_state copies: changing the model does not change a taken state.
    with torch.no_grad():
        p.fill_(1.0)
    assert torch.all(state[name] == 0.5)


def test_full_size_random_build_on_meta_device(tiny_tokenizer):
    """OLMoE-1B-7B from the shipped config, random init, on the meta device: nothing allocated."""
    cfg = ModelConfig(name="allenai/OLMoE-1B-7B-0924", init="random", dtype="bfloat16")
    model, _ = build_model(cfg, tiny_tokenizer, seed=0, device="meta")
    # phi: DMR's [E] per layer; the router W_r is a host weight, trainable (model.router_trainable)
    base = sum(p.numel() for n, p in model.named_parameters()
               if (not p.requires_grad and not n.endswith(".phi")) or n.endswith(".mlp.router_weight"))
    assert base == 6_919_161_856
    assert {p.device.type for p in model.parameters()} == {"meta"}
    layer = smoe_layers(model)[0]
    assert layer.gate_up_proj.dtype == torch.bfloat16 and layer.gate_up_lora.A.dtype == torch.float32
    assert layer.router_weight.dtype == torch.float32 and layer.router_weight.requires_grad


def test_dense_backbone_random_builds_with_lora_on_attention_and_mlp(tiny_tokenizer):
    cfg = ModelConfig(name="allenai/OLMo-1B-hf", init="random", attention_lora=True, lora_rank=8)
    model, _ = build_model(cfg, tiny_tokenizer, device="meta")
    assert model.config.model_type == "olmo" and smoe_layers(model) == []
    trainable = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters()
                 if p.requires_grad}
    assert trainable == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == 1_176_764_416


def test_shared_setup_trains_the_tokenizer_to_the_preset_vocabulary(tmp_path, monkeypatch):
    """model.init=random on a preset: the tokenizer is trained locally to its vocabulary size."""
    from ubsmoe.config import load_config
    from ubsmoe.fl import client_runtime
    from ubsmoe.fl.client_runtime import shared_setup
    from ubsmoe.models.tokenizer import train_tokenizer as real

    seen = {}

    def spy(texts, vocab_size, cache):
        seen["vocab"] = vocab_size
        return real(list(texts)[:200], vocab_size, cache)

    monkeypatch.setattr(client_runtime, "train_tokenizer", spy)  # as shared_setup imported it
    cfg = load_config(None, ["model.name=medium", f"model.tokenizer_cache={tmp_path}",
                             "data.train_examples=200", "fl.num_clients=2"])
    setup = shared_setup(cfg)
    assert seen["vocab"] == MEDIUM.vocab_size
    assert setup.tokenizer.pad_token == "<pad>"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_build_trains_on_the_device_and_adapters_come_back_on_cpu(tiny_tokenizer, adams):
    from ubsmoe.fl.train import local_train
    from ubsmoe.methods import get_method_class

    model, _ = build_model(ModelConfig(name="medium", device="cuda"), tiny_tokenizer, seed=0)
    base = smoe_layers(model)[0]
    assert base.gate_up_proj.device.type == "cuda" and base.gate_up_proj.dtype == torch.bfloat16
    # model.router_trainable: the router trains in float32 on the device under the bfloat16 base
    assert base.router_weight.device.type == "cuda" and base.router_weight.dtype == torch.float32
    assert base.router_weight.requires_grad
    assert all(p.device.type == "cuda" for p in model.parameters())
    ids = torch.randint(2, len(tiny_tokenizer), (2, 16))  # CPU batch: local_train moves it
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    before = adapter_state(model)
    local_train(model, [batch], get_method_class("ubsmoe")(), TrainConfig(lr=1e-3), top_k=2)
    assert len(adams) == 1 and adams[0].defaults["fused"] is True  # fused Adam on CUDA
    after = adapter_state(model)
    assert all(t.device.type == "cpu" for t in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    routers = [n for n in after if n.endswith(".mlp.router_weight")]
    assert routers and all(after[n].dtype == torch.float32 and not torch.equal(before[n], after[n])
                           for n in routers)
    load_adapter_state(model, before)
    assert all(torch.equal(p.cpu(), before[n]) for n, p in model.named_parameters() if p.requires_grad)
