"""Launch a federated job the way ``flwr run`` does: a private local SuperLink in simulation mode.

``ubsmoe run`` calls :func:`run_federated`, which

1. makes a private Flower home (a temporary folder, not ``~/.flwr``) whose
   ``config.toml`` names one SuperLink connection on a free local port;
2. starts ``flower-superlink --simulation`` there (runtime dependency installation
   off: the run uses this Python environment), in its own session;
3. submits the app shipped with the package (``ubsmoe/flwr_app/pyproject.toml``,
   package data, so it works from a non-editable install) with
   ``flwr run <app> ubsmoe --stream``: the run config carries the resolved ubsmoe
   config, the run directory, ``resume`` and a progress-events file; the federation
   config carries ``fl.num_clients`` SuperNodes and ``fl.client_cpus`` /
   ``fl.client_gpus`` per client;
4. follows the progress events the ServerApp appends (:class:`ubsmoe.fl.server_app.ProgressLog`)
   until ``flwr run`` returns;
5. stops every process it started, with all their descendants (Ray's GCS, raylet,
   workers, the ServerApp and simulation processes), on success, failure, Ctrl-C or
   SIGTERM, and deletes the private home.

Flower's log stream goes to ``<run dir>/ubsmoe.log`` (to the terminal with ``verbose``),
the SuperLink's log to ``<run dir>/superlink.log``, a ServerApp traceback to
``<run dir>/server_error.log``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any

import psutil

from ubsmoe.config import RunConfig, save_config
from ubsmoe.fl.run_dir import METRICS_FILE
from ubsmoe.logs import LOG_FILE

ProgressFn = Callable[[str, dict[str, Any]], None]
CONNECTION = "ubsmoe"
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.2
STREAM_FLUSH_S = 20.0  # wait for `flwr run --stream` to print the run's logs


def _noop(event: str, info: dict[str, Any]) -> None:
    pass


class RunFailed(RuntimeError):
    """The federated run failed; the message is one line, details in the run's logs."""


def app_dir() -> Path:
    """The Flower app directory shipped with the package (holds its ``pyproject.toml``).

    Raises:
        FileNotFoundError: the package data is missing (a broken install).
    """
    path = Path(str(resources.files("ubsmoe").joinpath("flwr_app")))
    if not (path / "pyproject.toml").is_file():
        raise FileNotFoundError(f"the packaged Flower app is missing: {path / 'pyproject.toml'}")
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_path(path: str) -> str:
    """``PATH`` for the programs a run starts: this interpreter's folder first, then ``path``.

    The SuperLink starts ``flower-superexec`` (and the simulation runtime its
    Python) by name on ``PATH``; with this interpreter's folder (a virtual
    environment's ``bin``, not resolved through its symlinks) in front, a CLI started
    by absolute path without an activated environment (cron, systemd, a notebook
    kernel) finds them as :func:`executable` does.

    Args:
        path: the current ``PATH`` (``os.pathsep``-separated; may be empty).

    Returns:
        The new ``PATH``.
    """
    return os.pathsep.join(p for p in (str(Path(sys.executable).parent), path) if p)


def executable(name: str) -> str:
    """Path of a Flower console script: next to this Python first, then on PATH.

    Raises:
        RunFailed: not found.
    """
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RunFailed(f"`{name}` not found next to {sys.executable} or on PATH; install flwr[simulation]")
    return found


def stop_process_tree(procs: list[subprocess.Popen], timeout: float = STOP_TIMEOUT_S,
                      workers: set[int] | None = None) -> list[int]:
    """Stop the given processes and every descendant they have: SIGTERM, then SIGKILL.

    The descendants are listed (psutil) before anything is signalled, since a child
    whose parent dies is re-parented and no longer found under it. Each started
    process leads its own session, so its process group is signalled too (catching
    a grandchild forked after the listing).

    Args:
        procs: processes started with ``start_new_session=True``.
        timeout: seconds to wait after SIGTERM before SIGKILL.
        workers: pids of the run's ClientApp workers (:func:`worker_pids`). Ray's
            workers can outlive the simulation process that started them (re-parented,
            so no longer its descendants); those still running a Ray worker are
            stopped with the rest.

    Returns:
        The pids that had to be killed with SIGKILL.
    """
    tree: dict[int, psutil.Process] = {}
    for proc in procs:
        with suppress(psutil.Error):
            root = psutil.Process(proc.pid)
            tree[root.pid] = root
            for child in root.children(recursive=True):
                tree[child.pid] = child
    for pid in workers or ():
        with suppress(psutil.Error):
            worker = psutil.Process(pid)
            if _is_ray_worker(worker):  # a recycled pid of another program is left alone
                tree.setdefault(pid, worker)

    def signal_all(sig: int, alive: list[psutil.Process]) -> None:
        """Send ``sig`` to every started process, its process group and ``alive`` descendants."""
        for proc in procs:
            if proc.poll() is None:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
        for p in alive:
            with suppress(psutil.Error):
                p.send_signal(sig)

    signal_all(signal.SIGTERM, list(tree.values()))
    _, alive = psutil.wait_procs(list(tree.values()), timeout=timeout)
    killed = [p.pid for p in alive]
    if alive:
        signal_all(signal.SIGKILL, alive)
        psutil.wait_procs(alive, timeout=timeout)
    for proc in procs:  # reap our direct children
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
    return killed


