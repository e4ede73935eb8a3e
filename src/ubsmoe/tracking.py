"""Per-round scalars to TensorBoard and W&B, beside ``metrics.jsonl`` (``log`` config section).

Every record the server appends to ``metrics.jsonl`` (``train``, ``diagnostics``,
``eval``, ``timing``) is flattened to ``/``-joined scalar tags by :func:`record_scalars`
and written at step = the record's round by a :class:`RunTracker`:

- TensorBoard (``log.tensorboard``, default on): event files in ``run_dir/tensorboard/``
  through ``torch.utils.tensorboard.SummaryWriter``; a resumed run opens the writer
  with ``purge_step`` = the first round it will run, so steps a crashed run wrote
  after its last checkpoint are dropped, not duplicated.
- Weights & Biases (``log.wandb``): ``wandb.init(project=log.wandb_project,
  dir=run_dir, config=<resolved config>, id=<run id>, resume="allow")``; the run id
  is stored in ``run_dir/wandb_run_id.txt``, so ``--resume`` continues the same W&B run.

Pure Python and torch; knows nothing of Flower.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Any

from ubsmoe.io import atomic_write_text

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"
NOT_METRICS = ("id", "pid")  # identifiers in a client's record, not measurements
BYTES_KEYS = ("bytes_up", "bytes_down")


def _fmt_budget(value: Any) -> str:
    return f"{float(value):g}"


def flatten_scalars(tree: Any, prefix: str) -> dict[str, float]:
    """The numeric leaves of nested dicts/lists as ``{"prefix/key/sub": value}``.

    Dict keys and list indices become path parts; a list of dicts with an ``id``
    key is indexed by that id (``clients/3/loss``). Booleans become 0/1. Strings,
    None, non-finite numbers and matrices (lists of lists, e.g. the utilization
    ``[L, E]``) are left out: they are not scalars.

    Args:
        tree: a JSON-like value.
        prefix: the tag of ``tree`` itself.

    Returns:
        Tag -> float, in the record's order.
    """
    out: dict[str, float] = {}
    if isinstance(tree, bool):
        out[prefix] = float(tree)
    elif isinstance(tree, (int, float)):
        if math.isfinite(float(tree)):
            out[prefix] = float(tree)
    elif isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten_scalars(value, f"{prefix}/{key}"))
    elif isinstance(tree, (list, tuple)):
        if any(isinstance(v, (list, tuple)) for v in tree):
            return out  # a matrix, not a scalar series
        for i, value in enumerate(tree):
            if isinstance(value, dict) and "id" in value:  # indexed by its id, which is not a metric
                key, value = value["id"], {k: v for k, v in value.items() if k not in NOT_METRICS}
            else:
                key = i
            out.update(flatten_scalars(value, f"{prefix}/{key}"))
    return out


def record_scalars(record: dict[str, Any]) -> dict[str, float]:
    """Scalar tags of one ``metrics.jsonl`` record.

    Tags (``round`` and ``type`` are the step and the prefix, not tags):

    - ``train``: ``train/loss``, ``train/round_wall_s``, ``train/aggregate_s``, ...,
      ``train/bytes_up`` / ``train/bytes_down`` (bytes, summed over the round's
      clients) and per client ``train/clients/<id>/<metric>`` (loss, top_k, examples,
      bytes up/down, ...; not its id or pid);
    - ``diagnostics``: ``diagnostics/entropy/mean``, ``diagnostics/entropy/per_layer/<l>``,
      ``diagnostics/gini/mean``, ``diagnostics/phi/...``, ``diagnostics/pg_alignment/<i>/...``;
    - ``eval``: ``eval/<protocol>/<top_k_mode>/budget_<beta>/average`` (accuracy in
      [0, 1]), ``.../<task>`` per task and ``.../top_k``, ``.../lora_rank``;
    - ``timing``: ``timing/eval_s``; any other type: ``<type>/<key>``.

    Args:
        record: a metrics record with ``type`` and ``round``.

    Returns:
        Tag -> float.
    """
    kind = str(record.get("type", "record"))
    if kind == "eval":
        prefix = (f"eval/{record['protocol']}/{record.get('top_k_mode', 'budget')}/"
                  f"budget_{_fmt_budget(record['budget'])}")
        out = {f"{prefix}/average": float(record["average"])}
        out.update(flatten_scalars(record.get("per_task", {}), prefix))
        for key in ("top_k", "lora_rank"):
            if key in record:
                out.update(flatten_scalars(record[key], f"{prefix}/{key}"))
        return out
    body = {k: v for k, v in record.items() if k not in ("type", "round")}
    out = flatten_scalars(body, kind)
    if kind == "train":  # the round's traffic, all clients together
        for key in BYTES_KEYS:
            values = [c[key] for c in record.get("clients", []) if isinstance(c.get(key), (int, float))]
            if values:
                out[f"train/{key}"] = float(sum(values))
    return out


class RunTracker:
    """Writes each metrics record's scalars to TensorBoard and/or W&B at step = round.

    Args:
        run_dir: the run directory (``tensorboard/`` and the W&B id file go there).
        tensorboard: write TensorBoard event files.
        wandb: log to W&B (the ``wandb`` package must be importable).
        wandb_project: W&B project name.
        config: the resolved run config (``RunConfig.to_dict()``) for W&B's run config.
        start_round: the first round this process will run (1 for a new run; the
            checkpoint's round + 1 on resume): TensorBoard purges steps >= it.

    Raises:
        ImportError: ``wandb`` is true and the package is not installed.
    """

    def __init__(self, run_dir: Path, tensorboard: bool = True, wandb: bool = False,
                 wandb_project: str = "ubsmoe", config: dict[str, Any] | None = None,
                 start_round: int = 1) -> None:
        self.run_dir = Path(run_dir)
        self.writer = None
        self.wandb_run = None
        if tensorboard:
            # optional (log.tensorboard): imports tensorboard only when asked for
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR),
                                        purge_step=start_round if start_round > 1 else None)
        if wandb:
            # optional (log.wandb): may not be installed
            import wandb as wandb_module

            id_file = self.run_dir / WANDB_ID_FILE
            if id_file.is_file():
                run_id = id_file.read_text(encoding="utf-8").strip()
            else:
                run_id = uuid.uuid4().hex[:12]
                atomic_write_text(id_file, run_id + "\n")
            self.wandb_run = wandb_module.init(project=wandb_project, dir=str(self.run_dir),
                                               config=config or {}, id=run_id, resume="allow")

    def log(self, record: dict[str, Any]) -> dict[str, float]:
        """Write one metrics record's scalars at step ``record["round"]``; return them.

        Records without a ``round`` are not written (nothing to put them against).
        """
        if "round" not in record:
            return {}
        step = int(record["round"])
        scalars = record_scalars(record)
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, global_step=step)
            self.writer.flush()
        if self.wandb_run is not None and scalars:
            self.wandb_run.log(scalars, step=step)
        return scalars

    def close(self) -> None:
        """Flush and close the writers (the W&B run is finished)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
