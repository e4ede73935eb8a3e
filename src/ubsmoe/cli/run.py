"""``ubsmoe run`` (fresh or ``--resume``) and ``ubsmoe eval``: start, follow and re-score a run."""

from __future__ import annotations

import contextlib
import logging
import shlex
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated, Any

import typer

from ubsmoe.cli.app import app, console, err_console, fail, parse_list
from ubsmoe.cli.progress import RunDisplay
from ubsmoe.config import RunConfig, load_config, load_saved_config
from ubsmoe.errors import ConfigError
from ubsmoe.experiments import (
    cell_record,
    find_cell,
    is_experiment_file,
    load_experiment,
    resolve_cell,
)
from ubsmoe.fl.run_dir import SUMMARY_FILE, latest_checkpoint
from ubsmoe.io import atomic_write_json
from ubsmoe.logs import LOG_FILE, log_warning, route_logs
from ubsmoe.report import accuracy_table, change_table


@app.command()
def run(
    overrides: Annotated[list[str] | None, typer.Argument(
        help="key=value overrides, e.g. method=a3smoe fl.rounds=2")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML config (on top of the embedded default), or an experiment "
                               "(file or shipped name, `ubsmoe configs`) with method=M picking its cell")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="run directory (default runs/<timestamp>-<method>); refused when it "
                            "already holds a run (continue that one with --resume)")] = None,
    scale: Annotated[str, typer.Option(help="an experiment's scale: tiny or paper")] = "tiny",
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="continue the run in this directory from its latest checkpoint")] = None,
    verbose: Annotated[bool, typer.Option(
        "--verbose", help="show Flower's, Ray's and the libraries' logs and warnings on the console "
                          "(default: only in RUN_DIR/ubsmoe.log)")] = False,
    force: Annotated[bool, typer.Option(
        "--force", help="start even when `ubsmoe plan` says the run does not fit its device")] = False,
) -> None:
    """Run a federated fine-tuning job on a private local Flower SuperLink (simulation runtime).

    Exit codes: 0 done, 2 bad config, 1 the run failed, 130 interrupted (Ctrl-C or
    SIGTERM; every process started is stopped, and ``--resume DIR`` continues).
    Third-party logs and warnings and Flower's log stream go to ``RUN_DIR/ubsmoe.log``
    (the console with ``--verbose``); a failure prints one line ending with that path.
    """
    command = shlex.join(sys.argv)
    start = _Start()
    with start.failures():
        cfg, run_dir = _resolve_run(resume, list(overrides or []), config, out, scale)
        # Third-party logs and warnings (e.g. the hub client's retries while the plan
        # looks a model up) go to the run's log from here on (console with --verbose).
        start.route_logs(run_dir, verbose)
        logging.getLogger("ubsmoe").info("%s", command)
        if not force:
            _preflight(cfg)
        setup = _shared_setup(cfg)
    with start.logs:
        _run_and_report(cfg, run_dir, resume is not None, setup, verbose, command, start.log_path)


class _Start:
    """A run's start-up: its log routing, and what bad input or a failed start leaves behind.

    Bad input (a ConfigError, a missing file, a one-line refusal) exits 2 with one
    line and removes the log (and its folder) this run created; any other failure
    writes its traceback to the log and exits 1 with one line naming the log.
    """

    def __init__(self) -> None:
        self.logs = ExitStack()
        self.log_path: Path | None = None
        self.made_dir = False

    def route_logs(self, run_dir: Path, verbose: bool) -> None:
        """Send third-party logs and warnings to ``RUN_DIR/ubsmoe.log`` (console with ``verbose``)."""
        self.log_path = Path(run_dir).expanduser().resolve() / LOG_FILE
        self.made_dir = not self.log_path.parent.exists()  # bad input removes what route_logs made
        self.logs.enter_context(route_logs(self.log_path, verbose=verbose))

    @contextlib.contextmanager
    def failures(self) -> Iterator[None]:
        """Turn an exception of the start-up into its one-line exit (see the class).

        Raises:
            typer.Exit: code 2 (bad input) or 1 (the start failed).
        """
        try:
            yield
        except ConfigError as e:
            self._discard()
            fail(str(e).replace("\n", "; "))
        except (FileNotFoundError, OSError) as e:
            self._discard()
            fail(" ".join(str(e).split()))
        except typer.Exit:  # a one-line refusal (the plan, --resume): nothing left behind
            self._discard()
            raise
        except Exception as e:  # e.g. building the data or tokenizer failed: traceback to the log
            if self.log_path is None:
                raise
            logging.getLogger("ubsmoe").exception("the run failed before it started")
            self.logs.close()
            message = f"{type(e).__name__}: {e}".replace("\n", "; ")
            fail(f"the run failed: {message}; log: {self.log_path}", code=1)

    def _discard(self) -> None:
        """Stop routing the logs and remove what this start-up created (:func:`_discard_log`)."""
        self.logs.close()
        _discard_log(self.log_path, self.made_dir)


