"""Streaming aggregation of a round's replies in client-id order (plain PyTorch, no Flower)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from ubsmoe.methods import ClientUpdate
from ubsmoe.methods.aggregation import Aggregator


@dataclass(frozen=True)
class LeftOut:
    """A participant left out of a round: it failed, timed out or its reply was rejected.

    Attributes:
        client_id: the participant.
        reason: one line naming what went wrong (e.g. ``timeout after 30 s``).
    """

    client_id: int
    reason: str

    def record(self) -> dict[str, Any]:
        """``{"client": id, "reason": ...}`` as logged in a round's ``failed`` list."""
        return {"client": self.client_id, "reason": self.reason}


class RoundIncomplete(RuntimeError):
    """Too few good replies for a round to complete; nothing of the try was committed.

    Attributes:
        round_idx: the round.
        replies: good replies received.
        needed: good replies required (``fl.min_replies`` / ``fl.min_reply_fraction``).
        failed: the participants left out.
    """

    def __init__(self, round_idx: int, replies: int, needed: int, failed: Sequence[LeftOut]) -> None:
        self.round_idx, self.replies, self.needed, self.failed = round_idx, replies, needed, list(failed)
        causes = "; ".join(f"client {f.client_id}: {f.reason}" for f in self.failed)
        super().__init__(f"round {round_idx}: {replies} good replies, {needed} needed"
                         f"{f' ({causes})' if causes else ''}")


class OrderedFold:
    """Feeds replies to an :class:`~ubsmoe.methods.aggregation.Aggregator` in client-id order.

    Replies may arrive in any order; each one is folded as soon as every client
    with a smaller id has been folded, then only its statistics (no adapters) are
    kept. So the result is the same for any arrival order, and when replies arrive
    in id order no adapter is ever held beyond the one being folded.

    Args:
        aggregator: the method's aggregator for this round.
        client_ids: the round's participants.

    A participant left out of the round (failed or rejected reply) is
    :meth:`skip`-ped: the fold moves past its id as if its reply had been folded,
    so the order stays deterministic and the result is the aggregate of the other
    replies alone (every aggregator normalizes its weights over what it was given).

    Attributes:
        folded: the folded updates in id order, adapters dropped.
        skipped: ids of the participants left out.
        max_buffered: the most replies ever waiting for a predecessor.
        fold_s: seconds spent inside the aggregator.
        intervals: ``(start, end)`` epoch seconds of every fold call.
    """

    def __init__(self, aggregator: Aggregator, client_ids: Sequence[int]) -> None:
        self.aggregator = aggregator
        self.expected = sorted(client_ids)
        self.position = 0
        self.pending: dict[int, ClientUpdate] = {}
        self.folded: list[ClientUpdate] = []
        self.skipped: set[int] = set()
        self.max_buffered = 0
        self.fold_s = 0.0
        self.intervals: list[tuple[float, float]] = []

    def add(self, update: ClientUpdate) -> None:
        """Buffer ``update`` and fold every reply that is now next in id order.

        Raises:
            ValueError: a client that is not a participant, or a second reply from one.
        """
        cid = self._check(update.client_id)
        self.pending[cid] = update
        self.max_buffered = max(self.max_buffered, len(self.pending) - 1)
        self._advance()

    def skip(self, client_id: int) -> None:
        """Leave participant ``client_id`` out of the round and fold what now comes next.

        Raises:
            ValueError: a client that is not a participant, or one already in or skipped.
        """
        self.skipped.add(self._check(client_id))
        self._advance()

    def _check(self, cid: int) -> int:
        if (cid not in self.expected or cid in self.pending or cid in self.skipped
                or cid in self.expected[:self.position]):
            raise ValueError(f"unexpected reply from client {cid} (participants: {self.expected})")
        return cid

    def _advance(self) -> None:
        while self.position < len(self.expected):
            cid = self.expected[self.position]
            if cid in self.pending:
                nxt = self.pending.pop(cid)
                self._timed(self.aggregator.add, nxt)
                self.folded.append(replace(nxt, adapters={}))
            elif cid not in self.skipped:
                break
            self.position += 1

    def result(self) -> dict[str, torch.Tensor]:
        """The aggregated adapters.

        Raises:
            ValueError: a participant's reply is missing.
        """
        missing = self.expected[self.position:]
        if missing:
            raise ValueError(f"no reply from clients {missing}")
        return self._timed(self.aggregator.result)

    def _timed(self, fn, *args):
        start = time.time()
        out = fn(*args)
        end = time.time()
        self.fold_s += end - start
        self.intervals.append((start, end))
        return out


def union_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length (seconds) of the union of ``(start, end)`` intervals."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total