def _is_ray_worker(proc: psutil.Process) -> bool:
    """True when ``proc`` runs a Ray worker (its title ``ray::...``, e.g. ``ray::ClientAppActor``).

    Raises:
        psutil.Error: the process is gone or cannot be read.
    """
    return proc.name().startswith("ray::") or any(part.startswith("ray::") for part in proc.cmdline())


def worker_pids(run_dir: Path) -> set[int]:
    """The pids of the ClientApp workers that trained in this run (train records' ``clients[].pid``)."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return set()
    pids = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        with suppress(ValueError):
            record = json.loads(line)
            if record.get("type") == "train":
                pids |= {int(c["pid"]) for c in record.get("clients", []) if c.get("pid")}
    return pids


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt (main thread only) so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        """SIGTERM -> KeyboardInterrupt, so the same cleanup runs as on Ctrl-C."""
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def federation_config(cfg: RunConfig, verbose: bool = False) -> str:
    """The ``flwr run --federation-config`` value of a run (Flower's SimulationConfig keys).

    ``num-supernodes`` = ``fl.num_clients``; ``client-resources-num-cpus`` /
    ``-num-gpus`` = ``fl.client_cpus`` / ``fl.client_gpus`` (Ray resources per
    ClientApp worker: the simulation runs floor(available / per-client) workers at
    once); Ray's own logging at ERROR unless ``verbose``.
    """
    level = "INFO" if verbose else "ERROR"
    return (f"num-supernodes={cfg.fl.num_clients} "
            f"client-resources-num-cpus={int(cfg.fl.client_cpus)} "
            f"client-resources-num-gpus={float(cfg.fl.client_gpus)} "
            f'init-args-logging-level="{level}" '
            f"init-args-log-to-driver={'true' if verbose else 'false'}")


def _root_exception_line(log: Path) -> str:
    """The first ``SomeError: message`` line of a log (the root of a chained traceback), or ''."""
    if not log.is_file():
        return ""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    hits = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", ln)
            and not ln.startswith("RuntimeError: An error was encountered")]
    return hits[0] if hits else ""


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def _wait_healthy(port: int, superlink: subprocess.Popen, log: Path, cafile: Path | None = None) -> None:
    """Wait until the SuperLink answers ``/health`` (over TLS verified by ``cafile`` if given).

    Raises:
        RunFailed: it exited or did not answer within ``STARTUP_TIMEOUT_S``.
    """
    scheme = "https" if cafile is not None else "http"
    context = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if superlink.poll() is not None:
            raise RunFailed(f"flower-superlink exited with code {superlink.returncode}; see {log}")
        with suppress(OSError), urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health",
                                                        timeout=0.5, context=context) as r:
            if r.status == 200:
                return
        time.sleep(POLL_S)
    raise RunFailed(f"flower-superlink did not answer on 127.0.0.1:{port} within {STARTUP_TIMEOUT_S:.0f}s; "
                    f"see {log}")


class _EventReader:
    """Reads whole new JSON lines from the ServerApp's progress file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        """The events appended since the last call (complete lines only)."""
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # an unterminated tail is read next time
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]


