"""FLOP counting for grouped matmuls with ``torch.utils.flop_counter``.

PyTorch's :class:`~torch.utils.flop_counter.FlopCounterMode` has no formula for
``aten._grouped_mm`` (the op behind ``torch.nn.functional.grouped_mm``), so expert
compute would count as zero. :func:`register_grouped_mm_flops` adds one:
a grouped matmul of ``[rows, k] x [groups, k, n]`` costs ``2 * rows * k * n`` FLOPs
(each row is multiplied by exactly one group's matrix); the backward pass is itself
made of grouped matmuls and is counted by the same formula.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

_REGISTERED = False


def _grouped_mm_flop(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    if len(a_shape) == 2 and len(b_shape) == 3:  # [rows, k] x [G, k, n] -> [rows, n]
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # [m, rows] x [rows, n] -> [G, m, n] (weight grad)
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:  # [G, m, k] x [k, cols] -> [m, cols], groups along cols
        return 2 * b_shape[1] * a_shape[1] * a_shape[2]
    # 3D x 3D: batched matmul per group
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def register_grouped_mm_flops() -> None:
    """Teach ``FlopCounterMode`` the cost of ``aten._grouped_mm`` (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flop)
    _REGISTERED = True
