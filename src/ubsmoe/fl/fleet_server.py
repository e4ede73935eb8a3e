"""The server's side of ``budget=auto`` clients and of a simulated fleet (plain PyTorch, no Flower).

:class:`FleetLevels` is part of :class:`~ubsmoe.fl.server.Server`. Each round it
screens the replies (:meth:`FleetLevels.screen_fleet`): a reply reporting a level
(``auto_budget``, :mod:`ubsmoe.fl.autobudget`) from a client that is not
``budget=auto``, or a level that is not one of ``fl.budgets``, is rejected with one
line; with a simulated fleet (``fl.client_speed``) a reply whose simulated time
``sim_s`` exceeds ``fl.round_timeout_s`` (> 0) is left out as a simulated timeout.
A valid reported level (also from a reply left out for time: the report is still
true) becomes the client's level for its next round once the round is committed
(:meth:`FleetLevels.commit_levels`): K_c and LoRA rank follow the level.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

from ubsmoe.fl.autobudget import AUTO_BUDGET, AUTO_CALIBRATED, SIM_S, reason_from_metrics
from ubsmoe.fl.fold import LeftOut
from ubsmoe.methods import ClientUpdate


class FleetLevels:
    """Reported levels and the simulated clock of the Server's round.

    Uses the Server's ``cfg``, ``budgets``, ``top_k``, ``lora``, :meth:`level_top_k`,
    :meth:`level_lora` and ``auto_clients`` (client ids that choose their own level).
    """

    auto_clients: set[int]

    def _fleet_reset(self) -> None:
        self._pending_levels: dict[int, int] = {}
        self._sim: dict[int, float] = {}
        self._auto_rows: list[dict[str, Any]] = []

    def screen_fleet(self, updates: Iterable[ClientUpdate | LeftOut]) -> Iterator[ClientUpdate | LeftOut]:
        """Yield the round's items, rejecting bad level reports and cutting simulated timeouts.

        Args:
            updates: replies and left-out markers, as :meth:`Server.end_round` takes them.

        Yields:
            The same items, a reply replaced by a :class:`~ubsmoe.fl.fold.LeftOut`
            when its level report is refused (``rejected: ...``) or its ``sim_s``
            exceeds ``fl.round_timeout_s`` on the simulated clock.
        """
        self._fleet_reset()
        fl = self.cfg.fl
        for u in updates:
            if isinstance(u, LeftOut):
                yield u
                continue
            cid = u.client_id
            if AUTO_BUDGET in u.metrics:
                beta = u.metrics[AUTO_BUDGET]
                level = next((j for j, b in enumerate(fl.budgets) if math.isclose(b, beta, rel_tol=1e-9)), None)
                if cid not in self.auto_clients:
                    yield LeftOut(cid, f"rejected: client {cid} reports budget level {beta:g} but does not "
                                       "choose its own (neither budget=auto nor fl.budget_pattern=auto)")
                    continue
                if level is None:
                    yield LeftOut(cid, f"rejected: reported budget level {beta:g} is not one of fl.budgets "
                                       f"[{', '.join(f'{b:g}' for b in fl.budgets)}]")
                    continue
                self._pending_levels[cid] = level
                self._auto_rows.append({
                    "id": cid, "trained_budget": self.budgets[cid], "next_budget": fl.budgets[level],
                    "calibrated": bool(u.metrics.get(AUTO_CALIBRATED, 0.0)),
                    "reason": reason_from_metrics(u.metrics, len(fl.budgets))})
            if fl.simulated_fleet and SIM_S in u.metrics:
                sim = u.metrics[SIM_S]
                self._sim[cid] = sim
                if fl.round_timeout_s > 0 and sim > fl.round_timeout_s:
                    yield LeftOut(cid, f"simulated timeout: {sim:.3g} s > fl.round_timeout_s="
                                       f"{fl.round_timeout_s:g} s")
                    continue
            yield u

    def fleet_facts(self) -> dict[str, Any]:
        """The train record's fleet keys: ``sim_round_s`` and ``auto`` (each reported level and why).

        ``sim_round_s``: the round's time on the simulated clock: the slowest reply's
        ``sim_s``, or ``fl.round_timeout_s`` when a reply was cut by it.
        """
        out: dict[str, Any] = {}
        if self._sim:
            timeout = self.cfg.fl.round_timeout_s
            slowest = max(self._sim.values())
            out["sim_round_s"] = min(slowest, timeout) if timeout > 0 else slowest
        if self._auto_rows:
            out["auto"] = sorted(self._auto_rows, key=lambda row: row["id"])
        return out

    def commit_levels(self) -> None:
        """Give every client that reported a valid level this round that level (K_c, rank) from now on."""
        level_k = self.level_top_k()
        for cid, level in self._pending_levels.items():
            beta = self.cfg.fl.budgets[level]
            self.budgets[cid] = beta
            self.top_k[cid] = level_k[beta]
            self.lora[cid] = self.level_lora(level)
        self._pending_levels = {}
