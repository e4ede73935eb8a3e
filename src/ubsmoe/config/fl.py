"""Config section of the federation: :class:`FLConfig` (clients, budgets, rounds, failures, aggregation)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from ubsmoe.config.choices import BUDGET_PATTERNS, STEP_COSTS
from ubsmoe.errors import ConfigError, raise_if_any
from ubsmoe.errors import bad_value as _bad

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
            ``long_tail`` (75% at the lowest level), ``reverse_long_tail``
            (75% at the highest) or ``auto`` (every client starts at the lowest
            level and picks its own from its measured step times and memory, see
            ``round_deadline_s``; :mod:`ubsmoe.fl.autobudget`) or ``top`` (every
            client at the highest level).
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
        round_deadline_s: the time a ``budget=auto`` client's local round should
            take, in seconds (on the simulated clock when ``client_speed`` is set):
            the target its level choice aims at; 0: no time target (memory alone
            decides). ``round_timeout_s`` stays the hard cut.
        deadline_margin: share of ``round_deadline_s`` kept free for upload and
            evaluation, in [0, 1): a level fits when its predicted local-round time
            is at most ``round_deadline_s x (1 - deadline_margin)``.
        remeasure_fraction: a ``budget=auto`` client times its levels again when a
            round's real time misses the prediction by more than this share of the
            prediction (> 0), so a device that became busy steps down and one that
            became free steps up.
        calibration_steps: optimizer steps a ``budget=auto`` client times at each
            level's K_j (and rank) when it (re)calibrates, an integer >= 1.
        client_speed: speed factors of a simulated fleet: a client with factor s is
            charged s x its measured compute time on a simulated clock (accounting,
            not sleeping), and ``round_timeout_s`` is applied to that clock instead of
            the wall clock. Empty: no simulated fleet. Else one entry per client (or
            one for all), each a number or per-round factors joined by ``/``
            (``"1/1/4/1"``: round r uses the r-th, the last repeats), or one named
            distribution: ``linear:LO:HI`` (client c gets LO + (HI - LO) c / (n - 1))
            or ``uniform:LO:HI:SEED`` (seeded draws). Factors > 0.
        client_memory_gib: memory cap of each simulated client in GiB, the same
            forms as ``client_speed`` (0: no cap, the device's free memory). Empty:
            no caps (a deployed node may declare ``memory-gib=``).
        step_cost: what a simulated fleet charges per optimizer step: ``measured``
            (the step's wall time on this machine) or ``flops`` (deterministic:
            simulated compute = training FLOPs of the step at the level's K and rank /
            ``sim_flops_per_s`` x speed factor; the step's tokens are
            ``train.batch_size x data.max_length``, FLOPs per token from
            :func:`ubsmoe.metrics.flops.training_flops_per_token`). Calibration and
            the round's training are both charged this way.
        sim_flops_per_s: the assumed device throughput at speed factor 1 in FLOP/s
            for ``step_cost=flops``, > 0.
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
    round_deadline_s: float = 0.0
    deadline_margin: float = 0.1
    remeasure_fraction: float = 0.25
    calibration_steps: int = 2
    client_speed: list[str] = field(default_factory=list)
    client_memory_gib: list[str] = field(default_factory=list)
    step_cost: str = "measured"
    sim_flops_per_s: float = 1e9

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
        if not self.round_deadline_s >= 0:
            errors.append(_bad("fl.round_deadline_s", self.round_deadline_s, "seconds >= 0 (0: no target)"))
        if not 0.0 <= self.deadline_margin < 1.0:
            errors.append(_bad("fl.deadline_margin", self.deadline_margin, "a share in [0, 1)"))
        if not self.remeasure_fraction > 0:
            errors.append(_bad("fl.remeasure_fraction", self.remeasure_fraction, "a share > 0"))
        if self.calibration_steps < 1:
            errors.append(_bad("fl.calibration_steps", self.calibration_steps, "an integer >= 1"))
        if self.step_cost not in STEP_COSTS:
            errors.append(_bad("fl.step_cost", self.step_cost, f"one of {', '.join(STEP_COSTS)}"))
        if not (self.sim_flops_per_s > 0 and math.isfinite(self.sim_flops_per_s)):
            errors.append(_bad("fl.sim_flops_per_s", self.sim_flops_per_s, "FLOP/s > 0"))
        for name, floor in (("client_speed", 0.0), ("client_memory_gib", None)):
            try:
                fleet_table(getattr(self, name), self.num_clients, f"fl.{name}", floor)
            except ConfigError as e:
                errors.append(str(e))
        raise_if_any(errors)

    @property
    def simulated_fleet(self) -> bool:
        """True when ``client_speed`` is set: clients are charged on the simulated clock."""
        return bool(self.client_speed)

    def fleet_speed(self, client: int, round_idx: int) -> float:
        """Speed factor s of ``client`` in ``round_idx`` (1-based); 1.0 without a simulated fleet."""
        if not self.client_speed:
            return 1.0
        return _at(fleet_table(self.client_speed, self.num_clients, "fl.client_speed", 0.0)[client], round_idx)

    def fleet_memory_bytes(self, client: int, round_idx: int = 1) -> int | None:
        """Memory cap of ``client`` in bytes from ``client_memory_gib``; None: no cap set (or 0)."""
        if not self.client_memory_gib:
            return None
        gib = _at(fleet_table(self.client_memory_gib, self.num_clients, "fl.client_memory_gib", None)[client],
                  round_idx)
        return int(gib * 1024 ** 3) if gib > 0 else None


FLEET_FORMS = ("a number or per-round numbers joined by '/' per client (or one for all), "
               "or one of linear:LO:HI, uniform:LO:HI:SEED")


def _at(factors: list[float], round_idx: int) -> float:
    """The factor of round ``round_idx`` (1-based): the r-th, the last one repeating."""
    return factors[min(max(round_idx, 1), len(factors)) - 1]


def fleet_table(specs: list[str], num_clients: int, name: str, floor: float | None) -> list[list[float]]:
    """Per-client, per-round values of a fleet setting (``fl.client_speed``, ``fl.client_memory_gib``).

    Args:
        specs: the setting (see :class:`FLConfig`); empty gives ``[]``.
        num_clients: ``fl.num_clients``.
        name: the field, for errors.
        floor: values must exceed it (speed: 0); None: values must be >= 0 (memory).

    Returns:
        ``[num_clients]`` lists of per-round values (one value: constant).

    Raises:
        ConfigError: one line naming the field and the allowed forms.
    """
    if not specs:
        return []
    allowed = FLEET_FORMS + (" with values > 0" if floor is not None else " with values >= 0 (0: no cap)")
    head = str(specs[0]).strip()
    try:
        if len(specs) == 1 and ":" in head:
            kind, *args = head.split(":")
            nums = [float(a) for a in args]
            if kind == "linear" and len(nums) == 2:
                lo, hi = nums
                values = [[lo + (hi - lo) * c / max(num_clients - 1, 1)] for c in range(num_clients)]
            elif kind == "uniform" and len(nums) == 3 and nums[2] == int(nums[2]):
                rng = random.Random(int(nums[2]))
                values = [[rng.uniform(nums[0], nums[1])] for _ in range(num_clients)]
            else:
                raise ValueError(head)
        else:
            values = [[float(x) for x in str(spec).split("/")] for spec in specs]
            if len(values) == 1:
                values = values * num_clients
    except ValueError:
        raise ConfigError(_bad(name, specs, allowed)) from None
    if len(values) != num_clients:
        raise ConfigError(_bad(name, specs, f"{num_clients} entries (fl.num_clients) or one; {allowed}"))
    flat = [v for row in values for v in row]
    if any(not math.isfinite(v) or (v <= floor if floor is not None else v < 0) for v in flat):
        raise ConfigError(_bad(name, specs, allowed))
    return values


