"""The final adapters of a run, written to ``checkpoints/adapter`` (plain PyTorch, no Flower).

One folder that plain transformers + PEFT load::

    model = AutoModelForCausalLM.from_pretrained(base)
    model = PeftModel.from_pretrained(model, "RUN_DIR/checkpoints/adapter")

- attention LoRA: PEFT ``target_modules`` (``q_proj k_proj v_proj o_proj``);
- per-expert LoRA: PEFT ``target_parameters`` on OLMoE's fused expert weights
  ``mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``mlp.experts.down_proj``
  ``[E, H, I]`` (PEFT's ``ParamWrapper``; see :func:`peft_expert_factors` for the
  layout);
- the trained router (``model.router_trainable``): PEFT ``modules_to_save`` on
  ``mlp.gate`` (the full ``W_r`` ``[E, H]`` of every layer);
- FLoRA / FLoRIST, whose updates are merged into the base weights: every merge
  ``B_i A_i`` (and any nonzero current adapter, its scale folded in) stacked into one
  LoRA of rank ``sum r_i`` with scaling 1, so the adapter on the *pretrained* base is
  exactly the merged model (:func:`stack_terms`).

LoRA experts on a dense model (``model.lora_experts``, beyond the papers): PEFT has
no way to say "M experts sharing one frozen MLP, each with its own LoRA, and a
router", so only the attention LoRA goes into the PEFT adapter (none at all without
``model.attention_lora``); the experts' LoRA (and, when trained, the routers) are
written under ubsmoe's names to ``lora_experts.safetensors`` (and
``router.safetensors``), ``ubsmoe_export.json`` and the model card say so, and
:func:`ubsmoe.load_run` rebuilds the full model.

PEFT cannot express K < native or UB-SMoE's DMR modulation phi: the plain-PEFT model
routes at the host's native top-k without phi. ``phi.safetensors`` keeps phi, and
:func:`ubsmoe.load_run` rebuilds the full model at any budget level. The folder also
holds ``router.safetensors`` / ``base_merges.safetensors`` under ubsmoe's own names
and a model card ``README.md`` (:func:`ubsmoe.fl.model_card.model_card`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ubsmoe.fl.model_card import RunInfo, model_card
from ubsmoe.methods.base import EXPERT_PARAM_RE, PHI_PARAM_RE, ROUTER_PARAM_RE
from ubsmoe.methods.rank_base import lora_pairs
from ubsmoe.models.adapters import lora_rank_scales
from ubsmoe.models.patching import is_lora_expert_model
from ubsmoe.models.runtime import smoe_layers

PEFT_PREFIX = "base_model.model."
# our per-expert LoRA module -> the OlmoeExperts parameter it adapts
EXPERT_TARGET = {"gate_up_lora": "gate_up_proj", "down_lora": "down_proj"}
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _hf_name(name: str) -> str:
    """Our model's name of a module/parameter -> the unpatched transformers model's."""
    return name.removeprefix(PEFT_PREFIX)


def lora_terms(adapters: dict[str, torch.Tensor], scale: float,
               base_merges: Sequence[tuple[str, dict[str, torch.Tensor]]] = ()
               ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]]:
    """Every low-rank update of every LoRA target, as ``(A, B, scale)`` terms.

    Args:
        adapters: the global adapters (PEFT attention names ``<m>.lora_A.<a>.weight``,
            per-expert ``<m>.gate_up_lora.A`` ...).
        scale: the adapters' LoRA scale ``alpha / r``.
        base_merges: ``[(merge id, {"<m>.A": A, "<m>.B": B})]`` (scale folded in, so
            the update is ``B @ A``), oldest first.

    Returns:
        ``{target: [(A, B, s), ...]}`` keyed by the transformers name of the adapted
        module (``model.layers.0.self_attn.q_proj``; update ``s B A``, A ``[r, in]``,
        B ``[out, r]``) or expert parameter (``model.layers.0.mlp.experts.gate_up_proj``;
        A ``[E, r, in]``, B ``[E, out, r]``, update ``s B[e] A[e]`` per expert). Merges
        come first in order; the current adapter comes last and is left out when its
        B is all zero and there are merges (FLoRA resets B after each merge).
    """
    def target(module: str) -> str:
        """PEFT's target name of one of our LoRA modules (fused expert parameters for experts)."""
        parent, _, child = _hf_name(module).rpartition(".")
        return f"{parent}.experts.{EXPERT_TARGET[child]}" if child in EXPERT_TARGET else f"{parent}.{child}"

    terms: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for _, factors in base_merges:
        for module in sorted({k.rpartition(".")[0] for k in factors}):
            terms.setdefault(target(module), []).append(
                (factors[f"{module}.A"], factors[f"{module}.B"], 1.0))
    pairs, _ = lora_pairs(list(adapters))
    for p in pairs:
        B = adapters[p.b]
        if base_merges and not B.any():
            terms.setdefault(target(p.module), [])
            continue
        terms.setdefault(target(p.module), []).append((adapters[p.a], B, scale))
    return terms


