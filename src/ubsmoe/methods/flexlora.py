"""FlexLoRA: weighted full-update averaging with SVD redistribution to each client's rank.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks
and Client Resources", NeurIPS 2024 (arXiv 2402.11505). DESIGN.md section 5: per LoRA
module (per expert for a per-expert LoRA)

    dW = sum_c p_c s_c B_c A_c = U diag(S) V^T,
    a client of rank r gets  A = V_r^T,  B = U_r diag(S_r) / s_r,

with p_c the data-size weights and s = alpha / rank. The SVD is computed in factored
form (stack the clients' factors, QR both stacks, SVD the small core;
:func:`~ubsmoe.methods.lowrank.flexlora_aggregate`), so dW is never materialised.

The server keeps the rank-r_max redistribution (``A = V_{r_max}^T``,
``B = U_{r_max} diag(S) / s_{r_max}``) as its global adapters; a client of rank
r <= r_max receives its first r components rescaled to its own scale
(:meth:`RankMethod.client_adapters`), which is exactly ``A = V_r^T,
B = U_r diag(S_r) / s_r``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ubsmoe.methods.base import ClientUpdate, data_weights, register_method
from ubsmoe.methods.lowrank import flexlora_aggregate
from ubsmoe.methods.rank import (
    LoRAPair,
    LoRARankConfig,
    RankMethod,
    client_factors,
    map_experts,
    pair_rank,
)


@dataclass
class FlexLoRAConfig(LoRARankConfig):
    """FlexLoRA hyperparameters: the client ranks and alpha (see :class:`LoRARankConfig`)."""

    section = "flexlora"


@register_method("flexlora")
class FlexLoRA(RankMethod):
    """Rank r_c per budget; average s_c B_c A_c, factored SVD, redistribute to each rank."""

    config_class = FlexLoRAConfig

    def aggregate(self, global_adapters: dict[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Global rank-r_max factors of ``sum_c p_c s_c B_c A_c`` per LoRA module.

        Returns:
            The global adapters: per module ``A = V_{r_g}^T``, ``B = U_{r_g} diag(S) / s_g``
            with r_g the global adapters' rank (zero-padded past the update's rank);
            non-LoRA tensors: FedAvg.

        Raises:
            ValueError: no updates.
        """
        pairs, out = self._others(global_adapters, updates)
        p = data_weights(updates)  # [C]
        for pair in pairs:
            r_g = pair_rank(global_adapters, pair)
            As, Bs, ranks = client_factors(updates, pair)
            scales = [self.scale(r) for r in ranks]
            w = self.module_weights(pair, updates, p)  # [C], or [E, C] per expert

            def agg(*factors, r_g=r_g, scales=scales, w=w):
                """One module (one expert): the clients' A's then B's -> global (A, B)."""
                n = len(scales)
                [(A, B)] = flexlora_aggregate(list(factors[:n]), list(factors[n:]), scales, w,
                                              [r_g], [self.scale(r_g)])
                return A, B

            if w.dim() == 1:
                A, B = map_experts(agg, *As, *Bs)
            else:  # per-expert client weights: one FlexLoRA step per expert e with w[e]
                parts = [agg(*(t[e] for t in (*As, *Bs)), w=w[e]) for e in range(w.shape[0])]
                A, B = (torch.stack(x) for x in zip(*parts, strict=True))
            out[pair.a] = A.to(global_adapters[pair.a].dtype)
            out[pair.b] = B.to(global_adapters[pair.b].dtype)
        return out

    def module_weights(self, pair: LoRAPair, updates: Sequence[ClientUpdate],
                       p: torch.Tensor) -> torch.Tensor:
        """The client weights of one LoRA module in ``sum_c w_c s_c B_c A_c``.

        FlexLoRA weights every module by the data sizes p_c; a subclass may return
        per-expert weights ``[E, C]`` for a per-expert module (``a3smoe_flexlora``).

        Args:
            pair: the module's factor names.
            updates: the round's C client updates.
            p: ``[C]`` data-size weights p_c (sum 1).

        Returns:
            ``[C]`` (the same weights for every expert) or ``[E, C]``.
        """
        return p
