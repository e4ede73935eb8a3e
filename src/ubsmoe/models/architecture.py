"""A model's architecture: its ``model_type`` and Hugging Face config, read offline where possible."""

from __future__ import annotations

import json
from pathlib import Path

from ubsmoe.config import ModelConfig
from ubsmoe.models.families import DENSE_FAMILIES, MOE_FAMILIES, family
from ubsmoe.models.presets import (
    DENSE_MLP_FACTOR,
    PRESET_MODEL_TYPES,
    SHIPPED_CONFIGS,
    preset_sizes,
    shipped_config,
)


def _read_config(cfg: ModelConfig) -> dict:
    """The raw ``config.json`` dict of a non-preset ``model.name`` (shipped, local, hub)."""
    if cfg.name in SHIPPED_CONFIGS:
        return shipped_config(cfg.name)
    path = Path(cfg.name)
    path = path / "config.json" if path.is_dir() else path
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    try:
        # lazy: transformers takes seconds to import; only this path needs it
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(cfg.name).to_dict()
    except (OSError, ValueError) as e:
        raise ValueError(f"model.name: no config for {cfg.name!r} (not shipped, not a local "
                         f"path, hub lookup failed); shipped offline: "
                         f"{', '.join(SHIPPED_CONFIGS)}") from e


def model_type_of(cfg: ModelConfig) -> str:
    """The Hugging Face ``model_type`` of ``cfg.name`` (a preset's, or read from its config).

    Raises:
        ValueError: see :func:`architecture_config`.
    """
    if cfg.name in PRESET_MODEL_TYPES:
        return PRESET_MODEL_TYPES[cfg.name]
    return architecture_config(cfg)["model_type"]


def known_model_type(cfg: ModelConfig) -> str | None:
    """``model_type`` of a preset, shipped config or local ``config.json``; None otherwise.

    Never touches the network (a hub name gives None: its type is known once loaded).
    """
    if cfg.name in PRESET_MODEL_TYPES:
        return PRESET_MODEL_TYPES[cfg.name]
    if cfg.name in SHIPPED_CONFIGS:
        return shipped_config(cfg.name).get("model_type")
    path = Path(cfg.name)
    path = path / "config.json" if path.is_dir() else path
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8")).get("model_type")
        except (json.JSONDecodeError, AttributeError):
            return None
    return None


def architecture_config(cfg: ModelConfig) -> dict:
    """The Hugging Face ``config.json`` dict of a non-preset ``model.name``, read offline.

    Resolution: a shipped config (:data:`ubsmoe.models.presets.SHIPPED_CONFIGS`) ->
    a local ``config.json`` or a folder holding one -> ``transformers.AutoConfig``
    (hub name; needs the network or the HF cache).

    Raises:
        ValueError: nothing could be loaded, or the architecture is not a supported
            family (:mod:`ubsmoe.models.families`: a sparse-MoE family or a dense
            backbone).
    """
    config = _read_config(cfg)
    model_type = config.get("model_type")
    if model_type not in MOE_FAMILIES and model_type not in DENSE_FAMILIES:
        raise ValueError(f"model.name: {cfg.name!r} is a {model_type!r} model; supported: sparse MoE "
                         f"{', '.join(MOE_FAMILIES)}; dense {', '.join(DENSE_FAMILIES)}")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def hf_config(cfg: ModelConfig, vocab_size: int | None = None, pad_token_id: int | None = None,
              eos_token_id: int | None = None):
    """The Hugging Face config a ``random`` build uses: a preset's sizes or a full architecture.

    A ``tiny*`` preset takes ``cfg.tiny``'s sizes in its family's architecture: the
    expert width is ``intermediate_size`` (Qwen's ``moe_intermediate_size``), a
    Qwen2-MoE shared expert is ``4 * intermediate_size`` wide (Qwen1.5-MoE's ratio),
    ``norm_topk_prob`` follows the family's released checkpoints
    (:attr:`~ubsmoe.models.families.MoEFamily.preset_norm_topk`), and the dense
    ``tiny-dense`` (OLMo) has an MLP of ``4 * intermediate_size``.

    Args:
        cfg: model config (``name``: a preset, or a shipped / local config).
        vocab_size: a preset's vocabulary (the trained tokenizer's size; default the
            preset's ``vocab_size``). A full architecture keeps its own vocabulary.
        pad_token_id, eos_token_id: the tokenizer's special ids (default: the config's;
            0 and 1 for a preset, where :func:`train_tokenizer` puts them).

    Raises:
        ValueError: see :func:`architecture_config`.
    """
    t = preset_sizes(cfg.name, cfg)
    special = {k: v for k, v in (("pad_token_id", pad_token_id), ("eos_token_id", eos_token_id),
                                 ("bos_token_id", eos_token_id)) if v is not None}
    if t is None:
        config = architecture_config(cfg)
        return family(config["model_type"]).config_cls()(**{**config, **special})
    fam = family(PRESET_MODEL_TYPES[cfg.name])
    # A preset's trained tokenizer puts <pad> at 0 and <|endoftext|> at 1 (SPECIAL_TOKENS).
    special = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1, **special}
    common = dict(
        vocab_size=vocab_size or t.vocab_size,
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_attention_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=False,
        initializer_range=t.initializer_range,
        **special,
    )
    if fam.model_type not in MOE_FAMILIES:
        return fam.config_cls()(intermediate_size=DENSE_MLP_FACTOR * t.intermediate_size, **common)
    moe = {fam.num_experts_key: t.num_experts, fam.expert_size_key: t.intermediate_size,
           "num_experts_per_tok": t.num_experts_per_tok}
    if not fam.always_norm_topk:
        moe["norm_topk_prob"] = fam.preset_norm_topk
    if fam.expert_size_key != "intermediate_size":  # Qwen: the dense-MLP width (unused layers)
        moe["intermediate_size"] = DENSE_MLP_FACTOR * t.intermediate_size
    if fam.shared_expert:
        moe[fam.shared_expert_size_key] = DENSE_MLP_FACTOR * t.intermediate_size
    return fam.config_cls()(**moe, **common)


def tokenizer_vocab_size(cfg: ModelConfig) -> int:
    """Vocabulary size a locally trained tokenizer targets: the preset's or the architecture's."""
    t = preset_sizes(cfg.name, cfg)
    return t.vocab_size if t is not None else int(architecture_config(cfg)["vocab_size"])


# The name the OLMoE-only code used (kept for the benchmarks and tests that import it).
olmoe_config = hf_config
