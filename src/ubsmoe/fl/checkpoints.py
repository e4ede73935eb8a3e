"""The server's persistence: round checkpoints and the final PEFT-loadable adapters (no Flower).

:class:`ServerCheckpoints` is part of :class:`~ubsmoe.fl.server.Server`; the run
directory's layout is :mod:`ubsmoe.fl.run_dir`, the adapter export :mod:`ubsmoe.fl.export`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ubsmoe.fl.export import export_adapters
from ubsmoe.fl.model_card import RunInfo
from ubsmoe.fl.run_dir import CHECKPOINT_DIR, prune_checkpoints
from ubsmoe.io import atomic_torch_save
from ubsmoe.models import load_adapter_state, set_top_k
from ubsmoe.models.adapters import set_lora_rank


class ServerCheckpoints:
    """The Server's round checkpoint, model-card facts and final adapter export.

    Uses the Server's ``cfg``, ``method``, ``model``, ``state``, ``run_dir``,
    ``global_lora``, ``k_max``, :meth:`sync_base`, :meth:`global_phi`,
    :meth:`level_lora` and :meth:`level_top_k`.
    """

    def checkpoint(self) -> Path:
        """Write ``checkpoints/round_XXXX.pt`` atomically and return its path.

        Then prunes older round checkpoints to ``fl.keep_checkpoints`` (see
        :func:`prune_checkpoints`); the one just written is always among those kept.
        """
        path = self.run_dir / CHECKPOINT_DIR / f"round_{self.state.round:04d}.pt"
        atomic_torch_save(path, self.state.state_dict())
        prune_checkpoints(self.run_dir, self.cfg.fl.keep_checkpoints)
        return path

    def run_info(self, accuracy: Sequence[dict[str, Any]] = ()) -> RunInfo:
        """The model card's facts: base model, method, budget levels (K_j, r_j), rounds, clients.

        Args:
            accuracy: the summary's accuracy rows for the card's table.
        """
        levels = [{"budget": beta, "top_k": k, "lora_rank": self.level_lora(j)[0]}
                  for j, (beta, k) in enumerate(self.level_top_k().items())]
        return RunInfo(base_model=self.cfg.model.name, random_base=self.cfg.model.resolved_init == "random",
                       method=self.cfg.method, levels=levels, rounds=self.state.round,
                       clients=self.cfg.fl.num_clients, fraction=self.cfg.fl.fraction,
                       seed=self.cfg.train.seed, accuracy=list(accuracy),
                       phi=self.global_phi() is not None)

    def save_adapters(self, accuracy: Sequence[dict[str, Any]] = ()) -> Path:
        """Save the final global adapters under ``checkpoints/adapter`` (see :func:`export_adapters`).

        The merged base and the global rank are restored first, so the exported
        adapter (plus, for FLoRA / FLoRIST, the stacked merges) is the global model.

        Args:
            accuracy: the summary's accuracy rows, for the model card.
        """
        self.sync_base()
        set_lora_rank(self.model, *self.global_lora, seed=self.cfg.train.seed + 1)
        load_adapter_state(self.model, self.state.adapters)
        set_top_k(self.model, self.k_max)
        return export_adapters(self.model, self.state.adapters, self.method.base_merges(),
                               self.run_dir / CHECKPOINT_DIR / "adapter", self.run_info(accuracy))

