"""The final adapters of a run, written to ``checkpoints/adapter`` (plain PyTorch, no Flower)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ubsmoe.methods.base import ROUTER_PARAM_RE


def export_adapters(model: nn.Module, adapters: dict[str, torch.Tensor],
                    base_merges: Sequence[tuple[str, dict[str, torch.Tensor]]], final: Path) -> Path:
    """Save the final global adapters: attention LoRA in PEFT format, expert LoRA as safetensors.

    ``model`` must already hold ``adapters`` at the global rank (its PEFT attention
    LoRA is saved with ``save_pretrained``). With ``model.router_trainable`` the
    trained routers go to ``router.safetensors`` (``<layer>.mlp.router_weight``
    ``[E, H]`` float32, the model's parameter names).

    A method that merges into the base weights (FLoRA, FLoRIST) passes its merge
    factors, written to ``base_merges.safetensors`` (``"<merge index>/<module>.A|B"``,
    update ``B @ A`` each). Written to a temporary folder and renamed, so a crash
    leaves no half adapter.

    Args:
        model: the server model holding ``adapters``.
        adapters: the global adapter tensors, name -> tensor.
        base_merges: the method's merge history ``[(merge id, factors)]``.
        final: the adapter folder to write (replaced when it exists).

    Returns:
        ``final``.
    """
    from safetensors.torch import save_file

    tmp = final.with_name(".adapter.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if hasattr(model, "save_pretrained") and hasattr(model, "peft_config"):
        model.save_pretrained(tmp)  # PEFT: attention LoRA only (keys with "lora_")
    experts = {k: v.contiguous() for k, v in adapters.items() if "_lora." in k}
    save_file(experts, str(tmp / "expert_lora.safetensors"))
    routers = {k: v.contiguous() for k, v in adapters.items() if ROUTER_PARAM_RE.search(k)}
    if routers:  # model.router_trainable: the trained W_r [E, H] of every SMoE layer
        save_file(routers, str(tmp / "router.safetensors"))
    if base_merges:  # FLoRA / FLoRIST: the merged base is the pretrained one plus these
        save_file({f"{i:04d}/{name}": t.contiguous() for i, (_, factors) in enumerate(base_merges)
                   for name, t in factors.items()}, str(tmp / "base_merges.safetensors"))
    if final.exists():
        old = final.with_name(".adapter.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final
