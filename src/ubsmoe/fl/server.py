"""The per-round server logic (plain PyTorch, no Flower).

A round: server state (adapters, round index) -> per-client instruction (its K_c and
the global adapters) -> local training -> replies -> method aggregation, folded in
client-id order so a seeded run is reproducible whatever order replies arrive in ->
evaluation per budget level -> metrics appended to the run directory -> checkpoint.
The Flower ServerApp (:mod:`ubsmoe.fl.server_app`) only moves messages and calls
:class:`Server`.

The Server is assembled from one module per job: :mod:`ubsmoe.fl.state` (the round
state), :mod:`ubsmoe.fl.round` (outlier rejection, folding, the train record),
:mod:`ubsmoe.fl.round_diagnostics`, :mod:`ubsmoe.fl.evaluation`,
:mod:`ubsmoe.fl.declarations` (node declarations) and :mod:`ubsmoe.fl.checkpoints`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ubsmoe.budgets import assign_budgets, top_k_for_budget
from ubsmoe.config import RunConfig, save_config
from ubsmoe.core.privacy import counts_sensitivity
from ubsmoe.eval.instruction import task_metric
from ubsmoe.eval.loss import LOSS_ROW_KEYS
from ubsmoe.fl.checkpoints import ServerCheckpoints
from ubsmoe.fl.client_runtime import SharedSetup
from ubsmoe.fl.declarations import NodeDeclarations
from ubsmoe.fl.evaluation import ServerEvaluation
from ubsmoe.fl.fleet_server import FleetLevels
from ubsmoe.fl.fold import LeftOut, OrderedFold, RoundIncomplete
from ubsmoe.fl.privacy import ServerRelease, combined, finite_or_none, round_accountant
from ubsmoe.fl.round import fold_replies, reject_outliers, train_record
from ubsmoe.fl.round_diagnostics import RoundDiagnostics
from ubsmoe.fl.run_dir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    PROVENANCE_FILE,
    SUMMARY_FILE,
    latest_checkpoint,
)
from ubsmoe.fl.state import ServerState
from ubsmoe.fl.train import client_seed
from ubsmoe.io import append_jsonl, atomic_write_json, read_jsonl
from ubsmoe.methods import ClientUpdate, get_method_class
from ubsmoe.models import adapter_state, build_model, smoe_layers
from ubsmoe.models.adapters import set_lora_rank
from ubsmoe.provenance import provenance
from ubsmoe.tracking import RunTracker


class Server(NodeDeclarations, FleetLevels, RoundDiagnostics, ServerEvaluation, ServerCheckpoints):
    """Server side of a run: sampling, aggregation, evaluation, logging, checkpoints.

    Args:
        cfg: the run config.
        run_dir: the run directory (created).
        setup: data, tokenizer and partitions shared with the clients.
        resume: continue from the latest checkpoint in ``run_dir``.
        command: the invoking command line, for the run's provenance
            (``run_dir/provenance.json``, ``summary["provenance"]``); None: unknown.

    Raises:
        FileNotFoundError: ``resume`` without a checkpoint in ``run_dir``.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, setup: SharedSetup, resume: bool = False,
                 command: str | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.setup = setup
        self.method = get_method_class(cfg.method)(cfg.method_config)
        self.model, self.tokenizer = build_model(cfg.model, setup.tokenizer, seed=cfg.train.seed)
        self.method.prepare_model(self.model)
        self.method.set_robust(cfg.fl.aggregation, cfg.fl.trim_fraction)
        self.method.set_lora_scale(cfg.model.lora_scale_rule, cfg.model.lora_scale)
        self.model.eval()
        # The global adapters' (rank, alpha): the model's, or e.g. max(ranks) for HetLoRA.
        self.global_lora = self.method.global_lora(cfg.model.lora_rank, cfg.model.lora_alpha)
        set_lora_rank(self.model, *self.global_lora, seed=cfg.train.seed + 1)
        self._merged: list[str] = []  # ids of the method's base merges applied to self.model
        layers = smoe_layers(self.model)
        # A dense backbone has no experts: one MLP per token, so every level runs at K = 1.
        self.k_max = layers[0].max_top_k if layers else 1
        # (L, E): the shape of a client's expert_counts (checked on every reply); a dense
        # backbone sends [0, 0].
        self.counts_shape = (len(layers), layers[0].num_experts) if layers else (0, 0)
        self.budgets = assign_budgets(cfg.fl.num_clients, cfg.fl.budgets, cfg.fl.budget_pattern,
                                      cfg.train.seed)
        self.top_k = [self.level_top_k()[b] for b in self.budgets]
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
        # DP (privacy.mode on): the accountant over rounds, restored on resume.
        self.accountant = round_accountant(cfg, len(layers)) if cfg.privacy.enabled else None
        if self.accountant is not None and self.state.privacy_state:
            self.accountant.load_state_dict(self.state.privacy_state)
        self.last_eval: list[dict[str, Any]] = []
        self.last_diagnostics: dict[str, Any] = {}
        self.provenance = provenance(command, next(self.model.parameters()).device)
        atomic_write_json(self.run_dir / PROVENANCE_FILE, self.provenance)
        self.tracker = RunTracker(self.run_dir, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                                  wandb_project=cfg.log.wandb_project, config=cfg.to_dict(),
                                  start_round=self.state.round + 1)

        # client id -> what its node declared (deployment; empty: the config decides).
        self.declared: dict[int, dict[str, Any]] = {}
        self._tokenizer_files: dict[str, str] | None = None
        self._local_data: set[int] = set()  # clients training on their node's own data
        # Clients that choose their own level (fl.budget_pattern=auto, or a node's budget=auto).
        self.auto_clients: set[int] = set(range(cfg.fl.num_clients)) if cfg.fl.budget_pattern == "auto" else set()
        self._fleet_reset()

    def record(self, record: dict[str, Any]) -> None:
        """Append a metrics record to ``metrics.jsonl`` and its scalars to TensorBoard/W&B."""
        append_jsonl(self.run_dir / METRICS_FILE, record)
        self.tracker.log(record)

    # ----- round protocol ------------------------------------------------------
    def level_lora(self, level: int) -> tuple[int, float]:
        """``(rank, alpha)`` of the LoRA a client at budget level ``level`` (0-based) trains."""
        return self.method.client_lora(level, self.cfg.model.lora_rank, self.cfg.model.lora_alpha)

    def client_task(self, client_id: int, round_idx: int) -> dict[str, Any]:
        """What client ``client_id`` is sent for ``round_idx``.

        Returns:
            The keyword arguments of :meth:`~ubsmoe.fl.client_runtime.ClientRuntime.train_round`:
            ``client_id``, ``round_idx``, ``top_k`` (K_c), ``global_adapters`` (what the
            method gives a client of its LoRA rank), ``lora_rank``, ``lora_alpha`` and
            ``base_merges`` (the method's merge history).
        """
        # the level's (rank, alpha), or e.g. a HetLoRA client's self-pruned rank
        rank, alpha = self.method.current_lora(client_id, *self.lora[client_id])
        seed = client_seed(self.cfg.train.seed + 1, client_id, round_idx)
        return {
            "client_id": client_id,
            "round_idx": round_idx,
            "top_k": self.top_k[client_id],
            "global_adapters": self.method.client_adapters(self.state.adapters, rank, seed),
            "lora_rank": rank,
            "lora_alpha": alpha,
            "base_merges": self.method.base_merges(),
            **({"tokenizer_files": self.tokenizer_files()} if client_id in self._local_data else {}),
        }

    def sample_clients(self, round_idx: int) -> list[int]:
        """Client ids participating in ``round_idx`` (seeded; all when fraction = 1)."""
        n = self.cfg.fl.num_clients
        m = max(1, round(self.cfg.fl.fraction * n))
        if m >= n:
            return list(range(n))
        gen = torch.Generator().manual_seed(client_seed(self.cfg.train.seed, -1, round_idx))
        return sorted(torch.randperm(n, generator=gen)[:m].tolist())

    def required_replies(self, sampled: int) -> int:
        """Good replies a round of ``sampled`` clients needs to complete.

        ``max(fl.min_replies, ceil(fl.min_reply_fraction x sampled))``, at most ``sampled``.
        """
        fl = self.cfg.fl
        return min(sampled, max(fl.min_replies, math.ceil(fl.min_reply_fraction * sampled - 1e-9)))

    @property
    def buffers_replies(self) -> bool:
        """True when a round's replies are held together (norm check or robust aggregation on)."""
        return self.cfg.fl.reject_norm_multiple > 0 or self.cfg.fl.aggregation != "mean"

    def end_round(self, round_idx: int, updates: Iterable[ClientUpdate | LeftOut],
                  timings: dict[str, float] | None = None, clients: Sequence[int] | None = None,
                  round_start: float | None = None, attempt: int = 1) -> dict[str, Any]:
        """Aggregate the round's updates, log, evaluate when due, checkpoint.

        Updates are folded in client-id order as they come (``updates`` may be a
        generator yielding replies as they arrive); each one's adapters are dropped
        once folded. A :class:`~ubsmoe.fl.fold.LeftOut` item leaves its client out
        (logged under the record's ``failed``), and the result is the aggregate of
        the other replies alone. The round is committed (global adapters, method
        state, metrics, checkpoint) only once every participant is accounted for
        and at least :meth:`required_replies` replies are good; otherwise nothing
        changes but a ``round_incomplete`` metrics record.

        With ``fl.reject_norm_multiple`` > 0 or a robust ``fl.aggregation`` the
        replies are held until all are in (:attr:`buffers_replies`); a reply whose
        ``update_norm`` metric exceeds the multiple of the round's median is left out.

        Args:
            round_idx: 1-based round just trained.
            updates: replies (or :class:`~ubsmoe.fl.fold.LeftOut` markers) in any order.
            timings: optional extra wall-clock seconds to record.
            clients: the round's participants (default: the ids in ``updates``,
                which are then read all at once).
            round_start: epoch seconds when the round's messages were sent; with
                it, the record gets the round's wall time and the share of it spent
                neither in client work (``work_start``..``work_end`` metrics) nor in
                aggregation (``overhead_share``).

        Returns:
            The round's train metrics record.

        Raises:
            ValueError: no updates, an unexpected reply.
            RoundIncomplete: fewer good replies than :meth:`required_replies`.
        """
        if clients is None:
            updates = list(updates)
            clients = [u.client_id for u in updates]
        if not clients:
            raise ValueError(f"round {round_idx}: no client replied")
        facts = self._client_facts()  # the ranks the clients trained at (before HetLoRA prunes)
        release = self._release(round_idx)
        fold = OrderedFold(self.method.aggregator(self.state.adapters), clients)
        updates = self.screen_fleet(updates)  # budget=auto level reports, the simulated clock
        held = 0
        if self.buffers_replies:
            updates, held = reject_outliers(updates, self.cfg.fl.reject_norm_multiple)
        failed = fold_replies(fold, updates)
        self._require_replies(round_idx, fold, failed, len(clients), attempt)
        self.state.adapters = fold.result()
        self.state.method_state = self.method.state_dict()
        record = train_record(round_idx, fold, failed, facts, held, attempt, timings,
                              round_start, round_end=time.time())
        record.update(self.fleet_facts())
        if release is not None:
            record["privacy"] = finite_or_none({**combined(self.accountant.step()), **release.stats})
            self.state.privacy_state = self.accountant.state_dict()
        self.record(record)
        self.last_diagnostics = self.diagnostics(round_idx, fold.folded, release)
        self.record(self.last_diagnostics)
        self.state.round = round_idx
        self.commit_levels()  # levels budget=auto clients reported apply from their next round
        self.state.train_loss.append({"round": round_idx, "loss": record["loss"]})
        if self.eval_due(round_idx):
            start = time.time()
            self.last_eval = self.evaluate(round_idx)
            self.record({"type": "timing", "round": round_idx, "eval_s": time.time() - start})
        self.checkpoint()
        return record

    def _release(self, round_idx: int) -> ServerRelease | None:
        """Hand the method this round's DP release (None, and nothing set, when DP is off)."""
        if not self.cfg.privacy.enabled:
            return None
        num_layers, _ = self.counts_shape
        bound = counts_sensitivity(num_layers, self.k_max) if num_layers else 0.0
        release = ServerRelease(self.cfg.privacy, self.state.adapters, round_idx, bound)
        self.method.set_release(release)
        return release

    def _require_replies(self, round_idx: int, fold: OrderedFold, failed: list[LeftOut], sampled: int,
                         attempt: int) -> None:
        """Raise :class:`RoundIncomplete` (after a ``round_incomplete`` record) below :meth:`required_replies`."""
        needed = self.required_replies(sampled)
        if len(fold.folded) < needed:
            append_jsonl(self.run_dir / METRICS_FILE, {
                "type": "round_incomplete", "round": round_idx, "try": attempt,
                "replies": len(fold.folded), "needed": needed, "failed": [f.record() for f in failed]})
            raise RoundIncomplete(round_idx, len(fold.folded), needed, failed)

    def _client_facts(self) -> dict[int, dict[str, Any]]:
        """Client id -> ``budget``, ``lora_rank`` and (declared nodes) ``declared``, for the train record.

        ``lora_rank``: the rank the client is sent now (:meth:`Method.current_lora`: its
        level's, or a HetLoRA client's self-pruned rank).
        """
        return {c: {"budget": self.budgets[c], "lora_rank": self.method.current_lora(c, *self.lora[c])[0],
                    **({"declared": self.declared[c]["declared"]} if c in self.declared else {})}
                for c in range(len(self.budgets))}

    def evaluate_before_training(self) -> list[dict[str, Any]]:
        """Round 0: score every budget level before the first round (``eval.before_training``).

        Runs only on a fresh run (``state.round == 0``): the base model with the
        initial global adapters, each level at its K_j and rank r_j exactly as the
        final evaluation. The rows go to ``metrics.jsonl`` with ``round: 0`` (plus a
        ``timing`` record) and to the summary's ``initial_accuracy``.

        Returns:
            The rows of :meth:`score_levels` for round 0; empty when off or resumed.
        """
        if not self.cfg.eval.before_training or self.state.round != 0:
            return []
        start = time.time()
        rows = self.evaluate(0)
        self.record({"type": "timing", "round": 0, "eval_s": time.time() - start})
        return rows

    def eval_due(self, round_idx: int) -> bool:
        """True when ``round_idx`` is evaluated: the last round, or every ``eval.every_rounds``."""
        every = self.cfg.eval.every_rounds
        return round_idx == self.cfg.fl.rounds or bool(every and round_idx % every == 0)

    def level_top_k(self, mode: str | None = None) -> dict[float, int]:
        """K each budget level runs at: ``{beta: K}`` for ``fl.budgets``.

        Args:
            mode: ``auto``, ``budget`` or ``native`` (see :meth:`Method.client_top_k`);
                None: the training mode, ``train.top_k``.
        """
        mode = self.cfg.train.top_k if mode is None else mode
        return {beta: self.method.client_top_k(top_k_for_budget(beta, self.k_max, self.cfg.model.k_min),
                                               self.k_max, mode)
                for beta in self.cfg.fl.budgets}

    def summary(self) -> dict[str, Any]:
        """The run's summary (also written to summary.json by :meth:`finish`)."""
        data = self.setup.data
        tests = self.test_sets
        return {
            "method": self.cfg.method,
            "model": self.cfg.model.name,
            "rounds_completed": self.state.round,
            "train_top_k": self.cfg.train.top_k,
            "wall_time_s": time.time() - self.start_time,
            "clients": [
                {"id": c, "budget": b, "top_k": k, "lora_rank": r,
                 "train_examples": len(self.setup.partitions[c]),
                 **({"declared": self.declared[c]} if c in self.declared else {})}
                for c, (b, k, (r, _)) in enumerate(zip(self.budgets, self.top_k, self.lora))
            ],
            "data": {
                "data_dir": data.data_dir,
                "train_examples": len(data.train),
                "tasks_scored": sorted(tests),
                "skipped_tasks": data.skipped,
                "train_carved_from_test": data.carved,
                "duplicates_dropped": data.duplicates,
                "test_examples_scored": {t: len(r) for t, r in tests.items()},
                **self._data_summary(),
            },
            "train_loss": self.state.train_loss,
            "diagnostics": {k: v for k, v in self.last_diagnostics.items() if k != "type"},
            "accuracy": [summary_row(row) for row in self.last_eval],
            **({"initial_accuracy": self.initial_rows()} if self.cfg.eval.before_training else {}),
            "provenance": self.provenance,
            **({"privacy": self.privacy_summary()} if self.accountant is not None else {}),
        }

    def privacy_summary(self) -> dict[str, Any]:
        """``summary["privacy"]``: the settings and the accountant's epsilon after the rounds so far."""
        p = self.cfg.privacy
        return {"mode": p.mode, "noise_multiplier": p.noise_multiplier,
                "clipping_norm": p.clipping_norm, "counts_noise_multiplier": p.counts_noise_multiplier,
                "groups": list(p.groups), "seeded": p.seed is not None,
                **finite_or_none(combined(self.accountant.spent()))}

    def initial_rows(self) -> list[dict[str, Any]]:
        """The round-0 evaluation rows of this run (``metrics.jsonl``, so a resumed run has them too)."""
        path = self.run_dir / METRICS_FILE
        rows = read_jsonl(path) if path.is_file() else []
        return [summary_row(r) for r in rows if r.get("type") == "eval" and r.get("round") == 0]

    def _data_summary(self) -> dict[str, Any]:
        """Instruction data's summary keys: source name, answer types, metrics, partition, BERTScore."""
        if self.cfg.data.name != "instruction":
            return {}
        data = self.setup.data
        types = dict(data.answer_types)
        out: dict[str, Any] = {
            "name": "instruction",
            "answer_types": types,
            "task_metric": {t: task_metric(a, self.cfg.eval.text_metric) for t, a in types.items()},
            "partition_by": data.partition_by,
        }
        scorer = self.bertscore
        if scorer is not None:
            out["bertscore"] = {"model": scorer.model, "num_layers": scorer.num_layers,
                                **({"skipped": scorer.reason} if scorer.reason else {})}
            if scorer.reason:
                out["task_metric"] = {t: ("rouge_l" if m == "bertscore_f1" else m)
                                      for t, m in out["task_metric"].items()}
        return out

    def finish(self) -> dict[str, Any]:
        """Save the final adapters (model card with the summary's accuracy) and write summary.json."""
        summary = self.summary()
        self.save_adapters(summary["accuracy"])
        atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        self.tracker.close()
        return summary


def summary_row(row: dict[str, Any]) -> dict[str, Any]:
    """The keys of an evaluation row that ``summary.json`` keeps (``accuracy`` / ``initial_accuracy``)."""
    return {k: row[k] for k in ("round", "budget", "top_k", "top_k_mode", "lora_rank", "protocol",
                                "per_task", "average", "per_task_metric", "per_task_metrics",
                                *LOSS_ROW_KEYS, "utilization")
            if k in row}
