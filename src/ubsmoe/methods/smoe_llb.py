"""SMoE-LLB: heterogeneous K_c plus the host model's load-balancing loss, FedAvg.

The load-balancing baseline of UB-SMoE ("Universally Balanced Sparse
Mixture-of-Experts for Resource-Adaptive Federated Fine-Tuning of Foundation
Models", ICML 2026, arXiv 2605.16690), DESIGN.md section 5. Each client adds the
host model's own auxiliary loss, computed at its own top-k = K_c: the
``load_balancing_loss_func`` of the host family's transformers modeling module
(:meth:`ubsmoe.models.families.MoEFamily.load_balancing_loss`; OLMoE, Mixtral,
Qwen2-MoE and Qwen3-MoE all use the same definition; a dense model with LoRA experts,
``model.lora_experts``, has no family loss and uses OLMoE's). For OLMoE that is
the Switch-Transformer loss (Fedus et al., 2022, eqs. 4-6) as transformers
implements it, ``M * sum_i f_i * P_i`` over all SMoE layers' tokens (f_i: share of
top-K_c assignments, P_i: mean router probability), with coefficient 0.01 (OLMoE's
``router_aux_loss_coef``). The loss is transformers' own
``load_balancing_loss_func``, not a re-implementation.

The load-balancing loss is a per-batch statistic (f_i and P_i are batch means).
With gradient accumulation (``train.grad_accumulation_steps > 1``) it is computed
per micro-batch, as transformers computes it per forward, and averaged over the
step's micro-batches; it is therefore not identical to the full batch's value.
Under activation checkpointing the recomputed forward keeps no router logits, so
each micro-batch's loss is taken once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ubsmoe.errors import ConfigError
from ubsmoe.methods.base import Method
from ubsmoe.methods.registry import register_method
from ubsmoe.models.families import MOE_FAMILIES, moe_family_of
from ubsmoe.models.runtime import smoe_layers


@dataclass
class SMoELLBConfig:
    """SMoE-LLB hyperparameters.

    Attributes:
        aux_loss_coef: coefficient of the host model's load-balancing loss,
            computed at top-k = K_c (OLMoE: 0.01), >= 0.

    Raises:
        ConfigError: ``aux_loss_coef`` negative.
    """

    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:

        if not self.aux_loss_coef >= 0:
            raise ConfigError(
                f"smoe_llb.aux_loss_coef: got {self.aux_loss_coef!r}, expected a number >= 0"
            )


def load_balancing_loss(model: nn.Module, top_k: int) -> torch.Tensor:
    """The host model's load-balancing loss at top-k = ``top_k`` from the last forward.

    Uses the host family's transformers ``load_balancing_loss_func``
    (:mod:`ubsmoe.models.families`; a model whose family is unknown falls back to
    OLMoE's) on the router logits every SMoE layer kept (``keep_router_logits``; real tokens only, so no attention mask
    is needed: the HF function with a mask averages over the same tokens).

    Returns:
        Scalar float32 loss, differentiable w.r.t. whatever the router logits
        depend on.

    Raises:
        ValueError: the model has no SMoE layer or a layer kept no router logits.
    """
    load_balancing_loss_func = (moe_family_of(model) or MOE_FAMILIES["olmoe"]).load_balancing_loss()
    layers = smoe_layers(model)
    logits = tuple(m.router_logits_out for m in layers)
    if not layers or any(x is None for x in logits):
        raise ValueError("load_balancing_loss: no router logits kept; call prepare_model first")
    return load_balancing_loss_func(logits, layers[0].num_experts, top_k, None)


@register_method("smoe_llb")
class SMoELLB(Method):
    """Per-client K_c, the task loss plus ``aux_loss_coef`` x load-balancing loss, FedAvg."""

    config_class = SMoELLBConfig
    privacy_modes = ("central", "local")  # the load-balancing loss is local

    def prepare_model(self, model: nn.Module) -> None:
        """Make every SMoE layer keep its router logits for the auxiliary loss."""
        for layer in smoe_layers(model):
            layer.keep_router_logits = True

    def extra_loss(self, model: nn.Module, top_k: int) -> torch.Tensor | None:
        """``aux_loss_coef * load_balancing_loss(model, K_c)``."""
        return self.config.aux_loss_coef * load_balancing_loss(model, top_k)
