"""Streaming aggregation of a round's replies in client-id order (plain PyTorch, no Flower)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import replace

import torch

from ubsmoe.methods import ClientUpdate
from ubsmoe.methods.base import Aggregator


class OrderedFold:
    """Feeds replies to an :class:`~ubsmoe.methods.base.Aggregator` in client-id order.

    Replies may arrive in any order; each one is folded as soon as every client
    with a smaller id has been folded, then only its statistics (no adapters) are
    kept. So the result is the same for any arrival order, and when replies arrive
    in id order no adapter is ever held beyond the one being folded.

    Args:
        aggregator: the method's aggregator for this round.
        client_ids: the round's participants.

    Attributes:
        folded: the folded updates in id order, adapters dropped.
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
        self.max_buffered = 0
        self.fold_s = 0.0
        self.intervals: list[tuple[float, float]] = []

    def add(self, update: ClientUpdate) -> None:
        """Buffer ``update`` and fold every reply that is now next in id order.

        Raises:
            ValueError: a client that is not a participant, or a second reply from one.
        """
        cid = update.client_id
        if cid not in self.expected or cid in self.pending or cid in self.expected[:self.position]:
            raise ValueError(f"unexpected reply from client {cid} (participants: {self.expected})")
        self.pending[cid] = update
        self.max_buffered = max(self.max_buffered, len(self.pending) - 1)
        while self.position < len(self.expected) and self.expected[self.position] in self.pending:
            nxt = self.pending.pop(self.expected[self.position])
            self._timed(self.aggregator.add, nxt)
            self.folded.append(replace(nxt, adapters={}))
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
