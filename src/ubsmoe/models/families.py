"""Model families: which Hugging Face architectures the SMoE patch and the dense path support.

One registry entry per sparse-MoE family (:data:`MOE_FAMILIES`) says what
:func:`~ubsmoe.models.patching.patch_smoe` needs to replace the host's sparse-MoE
block by an :class:`~ubsmoe.core.smoe.SMoELayer` with the host's exact routing:

- the host block class (router at ``block.gate`` with ``weight [E, H]`` and
  ``top_k``; experts at ``block.experts`` with fused ``gate_up_proj [E, 2I, H]``,
  ``down_proj [E, H, I]`` and ``act_fn``: the transformers >= 5 layout of every
  family here);
- the gate convention: softmax over all E logits in float32, top-k of the
  probabilities, then renormalised over the k selected experts exactly when the
  family says so (Mixtral always; OLMoE, Qwen2-MoE, Qwen3-MoE when
  ``config.norm_topk_prob``);
- a shared expert (Qwen2-MoE): a dense SwiGLU MLP every token runs, scaled by
  ``sigmoid(shared_expert_gate(x))`` and added to the routed output; it is kept as
  the host module and gets an ordinary PEFT LoRA on its projections;
- the family's own load-balancing loss (``load_balancing_loss_func`` of its
  transformers modeling module; SMoE-LLB calls it at top-k = K_c);
- the config keys of the expert count and the expert width.

Dense backbones (:data:`DENSE_FAMILIES`: OLMo, Llama, Mistral) have no MoE block:
LoRA goes on the attention and MLP projections through PEFT and only the
LoRA-based methods (fedit and the rank methods) run on them, unless
``model.lora_experts = M > 0`` turns each MLP into M LoRA experts sharing its frozen
weights (:func:`ubsmoe.models.patching.patch_lora_experts`; beyond the papers), on
which the SMoE methods run too (SMoE-LLB then uses OLMoE's Switch-Transformer
``load_balancing_loss_func``).

Adding a family is one entry here plus one row of the test table
(``tests/models/test_families.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class MoEFamily:
    """What the SMoE patch needs to know about one sparse-MoE architecture.

    Attributes:
        model_type: Hugging Face ``model_type`` (``config.json``).
        module: the transformers modeling module (``transformers.models.X.modeling_X``).
        block_class: the host sparse-MoE block's class name in ``module``.
        config_class: the ``PretrainedConfig`` class name (in ``transformers``).
        model_class: the causal-LM class name (in ``transformers``).
        num_experts_key: config key of E (``num_experts`` or ``num_local_experts``).
        expert_size_key: config key of the expert intermediate size I.
        always_norm_topk: the router always renormalises the top-k weights (Mixtral);
            otherwise the router's ``norm_topk_prob`` (from the config) decides.
        shared_expert: the block has a dense shared expert with a sigmoid gate
            (``block.shared_expert``, ``block.shared_expert_gate``).
        shared_expert_size_key: config key of the shared expert's intermediate size.
        preset_norm_topk: ``norm_topk_prob`` of this family's tiny preset (the
            convention of its released checkpoints).
    """

    model_type: str
    module: str
    block_class: str
    config_class: str
    model_class: str
    num_experts_key: str
    expert_size_key: str
    always_norm_topk: bool = False
    shared_expert: bool = False
    shared_expert_size_key: str = ""
    preset_norm_topk: bool = False

    def block_type(self) -> type[nn.Module]:
        """The host sparse-MoE block class (imported from transformers)."""
        return getattr(importlib.import_module(self.module), self.block_class)

    def norm_topk_prob(self, block: nn.Module) -> bool:
        """Whether the host ``block`` renormalises its top-k gate weights."""
        return True if self.always_norm_topk else bool(block.gate.norm_topk_prob)

    def load_balancing_loss(self) -> Callable:
        """The family's ``load_balancing_loss_func(gate_logits, num_experts, top_k, mask)``."""
        return importlib.import_module(self.module).load_balancing_loss_func

    def config_cls(self) -> type:
        """The family's ``PretrainedConfig`` class."""
        # lazy: transformers takes seconds to import; only this path needs it
        import transformers

        return getattr(transformers, self.config_class)

    def model_cls(self) -> type:
        """The family's causal-LM class."""
        # lazy: transformers takes seconds to import; only this path needs it
        import transformers

        return getattr(transformers, self.model_class)