def stack_terms(terms: list[tuple[torch.Tensor, torch.Tensor, float]], rank: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA ``(A, B)`` of rank ``rank`` with ``B @ A = sum_i s_i B_i @ A_i`` (scaling 1).

    Exact: the ranks are concatenated (``A = [A_1; ...; A_n]``, ``B = [s_1 B_1 | ... |
    s_n B_n]``, as FLoRA's stacking, DESIGN.md section 5) and zero-padded to ``rank``.

    Args:
        terms: ``(A [.., r_i, in], B [.., out, r_i], s_i)``; at least one.
        rank: the output rank, ``>= sum r_i``.

    Returns:
        ``(A [.., rank, in], B [.., out, rank])`` in float32.

    Raises:
        ValueError: no terms, or ``rank < sum r_i``.
    """
    if not terms:
        raise ValueError("stack_terms: no terms")
    A = torch.cat([a.float() for a, _, _ in terms], dim=-2)
    B = torch.cat([b.float() * s for _, b, s in terms], dim=-1)
    pad = rank - A.shape[-2]
    if pad < 0:
        raise ValueError(f"stack_terms: rank {rank} < stacked rank {A.shape[-2]}")
    if pad:
        A = torch.cat([A, A.new_zeros((*A.shape[:-2], pad, A.shape[-1]))], dim=-2)
        B = torch.cat([B, B.new_zeros((*B.shape[:-1], pad))], dim=-1)
    return A, B


def peft_expert_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert LoRA ``A [E, r, in]``, ``B [E, out, r]`` -> PEFT ``ParamWrapper`` weights.

    PEFT (0.21, ``lora.ParamWrapper`` on a 3D ``[E, out, in]`` parameter, e.g.
    ``OlmoeExperts.gate_up_proj``) keeps ``lora_A.weight`` ``[E*r, in]``, read as
    ``[E, r, in]``, and ``lora_B.weight`` ``[out, r*E]``, read as ``[out, r, E]``;
    its delta is ``einsum("o r e, e r i -> e o i")`` times ``alpha / r``. So
    ``lora_A = A.reshape(E*r, in)`` and ``lora_B[o, r*E] = B[e, o, r]`` arranged
    ``[out, r, E]``: expert e's delta is ``B[e] @ A[e]``, exactly ours.

    Returns:
        ``(lora_A [E*r, in], lora_B [out, r*E])``, contiguous.
    """
    num_experts, rank, in_features = A.shape
    return (A.reshape(num_experts * rank, in_features).contiguous(),
            B.permute(1, 2, 0).reshape(B.shape[1], rank * num_experts).contiguous())


def peft_export(model: nn.Module, adapters: dict[str, torch.Tensor],
                base_merges: Sequence[tuple[str, dict[str, torch.Tensor]]], base_model: str):
    """The PEFT ``LoraConfig`` and saved state dict expressing the run's adapters.

    The PEFT wrapping (and so every key name) is PEFT's own: the unpatched
    transformers model is built on the ``meta`` device from ``model.config`` (no
    memory), wrapped with ``get_peft_model``, and its adapter state dict filled with
    our tensors; ``get_peft_model_state_dict`` then gives the saved names.

    Args:
        model: the server model (SMoE-patched, possibly PEFT-wrapped) holding ``adapters``.
        adapters: the global adapters (phi is not expressible and left out).
        base_merges: the method's merge history (FLoRA / FLoRIST).
        base_model: ``base_model_name_or_path``.

    Returns:
        ``(LoraConfig, {saved key: tensor}, info)``; ``info`` has ``r``, ``lora_alpha``,
        ``stacked`` (merges were stacked into one LoRA), ``router``, ``merges``, and
        for a model with LoRA experts ``lora_experts`` (``experts`` M, ``top_k``
        K_max, ``note``: what PEFT leaves out). With LoRA experts and no attention
        LoRA there is nothing PEFT can hold: ``(None, {}, info)`` with ``info["peft"]``
        False.

    Raises:
        ValueError: the model's LoRA modules disagree on (rank, scale), or a tensor
            has no place in the PEFT model.
    """
    # peft (seconds to import): only the PEFT export needs it, not the rounds
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper
    from peft.utils import ModulesToSaveWrapper, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    scales = lora_rank_scales(model)
    if len(scales) != 1:
        raise ValueError(f"export: the model's LoRA modules have different (rank, scale) {sorted(scales)}")
    (rank, scale), = scales
    terms = lora_terms(adapters, scale, base_merges)
    stacked = bool(base_merges)
    if stacked:  # one LoRA of rank max_target(sum r_i), scaling 1
        r = max(max((sum(a.shape[-2] for a, _, _ in t) for t in terms.values()), default=1), 1)
        alpha = float(r)
        factors = {k: stack_terms(t, r) if t else None for k, t in terms.items()}
    else:
        r, alpha = rank, rank * scale
        factors = {k: (t[0][0].float(), t[0][1].float()) for k, t in terms.items()}
    routers = {_hf_name(k).rpartition(".")[0] + ".gate": v for k, v in adapters.items()
               if ROUTER_PARAM_RE.search(k)}
    experts_info = {}
    if is_lora_expert_model(model):  # shared-MLP LoRA experts: no PEFT form (module docstring)
        layer = smoe_layers(model)[0]
        factors = {k: v for k, v in factors.items() if ".experts." not in k}
        routers = {}
        experts_info = {"lora_experts": {
            "experts": layer.num_experts, "top_k": layer.max_top_k,
            "note": ("PEFT cannot express LoRA experts sharing a frozen dense MLP: the PEFT adapter "
                     "holds the attention LoRA only; the experts' LoRA is in lora_experts.safetensors"
                     " (the routers in router.safetensors when trained, seeded from train.seed "
                     "otherwise); rebuild the full model with ubsmoe.load_run(RUN_DIR, budget=beta)")}}
    modules = sorted({k.rpartition(".")[2] for k, f in factors.items() if ".experts." not in k})
    params = sorted({"mlp.experts." + k.rpartition(".")[2] for k in factors if ".experts." in k})
    if experts_info and not modules:
        return None, {}, {"r": r, "lora_alpha": alpha, "stacked": stacked, "router": False,
                          "merges": len(base_merges), "peft": False, **experts_info}
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                        target_modules=modules or None, target_parameters=params or None,
                        modules_to_save=["mlp.gate"] if routers else None,
                        base_model_name_or_path=base_model)
    hf_config = copy.deepcopy(model.config)
    with torch.device("meta"), warnings.catch_warnings():
        # the meta model has no name_or_path (PEFT warns it renames the copy's base) and PEFT
        # reads transformers' deprecated `is_gradient_checkpointing`: neither concerns the export
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*", category=UserWarning)
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning)
        meta = get_peft_model(AutoModelForCausalLM.from_config(hf_config), copy.deepcopy(config))
    state: dict[str, torch.Tensor] = {}
    for name, module in meta.named_modules():
        hf = _hf_name(name)
        if isinstance(module, ModulesToSaveWrapper):
            state[f"{name}.modules_to_save.default.weight"] = routers.pop(hf)
        elif isinstance(module, ParamWrapper):
            parent = hf.replace(".base_layer", "")
            key = f"{parent}.{module.parameter_name}"
            pair = factors.pop(key)
            if pair is None:  # a module no merge touched: exact zero update
                E, out, inp = module.get_param().shape
                pair = (torch.zeros(E, r, inp), torch.zeros(E, out, r))
            la, lb = peft_expert_factors(*pair)
            state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"] = la, lb
        elif isinstance(module, LoraLayer):
            pair = factors.pop(hf)
            if pair is None:
                out, inp = module.get_base_layer().weight.shape
                pair = (torch.zeros(r, inp), torch.zeros(out, r))
            state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"] = pair
    if factors or routers:
        raise ValueError(f"export: no PEFT place for {sorted(factors)[:3] + sorted(routers)[:3]}")
    expected = get_peft_model_state_dict(meta)
    saved = get_peft_model_state_dict(meta, state_dict=state)
    if set(saved) != set(expected):
        raise ValueError(f"export: PEFT state keys differ: {sorted(set(expected) ^ set(saved))[:4]}")
    for k, v in saved.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"export {k}: shape {tuple(v.shape)}, PEFT expects {tuple(expected[k].shape)}")
    saved = {k: v.detach().to("cpu").contiguous() for k, v in saved.items()}
    info = {"r": r, "lora_alpha": alpha, "stacked": stacked, "router": bool(modules_to_save(config)),
            "merges": len(base_merges), "peft": True, **experts_info}
    return config, saved, info


