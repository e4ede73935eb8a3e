"""What a client returns (:class:`ClientUpdate`) and how a round's replies fold into new adapters.

The data weights p_c, the round's global expert utilization, the incremental
aggregators the server feeds one reply at a time (FedAvg's running weighted mean, or
a buffer for all-at-once aggregations) and :func:`fedavg`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ubsmoe.core.routing import global_utilization
from ubsmoe.methods.robust import robust_aggregate


@dataclass
class ClientUpdate:
    """What a client returns after local training in one round.

    Attributes:
        client_id: partition id of the client (0..num_clients-1).
        num_examples: distinct examples the client trained on in this round (its
            partition size unless ``train.max_local_steps`` ended the round before
            the partition was covered; local epochs do not multiply it); the
            data-size weight p_c is proportional to it.
        adapters: trained LoRA parameters, name -> tensor (same names and shapes as
            the global adapters).
        expert_counts: ``[L, E]`` tokens routed to each expert per SMoE layer (a_{c,i}).
        token_counts: ``[L]`` tokens processed per SMoE layer (n_c).
        top_k: K_c the client trained with.
        loss: mean training loss over the round's steps (task loss only).
        metrics: further scalar metrics.
    """

    client_id: int
    num_examples: int
    adapters: dict[str, torch.Tensor]
    expert_counts: torch.Tensor
    token_counts: torch.Tensor
    top_k: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def data_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """p_c = n_c / sum_c n_c over the round's participants (DESIGN.md section 2).

    Returns:
        ``[num_updates]`` float64, summing to 1 (uniform if every n_c is 0).
    """
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    if n.sum() <= 0:
        return torch.full_like(n, 1.0 / len(updates))
    return n / n.sum()


def round_utilization(updates: Sequence[ClientUpdate], signed: bool = False) -> torch.Tensor:
    """Global expert utilization of a round, ``u~_i = sum_c p_c a_{c,i} / n_c`` (DESIGN.md 4.1).

    Args:
        updates: the round's client updates.
        signed: the counts may be negative (DP histograms with local noise; the
            caller clamps the mean, :meth:`ubsmoe.fl.privacy.ServerRelease.utilization`).

    Returns:
        ``[L, E]`` float64 (see :func:`ubsmoe.core.routing.global_utilization`).

    Raises:
        ValueError: no updates, or updates with different ``[L, E]`` shapes.
    """
    if not updates:
        raise ValueError("round_utilization: no client updates")
    counts = torch.stack([u.expert_counts for u in updates])  # [C, L, E]
    tokens = torch.stack([u.token_counts for u in updates])  # [C, L]
    return global_utilization(counts, tokens, data_weights(updates), signed=signed)


class Aggregator:
    """Folds one round's client updates into new global adapters, one reply at a time.

    The server calls :meth:`add` for each reply (in client-id order, so results do
    not depend on arrival order) and drops the reply right after, then
    :meth:`result` once. An incremental aggregator holds O(model) memory whatever
    the number of clients (issue: server memory independent of the client count).
    """

    def add(self, update: ClientUpdate) -> None:
        """Fold in one client's update."""
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:
        """The new global adapters, name -> tensor.

        Raises:
            ValueError: nothing was added.
        """
        raise NotImplementedError


class FedAvgAggregator(Aggregator):
    """Running p_c-weighted mean, ``sum_c n_c x_c / sum_c n_c`` (FedAvg / FedIT).

    Accumulates ``n_c * x_c`` in float64 (n_c: the client's example count) and
    divides once at the end, casting back to each tensor's dtype; memory is one
    float64 copy of the named tensors.

    With ``robust=(rule, trim_fraction)`` (``fl.aggregation``: ``median`` or
    ``trimmed_mean``, :mod:`ubsmoe.methods.robust`) it instead keeps every reply's
    tensors and returns their unweighted coordinate-wise median / trimmed mean:
    memory then grows with the number of clients.

    Args:
        names: the tensors to average (the global adapter names).
        robust: None (weighted mean) or ``(rule, trim_fraction)``.
        release: DP's server-side release (``release.adapters(mean, n)`` noises
            the mean of the privatised tensors, :class:`ubsmoe.fl.privacy.ServerRelease`),
            or None (DP off).
    """

    def __init__(self, names: Sequence[str], robust: tuple[str, float] | None = None,
                 release: Any = None) -> None:
        self.names = list(names)
        self.robust = robust
        self.release = release
        self.kept: dict[str, list[torch.Tensor]] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.total = 0.0
        self.count = 0

    def add(self, update: ClientUpdate) -> None:
        """Add ``n_c * x_c`` for every named tensor.

        Raises:
            ValueError: negative example count, or a named tensor missing from the update.
        """
        n = float(update.num_examples)
        if n < 0:
            raise ValueError(f"client {update.client_id}: num_examples {update.num_examples} < 0")
        for k in self.names:
            if k not in update.adapters:
                raise ValueError(f"client {update.client_id}: adapters lack {k!r}")
            x = update.adapters[k]
            if k not in self.sums:
                self.sums[k] = torch.zeros_like(x, dtype=torch.float64)
                self.dtypes[k] = x.dtype
            if self.robust is not None:
                self.kept.setdefault(k, []).append(x)
                continue
            self.sums[k].add_(x, alpha=n)  # promotes to float64 without a copy of x
        self.total += n
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """``sum_c n_c x_c / sum_c n_c`` per tensor.

        Raises:
            ValueError: no update was added, or every client reported 0 examples.
        """
        if not self.count:
            raise ValueError("aggregate: no client updates")
        if self.robust is not None:
            rule, trim = self.robust
            return {k: robust_aggregate(torch.stack(xs).to(torch.float64), rule, trim).to(self.dtypes[k])
                    for k, xs in self.kept.items()}
        if self.total <= 0:
            raise ValueError("aggregate: every client reported 0 training examples")
        out = {k: (v / self.total).to(self.dtypes[k]) for k, v in self.sums.items()}
        return out if self.release is None else self.release.adapters(out, self.count)


class BufferedAggregator(Aggregator):
    """Keeps every update and calls an all-at-once ``aggregate(updates)`` at the end.

    For methods whose aggregation needs every reply at once (e.g. stacking LoRA
    factors); memory grows with the number of clients by the size of an adapter.
    """

    def __init__(self, aggregate_all) -> None:
        self.aggregate_all = aggregate_all
        self.updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        """Keep ``update``."""
        self.updates.append(update)

    def result(self) -> dict[str, torch.Tensor]:
        """``aggregate_all(updates)`` over the kept updates (in the order added).

        Raises:
            ValueError: nothing was added.
        """
        if not self.updates:
            raise ValueError("aggregate: no client updates")
        return self.aggregate_all(self.updates)


def aggregate_with(aggregator: Aggregator, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Add ``updates`` to ``aggregator`` in the given order and return its result.

    Raises:
        ValueError: no updates.
    """
    if not updates:
        raise ValueError("aggregate: no client updates")
    for u in updates:
        aggregator.add(u)
    return aggregator.result()


def fedavg(updates: Sequence[ClientUpdate], names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """p_c-weighted mean of the clients' adapters (FedAvg / FedIT), all at once.

    ``names`` restricts the keys (default: all of the first update's).

    Raises:
        ValueError: no updates, or every client reported 0 examples.
    """
    if not updates:
        raise ValueError("aggregate: no client updates")
    return aggregate_with(FedAvgAggregator(list(names) if names is not None else list(updates[0].adapters)),
                updates)