def _resolve_run(resume: Path | None, overrides: list[str], config: Path | None, out: Path | None,
                 scale: str) -> tuple[RunConfig, Path]:
    """The run's config and directory: ``--resume``'s saved config, else ``-c`` plus overrides.

    A fresh run refuses an ``--out`` holding another run; an experiment cell's record
    (``cell.json``) is written into the new run directory.

    Raises:
        typer.Exit: code 2, ``--resume`` with a config or overrides, or without config.yaml.
        ConfigError: an invalid config, experiment or cell.
    """
    if resume is not None:
        if overrides or config:
            fail("--resume takes the run directory's saved config; give no config or overrides")
        cfg_path = resume / "config.yaml"
        if not cfg_path.is_file():
            fail(f"--resume: {str(resume)!r} has no config.yaml")
        # The saved config is complete; no embedded default underneath changes it.
        return load_saved_config(cfg_path), resume
    cfg, cell = load_run_config(config, overrides, scale)
    run_dir = out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}"
    _refuse_existing_run(run_dir)
    if cell is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "cell.json", cell_record(cell, cfg))
    return cfg, run_dir


def _shared_setup(cfg: RunConfig):
    """Build the run's data, tokenizer and partitions; our warnings to the console, others to the log."""
    # imports torch and transformers (seconds): only when a run starts, so other commands start fast
    from ubsmoe.fl.client_runtime import shared_setup

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        setup = shared_setup(cfg)
    for w in caught:
        if "ubsmoe" in str(w.filename) or "config section" in str(w.message):
            err_console.print(f"[yellow]warning:[/] {w.message}", highlight=False)
        else:
            log_warning(w)
    return setup