def modules_to_save(config) -> list[str]:
    """The config's ``modules_to_save`` (empty list when None)."""
    return list(config.modules_to_save or [])


def export_adapters(model: nn.Module, adapters: dict[str, torch.Tensor],
                    base_merges: Sequence[tuple[str, dict[str, torch.Tensor]]], final: Path,
                    run: RunInfo | None = None) -> Path:
    """Write the final adapters as one folder plain transformers + PEFT load.

    Files: ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT, see
    :func:`peft_export`; absent for LoRA experts without attention LoRA),
    ``lora_experts.safetensors`` (LoRA experts on a dense model: every expert LoRA
    factor ``<layer>.mlp.gate_up_lora.A`` ``[M, r, H]`` ...), ``README.md`` (:func:`~ubsmoe.fl.model_card.model_card`, when ``run`` is given),
    and under ubsmoe's own names ``router.safetensors`` (``<layer>.mlp.router_weight``
    ``[E, H]`` float32, with ``model.router_trainable``), ``phi.safetensors``
    (``<layer>.mlp.phi`` ``[E]``, with DMR) and ``base_merges.safetensors``
    (FLoRA / FLoRIST: ``"<merge index>/<module>.A|B"``, update ``B @ A`` each).
    Written to a temporary folder and renamed, so a crash leaves no half adapter.

    Args:
        model: the server model holding ``adapters`` at the global rank.
        adapters: the global adapter tensors, name -> tensor.
        base_merges: the method's merge history ``[(merge id, factors)]``.
        final: the adapter folder to write (replaced when it exists).
        run: the model card's facts (None: ``base_model_name_or_path`` is the model's
            ``name_or_path`` and no card is written).

    Returns:
        ``final``.

    Raises:
        ValueError: see :func:`peft_export`.
    """
    # only the final export writes safetensors
    from safetensors.torch import save_file

    base = run.base_model if run is not None else str(getattr(model.config, "name_or_path", "") or "")
    config, state, info = peft_export(model, adapters, base_merges, base)
    tmp = final.with_name(".adapter.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if config is not None:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    if info.get("lora_experts"):  # the experts' LoRA, which PEFT cannot express
        save_file({k: v.contiguous() for k, v in adapters.items() if EXPERT_PARAM_RE.search(k)},
                  str(tmp / "lora_experts.safetensors"))
    routers = {k: v.contiguous() for k, v in adapters.items() if ROUTER_PARAM_RE.search(k)}
    if routers:  # model.router_trainable: the trained W_r [E, H] of every SMoE layer
        save_file(routers, str(tmp / "router.safetensors"))
    phi = {k: v.contiguous() for k, v in adapters.items() if PHI_PARAM_RE.search(k)}
    if phi:
        save_file(phi, str(tmp / "phi.safetensors"))
    if base_merges:  # FLoRA / FLoRIST: the merged base is the pretrained one plus these
        save_file({f"{i:04d}/{name}": t.contiguous() for i, (_, factors) in enumerate(base_merges)
                   for name, t in factors.items()}, str(tmp / "base_merges.safetensors"))
    if run is not None:
        (tmp / "README.md").write_text(model_card(run, info), encoding="utf-8")
    (tmp / "ubsmoe_export.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    if final.exists():
        old = final.with_name(".adapter.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final
