"""Run every cell of an experiment: one run directory per cell, skip done, resume partial.

A sweep lays its cells out under ``--out`` as ``<label>-<hash>/`` (:func:`cell_dir_name`),
writes each cell's ``cell.json`` atomically before its run starts, skips a cell whose
directory already holds ``summary.json``, resumes one that holds a round checkpoint
(``ubsmoe run --resume``) and starts the others fresh. Each run is its own
``ubsmoe run`` process (its logs in ``<run_dir>/sweep.log``), so a failing run does
not stop the sweep and several runs can share a machine: one at a time on CPU, one
per GPU when several are visible. A run placed on GPU i sees only that GPU
(``CUDA_VISIBLE_DEVICES`` of its process, so its simulation runtime offers its clients
that GPU alone) and runs with ``model.device=cuda`` (outside the hash).

``--reuse DIR``: a queued cell whose resolved config (its hash) equals a finished run
under DIR (``*-<hash>/summary.json``, e.g. the default UB-SMoE cell that several
sweeps share) is copied instead of run: the copy's ``cell.json`` is this cell's, with
``reused_from`` naming the source. A run is a deterministic function of its config on
the CPU, so the copy is the run this cell would make there.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ubsmoe.config import RunConfig, load_saved_config, save_config
from ubsmoe.errors import ConfigError
from ubsmoe.experiments import Cell, Experiment, cell_dir_name, cell_record, resolve_cell
from ubsmoe.fl.run_dir import CONFIG_FILE, SUMMARY_FILE, latest_checkpoint
from ubsmoe.io import atomic_write_json

CELL_FILE = "cell.json"
LOG_FILE = "sweep.log"
STATES = ("queued", "running", "done", "skipped", "failed")


@dataclass
class SweepItem:
    """One cell of a sweep and where it stands.

    Attributes:
        cell: the grid cell.
        cfg: its validated resolved config.
        run_dir: ``<out>/<label>-<hash>``.
        state: ``queued``, ``running``, ``done`` (ran now), ``skipped`` (was complete)
            or ``failed``.
        resume: the run continues from a checkpoint.
        device: its GPU slot, ``cuda:i`` (the i-th visible GPU, the only one its run
            sees); None: the config's own device.
        seconds: wall time of its run in this sweep (s), once finished.
        message: the failure's one line, when failed; ``reused <dir>`` for a copy.
        reuse_from: a finished run of the same config hash to copy instead of running.
    """

    cell: Cell
    cfg: RunConfig
    run_dir: Path
    state: str = "queued"
    resume: bool = False
    device: str | None = None
    seconds: float = 0.0
    message: str = ""
    reuse_from: Path | None = None


def plan_sweep(experiment: Experiment, out: Path, scale: str = "tiny", methods: list[str] | None = None,
               seeds: int | None = None, overrides: list[str] | None = None,
               reuse: Sequence[Path] = ()) -> list[SweepItem]:
    """Validate every cell and lay out its run directory; nothing is written.

    Args:
        experiment: the experiment.
        out: the sweep's directory.
        scale: ``tiny`` or ``paper``.
        methods: keep only these methods.
        seeds: run seeds ``0..N-1`` instead of the scale's.
        overrides: ``key=value`` config overrides applied to every cell.
        reuse: folders of finished runs; a fresh cell whose config hash matches one
            (``*-<hash>/summary.json``) gets ``reuse_from`` (copied, not run).

    Returns:
        One item per cell; ``skipped`` where ``summary.json`` exists, ``resume`` set
        where a round checkpoint exists.

    Raises:
        RequirementError: a cell of an experiment with ``requires`` does not validate.
        ConfigError: any other invalid cell (the first one met).
    """
    items = []
    for cell in experiment.cells(scale, methods=methods, seeds=seeds):
        cfg = resolve_cell(experiment, cell, overrides)
        run_dir = Path(out) / cell_dir_name(cell, cfg)
        item = SweepItem(cell, cfg, run_dir)
        if (run_dir / SUMMARY_FILE).is_file():
            item.state = "skipped"
        elif latest_checkpoint(run_dir) is not None and (run_dir / CONFIG_FILE).is_file():
            item.resume = True
        else:
            item.reuse_from = _finished_twin(run_dir, reuse)
        items.append(item)
    return items


def _finished_twin(run_dir: Path, roots: Sequence[Path]) -> Path | None:
    """A finished run under ``roots`` with ``run_dir``'s config hash (its name's suffix), if any."""
    config_hash = run_dir.name.rsplit("-", 1)[1]
    for root in roots:
        for twin in sorted(Path(root).glob(f"*-{config_hash}")):
            if (twin / SUMMARY_FILE).is_file() and twin.resolve() != run_dir.resolve():
                return twin
    return None


def reuse_item(item: SweepItem) -> None:
    """Copy ``item.reuse_from`` to ``item.run_dir`` (through a temporary folder, then renamed)
    with this cell's ``cell.json`` plus ``reused_from``; the item becomes ``done``."""
    src = item.reuse_from
    tmp = item.run_dir.with_name(item.run_dir.name + ".reuse-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    atomic_write_json(tmp / CELL_FILE, {**cell_record(item.cell, item.cfg), "reused_from": str(src)})
    shutil.rmtree(item.run_dir, ignore_errors=True)
    tmp.rename(item.run_dir)
    item.state, item.message = "done", f"reused {src}"


def parse_part(spec: str) -> tuple[int, int]:
    """``"i/n"`` (``--cells``) -> ``(i, n)`` with ``1 <= i <= n``.

    Raises:
        ConfigError: not two integers ``i/n`` with ``1 <= i <= n``.
    """
    head, sep, tail = spec.partition("/")
    try:
        i, n = int(head), int(tail)
    except ValueError:
        i, n = 0, 0
    if not sep or not 1 <= i <= n:
        raise ConfigError(f"--cells: got {spec!r}, expected i/n with integers 1 <= i <= n (part i of n)")
    return i, n


def select_part(items: Sequence[SweepItem], part: int, parts: int) -> list[SweepItem]:
    """Part ``part`` of ``parts`` of a sweep's cells, for splitting a grid across processes.

    Cell k (0-based, grid order: method, settings, seed) belongs to part
    ``k mod parts + 1``, round robin, so each part gets every method's cells in turn
    and the parts' lengths differ by at most one. The parts of ``1..parts`` are
    disjoint and together are exactly the grid (in its order). Run directories do not
    depend on the split, so processes may share one sweep directory.

    Args:
        items: the sweep's cells (:func:`plan_sweep`).
        part: 1-based part index.
        parts: number of parts, >= 1.

    Returns:
        The cells of that part, in grid order.
    """
    return [item for k, item in enumerate(items) if k % parts == part - 1]


def sweep_devices(cfg: RunConfig, cuda_count: int) -> list[str | None]:
    """The device slots of a sweep: one per visible GPU, else one slot (the config's device).

    Args:
        cfg: any cell's config (its ``model.device`` decides).
        cuda_count: number of visible CUDA devices.

    Returns:
        ``["cuda:0", ..., "cuda:{n-1}"]`` when ``model.device`` is ``auto`` or ``cuda``
        and n > 1 (slot i: the i-th visible GPU, see :func:`visible_device`); else
        ``[None]`` (runs one after another on the config's device).
    """
    if cfg.model.device in ("auto", "cuda") and cuda_count > 1:
        return [f"cuda:{i}" for i in range(cuda_count)]
    return [None]


def visible_device(slot: str, environ: dict[str, str] | None = None) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` value that shows a run only the GPU of ``slot``.

    Args:
        slot: a device slot of :func:`sweep_devices`, ``cuda:i`` (i-th visible GPU).
        environ: the sweep's environment (default ``os.environ``); when it sets
            ``CUDA_VISIBLE_DEVICES`` (ids or UUIDs), its i-th entry, else ``str(i)``.

    Raises:
        ValueError: ``slot`` is not ``cuda:i``, or i is beyond the sweep's visible list.
    """
    head, _, index = slot.partition(":")
    if head != "cuda" or not index.isdigit():
        raise ValueError(f"slot: got {slot!r}, expected cuda:i")
    visible = (os.environ if environ is None else environ).get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return index
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if int(index) >= len(ids):
        raise ValueError(f"slot: got {slot!r}, but CUDA_VISIBLE_DEVICES={visible!r} lists {len(ids)}")
    return ids[int(index)]


def subprocess_runner(item: SweepItem, verbose: bool = False) -> tuple[int, str]:
    """Run one cell as an ``ubsmoe run`` process, output to ``<run_dir>/sweep.log``.

    Returns:
        ``(exit code, last non-empty line of the log)``.

    Raises:
        KeyboardInterrupt: passed on after the child is stopped (it stops its own Flower
            processes on SIGTERM).
    """
    args = ([sys.executable, "-m", "ubsmoe.cli", "run", "--resume", str(item.run_dir)] if item.resume else
            [sys.executable, "-m", "ubsmoe.cli", "run", "-c", str(item.run_dir / CONFIG_FILE),
             "--out", str(item.run_dir), "--force"])
    if verbose:
        args.append("--verbose")
    env = dict(os.environ, COLUMNS="120")
    if item.device is not None:  # one GPU per run: its server and its clients see only that GPU
        env["CUDA_VISIBLE_DEVICES"] = visible_device(item.device)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    log = item.run_dir / LOG_FILE
    with open(log, "ab") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    lines = [ln for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return code, (lines[-1].strip() if lines else "")


def prepare_item(item: SweepItem, device: str | None) -> None:
    """Write ``cell.json`` and the run's ``config.yaml`` (atomically) before the run starts.

    A fresh run gets the resolved config; a resumed one keeps its saved config. Placed
    on a GPU slot (``device`` = ``cuda:i``), the run's ``model.device`` becomes
    ``cuda``: its process sees only that GPU (:func:`visible_device`), so ``cuda``
    is it (the device is outside the config hash); ``item.device`` keeps the slot.
    """
    item.run_dir.mkdir(parents=True, exist_ok=True)
    item.device = device
    atomic_write_json(item.run_dir / CELL_FILE, cell_record(item.cell, item.cfg))
    if item.resume:
        if device is not None:
            saved = load_saved_config(item.run_dir / CONFIG_FILE)
            saved.model.device = "cuda"
            save_config(saved, item.run_dir / CONFIG_FILE)
        return
    if device is not None:
        item.cfg.model.device = "cuda"
    save_config(item.cfg, item.run_dir / CONFIG_FILE)


Runner = Callable[[SweepItem], tuple[int, str]]


def run_sweep(items: Sequence[SweepItem], runner: Runner = subprocess_runner,
              devices: Sequence[str | None] = (None,),
              on_change: Callable[[Sequence[SweepItem]], None] = lambda items: None) -> list[SweepItem]:
    """Run the queued items, one per device slot at a time.

    Args:
        items: from :func:`plan_sweep` (``skipped`` ones are left alone).
        runner: runs one prepared item, returns ``(exit code, last log line)``.
        devices: device slots; one worker per slot (``[None]``: one run at a time on
            each config's own device).
        on_change: called (from the workers, under a lock) whenever an item changes state.

    Returns:
        The items, states updated.

    Raises:
        KeyboardInterrupt: the sweep was interrupted (or whatever the runner raised);
            the running item goes back to ``queued`` (its run directory resumes next
            time), the others are left as they are.
    """
    todo: queue.Queue[SweepItem] = queue.Queue()
    for item in items:
        if item.state == "queued":
            todo.put(item)
    lock = threading.Lock()
    interrupted: list[BaseException] = []

    def changed() -> None:
        """Report the items' states to ``on_change`` (one caller at a time)."""
        with lock:
            on_change(items)

    def work(device: str | None) -> None:
        """Run queued cells on ``device`` (None: the run's own) until the queue is empty or interrupted."""
        while not interrupted:
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            if item.reuse_from is not None:
                reuse_item(item)
                changed()
                continue
            prepare_item(item, device)
            item.state = "running"
            changed()
            start = time.monotonic()
            try:
                code, last = runner(item)
            except BaseException as e:  # noqa: BLE001 (KeyboardInterrupt in the runner: stop everything, re-raised below)
                item.state = "queued"
                interrupted.append(e)
                changed()
                return
            item.seconds = time.monotonic() - start
            if code == 0 and (item.run_dir / SUMMARY_FILE).is_file():
                item.state = "done"
            else:
                item.state, item.message = "failed", f"exit {code}: {last}"
            changed()

    changed()
    if len(devices) == 1:
        work(devices[0])
    else:
        threads = [threading.Thread(target=work, args=(d,), daemon=True) for d in devices]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except KeyboardInterrupt as e:
            interrupted.append(e)
            raise
    if interrupted:
        raise interrupted[0]
    return list(items)


def sweep_eta(items: Sequence[SweepItem], slots: int) -> float | None:
    """Seconds left: mean run time of the items finished in this sweep x runs left / slots.

    Returns:
        None before any run finished.
    """
    times = [i.seconds for i in items if i.state in ("done", "failed") and i.seconds > 0]
    if not times:
        return None
    left = sum(1 for i in items if i.state in ("queued", "running"))
    return sum(times) / len(times) * left / max(slots, 1)
