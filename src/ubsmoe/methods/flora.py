"""FLoRA: fresh LoRA every round, exact stacking aggregation, merge into the base weights.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024 (arXiv 2409.05976). DESIGN.md section 5:

- every round each client trains a freshly initialised LoRA at its rank r_c (A
  Kaiming-uniform from its per-round seed, B = 0) on top of the current base weights;
- the server stacks the clients' factors per LoRA module (per expert for a
  per-expert LoRA), ``A_st = vstack_c(p_c s_c A_c)``, ``B_st = hstack_c(B_c)``, so that
  ``B_st A_st = sum_c p_c s_c B_c A_c`` exactly, and merges it into the frozen base
  weights: ``W <- W + B_st A_st``;
- the next round starts from the merged base.

The merges are the method's state (:meth:`FLoRA.base_merges`, kept in checkpoints):
the server sends their history with every round and each model (the server's and
every client runtime's) applies the merges it has not applied yet, so a resumed run
or a client that missed rounds ends up on the same base. Every merge has an id
chaining a SHA-256 over the previous id and the factors' bytes.

The global adapters after a round hold B = 0 (the update lives in the base), so
every budget level evaluates the same merged model: FLoRA's per-budget accuracies
are equal by construction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ubsmoe.core.lora import stack_lora
from ubsmoe.methods.aggregation import ClientUpdate, data_weights
from ubsmoe.methods.rank_base import (
    LoRAPair,
    LoRARankConfig,
    RankMethod,
    client_factors,
    fresh_factors,
    lora_pairs,
    map_experts,
)
from ubsmoe.methods.registry import register_method


@dataclass
class FLoRAConfig(LoRARankConfig):
    """FLoRA hyperparameters: the client ranks and alpha (see :class:`LoRARankConfig`)."""

    section = "flora"


def merge_id(previous: str, factors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) over the previous merge id and the factors' names and bytes.

    Chaining makes the id name the whole merge history up to this merge.
    """
    h = hashlib.sha256(previous.encode())
    for name in sorted(factors):
        t = factors[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@register_method("flora")
class FLoRA(RankMethod):
    """Rank r_c per budget; fresh LoRA per round, stacked aggregation merged into the base."""

    config_class = FLoRAConfig
    privacy_refusal = ("FLoRA stacks each client's factors side by side, so each client's update "
                       "appears in the global adapters on its own, not inside a noised sum")

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._merges: list[tuple[str, dict[str, torch.Tensor]]] = []

    # ----- client side -------------------------------------------------------------
    def client_adapters(self, global_adapters: dict[str, torch.Tensor], rank: int,
                        seed: int) -> dict[str, torch.Tensor]:
        """A fresh rank-``rank`` LoRA: A Kaiming-uniform from ``seed``, B = 0, per module.

        Non-LoRA tensors are passed on unchanged.
        """
        gen = torch.Generator().manual_seed(int(seed))
        pairs, _ = lora_pairs(list(global_adapters))
        out = dict(global_adapters)
        for pair in pairs:
            out[pair.a], out[pair.b] = fresh_factors(global_adapters[pair.a],
                                                     global_adapters[pair.b], rank, gen)
        return out

    # ----- server side -------------------------------------------------------------
    def merge_factors(self, pair: LoRAPair, updates: Sequence[ClientUpdate],
                      weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The factors merged into one module's base weight this round.

        FLoRA: the exact stack ``A_st [.., R, in]``, ``B_st [.., out, R]``,
        ``R = sum_c r_c``, with ``B_st A_st = sum_c p_c s_c B_c A_c``.

        Args:
            pair: the LoRA module.
            updates: the round's client updates.
            weights: ``[C]`` data weights p_c.

        Returns:
            ``(A, B)`` with the scale folded in, or None to leave the module unchanged.
        """
        As, Bs, ranks = client_factors(updates, pair)
        scales = [self.scale(r) for r in ranks]
        n = len(updates)
        return map_experts(lambda *f: stack_lora(list(f[:n]), list(f[n:]), scales, weights),
                           *As, *Bs)

    def aggregate(self, global_adapters: dict[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """Record this round's merge (:meth:`merge_factors` per module) and reset the adapters.

        Returns:
            The global adapters with every B set to 0 (A unchanged; clients draw fresh
            factors anyway); non-LoRA tensors: FedAvg.

        Raises:
            ValueError: no updates.
        """
        pairs, out = self._others(global_adapters, updates)
        p = data_weights(updates)  # [C]
        factors: dict[str, torch.Tensor] = {}
        for pair in pairs:
            merged = self.merge_factors(pair, updates, p)
            if merged is not None:
                factors[f"{pair.module}.A"], factors[f"{pair.module}.B"] = merged
            out[pair.a] = global_adapters[pair.a]
            out[pair.b] = torch.zeros_like(global_adapters[pair.b])
        previous = self._merges[-1][0] if self._merges else ""
        self._merges.append((merge_id(previous, factors), factors))
        return out

    def base_merges(self) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """Every round's merge so far, oldest first (see :meth:`Method.base_merges`)."""
        return list(self._merges)

    def state_dict(self) -> dict[str, Any]:
        """``{"merges": [{"id": str, "factors": {name: tensor}}, ...]}``."""
        return {"merges": [{"id": mid, "factors": dict(f)} for mid, f in self._merges]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the merge history from :meth:`state_dict` (an empty dict clears it).

        Raises:
            KeyError: an entry lacks ``id`` or ``factors``.
        """
        self._merges = [(str(m["id"]), dict(m["factors"])) for m in state.get("merges", [])]
