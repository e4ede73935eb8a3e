"""Models (layer 3): get a host model, patch it with SMoE layers, and drive it at run time.

Modules: :mod:`~ubsmoe.models.presets` (random-weight presets, shipped configs),
:mod:`~ubsmoe.models.architecture` (model type and HF config, offline),
:mod:`~ubsmoe.models.families` (supported MoE and dense families),
:mod:`~ubsmoe.models.devices` (device and dtype), :mod:`~ubsmoe.models.tokenizer`,
:mod:`~ubsmoe.models.build` (build, load, LoRA placement), :mod:`~ubsmoe.models.patching`
(SMoE layers, LoRA experts), :mod:`~ubsmoe.models.runtime` (top-k, routing mask, step
statistics, activation checkpointing) and :mod:`~ubsmoe.models.adapters` (adapter state,
rank surgery, base merges). This package re-exports the names most callers use.
"""

from ubsmoe.core.smoe import ExpertLoRA, SMoELayer
from ubsmoe.models.adapters import adapter_state, load_adapter_state
from ubsmoe.models.build import build_model
from ubsmoe.models.devices import resolve_device, resolve_dtype
from ubsmoe.models.runtime import (
    routing_mask,
    set_activation_checkpointing,
    set_top_k,
    smoe_layers,
    step_stats,
)
from ubsmoe.models.tokenizer import train_tokenizer

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
