"""Robust aggregation rules: coordinate-wise median and trimmed mean (plain PyTorch).

Used in place of the p_c-weighted mean (``fl.aggregation``) for the tensors a
method averages with data weights (:class:`~ubsmoe.methods.aggregation.FedAvgAggregator`).
Both rules are unweighted across the round's good replies, as in Yin et al., 2018,
"Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates" (ICML),
where the coordinate-wise median and the beta-trimmed mean are defined.
"""

from __future__ import annotations

import math

import torch

ROBUST_RULES = ("median", "trimmed_mean")


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median over clients (Yin et al., 2018, Definition 1).

    For an even count, the mean of the two middle values (so the rule is symmetric).

    Args:
        stack: ``[C, ...]``, one row per client.

    Returns:
        ``[...]`` in ``stack``'s dtype.

    Raises:
        ValueError: an empty stack.
    """
    if stack.shape[0] == 0:
        raise ValueError("coordinate_median: no client updates")
    s = stack.sort(dim=0).values
    c = s.shape[0]
    return s[c // 2] if c % 2 else (s[c // 2 - 1] + s[c // 2]) / 2


def trimmed_mean(stack: torch.Tensor, trim_fraction: float) -> torch.Tensor:
    """Coordinate-wise beta-trimmed mean (Yin et al., 2018, Definition 2).

    Per coordinate, drops the ``floor(trim_fraction x C)`` smallest and as many
    largest values and averages the rest.

    Args:
        stack: ``[C, ...]``, one row per client.
        trim_fraction: beta in [0, 0.5).

    Returns:
        ``[...]`` in ``stack``'s dtype.

    Raises:
        ValueError: an empty stack or beta outside [0, 0.5).
    """
    if stack.shape[0] == 0:
        raise ValueError("trimmed_mean: no client updates")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trimmed_mean: trim_fraction {trim_fraction} not in [0, 0.5)")
    c = stack.shape[0]
    cut = math.floor(trim_fraction * c)
    s = stack.sort(dim=0).values
    return s[cut:c - cut].mean(dim=0)


def robust_aggregate(stack: torch.Tensor, rule: str, trim_fraction: float = 0.1) -> torch.Tensor:
    """Apply ``rule`` (``median`` or ``trimmed_mean``) over dim 0 of ``stack`` ``[C, ...]``.

    Raises:
        ValueError: an unknown rule or an empty stack.
    """
    if rule == "median":
        return coordinate_median(stack)
    if rule == "trimmed_mean":
        return trimmed_mean(stack, trim_fraction)
    raise ValueError(f"robust aggregation: got {rule!r}, expected one of {', '.join(ROBUST_RULES)}")
