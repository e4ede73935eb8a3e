"""The run directory's layout and its round checkpoints (plain PyTorch, no Flower).

A run directory holds ``config.yaml`` (the resolved config), ``provenance.json`` (versions, git commit,
device, command; :mod:`ubsmoe.provenance`), ``tensorboard/`` (event files,
:mod:`ubsmoe.tracking`), ``metrics.jsonl`` (one
line per round, diagnostics and evaluation), ``summary.json`` and ``checkpoints/``:
``round_XXXX.pt`` (a :class:`~ubsmoe.fl.state.ServerState`, enough to resume) and ``adapter/`` (the
final adapters, :mod:`ubsmoe.fl.export`).
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
PROVENANCE_FILE = "provenance.json"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint file of a run directory, or None."""
    ckpts = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("round_*.pt"))
    return ckpts[-1] if ckpts else None


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``checkpoints/round_XXXX.pt`` of a run directory.

    Called only after a new checkpoint has been renamed into place (atomic write),
    so a crash at any point leaves at least one complete checkpoint for ``--resume``.
    The final adapters (``checkpoints/adapter``) are not round checkpoints and are
    never touched.

    Args:
        run_dir: the run directory.
        keep: how many of the newest round checkpoints to keep; 0 keeps all.

    Returns:
        The deleted paths, oldest first.
    """
    if keep <= 0:
        return []
    ckpts = sorted((Path(run_dir) / CHECKPOINT_DIR).glob("round_*.pt"))
    doomed = ckpts[:-keep]
    for path in doomed:
        path.unlink(missing_ok=True)
    return doomed
