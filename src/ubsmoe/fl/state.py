"""The server's round state: what a round checkpoint holds and ``--resume`` restores (plain PyTorch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ServerState:
    """Everything the server needs to resume: round index, global adapters, method state.

    Attributes:
        round: last completed round (0 before the first).
        adapters: global LoRA parameters, name -> tensor.
        train_loss: per completed round, the p_c-weighted mean client loss.
        method_state: the method's own state (:meth:`Method.state_dict`, e.g. FLoRA's
            base-weight merges).
        privacy_state: the DP accountant's state
            (:meth:`ubsmoe.core.accountant.PrivacyAccountant.state_dict`); empty when
            ``privacy.mode`` is off.
    """

    round: int
    adapters: dict[str, torch.Tensor]
    train_loss: list[dict[str, float]] = field(default_factory=list)
    method_state: dict[str, Any] = field(default_factory=dict)
    privacy_state: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data form for ``torch.save``."""
        out = {"round": self.round, "adapters": self.adapters, "train_loss": self.train_loss,
               "method_state": self.method_state}
        if self.privacy_state:
            out["privacy_state"] = self.privacy_state
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ServerState:
        """Inverse of :meth:`state_dict`.

        Raises:
            KeyError: a required entry is missing.
        """
        return cls(round=int(state["round"]), adapters=dict(state["adapters"]),
                   train_loss=list(state.get("train_loss", [])),
                   method_state=dict(state.get("method_state", {})),
                   privacy_state=dict(state.get("privacy_state", {})))
