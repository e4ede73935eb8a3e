"""Atomic writes for run directories: a crash never leaves a half-written file.

Every file is written to a temporary sibling, flushed, fsync'ed and then moved
into place with :func:`os.replace`, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _current_umask() -> int:
    """The process umask (read once at import; ``os.umask`` can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates its file 0600; a finished file gets the mode a plain open() would give.
_DEFAULT_MODE = 0o666 & ~_current_umask()


def _atomic(path: Path, write: Callable[[Any], None], mode: str, file_mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _DEFAULT_MODE if file_mode is None else file_mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, file_mode: int | None = None) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating parent folders.

    ``file_mode`` (e.g. ``0o600`` for a private key) is set before the file appears;
    None: what ``open()`` would give under the process umask (0644 under umask 022).
    """
    _atomic(Path(path), lambda f: f.write(text.encode("utf-8")), "wb", file_mode)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating parent folders."""
    _atomic(Path(path), lambda f: f.write(data), "wb")


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically."""
    import torch  # lazy: the foundation stays torch-free for the JSON/text writers (start-up time)

    _atomic(Path(path), lambda f: torch.save(obj, f), "wb")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``path`` and fsync it.

    An append of one short line either lands whole or, after a crash, leaves a last
    line without a newline; :func:`read_jsonl` skips such a torn last line.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file, ignoring a torn (unterminated) last line."""
    out = []
    text = Path(path).read_text(encoding="utf-8")
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if i == len(lines) - 1:  # no trailing newline: a torn write
            break
        out.append(json.loads(line))
    return out
