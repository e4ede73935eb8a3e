"""A3SMoE on top of FlexLoRA: rank r_j and K_j at once, activation-weighted expert SVD.

Tran et al., "Revisiting Sparse Mixture of Experts for Resource-adaptive Federated
Fine-tuning Foundation Models" (ICLR 2025 workshop), section 4.2.2 / Fig. 3. A client
at budget level j trains LoRA rank ``ranks[j]`` (FlexLoRA's) AND ``K_j`` experts per
token (A3SMoE's). The server runs FlexLoRA's step (:class:`~ubsmoe.methods.flexlora.FlexLoRA`)
per LoRA module, with the client weights of expert i in layer l replaced by A3SMoE's
activation weights (:func:`~ubsmoe.methods.a3smoe.a3smoe_expert_weights`):

    dW_{l,i} = sum_c w_{c,l,i} s_c B_{c,i} A_{c,i} = U diag(S) V^T,   w from A3SMoE,

redistributed by SVD to each client's rank; attention LoRA keeps FlexLoRA's data
weights p_c, and an expert no participant routed a token to keeps its previous global
factors (as in A3SMoE). With ``gamma = 0`` the weights are p_c and this is FlexLoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ubsmoe.methods.a3smoe import A3SMOE_WEIGHTINGS, a3smoe_expert_weights
from ubsmoe.methods.aggregation import ClientUpdate
from ubsmoe.methods.base import expert_layer_of
from ubsmoe.methods.flexlora import FlexLoRA
from ubsmoe.methods.rank_base import LoRAPair, LoRARankConfig
from ubsmoe.methods.registry import register_method


@dataclass
class A3SMoEFlexLoRAConfig(LoRARankConfig):
    """Ranks and alpha (:class:`~ubsmoe.methods.rank_base.LoRARankConfig`) plus A3SMoE's weighting.

    Attributes:
        gamma: exponent on the normalised activation frequency (0: FlexLoRA's p_c,
            i.e. this method is FlexLoRA). A client at level j trains rank
            ``ranks[j]`` and K_j experts; FlexLoRA's SVD step runs per module with
            each expert's client weights replaced by A3SMoE's; an expert no
            participant used keeps its factors.
        weighting: ``flame`` or ``literal``, as for ``a3smoe``
            (:class:`~ubsmoe.methods.a3smoe.A3SMoEConfig`).
    """

    section: ClassVar[str] = "a3smoe_flexlora"
    gamma: float = 4.0
    weighting: str = "flame"

    def _check_extra(self) -> list[str]:
        """Errors of ``gamma`` (a number >= 0) and ``weighting``."""
        errors = []
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not self.gamma >= 0:
            errors.append(f"{self.section}.gamma: got {self.gamma!r}, expected a number >= 0")
        if self.weighting not in A3SMOE_WEIGHTINGS:
            errors.append(f"{self.section}.weighting: got {self.weighting!r}, expected one of "
                          f"{', '.join(A3SMOE_WEIGHTINGS)}")
        return errors


@register_method("a3smoe_flexlora")
class A3SMoEFlexLoRA(FlexLoRA):
    """Rank r_j and K_j per client; FlexLoRA's SVD step with A3SMoE's per-expert weights."""

    config_class = A3SMoEFlexLoRAConfig
    privacy_refusal = ("it merges full-rank products B_c A_c by SVD (as FlexLoRA) with "
                       "A3SMoE's per-client count weights")
    own_train_top_k: ClassVar[str] = "budget"  # K_j, as A3SMoE (FlexLoRA alone trains native)
    train_top_k_modes: ClassVar[tuple[str, ...]] = ("auto", "budget")
    needs_moe: ClassVar[bool] = True  # K_j per client: a sparse-MoE model (FlexLoRA alone runs dense)

    def module_weights(self, pair: LoRAPair, updates: Sequence[ClientUpdate],
                       p: torch.Tensor) -> torch.Tensor:
        """``[E, C]`` A3SMoE weights w_{c,l,i} for a per-expert module of layer l, else ``[C]`` p_c.

        An expert no participant used gets all-zero weights here; :meth:`aggregate`
        then keeps its previous global factors.
        """
        layer = expert_layer_of(list(updates[0].adapters)).get(pair.a)  # depth order of all layers
        if layer is None:
            return p
        w, _ = a3smoe_expert_weights(updates, self.config.gamma, self.config.weighting)  # [C, L, E]
        return w[:, layer, :].T.contiguous()  # [E, C]

    def aggregate(self, global_adapters: dict[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """FlexLoRA's aggregation with A3SMoE expert weights; unused experts keep their factors.

        Returns:
            The global adapters (rank max(ranks)), see the module docstring.

        Raises:
            ValueError: no updates.
        """
        out = super().aggregate(global_adapters, updates)
        _, used = a3smoe_expert_weights(updates, self.config.gamma, self.config.weighting)  # [L, E]
        for name, layer in expert_layer_of(list(global_adapters)).items():
            keep = ~used[layer]  # [E]
            if keep.any():
                out[name] = out[name].clone()
                out[name][keep] = global_adapters[name][keep]
        return out
