"""The ``privacy`` section: client-level differential privacy (issue 25, docs/privacy.md).

:class:`PrivacyConfig` validates each field on its own; :func:`privacy_run_errors`
checks it against the rest of the run (aggregation and norm rejection), and the
method registry checks it against the method (each method's ``privacy_modes``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ubsmoe.config.choices import PRIVACY_GROUPS as GROUPS
from ubsmoe.config.choices import PRIVACY_MODES as MODES
from ubsmoe.errors import ConfigError
from ubsmoe.errors import bad_value as _bad

__all__ = ["PrivacyConfig", "privacy_run_errors"]


@dataclass
class PrivacyConfig:
    """The ``privacy`` section: client-level DP for updates and utilization counts.

    Attributes:
        mode: ``off`` (default; nothing changes), ``central`` (clients clip, the
            server adds noise to the sum: a trusted server, protected outputs) or
            ``local`` (each client clips and noises its own update and counts: the
            server is not trusted).
        noise_multiplier: sigma >= 0, the update noise's standard deviation in units
            of ``clipping_norm`` (on the sum in central mode, on each client's update
            in local mode). 0 adds no noise (no DP; epsilon is infinite).
        clipping_norm: C > 0, the L2 bound on one client's update over all
            privatised tensors together. ``inf`` means no clipping and is allowed
            only with ``noise_multiplier == 0`` (then the update path is exactly
            DP off).
        delta: the delta at which epsilon is reported, in (0, 1); typically below
            1 / num_clients.
        groups: which parameter groups are privatised: ``["all"]`` (default) or a
            non-empty subset of ``experts`` (per-expert LoRA), ``shared`` (every
            other LoRA adapter, e.g. attention), ``router`` (trainable router
            weights), ``phi`` (DMR's modulation). Groups left out are uploaded in
            the clear and are not protected (see docs/privacy.md).
        counts_noise_multiplier: sigma_k >= 0 for the utilization counts, in units
            of their sensitivity :func:`ubsmoe.core.privacy.counts_sensitivity`; 0 withholds the counts
            under DP (clients send zeros), which methods that use them refuse
            (:func:`ubsmoe.methods.registry.check_method_against_run`).
        noise_seed: -1 (default): every noise generator is seeded from the OS's
            entropy, a fresh secret every run. An integer >= 0 makes the noise
            reproducible, and anyone who knows it can regenerate and subtract the
            noise, so a seeded run is for experiments only. (An integer, not null,
            because the config travels to the clients as a Flower ConfigRecord.)

    Raises:
        ConfigError: one line per bad field, naming it, its value and what is allowed.
    """

    mode: str = "off"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    groups: list[str] = field(default_factory=lambda: ["all"])
    counts_noise_multiplier: float = 1.0
    noise_seed: int = -1

    def __post_init__(self) -> None:
        if self.mode is False or self.mode == "False":  # YAML 1.1 reads a bare ``off`` as false
            self.mode = "off"
        errors = []
        if self.mode not in MODES:
            errors.append(_bad("privacy.mode", self.mode, f"one of {', '.join(MODES)}"))
        if not _is_number(self.noise_multiplier) or not 0 <= self.noise_multiplier < math.inf:
            errors.append(_bad("privacy.noise_multiplier", self.noise_multiplier,
                               "a finite number >= 0"))
        if not _is_number(self.clipping_norm) or not self.clipping_norm > 0:
            errors.append(_bad("privacy.clipping_norm", self.clipping_norm,
                               "a number > 0 (inf: no clipping, only with noise_multiplier 0)"))
        elif (math.isinf(self.clipping_norm) and _is_number(self.noise_multiplier)
              and self.noise_multiplier > 0):
            errors.append(_bad("privacy.clipping_norm", self.clipping_norm,
                               "a finite number > 0 when privacy.noise_multiplier > 0 "
                               "(the noise is noise_multiplier x clipping_norm)"))
        if not _is_number(self.delta) or not 0 < self.delta < 1:
            errors.append(_bad("privacy.delta", self.delta, "a number in (0, 1), e.g. 1e-5"))
        groups = [self.groups] if isinstance(self.groups, str) else self.groups
        if (not isinstance(groups, Sequence) or not groups
                or not all(isinstance(g, str) for g in groups)
                or (list(groups) != ["all"] and not set(groups) <= set(GROUPS))
                or len(set(groups)) != len(groups)):
            errors.append(_bad("privacy.groups", self.groups,
                               f"[all] or a non-empty list of distinct names from "
                               f"{', '.join(GROUPS)}"))
        else:
            self.groups = list(groups)
        if (not _is_number(self.counts_noise_multiplier)
                or not 0 <= self.counts_noise_multiplier < math.inf):
            errors.append(_bad("privacy.counts_noise_multiplier", self.counts_noise_multiplier,
                               "a finite number >= 0 (0: counts withheld under DP)"))
        if (isinstance(self.noise_seed, bool) or not isinstance(self.noise_seed, int)
                or self.noise_seed < -1):
            errors.append(_bad("privacy.noise_seed", self.noise_seed,
                               "-1 (a secret seed from OS entropy) or an integer >= 0"))
        if errors:
            raise ConfigError("\n".join(errors))

    @property
    def seed(self) -> int | None:
        """The noise seed for :func:`ubsmoe.core.privacy.noise_generator` (None: secret)."""
        return None if self.noise_seed < 0 else self.noise_seed

    @property
    def enabled(self) -> bool:
        """True unless ``mode == "off"``."""
        return self.mode != "off"


def _is_number(x: Any) -> bool:
    """A real number (int or float, not bool), possibly inf; False for NaN."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def privacy_run_errors(privacy: PrivacyConfig, aggregation: str,
                       reject_norm_multiple: float) -> list[str]:
    """Why this privacy setting cannot run with the run's aggregation settings, one line each.

    DP needs the plain (uniform) mean: ``fl.aggregation`` must be ``mean`` (central: a
    median or trimmed mean has no bounded L2 sensitivity to one client; local: it
    does not average the noise down as 1/sqrt(n)), and ``fl.reject_norm_multiple``
    must be 0 (clipping already bounds each update; rejecting by norm makes a
    client's inclusion depend on its data). The data-size weights p_c are replaced
    by uniform weights under DP (clients report one example each), so there is no
    weighting to refuse.

    Args:
        privacy: the privacy section.
        aggregation: ``fl.aggregation``.
        reject_norm_multiple: ``fl.reject_norm_multiple``.

    Returns:
        One line per conflict; empty when ``privacy.mode == "off"``.
    """
    if not privacy.enabled:
        return []
    mode = privacy.mode
    errors = []
    if aggregation != "mean":
        why = ("a median or trimmed mean has no bounded L2 sensitivity to one client"
               if mode == "central" else
               "a median or trimmed mean of noisy replies does not average their noise "
               "down as 1/sqrt(n)")
        errors.append(_bad("fl.aggregation", aggregation,
                           f"'mean' with privacy.mode={mode} ({why})"))
    if reject_norm_multiple != 0:
        errors.append(_bad("fl.reject_norm_multiple", reject_norm_multiple,
                           f"0 with privacy.mode={mode} (clipping already bounds each update; "
                           "rejecting by norm makes inclusion depend on one client's data)"))
    return errors