MOE_FAMILIES: dict[str, MoEFamily] = {
    f.model_type: f for f in (
        MoEFamily("olmoe", "transformers.models.olmoe.modeling_olmoe", "OlmoeSparseMoeBlock",
                  "OlmoeConfig", "OlmoeForCausalLM", "num_experts", "intermediate_size"),
        MoEFamily("mixtral", "transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock",
                  "MixtralConfig", "MixtralForCausalLM", "num_local_experts", "intermediate_size",
                  always_norm_topk=True, preset_norm_topk=True),
        MoEFamily("qwen2_moe", "transformers.models.qwen2_moe.modeling_qwen2_moe",
                  "Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "num_experts",
                  "moe_intermediate_size", shared_expert=True,
                  shared_expert_size_key="shared_expert_intermediate_size"),
        MoEFamily("qwen3_moe", "transformers.models.qwen3_moe.modeling_qwen3_moe",
                  "Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "num_experts",
                  "moe_intermediate_size", preset_norm_topk=True),
    )
}


@dataclass(frozen=True)
class DenseFamily:
    """A dense decoder-only backbone: LoRA via PEFT on attention and MLP projections.

    Attributes:
        model_type: Hugging Face ``model_type``.
        config_class: the ``PretrainedConfig`` class name (in ``transformers``).
        model_class: the causal-LM class name (in ``transformers``).
        mlp_modules: names of the dense MLP's projections (PEFT LoRA targets).
    """

    model_type: str
    config_class: str
    model_class: str
    mlp_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

    def config_cls(self) -> type:
        """The family's ``PretrainedConfig`` class."""
        # lazy: transformers takes seconds to import; only this path needs it
        import transformers

        return getattr(transformers, self.config_class)

    def model_cls(self) -> type:
        """The family's causal-LM class."""
        # lazy: transformers takes seconds to import; only this path needs it
        import transformers

        return getattr(transformers, self.model_class)


DENSE_FAMILIES: dict[str, DenseFamily] = {
    f.model_type: f for f in (
        DenseFamily("olmo", "OlmoConfig", "OlmoForCausalLM"),
        DenseFamily("llama", "LlamaConfig", "LlamaForCausalLM"),
        DenseFamily("mistral", "MistralConfig", "MistralForCausalLM"),
    )
}


def family(model_type: str) -> MoEFamily | DenseFamily:
    """The registry entry of ``model_type``.

    Raises:
        ValueError: an unsupported ``model_type`` (one line listing the supported ones).
    """
    if model_type in MOE_FAMILIES:
        return MOE_FAMILIES[model_type]
    if model_type in DENSE_FAMILIES:
        return DENSE_FAMILIES[model_type]
    raise ValueError(f"model_type: got {model_type!r}, expected one of "
                     f"{', '.join([*MOE_FAMILIES, *DENSE_FAMILIES])}")


def is_dense(model_type: str) -> bool:
    """True for a supported dense backbone (no sparse-MoE block)."""
    return model_type in DENSE_FAMILIES


def moe_family_of(model: nn.Module) -> MoEFamily | None:
    """The MoE family of a (possibly PEFT-wrapped) model from its config, None if dense/unknown."""
    config = getattr(model, "config", None)
    return MOE_FAMILIES.get(getattr(config, "model_type", None))


def check_lora_experts(num_experts: int, top_k: int, dense: bool, model: str) -> None:
    """Validate LoRA experts (``model.lora_experts`` = M, ``model.lora_experts_top_k`` = K_max).

    M = 0 (off) is always valid. Shared by the FLOP calculator and the model patch,
    which both take M and K_max directly (the config checks them first for runs).

    Args:
        num_experts: M.
        top_k: K_max.
        dense: the model is a dense backbone (:data:`DENSE_FAMILIES`).
        model: the model's description in the message (e.g. ``tiny (olmoe)``).

    Raises:
        ValueError: M > 0 on a sparse-MoE model, M < 0, or K_max outside ``[1, M]``
            (one line naming the field).
    """
    if num_experts == 0:
        return
    if not dense:
        raise ValueError(f"model.lora_experts: got {num_experts}, expected 0 for the sparse-MoE model "
                         f"{model}; LoRA experts are for dense backbones")
    if num_experts < 0:
        raise ValueError(f"model.lora_experts: got {num_experts}, expected an integer >= 0 (0: off)")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"model.lora_experts_top_k: got {top_k}, expected an integer in [1, {num_experts}]")


def dense_refusal(method: str, model_name: str) -> str:
    """The one-line refusal of an SMoE method on a dense backbone."""
    return (f"method {method} needs a sparse-MoE model; model {model_name} is dense "
            "(methods that run on a dense model: fedit, hetlora, flexlora, flora, florist; "
            "or give it LoRA experts with model.lora_experts=M)")