def absolute_model_path(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a relative ``model.name`` that is a local folder made absolute (this process's cwd).

    The SuperLink's ServerApp and ClientApps run in other working directories, where
    ``model.name=src/ubsmoe/testbed_base`` would be read as a hub name.
    """
    path = Path(cfg.model.name).expanduser()
    if path.is_absolute() or not path.is_dir():
        return cfg
    return replace(cfg, model=replace(cfg.model, name=str(path.resolve())))


def run_federated(cfg: RunConfig, run_dir: Path, resume: bool = False, progress: ProgressFn = _noop,
                  verbose: bool = False, command: str | None = None) -> dict[str, Any]:
    """Run the federated job on a private local SuperLink (Flower's simulation runtime).

    ``cfg.fl.num_clients`` simulated SuperNodes, ``fl.client_cpus`` CPUs and
    ``fl.client_gpus`` GPUs per client (Ray resources; one ClientApp worker process
    per slot, each building one model and reusing it for every client it serves).

    Args:
        cfg: validated run config.
        run_dir: run directory (created; resumed from its latest checkpoint if ``resume``).
        resume: continue from the latest checkpoint in ``run_dir``.
        progress: callback ``(event, info)``: ``round_start`` {round, clients},
            ``client_done`` {round}, ``aggregate`` {round}, ``round_end`` {round, loss}.
        verbose: Flower's log stream (and Ray's logs) to the terminal instead of
            ``run_dir/ubsmoe.log``.
        command: the invoking command line, passed in the run config (``command``)
            to the ServerApp for the run's provenance.

    Returns:
        The run summary (``run_dir/summary.json``).

    Raises:
        RunFailed: the SuperLink did not start, the run failed (the ServerApp's error,
            one line) or ended without a result.
        KeyboardInterrupt: Ctrl-C or SIGTERM; every started process is stopped first.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = absolute_model_path(cfg)
    home = Path(tempfile.mkdtemp(prefix="ubsmoe-flwr-"))
    procs: list[subprocess.Popen] = []
    log_file = None
    try:
        with _sigterm_as_interrupt():
            port = free_port()
            (home / "config.toml").write_text(
                f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                f'address = "127.0.0.1:{port}"\ninsecure = true\n', encoding="utf-8")
            cfg_file = home / "config.yaml"
            save_config(cfg, cfg_file)
            events_file = home / "progress.jsonl"
            (home / "run_config.toml").write_text(
                f"config-file = {_toml_str(str(cfg_file))}\noverrides = \"\"\n"
                f"out = {_toml_str(str(run_dir))}\nresume = {'true' if resume else 'false'}\n"
                f"progress-file = {_toml_str(str(events_file))}\n"
                f"command = {_toml_str(command or '')}\n", encoding="utf-8")
            env = dict(os.environ, FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1",
                       FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
            # The SuperLink's ServerApp/ClientApp processes import this very ubsmoe.
            package_root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
            env["PATH"] = child_path(os.environ.get("PATH", ""))
            superlink_log = run_dir / "superlink.log"
            flower_log = run_dir / LOG_FILE
            log_file = None if verbose else open(flower_log, "ab")  # noqa: SIM115 (closed in finally)
            # The SuperLink's console output is that of the simulation process it starts (Flower's
            # simulation banners, Ray's tips, the ServerApp's and ClientApps' warnings): into the
            # run's log (the terminal with --verbose).
            procs.append(subprocess.Popen(
                [executable("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                 "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation",
                 "--log-file", str(superlink_log)],
                env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT if log_file else None, start_new_session=True))
            _wait_healthy(port, procs[0], superlink_log)
            federation = federation_config(cfg, verbose)
            procs.append(subprocess.Popen(
                [executable("flwr"), "run", str(app_dir()), CONNECTION, "--stream",
                 "--run-config", str(home / "run_config.toml"), "--federation-config", federation],
                env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT if log_file else None, start_new_session=True))
            events = _EventReader(events_file)
            result: dict[str, Any] = {}

            def drain() -> None:
                """Forward the progress events written so far to the display."""
                for ev in events.read():
                    name = ev.pop("event")
                    if name in ("done", "error"):
                        result[name] = ev
                    else:
                        progress(name, ev)

            while procs[1].poll() is None and "done" not in result and "error" not in result:
                if procs[0].poll() is not None:
                    raise RunFailed(f"flower-superlink exited with code {procs[0].returncode} "
                                    f"during the run; see {superlink_log}")
                drain()
                time.sleep(POLL_S)
            drain()
            # `flwr run --stream` prints the run's log stream (the simulation's banners, Ray's
            # tips, the apps' warnings) when the run ends: give it STREAM_FLUSH_S to do so.
            with suppress(subprocess.TimeoutExpired):
                procs[1].wait(timeout=STREAM_FLUSH_S)
            if "error" in result:
                with open(run_dir / "server_error.log", "w", encoding="utf-8") as f:
                    f.write(result["error"].get("traceback", ""))
                raise RunFailed(f"the ServerApp failed: {result['error']['message']} "
                                f"(traceback: {run_dir / 'server_error.log'})")
            if "done" not in result:
                cause = _root_exception_line(flower_log)
                raise RunFailed(f"`flwr run` exited with code {procs[1].returncode} without a result"
                                f"{f' ({cause})' if cause else ''}; see {flower_log} and {superlink_log}")
            return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    finally:
        stop_process_tree(procs, workers=worker_pids(run_dir))
        if log_file is not None:
            log_file.close()
        shutil.rmtree(home, ignore_errors=True)