def _refuse_existing_run(run_dir: Path) -> None:
    """Exit with one line when a fresh run's ``--out`` already holds a run's results.

    A folder with a round checkpoint or ``summary.json`` is another run's output: a
    fresh run would overwrite its metrics and checkpoints. Anything else (an empty
    folder, a sweep cell's ``cell.json`` / ``config.yaml``, unrelated files) is fine.

    Raises:
        typer.Exit: code 2, after printing the one line.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    held = [f.name for f in (run_dir / SUMMARY_FILE, latest_checkpoint(run_dir)) if f is not None and f.is_file()]
    if held:
        fail(f"--out: {str(run_dir)!r} already holds a run ({', '.join(held)}); continue it with "
              f"`ubsmoe run --resume {run_dir}` or choose a new --out")


def _discard_log(log_path: Path | None, made_dir: bool) -> None:
    """After bad input: delete the run's log and its (then empty) folder if this run created it.

    Bad input leaves nothing behind; the one-line error says what was wrong.
    """
    if log_path is None or not made_dir:  # an existing folder's log keeps its history
        return
    log_path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: something else is there; keep it
        log_path.parent.rmdir()




def _run_and_report(cfg, run_dir: Path, resume: bool, setup, verbose: bool, command: str,
                    log_path: Path) -> None:
    """Run the federated job with the live display; a failure is one line naming the log.

    Exit codes: 1 the run failed (RunFailed or any other exception, whose traceback
    goes to ``log_path``), 130 interrupted.
    """
    console.print(f"ubsmoe run: method={cfg.method} model={cfg.model.name} clients={cfg.fl.num_clients} "
                  f"rounds={cfg.fl.rounds} -> {run_dir} (log: {log_path})", highlight=False)
    skipped = setup.data.skipped
    if skipped:
        console.print(f"skipped tasks: {', '.join(f'{t} ({why})' for t, why in skipped.items())}", highlight=False)
    # imports Flower and torch (seconds): only when a run starts, so other commands start fast
    from ubsmoe.fl.simulation import RunFailed, run_federated

    logger = logging.getLogger("ubsmoe")
    display = RunDisplay(cfg.fl.rounds)
    try:
        with display.progress:
            if resume:
                ckpt = latest_checkpoint(run_dir)
                if ckpt is None:
                    fail(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
                display.resumed_at(int(ckpt.stem.split("_")[1]))
            summary = run_federated(cfg, run_dir, resume=resume, progress=display,
                                    verbose=verbose, command=command)
    except typer.Exit:
        raise
    except RunFailed as e:
        logger.error("the run failed: %s", e)
        fail(f"{e}; log: {log_path}", code=1)
    except KeyboardInterrupt:
        logger.error("interrupted")
        fail(f"interrupted; every process of the run was stopped. Continue with: "
              f"ubsmoe run --resume {run_dir}", code=130)
    except Exception as e:  # anything else: the traceback to the log, one line here
        logger.exception("the run failed")
        message = f"{type(e).__name__}: {e}".replace("\n", "; ")
        fail(f"the run failed: {message}; log: {log_path}", code=1)
    print_summary(summary, run_dir)




def load_run_config(config: Path | None, overrides: list[str], scale: str = "tiny"):
    """``-c``: a run config file as today, else an experiment (file or shipped name).

    For an experiment, ``method=M`` (and ``SETTING=VALUE`` / ``seed=N``) pick one cell
    of its grid at ``scale``; the other overrides apply on top.

    Returns:
        ``(RunConfig, Cell or None)``.

    Raises:
        ConfigError: an invalid config, an unknown experiment or cell;
            RequirementError (a ConfigError) for an experiment with ``requires``.
    """
    if config is None or (config.is_file() and not is_experiment_file(config)):
        return load_config(config, overrides), None
    experiment = load_experiment(config)
    cell, rest = find_cell(experiment, scale, overrides)
    return resolve_cell(experiment, cell, rest), cell




def _preflight(cfg) -> None:
    """Stop (exit 2, one line) when the run's clients cannot be placed on this machine
    (``check_resources``) or its plan does not fit its device (``check_plan``)."""
    # imports torch (seconds): only when a run starts, so other commands start fast
    from ubsmoe.metrics.plan import PlanError, check_plan, check_resources

    try:
        for line in check_resources(cfg):
            err_console.print(f"[yellow]warning:[/] {line}", highlight=False)
        check_plan(cfg)
    except (PlanError, ValueError) as e:  # ConfigError is a ValueError
        fail(str(e).replace("\n", "; "))




def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """Print a run's accuracy tables (one per protocol and K mode) and where its files are."""
    # One table per protocol and K mode (eval.top_k), so each stays narrow enough for a log.
    for protocol, mode in sorted({(r["protocol"], r.get("top_k_mode")) for r in summary.get("accuracy", [])},
                                 key=lambda pm: (pm[0], pm[1] or "")):
        console.print(accuracy_table(summary, protocol, mode))
    change = change_table(summary)  # eval.before_training: what fine-tuning did per level
    if change is not None:
        console.print(change)
    console.print(f"run directory: {run_dir} (summary.json, metrics.jsonl, config.yaml, ubsmoe.log, "
                  "tensorboard/, checkpoints/)",
                  highlight=False)




@app.command("eval")
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    budget: Annotated[float | None, typer.Option(
        "--budget", help="score only this budget level (one of the run's fl.budgets)")] = None,
    tasks: Annotated[str | None, typer.Option(
        "--tasks", help="comma-separated tasks (default: the run's)")] = None,
    protocol: Annotated[str | None, typer.Option(
        "--protocol", help="generation, loglik or loss (default: the run's eval.protocols)")] = None,
    examples_per_task: Annotated[int | None, typer.Option(
        "--examples-per-task", help="test examples per task, 0 = all (default: the run's)")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="model.device override (cpu, cuda, cuda:N, auto)")] = None,
) -> None:
    """Evaluate a finished run again (the Server's evaluation); writes RUN_DIR/eval_<timestamp>.json."""
    # imports torch, transformers and the Server (seconds): only for this command
    from ubsmoe.finished_run import evaluate_run

    task_list = parse_list("--tasks", tasks, str) if tasks is not None else None
    try:
        result = evaluate_run(run_dir, budget=budget, tasks=task_list, protocol=protocol,
                              examples_per_task=examples_per_task, device=device)
    except ConfigError as e:
        fail(str(e).replace("\n", "; "))
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    print_summary({"method": result["method"], "accuracy": result["accuracy"],
                    "data": {"test_examples_scored": result["accuracy"][0]["n"] if result["accuracy"] else {}}},
                   run_dir)
    console.print(f"written: {result['path']}", highlight=False)


