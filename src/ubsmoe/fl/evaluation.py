"""The server's evaluation: the global model scored at every budget level (plain PyTorch, no Flower).

:class:`ServerEvaluation` is part of :class:`~ubsmoe.fl.server.Server`. Level j is
scored with the LoRA rank r_j and adapters a client of that level holds, at K_j
(DESIGN.md section 6); the protocols are :mod:`ubsmoe.eval.commonsense` and
:mod:`ubsmoe.eval.instruction`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from ubsmoe.eval import commonsense, instruction
from ubsmoe.eval.commonsense import subsample
from ubsmoe.eval.instruction import BertScore
from ubsmoe.eval.loss import LOSS_PROTOCOL, add_loss_scores, loss_row_fields
from ubsmoe.eval.utilization import level_utilization
from ubsmoe.fl.client_runtime import sync_base_merges
from ubsmoe.fl.train import client_seed
from ubsmoe.methods.rank_base import lora_pairs
from ubsmoe.models import load_adapter_state, set_top_k
from ubsmoe.models.adapters import set_lora_rank


class ServerEvaluation:
    """The Server's test sets, BERTScore scorer, per-level model state and scoring.

    Uses the Server's ``cfg``, ``method``, ``model``, ``tokenizer``, ``setup``,
    ``state``, ``_merged``, :meth:`record`, :meth:`level_lora` and :meth:`level_top_k`.
    """

    @functools.cached_property
    def test_sets(self) -> dict[str, list[dict]]:
        """The seeded test subset scored per task (``eval.examples_per_task``), drawn once."""
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
        if "text" not in self.setup.data.answer_types.values():
            return None
        scorer = BertScore(self.cfg.eval.bertscore_model, self.cfg.eval.bertscore_num_layers)
        if scorer.reason:
            logging.getLogger("ubsmoe").warning("BERTScore skipped: %s", scorer.reason)
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
                    if protocol == LOSS_PROTOCOL:  # metric name, stderr, tokens (ubsmoe.eval.loss)
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

