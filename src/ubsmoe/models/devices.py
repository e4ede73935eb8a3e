"""``model.device`` / ``model.dtype`` resolved to torch objects against the visible devices."""

from __future__ import annotations

import torch

from ubsmoe.budgets import DEVICE_NAMES, valid_device_name
from ubsmoe.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """The torch device of ``model.device``.

    Args:
        name: ``auto`` (``cuda:0`` when a CUDA device is visible, else CPU), ``cpu``,
            ``cuda`` (the current CUDA device) or ``cuda:N``.

    Returns:
        The device (``meta`` is accepted too, for shape-only builds).

    Raises:
        ConfigError: an unknown name, CUDA asked for without a visible CUDA device,
            or ``cuda:N`` beyond the visible devices (one line naming ``model.device``).
    """
    if name in ("cpu", "meta"):
        return torch.device(name)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "auto":
        return torch.device("cuda", 0) if count else torch.device("cpu")
    if not valid_device_name(name):
        raise ConfigError(f"model.device: got {name!r}, expected {DEVICE_NAMES}")
    _, sep, index = name.partition(":")
    if count == 0:
        raise ConfigError(f"model.device: got {name!r}, expected auto or cpu (no CUDA device visible)")
    if not sep:
        return torch.device("cuda", torch.cuda.current_device())
    if int(index) >= count:
        raise ConfigError(f"model.device: got {name!r}, expected auto, cpu, cuda or cuda:0..cuda:{count - 1} "
                          f"({count} CUDA device{'s' if count > 1 else ''} visible)")
    return torch.device("cuda", int(index))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype of ``model.dtype`` on ``device``.

    Args:
        name: ``auto`` (bfloat16 on a CUDA device, float32 elsewhere), ``float32``,
            ``bfloat16`` or ``float16``.
        device: the resolved device (:func:`resolve_device`).

    Raises:
        ConfigError: an unknown dtype name.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype: got {name!r}, expected one of auto, float32, bfloat16, float16")
    return getattr(torch, name)
