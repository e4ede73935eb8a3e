"""FLoRIST: FLoRA's stacking with a factored SVD and an energy threshold on the global rank.

Ramesh and Dass, "FLoRIST: Singular Value Thresholding for Efficient and Accurate
Federated Fine-Tuning of Large Language Models", arXiv 2506.09199. DESIGN.md
section 5: each round follows FLoRA (fresh client LoRA at rank r_c, merge into the
base weights; :mod:`ubsmoe.methods.flora`), but per LoRA module (per expert for a
per-expert LoRA) the server

    stacks  B_st A_st = sum_c p_c s_c B_c A_c            (never formed densely)
    SVDs it in factored form  = U diag(S) V^T            (two QRs and a small SVD)
    keeps   k = min{k : sum_{i<=k} S_i^2 / sum S^2 >= tau}
    sends   A = V_k^T,  B = U_k diag(S_k)                (the same for every client)

and every model merges ``B A`` into its base. A zero update (every S_i = 0, e.g. no
client moved B off zero) has k = 0 and leaves the module unchanged. In a per-expert
LoRA each expert gets its own k; the experts' factors are zero-padded to the
largest k (the padding adds nothing to ``B A``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ubsmoe.methods.base import ClientUpdate, register_method
from ubsmoe.methods.flora import FLoRA
from ubsmoe.methods.lowrank import florist_aggregate, pad_lora
from ubsmoe.methods.rank import LoRAPair, LoRARankConfig, client_factors


@dataclass
class FLoRISTConfig(LoRARankConfig):
    """FLoRIST hyperparameters (ranks and alpha: see :class:`LoRARankConfig`).

    Attributes:
        tau: energy threshold in ``(0, 1]`` choosing the global rank per module
            (1 keeps every non-zero singular value: FLoRA's exact update).
    """

    section = "florist"

    tau: float = 0.9

    def _check_extra(self) -> list[str]:
        if not (isinstance(self.tau, (int, float)) and 0.0 < self.tau <= 1.0):
            return [f"florist.tau: got {self.tau!r}, expected a number in (0, 1]"]
        return []


@register_method("florist")
class FLoRIST(FLoRA):
    """Rank r_c per budget; FLoRA's stack thresholded to energy tau by a factored SVD."""

    config_class = FLoRISTConfig

    def merge_factors(self, pair: LoRAPair, updates: Sequence[ClientUpdate],
                      weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rank-k factors of the stacked update, k chosen by the energy threshold.

        Returns:
            ``(A [.., k, in], B [.., out, k])`` with ``B A`` the rank-k part of
            ``sum_c p_c s_c B_c A_c`` (k per expert, zero-padded to the largest), or
            None when the module's update is zero.
        """
        As, Bs, ranks = client_factors(updates, pair)
        scales = [self.scale(r) for r in ranks]
        tau = self.config.tau
        if As[0].dim() == 2:
            A, B, k = florist_aggregate(As, Bs, scales, weights, tau, 1.0)
            return (A, B) if k > 0 else None
        per_expert = [florist_aggregate([A[e] for A in As], [B[e] for B in Bs], scales, weights,
                                        tau, 1.0) for e in range(As[0].shape[0])]
        k_max = max(k for _, _, k in per_expert)
        if k_max == 0:
            return None
        padded = [pad_lora(A, B, k_max) for A, B, _ in per_expert]
        return torch.stack([a for a, _ in padded]), torch.stack([b for _, b in padded])
