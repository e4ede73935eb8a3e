"""The run directory's layout and its round checkpoints (plain PyTorch, no Flower).

A run directory holds ``config.yaml`` (the resolved config), ``provenance.json`` (versions, git commit,
device, command; :mod:`ubsmoe.provenance`), ``tensorboard/`` (event files,
:mod:`ubsmoe.tracking`), ``metrics.jsonl`` (one
line per round, diagnostics and evaluation), ``summary.json`` and ``checkpoints/``:
``round_XXXX.pt`` (a :class:`ServerState`, enough to resume) and ``adapter/`` (the
final adapters, :mod:`ubsmoe.fl.export`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
PROVENANCE_FILE = "provenance.json"


@dataclass
class ServerState:
    """Everything the server needs to resume: round index, global adapters, method state.

    Attributes:
        round: last completed round (0 before the first).
        adapters: global LoRA parameters, name -> tensor.
        train_loss: per completed round, the p_c-weighted mean client loss.
        method_state: the method's own state (:meth:`Method.state_dict`, e.g. FLoRA's
            base-weight merges).
    """

    round: int
    adapters: dict[str, torch.Tensor]
    train_loss: list[dict[str, float]] = field(default_factory=list)
    method_state: dict[str, Any] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data form for ``torch.save``."""
        return {"round": self.round, "adapters": self.adapters, "train_loss": self.train_loss,
                "method_state": self.method_state}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ServerState:
        """Inverse of :meth:`state_dict`.

        Raises:
            KeyError: a required entry is missing.
        """
        return cls(round=int(state["round"]), adapters=dict(state["adapters"]),
                   train_loss=list(state.get("train_loss", [])),
                   method_state=dict(state.get("method_state", {})))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint file of a run directory, or None."""
    ckpts = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("round_*.pt"))
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``checkpoints/round_XXXX.pt`` of a run directory.

    Called only after a new checkpoint has been renamed into place (atomic write),
    so a crash at any point leaves at least one complete checkpoint for ``--resume``.
    The final adapters (``checkpoints/adapter``) are not round checkpoints and are
    never touched.

    Args:
        run_dir: the run directory.
        keep: how many of the newest round checkpoints to keep; 0 keeps all.

    Returns:
        The deleted paths, oldest first.
    """
    if keep <= 0:
        return []
    ckpts = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("round_*.pt"))
    doomed = ckpts[:-keep]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
