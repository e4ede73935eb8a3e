"""Run provenance: package versions, git commit, device, command line, Python, platform.

Written to ``run_dir/provenance.json`` when a run (or a resume) starts and kept as
``summary["provenance"]``, so every result says what produced it.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

import ubsmoe

PACKAGES = ("torch", "transformers", "peft", "flwr", "ubsmoe", "datasets", "numpy", "tokenizers",
            "tensorboard", "ray")
GIT_TIMEOUT_S = 10.0


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """``{"python": "3.x.y", package: version or None when not installed}``."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        if name == "ubsmoe":  # the imported checkout, whatever is installed
            out[name] = ubsmoe.__version__
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (default: this package's source).

    Returns:
        The 40-hex commit, with ``+dirty`` appended when tracked files differ from
        it (``git status --porcelain --untracked-files=no`` is non-empty); None when
        ``path`` is not in a git work tree or git is not installed.
    """
    where = Path(path) if path is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        """stdout of ``git -C where ARGS`` stripped, or None when git fails or is absent."""
        try:
            done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                                  timeout=GIT_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}+dirty" if status else commit


def device_name(device: torch.device | str) -> str:
    """``"cpu"``, or ``"cuda:0 (NVIDIA H200)"`` for a CUDA device (its GPU name)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def provenance(command: str | None, device: torch.device | str) -> dict[str, Any]:
    """The run's provenance record.

    Args:
        command: the invoking command line (``sys.argv`` joined by ``ubsmoe run``);
            None when unknown (e.g. a bare ``flwr run``).
        device: the server model's device.

    Returns:
        Exactly the keys ``versions`` (:func:`package_versions`), ``git_commit``
        (:func:`git_commit`), ``device`` (:func:`device_name`), ``command``,
        ``python`` (implementation, version and executable) and ``platform``
        (``platform.platform()``).
    """
    return {
        "versions": package_versions(),
        "git_commit": git_commit(),
        "device": device_name(device),
        "command": command,
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
    }
