"""Model shapes: the sizes of a decoder-only transformer that set its cost, read from its config.

:class:`ModelShape` holds them; :func:`model_shape_from_config` reads one from a
Hugging Face ``config.json`` dict, :func:`load_model_shape` by shipped name, local
path or (online) hub name, and :func:`with_lora_experts` adds M LoRA experts to a
dense model. The FLOP and parameter formulas over a shape are in
:mod:`ubsmoe.metrics.flops`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ubsmoe.models.families import DENSE_FAMILIES, MOE_FAMILIES, check_lora_experts
from ubsmoe.models.presets import SHIPPED_CONFIGS, shipped_config

SUPPORTED_MODEL_TYPES = (*MOE_FAMILIES, *DENSE_FAMILIES)
# config key of the expert count and of the expert width per sparse-MoE family (the registry's).
_MOE_KEYS = {t: (f.num_experts_key, f.expert_size_key) for t, f in MOE_FAMILIES.items()}


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only (MoE or dense) transformer that set its cost.

    Attributes:
        name: model name or path it was read from.
        model_type: Hugging Face ``model_type`` (one of ``SUPPORTED_MODEL_TYPES``).
        hidden_size: H.
        num_layers: decoder layers L.
        num_heads, num_kv_heads, head_dim: attention heads (query, key/value) and
            their width.
        vocab_size: V.
        tie_word_embeddings: LM head shares the embedding matrix.
        intermediate_size: I of each expert (MoE) or of the dense MLP.
        num_experts: E per MoE layer (0 for a dense model).
        top_k: native experts per token K_max (0 for a dense model).
        attention_bias: q/k/v/o projections have biases.
        qk_norm: per-layer RMSNorm on q and k (OLMoE).
        norm_weights: the layer norms carry a weight vector (RMSNorm; OLMo's
            non-parametric LayerNorm does not).
        shared_expert_size: intermediate size of a dense shared expert every token
            runs, with a sigmoid gate ``[1, H]`` (Qwen2-MoE); 0 when none.
        qkv_bias: q/k/v (not o) projections have biases (Qwen2-MoE's ``qkv_bias``).
        head_qk_norm: q/k RMSNorm over each head's ``head_dim`` (Qwen3-MoE) rather
            than over the whole projection (OLMoE's ``qk_norm``).
        lora_experts: M LoRA experts sharing each layer's dense MLP (0: none; a
            dense model only, see :func:`with_lora_experts`); ``top_k`` is then K_max.
    """

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    intermediate_size: int
    num_experts: int
    top_k: int
    attention_bias: bool = False
    qk_norm: bool = False
    norm_weights: bool = True
    shared_expert_size: int = 0
    head_qk_norm: bool = False
    qkv_bias: bool = False
    lora_experts: int = 0

    @property
    def is_moe(self) -> bool:
        """True for a sparse-MoE model."""
        return self.num_experts > 0

    @property
    def routed(self) -> bool:
        """True when tokens are routed to K of several experts (sparse MoE or LoRA experts)."""
        return self.num_experts > 0 or self.lora_experts > 0

    @property
    def num_routed(self) -> int:
        """Experts a router chooses among: E (sparse MoE), M (LoRA experts), 0 (dense)."""
        return self.num_experts or self.lora_experts


def with_lora_experts(s: ModelShape, num_experts: int, top_k: int) -> ModelShape:
    """The shape of dense model ``s`` with M = ``num_experts`` LoRA experts per MLP, K_max = ``top_k``.

    ``num_experts = 0`` returns ``s`` unchanged.

    Raises:
        ValueError: ``s`` is a sparse-MoE model, ``num_experts < 0`` or ``top_k``
            outside ``[1, num_experts]`` (each names the field).
    """
    check_lora_experts(num_experts, top_k, not s.is_moe, f"{s.name} ({s.model_type})")
    if num_experts == 0:
        return s
    return replace(s, lora_experts=int(num_experts), top_k=int(top_k))


def model_shape_from_config(config: dict[str, Any], name: str = "") -> ModelShape:
    """Read a :class:`ModelShape` from a Hugging Face ``config.json`` dict.

    Raises:
        ValueError: unsupported ``model_type`` (lists the supported ones) or a
            missing or non-positive size field (named).
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type: got {model_type!r} in {name or 'the config'}, "
                         f"expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    experts_key, expert_size_key = _MOE_KEYS.get(model_type, ("", "intermediate_size"))
    required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                expert_size_key]
    if model_type in _MOE_KEYS:
        required.append("num_experts_per_tok")
    missing = [k for k in required if not isinstance(config.get(k), int) or config[k] < 1]
    if missing:
        raise ValueError(f"{name or 'config'}: fields {', '.join(missing)} missing or not positive "
                         "integers")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts (attribute map).
    num_experts = int(config.get(experts_key) or config.get("num_local_experts") or 0) if experts_key else 0
    if model_type in _MOE_KEYS and num_experts < 1:
        raise ValueError(f"{name or 'config'}: num_experts missing or not a positive integer")
    return ModelShape(
        name=name or str(config.get("_name_or_path", "")),
        model_type=model_type,
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        vocab_size=config["vocab_size"],
        # transformers' PretrainedConfig default is tied when the key is absent.
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
        intermediate_size=config[expert_size_key],
        num_experts=num_experts,
        top_k=int(config["num_experts_per_tok"]) if num_experts else 0,
        attention_bias=bool(config.get("attention_bias", False)),
        qk_norm=model_type == "olmoe",
        norm_weights=model_type != "olmo",
        shared_expert_size=int(config.get("shared_expert_intermediate_size") or 0)
        if model_type == "qwen2_moe" else 0,
        head_qk_norm=model_type == "qwen3_moe",
        qkv_bias=bool(config.get("qkv_bias", model_type == "qwen2_moe")) and model_type == "qwen2_moe",
    )


def load_model_shape(model: str, lora_experts: int = 0, lora_experts_top_k: int = 2) -> ModelShape:
    """Model sizes by shipped name, local path or (online) hub name.

    Resolution: a shipped config (``SHIPPED_CONFIGS``, works offline) -> a local
    ``config.json`` file or a folder holding one -> ``transformers.AutoConfig``
    (hub name; needs the network or the local HF cache).

    Args:
        model: the name or path.
        lora_experts, lora_experts_top_k: M LoRA experts per dense MLP and K_max
            (``model.lora_experts``; 0: none; :func:`with_lora_experts`).

    Raises:
        ValueError: nothing could be loaded (the message names the shipped configs),
            the file is not JSON, the model type is unsupported, or a bad LoRA-expert
            setting (:func:`with_lora_experts`).
    """
    return with_lora_experts(_load_model_shape(model), lora_experts, lora_experts_top_k)


def _load_model_shape(model: str) -> ModelShape:
    """:func:`load_model_shape` without LoRA experts."""
    if model in SHIPPED_CONFIGS:
        return model_shape_from_config(shipped_config(model), model)
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"model: {str(path)!r} is not a JSON config ({e})") from e
        return model_shape_from_config(config, model)
    try:
        # lazy: transformers takes seconds to import; only this path needs it
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model).to_dict()
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model: could not load a config for {model!r} (not a local path, and the hub "
            f"lookup failed: {str(e).splitlines()[0]}); shipped offline: "
            f"{', '.join(SHIPPED_CONFIGS)}"
        ) from e
    return model_shape_from_config(config, model)
