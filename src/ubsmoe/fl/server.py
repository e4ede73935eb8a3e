"""The per-round server logic (plain PyTorch, no Flower).

A round: server state (adapters, round index) -> per-client instruction (its K_c and
the global adapters) -> local training -> replies -> method aggregation, folded in
client-id order so a seeded run is reproducible whatever order replies arrive in ->
evaluation per budget level -> metrics appended to the run directory -> checkpoint.
The Flower ServerApp (:mod:`ubsmoe.fl.server_app`) only moves messages and calls
:class:`Server`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ubsmoe.config import RunConfig, save_config
from ubsmoe.fl.train import SharedSetup, client_seed, sync_base_merges
from ubsmoe.io import append_jsonl, atomic_torch_save, atomic_write_json
from ubsmoe.methods import ClientUpdate, get_method_class
from ubsmoe.methods.base import data_weights
from ubsmoe.models import adapter_state, build_model, load_adapter_state, set_top_k, smoe_layers
from ubsmoe.models.loading import set_lora_rank

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"


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


class Server:
    """Server side of a run: sampling, aggregation, evaluation, logging, checkpoints.

    Args:
        cfg: the run config.
        run_dir: the run directory (created).
        setup: data, tokenizer and partitions shared with the clients.
        resume: continue from the latest checkpoint in ``run_dir``.

    Raises:
        FileNotFoundError: ``resume`` without a checkpoint in ``run_dir``.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, setup: SharedSetup, resume: bool = False) -> None:
        from ubsmoe.data.partition import assign_budgets, top_k_for_budget

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.setup = setup
        self.method = get_method_class(cfg.method)(cfg.method_config)
        self.model, self.tokenizer = build_model(cfg.model, setup.tokenizer, seed=cfg.train.seed)
        self.model.eval()
        # The global adapters' (rank, alpha): the model's, or e.g. max(ranks) for HetLoRA.
        self.global_lora = self.method.global_lora(cfg.model.lora_rank, cfg.model.lora_alpha)
        set_lora_rank(self.model, *self.global_lora, seed=cfg.train.seed + 1)
        self._merged: list[str] = []  # ids of the method's base merges applied to self.model
        self.k_max = smoe_layers(self.model)[0].max_top_k
        self.budgets = assign_budgets(cfg.fl.num_clients, cfg.fl.budgets, cfg.fl.budget_pattern,
                                      cfg.train.seed)
        self.top_k = [
            self.method.client_top_k(top_k_for_budget(b, self.k_max, cfg.model.k_min), self.k_max)
            for b in self.budgets
        ]
        # (rank, alpha) of every client's LoRA, from its budget level.
        self.lora = [self.level_lora(cfg.fl.budgets.index(b)) for b in self.budgets]
        self.start_time = time.time()
        if resume:
            ckpt = latest_checkpoint(self.run_dir)
            if ckpt is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {self.run_dir / CHECKPOINT_DIR}")
            self.state = ServerState.from_state_dict(torch.load(ckpt, weights_only=True))
            self.method.load_state_dict(self.state.method_state)
        else:
            self.state = ServerState(round=0, adapters=adapter_state(self.model))
            save_config(cfg, self.run_dir / CONFIG_FILE)
        self.last_eval: list[dict[str, Any]] = []

    # ----- round protocol ------------------------------------------------------
    def level_lora(self, level: int) -> tuple[int, float]:
        """``(rank, alpha)`` of the LoRA a client at budget level ``level`` (0-based) trains."""
        return self.method.client_lora(level, self.cfg.model.lora_rank, self.cfg.model.lora_alpha)

    def client_task(self, client_id: int, round_idx: int) -> dict[str, Any]:
        """What client ``client_id`` is sent for ``round_idx``.

        Returns:
            The keyword arguments of :meth:`~ubsmoe.fl.train.ClientRuntime.train_round`:
            ``client_id``, ``round_idx``, ``top_k`` (K_c), ``global_adapters`` (what the
            method gives a client of its LoRA rank), ``lora_rank``, ``lora_alpha`` and
            ``base_merges`` (the method's merge history).
        """
        rank, alpha = self.lora[client_id]
        seed = client_seed(self.cfg.train.seed + 1, client_id, round_idx)
        return {
            "client_id": client_id,
            "round_idx": round_idx,
            "top_k": self.top_k[client_id],
            "global_adapters": self.method.client_adapters(self.state.adapters, rank, seed),
            "lora_rank": rank,
            "lora_alpha": alpha,
            "base_merges": self.method.base_merges(),
        }

    def sample_clients(self, round_idx: int) -> list[int]:
        """Client ids participating in ``round_idx`` (seeded; all when fraction = 1)."""
        n = self.cfg.fl.num_clients
        m = max(1, round(self.cfg.fl.fraction * n))
        if m >= n:
            return list(range(n))
        gen = torch.Generator().manual_seed(client_seed(self.cfg.train.seed, -1, round_idx))
        return sorted(torch.randperm(n, generator=gen)[:m].tolist())

    def end_round(self, round_idx: int, updates: Sequence[ClientUpdate],
                  timings: dict[str, float] | None = None) -> dict[str, Any]:
        """Aggregate the round's updates, log, evaluate when due, checkpoint.

        Args:
            round_idx: 1-based round just trained.
            updates: replies in any order; folded in client-id order.
            timings: optional wall-clock seconds of the round's phases.

        Returns:
            The round's train metrics record.

        Raises:
            ValueError: no updates.
        """
        if not updates:
            raise ValueError(f"round {round_idx}: no client replied")
        updates = sorted(updates, key=lambda u: u.client_id)
        t0 = time.time()
        self.state.adapters = self.method.aggregate(self.state.adapters, updates)
        self.state.method_state = self.method.state_dict()
        agg_s = time.time() - t0
        w = data_weights(updates)
        loss = float(sum(wc * u.loss for wc, u in zip(w.tolist(), updates)))
        record = {
            "type": "train",
            "round": round_idx,
            "loss": loss,
            "clients": [
                {"id": u.client_id, "top_k": u.top_k, "loss": u.loss, "examples": u.num_examples,
                 **u.metrics}
                for u in updates
            ],
            "aggregate_s": agg_s,
            **(timings or {}),
        }
        append_jsonl(self.run_dir / METRICS_FILE, record)
        self.state.round = round_idx
        self.state.train_loss.append({"round": round_idx, "loss": loss})
        every = self.cfg.eval.every_rounds
        if round_idx == self.cfg.fl.rounds or (every and round_idx % every == 0):
            self.last_eval = self.evaluate(round_idx)
        self.checkpoint()
        return record

    # ----- evaluation ------------------------------------------------------------
    @functools.cached_property
    def test_sets(self) -> dict[str, list[dict]]:
        """The seeded test subset scored per task (``eval.examples_per_task``), drawn once."""
        from ubsmoe.eval.commonsense import subsample

        return {task: subsample(recs, self.cfg.eval.examples_per_task, self.cfg.train.seed)
                for task, recs in self.setup.data.test.items()}

    def sync_base(self) -> None:
        """Merge the method's base-weight merges the server model does not hold yet.

        Raises:
            RuntimeError: the method's merge history no longer extends what the model holds.
        """
        if not sync_base_merges(self.model, self._merged, self.method.base_merges()):
            raise RuntimeError("server: the method's base merges do not extend the applied ones")

    def evaluate(self, round_idx: int) -> list[dict[str, Any]]:
        """Score the global model at every budget level's K and LoRA rank on every task.

        Level j is evaluated with the adapters a client of that level would hold
        (:meth:`Method.client_adapters` at its rank) on the merged base weights.
        Levels with equal (K, rank, alpha) share one evaluation, and so do levels
        whose adapters all have B = 0 (a zero update at any rank).

        Returns:
            One row per (budget level, protocol): ``budget``, ``top_k``, ``lora_rank``,
            ``protocol``, ``per_task`` accuracies, ``average`` and ``n`` (examples per task).
        """
        from ubsmoe.data.partition import top_k_for_budget
        from ubsmoe.eval.commonsense import evaluate_task
        from ubsmoe.methods.rank import lora_pairs

        self.sync_base()
        tests = self.test_sets
        by_key: dict[tuple, dict[str, dict[str, float]]] = {}
        rows = []
        seed = client_seed(self.cfg.train.seed + 1, -2, round_idx)
        for level, beta in enumerate(self.cfg.fl.budgets):
            k = self.method.client_top_k(top_k_for_budget(beta, self.k_max, self.cfg.model.k_min), self.k_max)
            rank, alpha = self.level_lora(level)
            adapters = self.method.client_adapters(self.state.adapters, rank, seed)
            pairs, _ = lora_pairs(list(adapters))
            zero = bool(pairs) and all(not adapters[p.b].any() for p in pairs)
            key = (k, None, None) if zero else (k, rank, alpha)
            if key not in by_key:
                set_lora_rank(self.model, rank, alpha, seed=self.cfg.train.seed + 1)
                load_adapter_state(self.model, adapters)
                set_top_k(self.model, k)
                by_key[key] = {
                    task: evaluate_task(self.model, self.tokenizer, task, recs, self.cfg.eval.protocols,
                                        self.cfg.eval.batch_size, self.cfg.eval.max_new_tokens)
                    for task, recs in tests.items()
                }
            scores = by_key[key]
            for protocol in self.cfg.eval.protocols:
                per_task = {t: s[protocol] for t, s in scores.items()}
                row = {
                    "type": "eval",
                    "round": round_idx,
                    "budget": beta,
                    "top_k": k,
                    "lora_rank": rank,
                    "protocol": protocol,
                    "per_task": per_task,
                    "average": sum(per_task.values()) / max(len(per_task), 1),
                    "n": {t: int(s["n"]) for t, s in scores.items()},
                }
                append_jsonl(self.run_dir / METRICS_FILE, row)
                rows.append(row)
        return rows

    # ----- persistence -----------------------------------------------------------
    def checkpoint(self) -> Path:
        """Write ``checkpoints/round_XXXX.pt`` atomically and return its path."""
        path = self.run_dir / CHECKPOINT_DIR / f"round_{self.state.round:04d}.pt"
        atomic_torch_save(path, self.state.state_dict())
        return path

    def save_adapters(self) -> Path:
        """Save the final global adapters: attention LoRA in PEFT format, expert LoRA as safetensors.

        A method that merges into the base weights (FLoRA, FLoRIST) also writes its merge
        factors, ``base_merges.safetensors`` (``"<merge index>/<module>.A|B"``, update
        ``B @ A`` each). Written to a temporary folder and renamed, so a crash leaves no
        half adapter.
        """
        import os
        import shutil

        from safetensors.torch import save_file

        self.sync_base()
        set_lora_rank(self.model, *self.global_lora, seed=self.cfg.train.seed + 1)
        load_adapter_state(self.model, self.state.adapters)
        final = self.run_dir / CHECKPOINT_DIR / "adapter"
        tmp = self.run_dir / CHECKPOINT_DIR / ".adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if hasattr(self.model, "save_pretrained") and hasattr(self.model, "peft_config"):
            self.model.save_pretrained(tmp)  # PEFT: attention LoRA only (keys with "lora_")
        experts = {k: v.contiguous() for k, v in self.state.adapters.items() if "_lora." in k}
        save_file(experts, str(tmp / "expert_lora.safetensors"))
        merges = self.method.base_merges()
        if merges:  # FLoRA / FLoRIST: the merged base is the pretrained one plus these
            save_file({f"{i:04d}/{name}": t.contiguous() for i, (_, factors) in enumerate(merges)
                       for name, t in factors.items()}, str(tmp / "base_merges.safetensors"))
        if final.exists():
            old = final.with_name(".adapter.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        return final

    def summary(self) -> dict[str, Any]:
        """The run's summary (also written to summary.json by :meth:`finish`)."""
        data = self.setup.data
        tests = self.test_sets
        return {
            "method": self.cfg.method,
            "model": self.cfg.model.name,
            "rounds_completed": self.state.round,
            "wall_time_s": time.time() - self.start_time,
            "clients": [
                {"id": c, "budget": b, "top_k": k, "lora_rank": r,
                 "train_examples": len(self.setup.partitions[c])}
                for c, (b, k, (r, _)) in enumerate(zip(self.budgets, self.top_k, self.lora))
            ],
            "data": {
                "data_dir": data.data_dir,
                "train_examples": len(data.train),
                "tasks_scored": sorted(tests),
                "skipped_tasks": data.skipped,
                "train_carved_from_test": data.carved,
                "test_examples_scored": {t: len(r) for t, r in tests.items()},
            },
            "train_loss": self.state.train_loss,
            "accuracy": [
                {k: row[k] for k in ("round", "budget", "top_k", "lora_rank", "protocol", "per_task",
                                     "average")}
                for row in self.last_eval
            ],
        }

    def finish(self) -> dict[str, Any]:
        """Save the final adapters and write summary.json; return the summary."""
        self.save_adapters()
        summary = self.summary()
        atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        return summary
