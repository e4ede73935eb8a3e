"""Random-weight model presets and the shipped model configs (config.json files read offline)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from ubsmoe.config import ModelConfig, TinyModelConfig

# The `medium` preset: OLMoE-1B-7B's routing (64 experts, top-8), expert intermediate =
# hidden / 2 and head width 128 as in OLMoE, at hidden 512 and 4 layers (about 0.11B
# parameters; the `olmoe_medium` shapes of the model_step benchmark).
MEDIUM = TinyModelConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=256, num_experts=64, num_experts_per_tok=8,
                         vocab_size=4096, max_position_embeddings=1024)


# Preset name -> Hugging Face model_type of its architecture (ubsmoe.models.families).
PRESET_MODEL_TYPES = {"tiny": "olmoe", "medium": "olmoe", "tiny-mixtral": "mixtral",
                      "tiny-qwen2-moe": "qwen2_moe", "tiny-qwen3-moe": "qwen3_moe",
                      "tiny-dense": "olmo"}


# A dense preset's MLP is this many times the tiny expert width (a dense MLP is wider).
DENSE_MLP_FACTOR = 4


def preset_sizes(name: str, cfg: ModelConfig | None = None) -> TinyModelConfig | None:
    """The sizes of preset ``name`` (``tiny*``: ``cfg.tiny``; ``medium``: :data:`MEDIUM`), else None."""
    if name == "medium":
        return MEDIUM
    if name in PRESET_MODEL_TYPES:
        return cfg.tiny if cfg is not None else TinyModelConfig()
    return None


# Hub name -> file under ubsmoe/configs/models (public config.json values).
SHIPPED_CONFIGS = {
    "allenai/OLMoE-1B-7B-0924": "allenai--OLMoE-1B-7B-0924.json",
    "allenai/OLMo-1B-hf": "allenai--OLMo-1B-hf.json",
}


def shipped_config(name: str) -> dict[str, Any]:
    """The shipped ``config.json`` of ``name`` (a key of ``SHIPPED_CONFIGS``).

    Raises:
        KeyError: ``name`` is not shipped.
    """
    file = resources.files("ubsmoe") / "configs" / "models" / SHIPPED_CONFIGS[name]
    return json.loads(file.read_text(encoding="utf-8"))
