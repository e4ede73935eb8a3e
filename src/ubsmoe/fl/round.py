"""The steps of a server round that need no server state: outlier rejection, folding, the record.

:meth:`ubsmoe.fl.server.Server.end_round` calls them in order; each is plain Python
over :class:`~ubsmoe.methods.ClientUpdate` replies (no Flower, no model).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from ubsmoe.fl.fold import LeftOut, OrderedFold, union_seconds
from ubsmoe.fl.validate import norm_outliers
from ubsmoe.methods import ClientUpdate
from ubsmoe.methods.aggregation import data_weights


def reject_outliers(updates: Iterable[ClientUpdate | LeftOut],
                    multiple: float) -> tuple[list[ClientUpdate | LeftOut], int]:
    """Hold every reply of a round and leave out those whose update norm is an outlier.

    A reply whose ``update_norm`` metric exceeds ``multiple`` x the round's median
    (:func:`~ubsmoe.fl.validate.norm_outliers`) becomes a :class:`LeftOut` naming both.

    Args:
        updates: the round's replies and left-out markers, in any order (read all at once).
        multiple: ``fl.reject_norm_multiple`` (0: no rejection).

    Returns:
        ``(items, held)``: the items sorted by client id, and how many good replies were held.
    """
    items = list(updates)
    good = [u for u in items if isinstance(u, ClientUpdate)]
    norms = [u.metrics.get("update_norm", 0.0) for u in good]
    outliers = set(norm_outliers(norms, multiple))
    if outliers:
        median = statistics.median(norms)
        items = [LeftOut(u.client_id, f"update norm {norms[i]:.4g} > {multiple:g}"
                                      f" x the round's median {median:.4g}") if i in outliers else u
                 for i, u in enumerate(good)] + [u for u in items if isinstance(u, LeftOut)]
    return sorted(items, key=lambda u: u.client_id), len(good)


def fold_replies(fold: OrderedFold, updates: Iterable[ClientUpdate | LeftOut]) -> list[LeftOut]:
    """Fold the replies as they come (client-id order, see :class:`OrderedFold`); skip the left-out.

    Every participant of ``fold.expected`` that neither replied nor was left out is
    left out with the reason ``no reply``.

    Returns:
        The round's left-out clients (markers from ``updates`` first, then the silent ones).
    """
    failed: list[LeftOut] = []
    for update in updates:
        if isinstance(update, LeftOut):
            failed.append(update)
            fold.skip(update.client_id)
        else:
            fold.add(update)
    for cid in [c for c in fold.expected[fold.position:] if c not in fold.pending]:
        failed.append(LeftOut(cid, "no reply"))
        fold.skip(cid)
    return failed


def train_record(round_idx: int, fold: OrderedFold, failed: Sequence[LeftOut],
                 clients: dict[int, dict[str, Any]], held: int, attempt: int,
                 timings: dict[str, float] | None, round_start: float | None,
                 round_end: float) -> dict[str, Any]:
    """The round's ``"type": "train"`` metrics record.

    The loss is the p_c-weighted mean of the folded clients' losses. The clients'
    ``work_start`` / ``work_end`` metrics are taken out of their entries (popped from
    ``u.metrics``) and, with ``round_start``, give the round's wall time and the
    share of it spent neither in client work nor in aggregation.

    Args:
        round_idx: 1-based round.
        fold: the round's fold, complete.
        failed: the left-out clients.
        clients: client id -> the server's facts for its entry (``budget``,
            ``lora_rank``, optionally ``declared``), in that key order.
        held: good replies held at once by :func:`reject_outliers` (0 when streamed).
        attempt: the round's try (1-based).
        timings: extra wall-clock seconds to record.
        round_start, round_end: epoch seconds the round's messages were sent / its
            aggregate committed (``round_start`` None: no wall time in the record).

    Returns:
        The record (``loss``, ``clients``, ``failed``, ``try``, ``aggregate_s``,
        ``max_buffered_replies``, the timings, and ``round_wall_s`` / ``overhead_s``
        / ``overhead_share`` with ``round_start``).
    """
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
            {"id": u.client_id, "top_k": u.top_k, "budget": clients[u.client_id]["budget"],
             "lora_rank": clients[u.client_id]["lora_rank"], "loss": u.loss, "examples": u.num_examples,
             **({"declared": clients[u.client_id]["declared"]} if "declared" in clients[u.client_id] else {}),
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
    return record
