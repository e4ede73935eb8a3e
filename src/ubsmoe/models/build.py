"""Load or build a model (sparse MoE or dense, :mod:`ubsmoe.models.families`) and patch it.

Two ways to get the model (``model.init``, see :class:`~ubsmoe.config.ModelConfig`):

- ``random``: a randomly initialised causal LM of a preset's sizes (``tiny``,
  ``medium``: OLMoE-1B-7B's routing shape, 64 experts and top-8, at small width and
  depth; ``tiny-mixtral``, ``tiny-qwen2-moe``, ``tiny-qwen3-moe``, ``tiny-dense``:
  the tiny sizes in another family's architecture) or of a full architecture read
  from a shipped or local ``config.json`` (e.g. OLMoE-1B-7B, OLMo-1B), built directly on
  the target device in the target dtype (no CPU copy first), plus a byte-level BPE tokenizer trained locally
  (Hugging Face ``tokenizers``) on the run's training text to the config's
  vocabulary size and cached on disk: everything runs without the model hub.
- ``pretrained``: a checkpoint's weights and tokenizer (hub name or local path).

:func:`~ubsmoe.models.devices.resolve_device` and
:func:`~ubsmoe.models.devices.resolve_dtype` turn ``model.device`` / ``model.dtype``
into torch objects. LoRA factors (PEFT attention LoRA through PEFT's
adapter autocast, per-expert LoRA in :class:`~ubsmoe.core.smoe.ExpertLoRA`) and
the DMR modulation phi are float32 whatever the base dtype; adapters leave the
model (:func:`~ubsmoe.models.adapters.adapter_state`) as CPU tensors.

:func:`build_model` then replaces every host sparse-MoE block (``OlmoeSparseMoeBlock``,
``MixtralSparseMoeBlock``, ...) with :class:`~ubsmoe.core.smoe.SMoELayer` (reusing
the frozen expert weights) and puts PEFT LoRA on the attention projections (if
configured), a Qwen2-MoE shared expert, or a dense backbone's MLP (:func:`lora_targets`).
With ``model.lora_experts = M > 0`` a dense backbone's MLPs become SMoE layers of M
LoRA experts sharing the frozen MLP weights instead
(:func:`~ubsmoe.models.patching.patch_lora_experts`).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ubsmoe.config import ModelConfig
from ubsmoe.models.architecture import hf_config, tokenizer_vocab_size
from ubsmoe.models.devices import resolve_device, resolve_dtype
from ubsmoe.models.families import DENSE_FAMILIES, MOE_FAMILIES, DenseFamily, family
from ubsmoe.models.patching import is_dense_model, patch_lora_experts, patch_smoe
from ubsmoe.models.presets import PRESET_MODEL_TYPES, preset_sizes
from ubsmoe.models.runtime import smoe_layers

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def random_model(cfg: ModelConfig, vocab_size: int | None, pad_token_id: int | None,
                 eos_token_id: int | None, seed: int = 0, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM of the configured family, built directly on ``device``.

    Construction runs under a ``torch.device(device)`` context, so every weight is
    allocated (and initialised, with the model's ``initializer_range``) on the target
    device: a 7B model never takes a CPU copy, and ``device="meta"`` allocates
    nothing (shapes only, for planning).

    Args:
        cfg: model config (a preset, or a shipped / local config of a supported family).
        vocab_size: a preset's vocabulary (the trained tokenizer's size).
        pad_token_id, eos_token_id: the tokenizer's special token ids.
        seed: initialisation seed (the same on server and every client).
        device: target device.
        dtype: parameter dtype.

    Raises:
        ValueError: see :func:`architecture_config`.
    """
    device = torch.device(device)
    hf_cfg = hf_config(cfg, vocab_size, pad_token_id, eos_token_id)
    model_cls = family(hf_cfg.model_type).model_cls()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with torch.device(device):
            model = model_cls._from_config(hf_cfg, dtype=dtype)
    return model


# The name the OLMoE-only code used (kept for the benchmarks and tests that import it).
random_olmoe = random_model


