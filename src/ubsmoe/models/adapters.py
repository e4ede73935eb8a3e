"""Adapter state of a patched model: read and load the LoRA tensors, change the LoRA rank, merge into the base."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ubsmoe.core.lora import merge_into_weight
from ubsmoe.core.smoe import ExpertLoRA

# Frozen SMoELayer weight each per-expert LoRA adapts (same [E, out, in] layout as B @ A).
EXPERT_BASE_WEIGHT = {"gate_up_lora": "gate_up_proj", "down_lora": "down_proj"}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every trainable parameter (LoRA, phi, routers), keyed by parameter name.

    CPU whatever the model's device: this is what goes over the wire and into
    checkpoints.
    """
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (tensors on any device) into the model's trainable parameters, on their device.

    Raises:
        KeyError: a trainable parameter is missing from ``state`` or ``state`` has
            an unknown name.
        ValueError: a shape differs.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise KeyError(f"adapter state: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if p.shape != state[name].shape:
                raise ValueError(f"adapter state {name}: shape {tuple(state[name].shape)} != {tuple(p.shape)}")
            p.copy_(state[name])


# ----- LoRA rank and base-weight merges (heterogeneous-rank methods) -------------------
def _peft_lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers holding the ``default`` adapter, by module name."""
    # lazy: peft (imports transformers) takes seconds to import; only this path needs it
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and PEFT_ADAPTER in m.lora_A}


def _expert_loras(model: nn.Module) -> dict[str, ExpertLoRA]:
    """Per-expert LoRA modules, by module name (``...mlp.gate_up_lora`` / ``...mlp.down_lora``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertLoRA)}


def lora_rank_scales(model: nn.Module) -> set[tuple[int, float]]:
    """The distinct ``(rank, scale)`` pairs of the model's LoRA modules (attention and experts).

    ``scale = alpha / rank`` as PEFT and :class:`~ubsmoe.core.smoe.ExpertLoRA` compute it.
    """
    out = {(int(m.r[PEFT_ADAPTER]), float(m.scaling[PEFT_ADAPTER]))
           for m in _peft_lora_layers(model).values()}
    out |= {(m.rank, float(m.scale)) for m in _expert_loras(model).values()}
    return out


def set_lora_rank(model: nn.Module, rank: int, alpha: float, seed: int = 0) -> None:
    """Give every LoRA of the model (attention and per-expert) rank ``rank``, scale ``alpha / rank``.

    Heterogeneous-rank methods (HetLoRA, FlexLoRA, FLoRA, FLoRIST; DESIGN.md section 5)
    train a client of budget level beta at its own rank r_c on every LoRA module. A
    no-op when every LoRA already has this rank and alpha; otherwise each adapter is
    recreated with PEFT's own ``update_layer`` (attention; the PEFT config's ``r`` and
    ``lora_alpha`` are updated too, so a saved adapter states the new rank) and a new
    :class:`~ubsmoe.core.smoe.ExpertLoRA` (experts), PEFT-initialised (A
    Kaiming-uniform, B = 0) from ``seed``. Frozen weights are untouched. Callers load
    the factors they want with :func:`load_adapter_state` afterwards.

    Args:
        model: a model from :func:`build_model`.
        rank: new LoRA rank, ``>= 1``.
        alpha: LoRA alpha, ``> 0``.
        seed: seed of the new factors' initialisation (the global RNG is not touched).

    Raises:
        ValueError: ``rank < 1`` or ``alpha <= 0``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora rank: got {rank!r}, expected an integer >= 1")
    if not alpha > 0:
        raise ValueError(f"lora alpha: got {alpha!r}, expected a number > 0")
    if lora_rank_scales(model) <= {(rank, alpha / rank)}:
        return
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_layers = _peft_lora_layers(model)
        if peft_layers:

            lora_cfg = dataclasses.replace(model.peft_config[PEFT_ADAPTER], r=rank, lora_alpha=alpha)
            model.peft_config[PEFT_ADAPTER] = lora_cfg
            for layer in peft_layers.values():
                dtype = layer.lora_A[PEFT_ADAPTER].weight.dtype  # PEFT may keep LoRA in float32
                layer.update_layer(PEFT_ADAPTER, rank, alpha, config=lora_cfg)
                layer.lora_A[PEFT_ADAPTER].to(dtype)
                layer.lora_B[PEFT_ADAPTER].to(dtype)
        for name, old in _expert_loras(model).items():
            parent_name, _, child = name.rpartition(".")
            num_experts, _, in_features = old.A.shape
            with torch.device(old.A.device):
                new = ExpertLoRA(num_experts, in_features, old.B.shape[1], rank, alpha, old.A.dtype)
            setattr(model.get_submodule(parent_name), child, new)


def lora_base_weight(model: nn.Module, module_name: str) -> nn.Parameter:
    """The frozen weight the LoRA module ``module_name`` adapts.

    Args:
        model: a model from :func:`build_model`.
        module_name: a PEFT LoRA layer (``...self_attn.q_proj``; its base weight is
            ``[out, in]``) or a per-expert LoRA (``...mlp.gate_up_lora`` /
            ``...mlp.down_lora``; the SMoE layer's ``gate_up_proj [E, 2I, H]`` /
            ``down_proj [E, H, I]``, i.e. ``[E, out, in]``).

    Raises:
        KeyError: ``module_name`` is not a LoRA module of the model.
    """
    try:
        module = model.get_submodule(module_name)
    except AttributeError as e:
        raise KeyError(f"no LoRA module {module_name!r} in the model") from e
    if isinstance(module, ExpertLoRA):
        parent_name, _, child = module_name.rpartition(".")
        return getattr(model.get_submodule(parent_name), EXPERT_BASE_WEIGHT[child])
    if module_name in _peft_lora_layers(model):
        return module.get_base_layer().weight
    raise KeyError(f"{module_name!r} is not a LoRA module")


def merge_into_base(model: nn.Module, factors: dict[str, torch.Tensor]) -> None:
    """Add low-rank updates ``B @ A`` to frozen base weights in place (FLoRA / FLoRIST merge).

    Args:
        model: a model from :func:`build_model`.
        factors: ``"<module>.A"`` ``[r, in]`` (``[E, r, in]`` for per-expert LoRA) and
            ``"<module>.B"`` ``[out, r]`` (``[E, out, r]``) per LoRA module name (see
            :func:`lora_base_weight`), with any scale already folded in (the update is
            exactly ``B @ A``). Accumulated in at least float32, stored in the weight's
            dtype.

    Raises:
        KeyError: a module name is unknown or its ``.A`` / ``.B`` partner is missing.
        ValueError: shapes do not match the base weight.
    """
    modules = sorted({k.rpartition(".")[0] for k in factors})
    with torch.no_grad():
        for name in modules:
            A, B = factors[f"{name}.A"], factors[f"{name}.B"]
            weight = lora_base_weight(model, name)
            if weight.dim() == 3:  # [E, out, in]: W[e] += B[e] @ A[e], batched over experts
                if A.dim() != 3 or B.dim() != 3 or weight.shape != (A.shape[0], B.shape[1], A.shape[2]) \
                        or A.shape[:2] != (B.shape[0], B.shape[2]):
                    raise ValueError(f"merge {name}: A {tuple(A.shape)}, B {tuple(B.shape)} do not fit "
                                     f"{tuple(weight.shape)}")
                work = torch.promote_types(weight.dtype, torch.float32)  # as merge_into_weight
                weight.copy_(torch.baddbmm(weight.to(work), B.to(work), A.to(work)))
            else:
                weight.copy_(merge_into_weight(weight, A, B, 1.0))


PEFT_ADAPTER = "default"
