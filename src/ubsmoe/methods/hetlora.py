"""HetLoRA: heterogeneous-rank LoRA with truncation, self-pruning and sparsity weighting.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation
Models", EMNLP 2024 (arXiv 2401.06432). DESIGN.md section 5:

- distribution: a client of rank r_c gets the global rank-r_max factors truncated to
  r_c (:meth:`RankMethod.client_adapters`, in the effective space ``s B A``);
- local loss: the task loss plus the rank self-pruning regulariser
  ``lambda * ||B[:, k:]||_F * ||A[k:, :]||_F``, ``k = floor(gamma r_c)``, summed over
  every LoRA module (and every expert of a per-expert LoRA); it carries gradient
  into the trailing rank components;
- aggregation: each client's factors are brought to the global scale
  (``B_c * s_c / s_g``), zero-padded to r_max and averaged with sparsity weights
  ``S_c / sum S``, ``S_c = ||s_c B_c A_c||_F`` computed from the Gram matrices
  (never the dense product); uniform weights if every S_c = 0. A and B are averaged
  separately, as in the paper.

The client's rank stays its budget level's rank across rounds: the paper's optional
rank reduction after pruning is not applied (the regulariser is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ubsmoe.methods.base import ClientUpdate, register_method
from ubsmoe.methods.lowrank import hetlora_aggregate, hetlora_regularizer
from ubsmoe.methods.rank import (
    LoRARankConfig,
    RankMethod,
    client_factors,
    lora_pairs,
    map_experts,
    pair_rank,
)


@dataclass
class HetLoRAConfig(LoRARankConfig):
    """HetLoRA hyperparameters (ranks and alpha: see :class:`LoRARankConfig`).

    Attributes:
        gamma: kept fraction of the rank in the self-pruning regulariser; the tail
            ``[floor(gamma r), r)`` is penalised. In ``(0, 1]`` (1: no tail, no penalty).
        reg_lambda: coefficient lambda of the regulariser, ``>= 0`` (0: off): the
            penalty ``lambda * ||B[:, floor(gamma r):]|| * ||A[floor(gamma r):]||`` on
            every LoRA module.
    """

    section = "hetlora"

    gamma: float = 0.99
    reg_lambda: float = 1e-3

    def _check_extra(self) -> list[str]:
        errors = []
        if not (isinstance(self.gamma, (int, float)) and 0.0 < self.gamma <= 1.0):
            errors.append(f"hetlora.gamma: got {self.gamma!r}, expected a number in (0, 1]")
        if not (isinstance(self.reg_lambda, (int, float)) and math.isfinite(self.reg_lambda)
                and self.reg_lambda >= 0):
            errors.append(f"hetlora.reg_lambda: got {self.reg_lambda!r}, expected a number >= 0")
        return errors


@register_method("hetlora")
class HetLoRA(RankMethod):
    """Rank r_c per budget; truncated distribution, self-pruning loss, sparsity-weighted padding."""

    config_class = HetLoRAConfig

    def extra_loss(self, model: nn.Module, top_k: int) -> torch.Tensor | None:
        """Rank self-pruning regulariser summed over the model's trainable LoRA modules.

        Per module ``lambda * ||B[:, k:]||_F * ||A[k:, :]||_F`` with
        ``k = floor(gamma r)`` (:func:`~ubsmoe.methods.lowrank.hetlora_regularizer`);
        a per-expert LoRA adds one term per expert. Attached to the graph.

        Returns:
            Scalar tensor, or None when ``reg_lambda = 0`` or the model has no LoRA.
        """
        if self.config.reg_lambda == 0:
            return None
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        pairs, _ = lora_pairs(list(params))
        gamma, coef = self.config.gamma, self.config.reg_lambda
        terms = []
        for pair in pairs:
            A, B = params[pair.a], params[pair.b]
            if A.dim() == 3:  # [E, r, in] / [E, out, r]: one penalty per expert
                per_expert = torch.vmap(lambda a, b: hetlora_regularizer(a, b, gamma, coef))(A, B)
                terms.append(per_expert.sum())
            else:
                terms.append(hetlora_regularizer(A, B, gamma, coef))
        return torch.stack(terms).sum() if terms else None

    def aggregate(self, global_adapters: dict[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Zero-pad to the global rank and average with weights S_c / sum S, per module.

        Each client's B is first rescaled to the global scale (``B_c s_c / s_g``), so
        the padded factors share one scale; ``S_c`` (and so the weights) is computed
        per LoRA module (per expert for a per-expert LoRA). Non-LoRA tensors: FedAvg.

        Raises:
            ValueError: no updates, or a client's rank exceeds the global rank.
        """
        pairs, out = self._others(global_adapters, updates)
        for pair in pairs:
            r_g = pair_rank(global_adapters, pair)
            s_g = self.scale(r_g)
            As, Bs, ranks = client_factors(updates, pair)
            Bs = [B * (self.scale(r) / s_g) for B, r in zip(Bs, ranks, strict=True)]
            scales = [s_g] * len(updates)  # ||s_g B'_c A_c|| = ||s_c B_c A_c|| = S_c

            def agg(*factors, r_g=r_g, scales=scales):
                """One module (one expert): the clients' A's then B's -> global (A, B)."""
                n = len(scales)
                return hetlora_aggregate(list(factors[:n]), list(factors[n:]), scales, r_g)

            A, B = map_experts(agg, *As, *Bs)
            out[pair.a] = A.to(global_adapters[pair.a].dtype)
            out[pair.b] = B.to(global_adapters[pair.b].dtype)
        return out