def tiny_olmoe(cfg: ModelConfig, vocab_size: int, pad_token_id: int, eos_token_id: int,
               seed: int = 0):
    """A randomly initialised model of a ``tiny*`` preset's sizes on CPU (default: OLMoE ``tiny``).

    Args:
        cfg: model config (sizes from ``cfg.tiny``; a ``tiny-*`` name picks that
            family's architecture, anything else ``tiny``; ``cfg.dtype``, ``auto`` =
            float32).
        vocab_size: the trained tokenizer's vocabulary size.
        pad_token_id, eos_token_id: the tokenizer's special token ids.
        seed: initialisation seed (the same on server and every client).
    """
    name = cfg.name if cfg.name.startswith("tiny") and cfg.name in PRESET_MODEL_TYPES else "tiny"
    tiny = cfg if cfg.name == name else ModelConfig(name=name, tiny=cfg.tiny)
    return random_model(tiny, vocab_size, pad_token_id, eos_token_id, seed, "cpu",
                        resolve_dtype(cfg.dtype, torch.device("cpu")))


def load_hf_model(cfg: ModelConfig, device: torch.device | None = None, dtype: torch.dtype | None = None):
    """Load a checkpoint of a supported family and its tokenizer by hub name or local path.

    Args:
        cfg: model config.
        device: where the weights go (default: :func:`resolve_device` of
            ``cfg.device``); loaded straight there (``device_map``) on CUDA.
        dtype: parameter dtype (default: :func:`resolve_dtype` of ``cfg.dtype``).

    Raises:
        ValueError: the checkpoint is not a supported family (:mod:`ubsmoe.models.families`).
        OSError: the hub or path cannot be reached (re-raised with the name).
    """
    # lazy: transformers takes seconds to import; only this path needs it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg.device) if device is None else device
    dtype = resolve_dtype(cfg.dtype, device) if dtype is None else dtype
    extra = {"device_map": str(device)} if device.type == "cuda" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name)
        model = AutoModelForCausalLM.from_pretrained(cfg.name, dtype=dtype, **extra)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OSError(f"model.name: could not load {cfg.name!r} ({first}); without the hub use "
                      "model.init=random or a local checkpoint path") from e

    if model.config.model_type not in MOE_FAMILIES and model.config.model_type not in DENSE_FAMILIES:
        raise ValueError(
            f"model.name: {cfg.name!r} is a {model.config.model_type!r} model; supported: sparse MoE "
            f"{', '.join(MOE_FAMILIES)}; dense {', '.join(DENSE_FAMILIES)}"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def build_model(cfg: ModelConfig, tokenizer=None, seed: int = 0, device: torch.device | str | None = None):
    """Build or load the configured model on its device, patch its MoE blocks (if any), add LoRA.

    Args:
        cfg: model config (``init``, ``device``, ``dtype``, LoRA).
        tokenizer: required for ``model.init=random`` (the locally trained one sets
            a preset's vocabulary and the special ids); ignored for ``pretrained``,
            whose own tokenizer is returned.
        seed: initialisation seed of random weights and of the LoRA A factors.
        device: override of ``cfg.device`` (e.g. ``"meta"`` for a shape-only build).

    Returns:
        ``(model, tokenizer)``: the patched model on its device with only LoRA
        parameters (and the routers when ``cfg.router_trainable``) trainable.

    Raises:
        ConfigError: ``model.device`` names no visible device.
        ValueError: ``random`` without a tokenizer, or an unsupported architecture.
    """
    model, tokenizer = base_model(cfg, tokenizer, seed, device)
    return prepare_model(model, cfg, seed), tokenizer


def base_model(cfg: ModelConfig, tokenizer=None, seed: int = 0, device: torch.device | str | None = None):
    """The unpatched ``OlmoeForCausalLM`` :func:`build_model` starts from, and its tokenizer.

    The same weights :func:`build_model` patches (a ``random`` model from ``seed`` and
    the tokenizer's vocabulary, or the ``pretrained`` checkpoint), without the SMoE
    patch or LoRA: the base a plain transformers + PEFT user loads the exported
    adapters onto (``save_pretrained`` it for a random preset).

    Args:
        cfg: model config (``init``, ``device``, ``dtype``).
        tokenizer: required for ``model.init=random``; ignored for ``pretrained``.
        seed: initialisation seed of random weights.
        device: override of ``cfg.device``.

    Returns:
        ``(model, tokenizer)``: the unpatched, unfrozen model on its device.

    Raises:
        ConfigError: ``model.device`` names no visible device.
        ValueError: ``random`` without a tokenizer, or a non-OLMoE architecture.
    """
    device = resolve_device(cfg.device) if device is None else torch.device(device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.resolved_init == "random":
        if tokenizer is None:
            raise ValueError(f"model.init=random ({cfg.name}) needs the locally trained tokenizer")
        vocab = len(tokenizer) if preset_sizes(cfg.name, cfg) is not None else None
        if vocab is None and len(tokenizer) > tokenizer_vocab_size(cfg):
            raise ValueError(f"tokenizer: {len(tokenizer)} tokens exceed {cfg.name}'s vocabulary "
                             f"{tokenizer_vocab_size(cfg)}")
        model = random_model(cfg, vocab, tokenizer.pad_token_id, tokenizer.eos_token_id, seed,
                             device, dtype)
    else:
        model, tokenizer = load_hf_model(cfg, device, dtype)
    return model, tokenizer


def lora_targets(model: nn.Module, attention_lora: bool, lora_experts: int = 0) -> list[str]:
    """PEFT ``target_modules`` of a model: attention, dense MLP and shared-expert projections.

    - a sparse-MoE model: q/k/v/o when ``attention_lora``; a Qwen2-MoE shared expert's
      ``gate_proj``/``up_proj``/``down_proj`` always (the routed experts get
      :class:`~ubsmoe.core.smoe.ExpertLoRA` from :func:`patch_smoe` instead);
    - a dense backbone (:data:`ubsmoe.models.families.DENSE_FAMILIES`): q/k/v/o when
      ``attention_lora`` plus the MLP's gate/up/down projections unless
      ``lora_experts > 0`` (its only MLP is the dense one; FedIT and the rank methods
      put LoRA on both; with LoRA experts, :func:`patch_lora_experts` gives the MLP
      its per-expert LoRA instead).

    Raises:
        ValueError: the model's ``model_type`` is not a supported family.
    """
    fam = family(model.config.model_type)
    targets = list(ATTENTION_MODULES) if attention_lora else []
    if isinstance(fam, DenseFamily):
        return targets if lora_experts else targets + list(fam.mlp_modules)
    if fam.shared_expert:
        targets += [f"shared_expert.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    return targets


def prepare_model(model: nn.Module, cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """Freeze a model, add PEFT LoRA (:func:`lora_targets`), patch its MoE blocks (if any).

    With ``model.router_trainable`` every SMoE layer's router ``W_r`` ``[E, H]`` is
    trainable too (float32, see :meth:`~ubsmoe.core.smoe.SMoELayer.set_router_trainable`)
    and so part of :func:`adapter_state`. A dense backbone gets LoRA on its attention
    (``attention_lora``) and MLP projections and no SMoE layer, or with
    ``model.lora_experts = M > 0`` LoRA on its attention only and an SMoE layer of M
    LoRA experts per MLP (:func:`patch_lora_experts`, router seeded from ``seed``).

    Args:
        model: a causal LM of a supported family (hub checkpoint or :func:`random_model`).
        cfg: LoRA rank, alpha and whether attention gets LoRA.
        seed: seed of the LoRA A factors (``seed + 1`` is used, as in :func:`build_model`).

    Returns:
        The model (a PEFT wrapper when PEFT LoRA targets exist) with only LoRA (and
        the routers, when trainable) trainable.

    Raises:
        ValueError: the model is not a supported family, a MoE model has no
            sparse-MoE block, or ``model.lora_experts > 0`` on a sparse-MoE model.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    dense = is_dense_model(model)
    if cfg.lora_experts and not dense:
        raise ValueError(f"model.lora_experts: got {cfg.lora_experts}, expected 0 for the sparse-MoE "
                         f"model {cfg.name} ({model.config.model_type}); LoRA experts are for dense backbones")
    targets = lora_targets(model, cfg.attention_lora, cfg.lora_experts)
    alpha = cfg.alpha_for(cfg.lora_rank)  # model.lora_scale_rule: scale lora_scale or lora_alpha / r
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        if targets:
            # lazy: peft (imports transformers) takes seconds to import; only this path needs it
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, lora_dropout=0.0,
                              target_modules=targets, bias="none")
            with warnings.catch_warnings():
                # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing`; the
                # FutureWarning is about PEFT's code, not ours (only this message is hidden).
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
                model = get_peft_model(model, lora)
        if not dense:
            patch_smoe(model, cfg.lora_rank, alpha)
        elif cfg.lora_experts:
            patch_lora_experts(model, cfg.lora_experts, cfg.lora_experts_top_k, cfg.lora_rank,
                               alpha, seed)
    for layer in smoe_layers(model):
        layer.set_router_trainable(cfg.router_trainable)
    model.config.use_cache = True
    return model


