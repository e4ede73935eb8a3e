"""Config section of the federation: :class:`FLConfig` (clients, budgets, rounds, failures, aggregation)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ubsmoe.config.choices import BUDGET_PATTERNS
from ubsmoe.errors import bad_value as _bad
from ubsmoe.errors import raise_if_any

AGGREGATIONS = ("mean", "median", "trimmed_mean")


@dataclass
class FLConfig:
    """Federation: clients, rounds, participation and compute budgets.

    Attributes:
        num_clients: number of clients (Flower SuperNodes).
        rounds: federated rounds.
        fraction: share of clients sampled each round, in (0, 1].
        budgets: the budget levels beta_1..beta_n, each in (0, 1], strictly
            increasing; client c at level beta gets
            K_c = clamp(floor(K_max * beta), k_min, K_max) (K = 1, 2, 4, 8 on a
            top-8 model with the default levels).
        budget_pattern: how clients are spread over the levels: ``uniform``,
            ``long_tail`` (75% at the lowest level) or ``reverse_long_tail``
            (75% at the highest).
        client_cpus: CPUs reserved per simulated client: the local SuperLink's
            federation config ``client-resources-num-cpus`` (Ray resources). A
            whole number >= 1: Flower 1.42's federation config takes integer CPUs.
            W = floor(CPUs / this) worker processes run, one model each.
        client_gpus: GPUs reserved per simulated client (``client-resources-num-gpus``);
            fractions share a GPU between workers (0.25: four per GPU); 0: clients on
            the CPU (a worker that reserves no GPU sees none; ``ubsmoe run`` warns
            when a GPU is visible and refuses ``model.device=cuda``).
        keep_checkpoints: how many ``checkpoints/round_XXXX.pt`` to keep, newest
            first (0: keep all); older ones are deleted once a new one is written.
            Checkpoints are written atomically, so ``--resume`` always has one.
            The final adapters (``checkpoints/adapter``) are always kept.
        round_timeout_s: seconds the server waits for a round's replies (per try);
            a client that has not replied by then is left out of the round as
            ``timeout after T s`` and its late reply is discarded. 0: no timeout (a
            disconnected node is still left out, through the error reply Flower
            sends for a node that went offline).
        min_replies: a round completes only with at least this many good replies.
        min_reply_fraction: ... and at least this share of the round's sampled
            clients (rounded up), in (0, 1].
        round_retries: how often a round that missed ``min_replies`` /
            ``min_reply_fraction`` is tried again with the same clients and seeds
            before the run stops (0: never). Nothing of a failed try is committed;
            after the last try the run stops with one line naming the last complete
            round's checkpoint.
        reject_norm_multiple: reject a reply whose update norm ``||x_c - x_sent||_2``
            exceeds this multiple of the round's median (0: off; e.g. 3). Buffers
            the round's replies.
        aggregation: ``mean`` (the method's own p_c-weighted mean, streaming),
            ``median`` (coordinate-wise median) or ``trimmed_mean`` (Yin et al.,
            2018) of the tensors a method averages with data weights; the robust
            ones are unweighted across the good replies and buffer the round's
            replies. The rank methods (``hetlora``, ``flexlora``, ``flora``,
            ``florist``, ``a3smoe_flexlora``) aggregate factors all at once and
            accept only ``mean``.
        trim_fraction: share of replies cut at each end per coordinate by
            ``trimmed_mean``, in [0, 0.5).
    """

    num_clients: int = 8
    rounds: int = 20
    fraction: float = 1.0
    budgets: list[float] = field(default_factory=lambda: [0.125, 0.25, 0.5, 1.0])
    budget_pattern: str = "uniform"
    client_cpus: float = 1.0
    client_gpus: float = 0.0
    keep_checkpoints: int = 2
    round_timeout_s: float = 0.0
    min_replies: int = 1
    min_reply_fraction: float = 0.5
    round_retries: int = 1
    reject_norm_multiple: float = 0.0
    aggregation: str = "mean"
    trim_fraction: float = 0.1

    def __post_init__(self) -> None:
        errors = []
        if not self.round_timeout_s >= 0:
            errors.append(_bad("fl.round_timeout_s", self.round_timeout_s, "seconds >= 0 (0: no timeout)"))
        if self.min_replies < 1:
            errors.append(_bad("fl.min_replies", self.min_replies, "an integer >= 1"))
        if not 0.0 < self.min_reply_fraction <= 1.0:
            errors.append(_bad("fl.min_reply_fraction", self.min_reply_fraction, "a number in (0, 1]"))
        if self.round_retries < 0:
            errors.append(_bad("fl.round_retries", self.round_retries, "an integer >= 0"))
        if not self.reject_norm_multiple >= 0:
            errors.append(_bad("fl.reject_norm_multiple", self.reject_norm_multiple,
                               "a number >= 0 (0: off; e.g. 3)"))
        if self.aggregation not in AGGREGATIONS:
            errors.append(_bad("fl.aggregation", self.aggregation, f"one of {', '.join(AGGREGATIONS)}"))
        if not 0.0 <= self.trim_fraction < 0.5:
            errors.append(_bad("fl.trim_fraction", self.trim_fraction, "a number in [0, 0.5)"))
        if self.num_clients < 1:
            errors.append(_bad("fl.num_clients", self.num_clients, "an integer >= 1"))
        if self.rounds < 1:
            errors.append(_bad("fl.rounds", self.rounds, "an integer >= 1"))
        if not 0.0 < self.fraction <= 1.0:
            errors.append(_bad("fl.fraction", self.fraction, "a number in (0, 1]"))
        if not self.budgets or any(not (0.0 < b <= 1.0) for b in self.budgets):
            errors.append(_bad("fl.budgets", self.budgets, "a non-empty list of numbers in (0, 1]"))
        elif sorted(self.budgets) != list(self.budgets) or len(set(self.budgets)) != len(self.budgets):
            errors.append(_bad("fl.budgets", self.budgets, "strictly increasing levels"))
        if self.budget_pattern not in BUDGET_PATTERNS:
            errors.append(
                _bad("fl.budget_pattern", self.budget_pattern, f"one of {', '.join(BUDGET_PATTERNS)}")
            )
        if not (self.client_cpus >= 1 and float(self.client_cpus).is_integer()):
            errors.append(_bad("fl.client_cpus", self.client_cpus, "a whole number >= 1"))
        if not self.client_gpus >= 0:
            errors.append(_bad("fl.client_gpus", self.client_gpus, "a number >= 0 (fractions allowed)"))
        if self.keep_checkpoints < 0:
            errors.append(_bad("fl.keep_checkpoints", self.keep_checkpoints, "an integer >= 0 (0: keep all)"))
        raise_if_any(errors)


