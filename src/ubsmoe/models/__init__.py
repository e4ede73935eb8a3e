"""Models: device and dtype, loading (checkpoint or random weights), the SMoE layer, expert LoRA."""

from ubsmoe.models.loading import (
    adapter_state,
    build_model,
    load_adapter_state,
    resolve_device,
    resolve_dtype,
    routing_mask,
    set_activation_checkpointing,
    set_top_k,
    smoe_layers,
    step_stats,
    train_tokenizer,
)
from ubsmoe.models.smoe import ExpertLoRA, SMoELayer

__all__ = [
    "ExpertLoRA",
    "SMoELayer",
    "adapter_state",
    "build_model",
    "load_adapter_state",
    "resolve_device",
    "resolve_dtype",
    "routing_mask",
    "set_activation_checkpointing",
    "set_top_k",
    "smoe_layers",
    "step_stats",
    "train_tokenizer",
]
