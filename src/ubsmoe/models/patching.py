"""Patch a host model: its sparse-MoE blocks become SMoE layers, or a dense MLP a mixture of LoRA experts."""

from __future__ import annotations

import torch
from torch import nn

from ubsmoe.core.smoe import SMoELayer
from ubsmoe.models.families import DENSE_FAMILIES, check_lora_experts, is_dense, moe_family_of
from ubsmoe.models.runtime import smoe_layers


def patch_smoe(model: nn.Module, lora_rank: int, lora_alpha: float) -> list[SMoELayer]:
    """Replace every host sparse-MoE block in ``model`` by an :class:`SMoELayer`.

    The host family comes from ``model.config.model_type``
    (:data:`ubsmoe.models.families.MOE_FAMILIES`). The new layer reuses the block's
    router and expert tensors (frozen), its top-k and its top-k renormalisation
    convention, keeps a shared expert and its gate (Qwen2-MoE) as the host modules,
    and adds per-expert LoRA. Returns the new layers in depth order.

    Raises:
        ValueError: the model is not a supported sparse-MoE family, has no MoE block,
            or uses Mixtral's router jitter (``router_jitter_noise > 0``), which the
            SMoE layer does not reproduce.
    """
    fam = moe_family_of(model)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if fam is None:
        raise ValueError(f"model: {model_type!r} is not a sparse-MoE family the SMoE patch supports")
    block_type = fam.block_type()
    layers: list[SMoELayer] = []
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, block_type)]
    if not targets:
        raise ValueError(f"model: no {fam.block_class} found to patch")
    for name, block in targets:
        if getattr(block, "jitter_noise", 0.0):
            raise ValueError(f"model: router_jitter_noise = {block.jitter_noise}, expected 0 "
                             "(the SMoE layer routes without jitter)")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        # LoRA factors, phi and the routing counters are allocated on the experts' device.
        with torch.device(block.experts.gate_up_proj.device):
            layer = SMoELayer(
                router_weight=block.gate.weight,
                gate_up_proj=block.experts.gate_up_proj,
                down_proj=block.experts.down_proj,
                act_fn=block.experts.act_fn,
                top_k=block.gate.top_k,
                norm_topk_prob=fam.norm_topk_prob(block),
                lora_rank=lora_rank,
                lora_alpha=lora_alpha,
                shared_expert=block.shared_expert if fam.shared_expert else None,
                shared_expert_gate=block.shared_expert_gate if fam.shared_expert else None,
            )
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


def patch_lora_experts(model: nn.Module, num_experts: int, top_k: int, lora_rank: int,
                       lora_alpha: float, seed: int = 0) -> list[SMoELayer]:
    """Replace every dense MLP by an :class:`SMoELayer` of LoRA experts sharing its frozen weights.

    Beyond the papers (docs/data-and-models.md, "Mixture of LoRA experts on a dense model"). Each
    decoder layer's SwiGLU MLP (``model.layers[i].mlp``: ``gate_proj`` ``[I, H]``,
    ``up_proj`` ``[I, H]``, ``down_proj`` ``[H, I]``, ``act_fn``) becomes an SMoE layer
    of ``num_experts`` = M experts. Every expert's frozen weights are the MLP's:
    ``gate_up_proj = cat([gate, up]).expand(M, 2I, H)`` and
    ``down_proj = down.expand(M, H, I)`` are stride-0 views (one copy of the MLP,
    not M); the experts differ only by their own :class:`~ubsmoe.core.smoe.ExpertLoRA`.
    A new router ``W_r`` ``[M, H]`` is drawn from ``N(0, initializer_range^2)`` with a
    CPU generator seeded by ``seed`` (the same on every device), and the top-K gate
    weights are renormalised (``norm_topk_prob=True``): they sum to 1, so with zero
    LoRA the layer computes ``sum_i g_i MLP(x) = MLP(x)``, the dense model, at any K.
    Compute: a token runs the frozen MLP once per selected expert (K MLP passes plus
    K LoRA passes plus the router, :func:`ubsmoe.metrics.flops.training_flops_per_token`).

    Build the model on its target device and dtype first: the views share the MLP's
    storage, and nothing here copies them (a later ``model.to`` to another device or
    dtype would materialise M copies).

    Args:
        model: a dense causal LM (:data:`ubsmoe.models.families.DENSE_FAMILIES`),
            possibly PEFT-wrapped with LoRA on its attention only.
        num_experts: M >= 0 (0: off, nothing patched).
        top_k: K_max, the experts a token runs at budget 1, in ``[1, M]``.
        lora_rank, lora_alpha: the experts' LoRA rank and alpha.
        seed: seed of the routers (every layer's drawn in depth order).

    Returns:
        The new layers in depth order.

    Raises:
        ValueError: the model is not a dense family, has no such MLP, its MLP has
            biases (``mlp_bias``), or M / K_max are out of range.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    check_lora_experts(num_experts, top_k, model_type in DENSE_FAMILIES, repr(model_type))
    if num_experts == 0:  # off: nothing to patch
        return []
    names = DENSE_FAMILIES[model_type].mlp_modules  # gate, up, down
    targets = [(name, mod) for name, mod in model.named_modules()
               if name.rpartition(".")[2] == "mlp" and all(isinstance(getattr(mod, n, None), nn.Linear)
                                                           for n in names)]
    if not targets:
        raise ValueError(f"model: no dense MLP with {', '.join(names)} found to patch")
    std = float(getattr(model.config, "initializer_range", 0.02))
    generator = torch.Generator().manual_seed(seed)
    layers: list[SMoELayer] = []
    for name, mlp in targets:
        gate, up, down = (getattr(mlp, n) for n in names)
        if any(p.bias is not None for p in (gate, up, down)):
            raise ValueError("model: MLP projections with biases (mlp_bias) are not supported by LoRA experts")
        weight = gate.weight
        router = torch.empty(num_experts, weight.shape[1]).normal_(0.0, std, generator=generator)  # [M, H]
        gate_up = torch.cat([gate.weight.detach(), up.weight.detach()], 0)  # [2I, H], one copy
        parent_name, _, child = name.rpartition(".")
        with torch.device(weight.device):
            layer = SMoELayer(
                router_weight=router.to(weight.device, weight.dtype),
                gate_up_proj=gate_up.unsqueeze(0).expand(num_experts, -1, -1),  # [M, 2I, H], stride 0
                down_proj=down.weight.detach().unsqueeze(0).expand(num_experts, -1, -1),  # [M, H, I]
                act_fn=mlp.act_fn,
                top_k=top_k,
                norm_topk_prob=True,
                lora_rank=lora_rank,
                lora_alpha=lora_alpha,
            )
        setattr(model.get_submodule(parent_name), child, layer)
        layers.append(layer)
    return layers


def is_lora_expert_model(model: nn.Module) -> bool:
    """True for a dense backbone whose MLPs were replaced by LoRA experts (:func:`patch_lora_experts`)."""
    return is_dense_model(model) and bool(smoe_layers(model))


def distinct_numel(t: torch.Tensor) -> int:
    """Elements a tensor really holds: a stride-0 (expanded) dimension counts once.

    ``numel()`` of a LoRA-expert layer's ``gate_up_proj`` ``[M, 2I, H]`` (a stride-0
    view of one ``[2I, H]`` weight) is M times its storage; this is ``2I * H``. Works
    on the meta device (no storage to compare there).
    """
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n


def is_dense_model(model: nn.Module) -> bool:
    """True for a dense backbone (no SMoE layer is or will be patched in)."""
    return is_dense(getattr(model.config, "model_type", ""))
