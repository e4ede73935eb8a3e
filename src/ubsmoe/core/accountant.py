"""Privacy accounting over rounds: epsilon per round and cumulative, from Opacus's RDP accountant.

The sampled Gaussian mechanism under Renyi DP (Mironov, "Renyi Differential
Privacy", CSF 2017, arXiv 1702.07476; Mironov, Talwar, Zhang, arXiv 1908.10530) as
Opacus implements it (:class:`opacus.accountants.RDPAccountant`). Both mechanisms of
:mod:`ubsmoe.core.privacy` (update and counts) see the same sampled clients in the
same round, so one round is a single sampled Gaussian mechanism with the combined
noise multiplier ``(sigma_u^-2 + sigma_k^-2)^-1/2`` (:func:`combined_noise_multiplier`),
which :class:`PrivacyAccountant` composes over rounds. Docs: ``docs/privacy.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["PrivacyAccountant", "calibrate_noise_multiplier", "combined_noise_multiplier"]


def combined_noise_multiplier(*multipliers: float) -> float:
    """One Gaussian mechanism equivalent to several released together on the same sample.

    Releasing ``f_j(D) + N(0, (sigma_j S_j)^2)`` for each j, with f_j of sensitivity
    S_j, is (after rescaling each part by ``1 / (sigma_j S_j)``) one Gaussian
    mechanism with unit noise and sensitivity ``sqrt(sum_j sigma_j^-2)``, i.e. noise
    multiplier ``(sum_j sigma_j^-2)^-1/2``. A zero multiplier gives 0 (no privacy).

    Raises:
        ValueError: no multipliers or a negative one.
    """
    if not multipliers or any(not m >= 0 for m in multipliers):
        raise ValueError(f"combined_noise_multiplier: got {multipliers!r}, expected numbers >= 0")
    if any(m == 0 for m in multipliers):
        return 0.0
    return 1.0 / math.sqrt(sum(m ** -2 for m in multipliers))


class PrivacyAccountant:
    """Epsilon per round and cumulative at delta, over the update and counts mechanisms.

    Backed by Opacus's :class:`opacus.accountants.RDPAccountant` (sampled Gaussian
    mechanism, add/remove-one-client neighbours, Poisson sampling at rate q). Each
    round composes one step with the combined noise multiplier of the mechanisms the
    round releases (:func:`combined_noise_multiplier`):

    * ``central``: multipliers ``sigma`` (update, sensitivity C) and ``sigma_k``
      (counts, sensitivity :func:`counts_sensitivity`), sampling rate q =
      ``fl.fraction``. The project samples a fixed number ``round(q N)`` of
      clients; Poisson sampling at q is the usual DP-FedAvg approximation of it
      (exact at q = 1).
    * ``local``: a client's own release must hide any change of its data, which
      can move its clipped update by 2C and its clipped histogram by 2 bound, so
      the multipliers are halved; no amplification (the server knows who took
      part: q = 1), and every round counts (an upper bound on one client's
      participations).

    Args:
        mode: ``central`` or ``local``.
        noise_multiplier: sigma of the updates.
        counts_noise_multiplier: sigma_k of the counts, or None when the counts are
            not released under DP.
        sample_rate: q in (0, 1] (ignored in local mode).
        delta: delta in (0, 1).

    Raises:
        ValueError: an unknown mode or an out-of-range argument.
    """

    def __init__(self, mode: str, noise_multiplier: float, counts_noise_multiplier: float | None,
                 sample_rate: float, delta: float) -> None:
        if mode not in ("central", "local"):
            raise ValueError(f"PrivacyAccountant: mode got {mode!r}, expected central or local")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"PrivacyAccountant: sample_rate got {sample_rate!r}, expected (0, 1]")
        if not 0 < delta < 1:
            raise ValueError(f"PrivacyAccountant: delta got {delta!r}, expected (0, 1)")
        # lazy: opacus takes seconds to import, only DP runs need it
        from opacus.accountants import RDPAccountant

        self.mode = mode
        self.delta = float(delta)
        self.sample_rate = float(sample_rate) if mode == "central" else 1.0
        factor = 1.0 if mode == "central" else 0.5
        parts = [noise_multiplier] + ([] if counts_noise_multiplier is None
                                      else [counts_noise_multiplier])
        self.noise_multiplier = combined_noise_multiplier(*(factor * m for m in parts))
        self.rounds = 0
        self._rdp = RDPAccountant()

    @classmethod
    def from_config(cls, privacy: Any, sample_rate: float,
                    counts_released: bool) -> PrivacyAccountant:
        """The accountant of a run: ``sample_rate`` = ``fl.fraction``.

        Args:
            privacy: the run's ``privacy`` section (:class:`ubsmoe.config.PrivacyConfig`:
                ``mode``, ``noise_multiplier``, ``counts_noise_multiplier``, ``delta``).
            sample_rate: q = ``fl.fraction``.
            counts_released: whether the clients send noised counts (else only the
                update mechanism is composed).
        """
        counts = privacy.counts_noise_multiplier if counts_released else None
        return cls(privacy.mode, privacy.noise_multiplier, counts, sample_rate, privacy.delta)

    def step(self) -> dict[str, float]:
        """Record one round's releases.

        Returns:
            ``{"epsilon": cumulative, "epsilon_round": one round alone, "delta",
            "noise_multiplier": combined, "sample_rate", "rounds"}``.
        """
        self.rounds += 1
        if self.noise_multiplier > 0:
            self._rdp.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return self.spent()

    def spent(self) -> dict[str, float]:
        """The same record as :meth:`step` returns, without composing a round."""
        return {"epsilon": self.epsilon(), "epsilon_round": self.epsilon_round(),
                "delta": self.delta, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "rounds": float(self.rounds)}

    def epsilon(self) -> float:
        """Cumulative epsilon at ``delta`` over the rounds so far (0 before any; inf without noise)."""
        if self.rounds == 0:
            return 0.0
        if self.noise_multiplier == 0:
            return math.inf
        return float(self._rdp.get_epsilon(delta=self.delta))

    def epsilon_round(self) -> float:
        """Epsilon at ``delta`` of a single round alone (inf without noise)."""
        if self.noise_multiplier == 0:
            return math.inf
        # lazy: opacus takes seconds to import, only DP runs need it
        from opacus.accountants import RDPAccountant

        one = RDPAccountant()
        one.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return float(one.get_epsilon(delta=self.delta))

    def state_dict(self) -> dict[str, Any]:
        """For resume: the settings and the number of rounds composed."""
        return {"mode": self.mode, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "delta": self.delta, "rounds": self.rounds}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the settings must match this accountant's.

        Raises:
            ValueError: a setting differs (resuming under other privacy settings
                would make the reported epsilon wrong).
        """
        for key in ("mode", "noise_multiplier", "sample_rate", "delta"):
            if state[key] != getattr(self, key):
                raise ValueError(f"privacy accountant state: {key} got {state[key]!r}, "
                                 f"expected this run's {getattr(self, key)!r}")
        # lazy: opacus takes seconds to import, only DP runs need it
        from opacus.accountants import RDPAccountant

        self._rdp = RDPAccountant()
        self.rounds = int(state["rounds"])
        if self.noise_multiplier > 0:
            for _ in range(self.rounds):
                self._rdp.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, rounds: int,
                               sample_rate: float) -> float:
    """The combined noise multiplier that reaches ``target_epsilon`` after ``rounds`` (Opacus RDP).

    Example (issue 25): 20 rounds, q = 1, epsilon 8, delta 1e-5 give about 2.85.
    Split it between updates and counts with :func:`combined_noise_multiplier`.
    """
    # lazy: opacus takes seconds to import
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=rounds, accountant="rdp"))
