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
import logging
import math
import statistics
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ubsmoe.config import RunConfig, save_config
from ubsmoe.fl.export import RunInfo, export_adapters
from ubsmoe.fl.fold import LeftOut, OrderedFold, RoundIncomplete, union_seconds
from ubsmoe.fl.run_dir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    PROVENANCE_FILE,
    SUMMARY_FILE,
    ServerState,
    latest_checkpoint,
    prune_checkpoints,
)
from ubsmoe.fl.train import SharedSetup, client_seed, sync_base_merges
from ubsmoe.fl.validate import norm_outliers
from ubsmoe.io import append_jsonl, atomic_torch_save, atomic_write_json
from ubsmoe.methods import ClientUpdate, get_method_class
from ubsmoe.methods.base import (
    data_weights,
    phi_layer_of,
    round_utilization,
)
from ubsmoe.models import adapter_state, build_model, load_adapter_state, set_top_k, smoe_layers
from ubsmoe.models.loading import set_lora_rank
from ubsmoe.provenance import provenance
from ubsmoe.tracking import RunTracker


class Server:
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
        from ubsmoe.data.partition import assign_budgets

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.setup = setup
        self.method = get_method_class(cfg.method)(cfg.method_config)
        self.model, self.tokenizer = build_model(cfg.model, setup.tokenizer, seed=cfg.train.seed)
        self.method.prepare_model(self.model)
        self.method.set_robust(cfg.fl.aggregation, cfg.fl.trim_fraction)
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

    def record(self, record: dict[str, Any]) -> None:
        """Append a metrics record to ``metrics.jsonl`` and its scalars to TensorBoard/W&B."""
        append_jsonl(self.run_dir / METRICS_FILE, record)
        self.tracker.log(record)

    def declare_nodes(self, declarations: dict[int, Any],
                      node_ids: dict[int, int] | None = None) -> dict[int, dict[str, Any]]:
        """Use what each client's node declared (:mod:`ubsmoe.budgets`) instead of the config.

        A node's budget declaration (``budget=``, ``top-k=``, ``lora-rank=``) replaces
        the level ``fl.budget_pattern`` gave its client (K_c and LoRA rank follow
        the level); a node without one keeps it. Clients whose node has its own
        data are sent the server's tokenizer. With at least one declaration a
        ``{"type": "nodes", "clients": [...]}`` record (client -> node, declared key
        and value, level, budget, K, rank, data, device) is appended to
        metrics.jsonl and kept for the summary. Call before the first round.

        Args:
            declarations: client id -> :class:`~ubsmoe.budgets.NodeDeclaration`.
            node_ids: client id -> Flower node id (names the node in errors and the log).

        Returns:
            client id -> the logged entry, for the clients whose node declared a budget.

        Raises:
            DeclarationError: a declaration the run cannot use (one line naming the
                node, the key and the allowed values).
        """
        from ubsmoe.budgets import declared_level

        budgets = list(self.cfg.fl.budgets)
        level_k = [self.level_top_k()[b] for b in budgets]
        ranks = getattr(self.method.config, "ranks", None)
        ranks = list(ranks) if ranks is not None and len(ranks) == len(budgets) else None
        rows = []
        for client, decl in sorted(declarations.items()):
            node = (node_ids or {}).get(client)
            label = f"{node} (client {client})" if node is not None else f"of client {client}"
            level = declared_level(decl, label, self.cfg.method, budgets, level_k, ranks)
            if decl.data_path is not None:
                self._local_data.add(client)
            if level is not None:
                beta = budgets[level]
                self.budgets[client] = beta
                self.top_k[client] = level_k[level]
                self.lora[client] = self.level_lora(level)
                self.declared[client] = {"declared": decl.budget_key, "value": decl.budget_value,
                                         "level": level, **({"node": node} if node is not None else {})}
            if level is not None or decl.data_path is not None or decl.device is not None:
                rows.append({"id": client, **self.declared.get(client, {}),
                             "budget": self.budgets[client], "top_k": self.top_k[client],
                             "lora_rank": self.lora[client][0],
                             **({"data_path": decl.data_path} if decl.data_path else {}),
                             **({"device": decl.device} if decl.device else {})})
        if rows:
            append_jsonl(self.run_dir / METRICS_FILE, {"type": "nodes", "clients": rows})
        return {c: self.declared[c] for c in self.declared}

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
            **({"tokenizer_files": self.tokenizer_files()} if client_id in self._local_data else {}),
        }

    def tokenizer_files(self) -> dict[str, str]:
        """The server's tokenizer as files (cached), for nodes with their own data."""
        from ubsmoe.fl.train import tokenizer_to_files

        if self._tokenizer_files is None:
            self._tokenizer_files = tokenizer_to_files(self.tokenizer)
        return self._tokenizer_files

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
        fold = OrderedFold(self.method.aggregator(self.state.adapters), clients)
        failed: list[LeftOut] = []
        held = 0
        if self.buffers_replies:
            items = list(updates)
            good = [u for u in items if isinstance(u, ClientUpdate)]
            held = len(good)
            norms = [u.metrics.get("update_norm", 0.0) for u in good]
            outliers = set(norm_outliers(norms, self.cfg.fl.reject_norm_multiple))
            if outliers:
                median = statistics.median(norms)
                items = [LeftOut(u.client_id, f"update norm {norms[i]:.4g} > {self.cfg.fl.reject_norm_multiple:g}"
                                              f" x the round's median {median:.4g}") if i in outliers else u
                         for i, u in enumerate(good)] + [u for u in items if isinstance(u, LeftOut)]
            updates = sorted(items, key=lambda u: u.client_id)
        for update in updates:
            if isinstance(update, LeftOut):
                failed.append(update)
                fold.skip(update.client_id)
            else:
                fold.add(update)
        for cid in [c for c in fold.expected[fold.position:] if c not in fold.pending]:
            failed.append(LeftOut(cid, "no reply"))
            fold.skip(cid)
        needed = self.required_replies(len(clients))
        if len(fold.folded) < needed:
            append_jsonl(self.run_dir / METRICS_FILE, {
                "type": "round_incomplete", "round": round_idx, "try": attempt,
                "replies": len(fold.folded), "needed": needed, "failed": [f.record() for f in failed]})
            raise RoundIncomplete(round_idx, len(fold.folded), needed, failed)
        self.state.adapters = fold.result()
        self.state.method_state = self.method.state_dict()
        round_end = time.time()
        folded = fold.folded
        w = data_weights(folded)
        loss = float(sum(wc * u.loss for wc, u in zip(w.tolist(), folded)))
        work = [(u.metrics.pop("work_start"), u.metrics.pop("work_end")) for u in folded
                if "work_start" in u.metrics and "work_end" in u.metrics]
        record = {
            "type": "train",
            "round": round_idx,
            "loss": loss,
            "clients": [
                {"id": u.client_id, "top_k": u.top_k, "budget": self.budgets[u.client_id],
                 "lora_rank": self.lora[u.client_id][0], "loss": u.loss, "examples": u.num_examples,
                 **({"declared": self.declared[u.client_id]["declared"]}
                    if u.client_id in self.declared else {}),
                 **u.metrics}
                for u in folded
            ],
            "failed": sorted((f.record() for f in failed), key=lambda f: f["client"]),
            "try": attempt,
            "aggregate_s": fold.fold_s,
            "max_buffered_replies": max(fold.max_buffered, held),
            **(timings or {}),
        }
        if round_start is not None:
            wall = round_end - round_start
            busy = union_seconds(work + fold.intervals)
            record.update({"round_wall_s": wall, "overhead_s": max(wall - busy, 0.0),
                           "overhead_share": max(wall - busy, 0.0) / wall if wall > 0 else 0.0})
        self.record(record)
        self.last_diagnostics = self.diagnostics(round_idx, folded)
        self.record(self.last_diagnostics)
        self.state.round = round_idx
        self.state.train_loss.append({"round": round_idx, "loss": loss})
        every = self.cfg.eval.every_rounds
        if round_idx == self.cfg.fl.rounds or (every and round_idx % every == 0):
            start = time.time()
            self.last_eval = self.evaluate(round_idx)
            self.record({"type": "timing", "round": round_idx, "eval_s": time.time() - start})
        self.checkpoint()
        return record

    # ----- diagnostics -----------------------------------------------------------
    def global_phi(self) -> torch.Tensor | None:
        """The global DMR modulation ``[L, E]`` (None when the method has no phi)."""
        layer_of = phi_layer_of(list(self.state.adapters))
        if not layer_of:
            return None
        return torch.stack([self.state.adapters[n] for n in sorted(layer_of, key=layer_of.get)])

    @functools.cached_property
    def probe_batch(self) -> dict[str, torch.Tensor]:
        """The fixed PG-alignment probe batch: ``eval.pg_probe_examples`` seeded training examples.

        Returns:
            ``input_ids`` / ``attention_mask`` / ``labels``, each ``[batch, seq]``, on
            the server model's device.
        """
        from ubsmoe.data.commonsense import collate, tokenize_example

        train = self.setup.data.train
        gen = torch.Generator().manual_seed(client_seed(self.cfg.train.seed, -2, 0))
        idx = torch.randperm(len(train), generator=gen)[:self.cfg.eval.pg_probe_examples].tolist()
        examples = [tokenize_example(self.tokenizer, train[i], self.cfg.data.max_length) for i in idx]
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in collate(examples, self.tokenizer.pad_token_id).items()}

    def diagnostics(self, round_idx: int, updates: Sequence[ClientUpdate]) -> dict[str, Any]:
        """Utilization, phi and PG-alignment diagnostics of a round (DESIGN.md section 6).

        Returns:
            A ``"type": "diagnostics"`` metrics record: the round's global
            utilization u~ ``[L, E]``, its entropy (per layer, mean, variance across
            layers) and Gini coefficient, the phi-utilization correlations and phi's
            range when the method has phi, and, for methods with a pseudo-gradient,
            the PG alignment on the probe batch at each budget level's K.
            ``utilization_top_k`` lists the K the round's clients trained at (the
            utilization mixes them; eval rows carry utilization at one K each). ``phi``
            holds phi's ``min``/``max``/``mean_abs``, ``outside_share`` (share of global
            phi entries outside the method's ``phi_range``, after aggregation) and, from
            the clients' ``phi_penalty_max`` metrics, ``penalty_max`` (max over clients)
            and ``penalty_acted`` (the range penalty was > 0 at some local step).
        """
        from ubsmoe.fl.train import causal_lm_loss
        from ubsmoe.metrics.diagnostics import pg_alignment, utilization_summary

        utilization = round_utilization(updates)  # [L, E]
        phi = self.global_phi()  # [L, E] or None
        # A dense backbone has no experts ([0, 0]): no utilization statistics.
        record: dict[str, Any] = {"type": "diagnostics", "round": round_idx,
                                  **(utilization_summary(utilization, phi) if utilization.numel() else {}),
                                  "utilization": utilization.tolist(),
                                  # training-time statistics: measured at each client's K_c
                                  "utilization_top_k": sorted({int(u.top_k) for u in updates})}
        if phi is not None:
            record["phi"] = {"min": float(phi.min()), "max": float(phi.max()),
                             "mean_abs": float(phi.abs().mean())}
            bounds = self.method.phi_range()
            if bounds is not None:  # share of global phi entries the range penalty would act on
                record["phi"]["outside_share"] = float(((phi < bounds[0]) | (phi > bounds[1]))
                                                       .double().mean())
            penalties = [u.metrics["phi_penalty_max"] for u in updates if "phi_penalty_max" in u.metrics]
            if penalties:  # largest range penalty in any client's loss at any local step
                record["phi"]["penalty_max"] = max(penalties)
                record["phi"]["penalty_acted"] = max(penalties) > 0
        pg = self.method.pseudo_gradient
        if pg is not None and self.cfg.eval.pg_probe_examples > 0:
            load_adapter_state(self.model, self.state.adapters)
            record["pg_alignment"] = [
                pg_alignment(self.model, self.probe_batch, k, pg, causal_lm_loss)
                for k in sorted(set(self.level_top_k().values()))
            ]
        return record

    def level_top_k(self, mode: str | None = None) -> dict[float, int]:
        """K each budget level runs at: ``{beta: K}`` for ``fl.budgets``.

        Args:
            mode: ``auto``, ``budget`` or ``native`` (see :meth:`Method.client_top_k`);
                None: the training mode, ``train.top_k``.
        """
        from ubsmoe.data.partition import top_k_for_budget

        mode = self.cfg.train.top_k if mode is None else mode
        return {beta: self.method.client_top_k(top_k_for_budget(beta, self.k_max, self.cfg.model.k_min),
                                               self.k_max, mode)
                for beta in self.cfg.fl.budgets}

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

    @functools.cached_property
    def bertscore(self):
        """The BERTScore scorer (``eval.bertscore_model``), loaded once; None without text tasks.

        Returns:
            A :class:`~ubsmoe.eval.instruction.BertScore` (its ``reason`` says why
            it is skipped when the model cannot be loaded), or None.
        """
        from ubsmoe.eval.instruction import BertScore

        if "text" not in self.setup.data.answer_types.values():
            return None
        scorer = BertScore(self.cfg.eval.bertscore_model, self.cfg.eval.bertscore_num_layers)
        if scorer.reason:
            log = logging.getLogger("ubsmoe")
            log.warning("BERTScore skipped: %s", scorer.reason)
        return scorer

    def evaluate_one(self, task: str, records: list[dict]) -> dict[str, Any]:
        """Score one task with the model as it is set (K, adapters).

        Commonsense data: :func:`ubsmoe.eval.commonsense.evaluate_task`; instruction
        data: :func:`ubsmoe.eval.instruction.evaluate_instruction_task` with the
        task's answer type.

        The ``loss`` protocol is :func:`ubsmoe.eval.loss.add_loss_scores` on the same
        records, cut to ``data.max_length`` as in training.

        Returns:
            ``{protocol: value, "n": examples}`` plus, for instruction data,
            ``metric`` (protocol -> metric name) and for text tasks ``metrics``;
            with ``loss``, also ``loss_stderr`` and ``loss_tokens``.
        """
        from ubsmoe.eval import commonsense, instruction
        from ubsmoe.eval.loss import LOSS_PROTOCOL, add_loss_scores

        ev = self.cfg.eval
        protocols = [p for p in ev.protocols if p != LOSS_PROTOCOL]  # loss: add_loss_scores below
        if self.cfg.data.name != "instruction":
            result = commonsense.evaluate_task(self.model, self.tokenizer, task, records, protocols,
                                               ev.batch_size, ev.max_new_tokens)
        else:
            result = instruction.evaluate_instruction_task(
                self.model, self.tokenizer, task, self.setup.data.answer_types[task], records, protocols,
                ev.batch_size, ev.max_new_tokens, ev.text_metric, self.bertscore)
        if LOSS_PROTOCOL in ev.protocols:
            add_loss_scores(result, self.model, self.tokenizer, records, ev.batch_size,
                            self.cfg.data.max_length)
        return result

    def evaluate(self, round_idx: int) -> list[dict[str, Any]]:
        """Score the global model at every budget level (:meth:`score_levels`) and log the rows.

        Returns:
            The rows of :meth:`score_levels`, each also appended to ``metrics.jsonl``.
        """
        rows = self.score_levels(round_idx)
        for row in rows:
            self.record(row)
        return rows

    def set_level(self, level: int, round_idx: int, mode: str = "budget") -> tuple[float, int, int]:
        """Put the server model in the state a client of budget level ``level`` evaluates in.

        Merged base weights (:meth:`sync_base`), the level's LoRA rank r_j (and alpha),
        the adapters :meth:`Method.client_adapters` gives that rank (seeded by the
        evaluation seed of ``round_idx``, as :meth:`score_levels`) and K_j of ``mode``.

        Args:
            level: 0-based index into ``fl.budgets``.
            round_idx: the round whose evaluation seed draws the rank-r_j adapters.
            mode: ``budget`` (K_j) or ``native`` (the model's top-k).

        Returns:
            ``(beta, K, rank)`` of the level.

        Raises:
            IndexError: ``level`` outside the budget levels.
        """
        if not 0 <= level < len(self.cfg.fl.budgets):
            raise IndexError(f"budget level {level}: the run has {len(self.cfg.fl.budgets)} levels")
        self.sync_base()
        rank, alpha = self.level_lora(level)
        seed = client_seed(self.cfg.train.seed + 1, -2, round_idx)
        set_lora_rank(self.model, rank, alpha, seed=self.cfg.train.seed + 1)
        load_adapter_state(self.model, self.method.client_adapters(self.state.adapters, rank, seed))
        beta, k = list(self.level_top_k(mode).items())[level]
        set_top_k(self.model, k)
        return beta, k, rank

    def score_levels(self, round_idx: int, levels: Sequence[int] | None = None,
                     tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Score the global model at every budget level's K and LoRA rank on every task.

        For each ``eval.top_k`` mode, level j runs at K_j (``budget``, DESIGN.md
        section 6: every method, as in the papers' tables) or at the native top-k
        (``native``), always with the adapters a client of that level would hold
        (:meth:`Method.client_adapters` at its rank r_j) on the merged base weights.
        Rows with equal (K, rank, alpha) share one evaluation, across levels and
        modes, and so do rows whose adapters all have B = 0 (a zero update at any
        rank).

        Args:
            round_idx: the round scored (seeds the rank-r_j adapters; in the rows).
            levels: 0-based budget levels to score (None: all).
            tasks: tasks to score, a subset of :attr:`test_sets` (None: all).

        Returns:
            One row per (mode, budget level, protocol): ``budget``, ``top_k``,
            ``top_k_mode`` (``budget`` or ``native``), ``lora_rank``, ``protocol``,
            ``per_task`` accuracies, ``average`` and ``n`` (examples per task).
            Instruction data: ``per_task`` holds each task's metric value,
            ``per_task_metric`` its name (``accuracy``, ``rouge_l``,
            ``bertscore_f1``), ``per_task_metrics`` every text metric computed;
            a protocol no task supports (``loglik`` without choices) has no row.
            ``loss`` rows (nats per token, lower is better) also carry ``metric``,
            ``lower_is_better``, ``stderr`` (of ``average``), ``per_task_stderr``
            and ``per_task_tokens`` (:func:`ubsmoe.eval.loss.loss_row_fields`).
            With ``eval.utilization`` every row of an SMoE model also has
            ``utilization``: tokens, entropy and Gini of the expert utilization at
            that row's K over all scored test records
            (:func:`ubsmoe.eval.utilization.level_utilization`).
            Nothing is written (:meth:`evaluate` logs them).

        Raises:
            ValueError: a task not among the run's test sets.
        """
        from ubsmoe.eval.loss import loss_row_fields
        from ubsmoe.eval.utilization import level_utilization
        from ubsmoe.methods.rank import lora_pairs

        self.sync_base()
        tests = self.test_sets
        if tasks is not None:
            unknown = sorted(set(tasks) - set(tests))
            if unknown:
                raise ValueError(f"tasks: got {unknown}, expected a subset of {', '.join(sorted(tests))}")
            tests = {t: recs for t, recs in tests.items() if t in set(tasks)}
        by_key: dict[tuple, dict[str, dict[str, float]]] = {}
        util: dict[tuple, dict[str, Any] | None] = {}
        seed = client_seed(self.cfg.train.seed + 1, -2, round_idx)
        modes = self.cfg.eval.top_k
        level_k = {mode: list(self.level_top_k(mode).items()) for mode in modes}
        by_mode: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
        for level in (range(len(self.cfg.fl.budgets)) if levels is None else levels):
            rank, alpha = self.level_lora(level)
            adapters = self.method.client_adapters(self.state.adapters, rank, seed)
            pairs, _ = lora_pairs(list(adapters))
            zero = bool(pairs) and all(not adapters[p.b].any() for p in pairs)
            for mode in modes:
                beta, k = level_k[mode][level]
                key = (k, None, None) if zero else (k, rank, alpha)
                if key not in by_key:
                    set_lora_rank(self.model, rank, alpha, seed=self.cfg.train.seed + 1)
                    load_adapter_state(self.model, adapters)
                    set_top_k(self.model, k)
                    by_key[key] = {task: self.evaluate_one(task, recs) for task, recs in tests.items()}
                    if self.cfg.eval.utilization:  # same tokens for every method (ubsmoe.eval.utilization)
                        util[key] = level_utilization(self.model, self.tokenizer, tests,
                                                      self.cfg.eval.batch_size, self.cfg.data.max_length)
                scores = by_key[key]
                for protocol in self.cfg.eval.protocols:
                    per_task = {t: s[protocol] for t, s in scores.items() if protocol in s}
                    if not per_task:  # e.g. loglik when no task has choices
                        continue
                    extra: dict[str, Any] = {}
                    if self.cfg.data.name == "instruction":
                        extra["per_task_metric"] = {t: scores[t]["metric"][protocol] for t in per_task}
                        text = {t: scores[t]["metrics"] for t in per_task if "metrics" in scores[t]}
                        if protocol == "generation" and text:
                            extra["per_task_metrics"] = text
                    if protocol == "loss":  # metric name, stderr, tokens (ubsmoe.eval.loss)
                        extra.update(loss_row_fields(scores, per_task))
                    if util.get(key) is not None:  # eval-time utilization of this level
                        extra["utilization"] = util[key]
                    by_mode[mode].append({
                        "type": "eval",
                        "round": round_idx,
                        "budget": beta,
                        "top_k": k,
                        "top_k_mode": mode,
                        "lora_rank": rank,
                        "protocol": protocol,
                        "per_task": per_task,
                        "average": sum(per_task.values()) / max(len(per_task), 1),
                        "n": {t: int(scores[t]["n"]) for t in per_task},
                        **extra,
                    })
        return [row for mode in modes for row in by_mode[mode]]  # mode by mode, levels in order

    # ----- persistence -----------------------------------------------------------
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

    def summary(self) -> dict[str, Any]:
        """The run's summary (also written to summary.json by :meth:`finish`)."""
        from ubsmoe.eval.loss import LOSS_ROW_KEYS

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
            "accuracy": [
                {k: row[k] for k in ("round", "budget", "top_k", "top_k_mode", "lora_rank", "protocol",
                                     "per_task", "average", "per_task_metric", "per_task_metrics",
                                     *LOSS_ROW_KEYS, "utilization")
                 if k in row}
                for row in self.last_eval
            ],
            "provenance": self.provenance,
        }

    def _data_summary(self) -> dict[str, Any]:
        """Instruction data's summary keys: source name, answer types, metrics, partition, BERTScore."""
        if self.cfg.data.name != "instruction":
            return {}
        from ubsmoe.eval.instruction import task_metric

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
