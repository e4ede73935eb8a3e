"""The ``ubsmoe`` command: wires configs, the federated run and reports together.

Subcommands take an optional YAML config plus ``key=value`` overrides and call
library functions; nothing parses argv at import time.
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="UB-SMoE: resource-adaptive federated fine-tuning of sparse MoE models.")
console = Console()
err_console = Console(stderr=True)


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def eta_seconds(round_seconds: list[float], rounds_done: int, total_rounds: int) -> float | None:
    """Estimated seconds until the run's last round ends, from the rounds timed so far.

    The mean duration of the timed rounds times the rounds left; the first timed
    round is left out once a later one is timed (it carries the workers' start-up
    and model building).

    Args:
        round_seconds: wall seconds of each round this process has seen end, in order.
        rounds_done: rounds completed (including those before a resume).
        total_rounds: the run's ``fl.rounds``.

    Returns:
        Seconds (0.0 when every round is done), or None before any round is timed.

    Raises:
        ValueError: a negative round time or count.
    """
    if rounds_done < 0 or total_rounds < 0 or any(t < 0 for t in round_seconds):
        raise ValueError(f"eta_seconds: got round_seconds={round_seconds}, rounds_done={rounds_done}, "
                         f"total_rounds={total_rounds}; expected values >= 0")
    left = max(total_rounds - rounds_done, 0)
    if left == 0:
        return 0.0
    if not round_seconds:
        return None
    timed = round_seconds[1:] if len(round_seconds) > 1 else round_seconds
    return sum(timed) / len(timed) * left


def format_duration(seconds: float | None) -> str:
    """``"1h02m"``, ``"3m05s"``, ``"42s"``; ``"?"`` for None."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class _Display:
    """Live progress of a run (rounds, client replies, loss, ETA) with rich.

    Called with the ServerApp's progress events as :func:`ubsmoe.fl.simulation.run_federated`
    reads them: ``round_start`` {round, clients}, ``client_done``, ``aggregate``,
    ``round_end`` {round, loss}, ``client_failed`` {round, client, reason} and
    ``round_retry`` / ``round_failed`` {round, message, replies, needed}, each printed
    as one line. The rounds line shows the last train loss and the run's ETA
    (:func:`eta_seconds` over the rounds timed so far); the clients line shows the
    round's clients done out of those sampled.
    """

    def __init__(self, rounds: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.total = rounds
        self.done = 0
        self.loss: float | None = None
        self.round_seconds: list[float] = []
        self._round_start: float | None = None
        self.rounds = self.progress.add_task("rounds", total=rounds)
        self.clients = self.progress.add_task("clients", total=1, visible=False)

    def resumed_at(self, rounds_done: int) -> None:
        """Mark ``rounds_done`` rounds as done before this process started (``--resume``)."""
        self.done = rounds_done
        self.progress.update(self.rounds, completed=rounds_done, description=self.rounds_text())

    def rounds_text(self) -> str:
        """The rounds line: ``rounds | loss 6.5533 | ETA 1m05s``."""
        loss = f" | loss {self.loss:.4f}" if self.loss is not None else ""
        return f"rounds{loss} | ETA {format_duration(eta_seconds(self.round_seconds, self.done, self.total))}"

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        p = self.progress
        if event == "round_start":
            self._round_start = time.monotonic()
            p.reset(self.clients, total=info["clients"], visible=True,
                    description=f"round {info['round']}: clients done")
        elif event == "client_done":
            p.advance(self.clients)
        elif event == "aggregate":
            p.update(self.clients, description=f"round {info['round']}: aggregate + evaluate")
        elif event == "round_end":
            if self._round_start is not None:
                self.round_seconds.append(time.monotonic() - self._round_start)
            self.done = int(info["round"])
            self.loss = float(info["loss"])
            p.update(self.rounds, completed=self.done, description=self.rounds_text())
            p.console.print(f"round {info['round']}: train loss {info['loss']:.4f}", highlight=False)
        elif event == "client_failed":  # one line per client left out of a round
            p.advance(self.clients)
            p.console.print(f"round {info['round']}: client {info['client']} left out: {info['reason']}",
                            highlight=False, soft_wrap=True)
        elif event in ("round_retry", "round_failed"):  # the clients' reasons are printed above
            p.console.print(f"round {info['round']}: {info['replies']} good replies, {info['needed']} "
                            f"needed; {'retrying the round' if event == 'round_retry' else 'no retries left'}",
                            highlight=False, soft_wrap=True)


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
    import logging
    import shlex
    from contextlib import ExitStack

    from ubsmoe.config import ConfigError, load_config
    from ubsmoe.fl.train import shared_setup
    from ubsmoe.logs import LOG_FILE, log_warning, route_logs

    command = shlex.join(sys.argv)
    logs = ExitStack()
    log_path = None
    made_dir = False
    try:
        if resume is not None:
            if overrides or config:
                _fail("--resume takes the run directory's saved config; give no config or overrides")
            cfg_path = resume / "config.yaml"
            if not cfg_path.is_file():
                _fail(f"--resume: {str(resume)!r} has no config.yaml")
            # The saved config is complete; no embedded default underneath changes it.
            cfg = load_config(cfg_path)
            run_dir = resume
        else:
            cfg, cell = _load_run_config(config, list(overrides or []), scale)
            run_dir = out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}"
            _refuse_existing_run(run_dir)
            if cell is not None:
                from ubsmoe.experiments import cell_record
                from ubsmoe.io import atomic_write_json

                run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_json(run_dir / "cell.json", cell_record(cell, cfg))
        log_path = Path(run_dir).expanduser().resolve() / LOG_FILE
        made_dir = not log_path.parent.exists()  # bad input removes what route_logs made
        # Third-party logs and warnings (e.g. the hub client's retries while the plan
        # looks a model up) go to the run's log from here on (console with --verbose).
        logs.enter_context(route_logs(log_path, verbose=verbose))
        logging.getLogger("ubsmoe").info("%s", command)
        if not force:
            _preflight(cfg)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            setup = shared_setup(cfg)
        for w in caught:
            if "ubsmoe" in str(w.filename) or "config section" in str(w.message):
                err_console.print(f"[yellow]warning:[/] {w.message}", highlight=False)
            else:
                log_warning(w)
    except ConfigError as e:
        logs.close()
        _discard_log(log_path, made_dir)
        _fail(str(e).replace("\n", "; "))
    except (FileNotFoundError, OSError) as e:
        logs.close()
        _discard_log(log_path, made_dir)
        _fail(" ".join(str(e).split()))
    except typer.Exit:  # a one-line refusal (the plan, --resume): nothing left behind
        logs.close()
        _discard_log(log_path, made_dir)
        raise
    except Exception as e:  # e.g. building the data or tokenizer failed: traceback to the log
        if log_path is None:
            raise
        logging.getLogger("ubsmoe").exception("the run failed before it started")
        logs.close()
        message = f"{type(e).__name__}: {e}".replace("\n", "; ")
        _fail(f"the run failed: {message}; log: {log_path}", code=1)
    with logs:
        _run_and_report(cfg, run_dir, resume is not None, setup, verbose, command, log_path)


def _refuse_existing_run(run_dir: Path) -> None:
    """Exit with one line when a fresh run's ``--out`` already holds a run's results.

    A folder with a round checkpoint or ``summary.json`` is another run's output: a
    fresh run would overwrite its metrics and checkpoints. Anything else (an empty
    folder, a sweep cell's ``cell.json`` / ``config.yaml``, unrelated files) is fine.

    Raises:
        typer.Exit: code 2, after printing the one line.
    """
    from ubsmoe.fl.run_dir import SUMMARY_FILE, latest_checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    held = [f.name for f in (run_dir / SUMMARY_FILE, latest_checkpoint(run_dir)) if f is not None and f.is_file()]
    if held:
        _fail(f"--out: {str(run_dir)!r} already holds a run ({', '.join(held)}); continue it with "
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
    import logging

    console.print(f"ubsmoe run: method={cfg.method} model={cfg.model.name} clients={cfg.fl.num_clients} "
                  f"rounds={cfg.fl.rounds} -> {run_dir} (log: {log_path})", highlight=False)
    skipped = setup.data.skipped
    if skipped:
        console.print(f"skipped tasks: {', '.join(f'{t} ({why})' for t, why in skipped.items())}", highlight=False)
    from ubsmoe.fl.simulation import RunFailed, run_federated

    logger = logging.getLogger("ubsmoe")
    display = _Display(cfg.fl.rounds)
    try:
        with display.progress:
            if resume:
                from ubsmoe.fl.run_dir import latest_checkpoint

                ckpt = latest_checkpoint(run_dir)
                if ckpt is None:
                    _fail(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
                display.resumed_at(int(ckpt.stem.split("_")[1]))
            summary = run_federated(cfg, run_dir, resume=resume, progress=display,
                                    verbose=verbose, command=command)
    except typer.Exit:
        raise
    except RunFailed as e:
        logger.error("the run failed: %s", e)
        _fail(f"{e}; log: {log_path}", code=1)
    except KeyboardInterrupt:
        logger.error("interrupted")
        _fail(f"interrupted; every process of the run was stopped. Continue with: "
              f"ubsmoe run --resume {run_dir}", code=130)
    except Exception as e:  # anything else: the traceback to the log, one line here
        logger.exception("the run failed")
        message = f"{type(e).__name__}: {e}".replace("\n", "; ")
        _fail(f"the run failed: {message}; log: {log_path}", code=1)
    _print_summary(summary, run_dir)


def _load_run_config(config: Path | None, overrides: list[str], scale: str = "tiny"):
    """``-c``: a run config file as today, else an experiment (file or shipped name).

    For an experiment, ``method=M`` (and ``SETTING=VALUE`` / ``seed=N``) pick one cell
    of its grid at ``scale``; the other overrides apply on top.

    Returns:
        ``(RunConfig, Cell or None)``.

    Raises:
        ConfigError: an invalid config, an unknown experiment or cell;
            RequirementError (a ConfigError) for an experiment with ``requires``.
    """
    from ubsmoe.config import load_config
    from ubsmoe.experiments import find_cell, is_experiment_file, load_experiment, resolve_cell

    if config is None or (config.is_file() and not is_experiment_file(config)):
        return load_config(config, overrides), None
    experiment = load_experiment(config)
    cell, rest = find_cell(experiment, scale, overrides)
    return resolve_cell(experiment, cell, rest), cell


def _sweep_resources(items, devices) -> None:
    """Stop a sweep (exit 2, one line) whose runs could not place their clients; print warnings.

    The first queued cell is checked with :func:`~ubsmoe.metrics.plan.check_resources`
    as its run will see the machine: with one run per GPU, one GPU and
    ``model.device=cuda`` (so ``fl.client_gpus`` must give the clients a share of it).
    The runs themselves start with ``--force``.
    """
    import copy

    from ubsmoe.metrics.plan import check_resources

    queued = [i for i in items if i.state == "queued"]
    if not queued:
        return
    cfg, gpus = copy.deepcopy(queued[0].cfg), None
    if len(devices) > 1:
        cfg.model.device, gpus = "cuda", 1
    try:
        for line in check_resources(cfg, gpus=gpus):
            err_console.print(f"[yellow]warning:[/] {line}", highlight=False)
    except ValueError as e:  # ConfigError
        _fail(f"{e} (each run of this sweep)" if gpus else str(e))


def _preflight(cfg) -> None:
    """Stop (exit 2, one line) when the run's clients cannot be placed on this machine
    (``check_resources``) or its plan does not fit its device (``check_plan``)."""
    from ubsmoe.metrics.plan import PlanError, check_plan, check_resources

    try:
        for line in check_resources(cfg):
            err_console.print(f"[yellow]warning:[/] {line}", highlight=False)
        check_plan(cfg)
    except (PlanError, ValueError) as e:  # ConfigError is a ValueError
        _fail(str(e).replace("\n", "; "))


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    from ubsmoe.report import accuracy_table

    # One table per protocol and K mode (eval.top_k), so each stays narrow enough for a log.
    for protocol, mode in sorted({(r["protocol"], r.get("top_k_mode")) for r in summary.get("accuracy", [])},
                                 key=lambda pm: (pm[0], pm[1] or "")):
        console.print(accuracy_table(summary, protocol, mode))
    console.print(f"run directory: {run_dir} (summary.json, metrics.jsonl, config.yaml, ubsmoe.log, "
                  "tensorboard/, checkpoints/)",
                  highlight=False)


@app.command()
def report(
    dirs: Annotated[list[Path], typer.Argument(
        help="run directories, or folders searched recursively for run directories")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="report folder (default: DIR/report for one DIR; required for several)")]
        = None,
) -> None:
    """Cross-run report: report.md, paper-shaped CSV tables and PNG figures (one run: also its tables)."""
    from ubsmoe.report import load_summary
    from ubsmoe.report.build import build_report, group_rich_tables
    from ubsmoe.report.runs import SUMMARY_FILE

    if out is None:
        if len(dirs) > 1:
            _fail(f"--out: required with several DIRs (got {len(dirs)}); give the report folder")
        out = dirs[0] / "report"
    single = len(dirs) == 1 and (dirs[0] / SUMMARY_FILE).is_file()
    if single:
        _print_summary(load_summary(dirs[0]), dirs[0])
    command = " ".join(["ubsmoe report", *map(str, dirs), f"--out {out}"])
    try:
        result = build_report(dirs, out, command=command)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    if not single:
        for table in group_rich_tables(result):
            console.print(table)
    for run in result.incomplete:
        console.print(f"incomplete (no summary.json): {run.path}", highlight=False)
    skipped = [f for f in result.figures if f.path is None]
    console.print(f"report: {result.markdown} ({len(result.runs)} runs, {len(result.groups)} group(s), "
                  f"{len(result.csvs)} CSV, {len(result.figures) - len(skipped)} figures"
                  + (f", {len(skipped)} skipped: see report.md" if skipped else "") + ")", highlight=False)


@app.command("eval")
def eval_run(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    budget: Annotated[float | None, typer.Option(
        "--budget", help="score only this budget level (one of the run's fl.budgets)")] = None,
    tasks: Annotated[str | None, typer.Option(
        "--tasks", help="comma-separated tasks (default: the run's)")] = None,
    protocol: Annotated[str | None, typer.Option(
        "--protocol", help="generation or loglik (default: the run's eval.protocols)")] = None,
    examples_per_task: Annotated[int | None, typer.Option(
        "--examples-per-task", help="test examples per task, 0 = all (default: the run's)")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="model.device override (cpu, cuda, cuda:N, auto)")] = None,
) -> None:
    """Evaluate a finished run again (the Server's evaluation); writes RUN_DIR/eval_<timestamp>.json."""
    from ubsmoe.config import ConfigError
    from ubsmoe.load import evaluate_run

    task_list = _parse_list("--tasks", tasks, str) if tasks is not None else None
    try:
        result = evaluate_run(run_dir, budget=budget, tasks=task_list, protocol=protocol,
                              examples_per_task=examples_per_task, device=device)
    except ConfigError as e:
        _fail(str(e).replace("\n", "; "))
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    _print_summary({"method": result["method"], "accuracy": result["accuracy"],
                    "data": {"test_examples_scored": result["accuracy"][0]["n"] if result["accuracy"] else {}}},
                   run_dir)
    console.print(f"written: {result['path']}", highlight=False)


@app.command()
def methods() -> None:
    """List the registered methods."""
    from ubsmoe.methods import available_methods, get_method_class

    for name in available_methods():
        doc = (get_method_class(name).__doc__ or "").strip().splitlines()[0]
        console.print(f"{name:10s} {doc}", highlight=False)


def _parse_list(option: str, text: str, kind: type) -> list:
    """Parse a comma-separated option value, failing with the option's name."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        _fail(f"{option}: got {text!r}, expected comma-separated {kind.__name__} values")
    if not values:
        _fail(f"{option}: got {text!r}, expected at least one value")
    return values


@app.command()
def bench(
    suite: Annotated[list[str] | None, typer.Option(
        "--suite", "-s", help="suite to run (repeatable; default: all)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON report path")] = Path("bench.json"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="tiny shapes, 2 repeats: checks the suites run (not a measurement)")] = False,
    repeats: Annotated[int | None, typer.Option(help="timed runs per case (default per suite)")] = None,
    warmup: Annotated[int | None, typer.Option(help="untimed runs per case (default per suite)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: unchanged)")] = None,
    seed: Annotated[int, typer.Option(help="seed of weights and inputs")] = 0,
) -> None:
    """Run the performance suites and write a JSON report (see `--suite`)."""
    from ubsmoe.bench import BenchOptions, available_suites, run_bench
    from ubsmoe.io import atomic_write_json

    try:
        options = BenchOptions(quick=quick, repeats=repeats, warmup=warmup, threads=threads, seed=seed)
    except ValueError as e:
        _fail(str(e))
    names = suite or available_suites()
    unknown = [n for n in names if n not in available_suites()]
    if unknown:
        _fail(f"--suite: got {', '.join(unknown)}, expected one of {', '.join(available_suites())}")
    parts = ["ubsmoe bench", *(f"--suite {n}" for n in suite or []), "--quick" if quick else "",
             f"--repeats {repeats}" if repeats is not None else "",
             f"--warmup {warmup}" if warmup is not None else "",
             f"--threads {threads}" if threads is not None else "", f"--seed {seed}" if seed else "",
             f"--out {out}"]
    command = " ".join(p for p in parts if p)
    report = run_bench(names, options, command=command,
                       progress=lambda name: console.print(f"suite {name} ...", highlight=False))
    atomic_write_json(out, report)
    from ubsmoe.report import bench_tables

    for table in bench_tables(report):
        console.print(table)
    console.print(f"report: {out}", highlight=False)


@app.command()
def flops(
    model: Annotated[str, typer.Argument(
        help="shipped name, local config.json / model folder, or hub name (online)")]
        = "allenai/OLMoE-1B-7B-0924",
    budgets: Annotated[str, typer.Option(help="budget levels beta, comma-separated")] = "0.125,0.25,0.5,1.0",
    ranks: Annotated[str | None, typer.Option(
        help="LoRA rank per budget level at native top-k (default for dense models: 12,16,24,40)")] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank of the K budgets of a MoE model")] = 20,
    seq_len: Annotated[int, typer.Option(help="sequence length for the attention-score FLOPs")] = 256,
    lora_targets: Annotated[str, typer.Option(
        help="LoRA on: all (attention + MLP/experts), attention, mlp")] = "all",
    frozen_backward: Annotated[bool, typer.Option(
        "--frozen-backward/--no-frozen-backward",
        help="count the input-gradient pass through frozen weights (a LoRA step computes it)")] = True,
    pg_probe_tokens: Annotated[int, typer.Option(
        help="also show the PG probe's extra FLOPs (ubsmoe.pg_rule=probe) at this many tokens per "
             "inactive expert (0: off)")] = 0,
    tokens_per_step: Annotated[int | None, typer.Option(
        help="tokens per local step, spreading the probe's per-step cost (default 16 x seq-len)")] = None,
    router_trainable: Annotated[bool, typer.Option(
        "--router-trainable/--frozen-router",
        help="count the router as trained (6 FLOPs/parameter, model.router_trainable) or frozen")] = True,
    lora_experts: Annotated[int, typer.Option(
        help="M LoRA experts sharing each dense MLP (model.lora_experts; dense models only, 0: off)")] = 0,
    lora_experts_top_k: Annotated[int, typer.Option(
        help="K_max of the LoRA experts (model.lora_experts_top_k)")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Activated parameters and training FLOPs per token for each compute budget."""
    import json

    from ubsmoe.metrics.flops import (
        PAPER_LORA_RANKS,
        budget_table,
        default_budgets,
        load_model_shape,
    )

    betas = _parse_list("--budgets", budgets, float)
    rank_list = _parse_list("--ranks", ranks, int) if ranks is not None else None
    try:
        shape = load_model_shape(model, lora_experts, lora_experts_top_k)
        if rank_list is None and not shape.routed:
            if len(betas) != len(PAPER_LORA_RANKS):
                _fail(f"--ranks: {model} is a dense model; give one LoRA rank per budget level")
            rank_list = list(PAPER_LORA_RANKS)
        table = budget_table(shape, default_budgets(shape, betas, rank_list, lora_rank),
                             seq_len=seq_len, lora_targets=lora_targets, frozen_backward=frozen_backward,
                             pg_probe_tokens=pg_probe_tokens, tokens_per_step=tokens_per_step,
                             router_trainable=router_trainable)
    except ValueError as e:
        _fail(str(e))
    if as_json:
        console.print_json(json.dumps(table))
        return
    from ubsmoe.report import flops_notes, flops_tables

    for t in flops_tables(table):
        console.print(t)
    for line in flops_notes(table):
        console.print(line, highlight=False, soft_wrap=True)


@app.command()
def plan(
    overrides: Annotated[list[str] | None, typer.Argument(
        help="key=value overrides, as for `ubsmoe run`")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML config, or an experiment name/file with method=M (as for `run`)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    scale: Annotated[str, typer.Option(help="an experiment's scale: tiny or paper")] = "tiny",
) -> None:
    """Parameters, memory per process, processes, FLOPs per round and disk of a run (meta device)."""
    import json

    from ubsmoe.config import ConfigError
    from ubsmoe.metrics.plan import plan as make_plan

    try:
        cfg, _ = _load_run_config(config, list(overrides or []), scale)
        result = make_plan(cfg)
    except ConfigError as e:
        _fail(str(e).replace("\n", "; "))
    except ValueError as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(result, indent=1))
        return
    from ubsmoe.report import plan_tables

    for t in plan_tables(result):
        console.print(t)


@app.command()
def configs() -> None:
    """List the shipped experiments (`-c NAME` of run / plan / sweep), one line each."""
    from ubsmoe.experiments import available_experiments, load_experiment

    for name in available_experiments():
        exp = load_experiment(name)
        cells = len(exp.cells("tiny"))
        needs = f" [needs {exp.requires['capability']}]" if exp.requires else ""
        console.print(f"{name:14s} {cells:3d} runs  {exp.description}{needs}", highlight=False,
                      soft_wrap=True, markup=False)


class _SweepDisplay:
    """Live table of a sweep (rich): each cell's state, device and time, counts and ETA."""

    def __init__(self, title: str, slots: int) -> None:
        from rich.live import Live

        self.title, self.slots, self.start = title, slots, time.monotonic()
        self.live = Live(console=console, refresh_per_second=1, transient=False)
        self._seen: set[tuple[str, str]] = set()

    def render(self, items) -> Any:
        """A rich Table of the items."""
        from rich.table import Table

        from ubsmoe.experiments.sweep import sweep_eta

        counts = {s: sum(1 for i in items if i.state == s) for s in ("skipped", "done", "running", "queued",
                                                                      "failed")}
        eta = sweep_eta(items, self.slots)
        eta_text = "ETA --" if eta is None else f"ETA {eta / 60:.1f} min"
        head = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
        table = Table(title=f"{self.title}: {head}; {eta_text}", title_justify="left")
        for col in ("run", "state", "device", "minutes"):
            table.add_column(col)
        style = {"done": "green", "skipped": "dim", "running": "bold yellow", "failed": "red"}
        for i in items:
            table.add_row(i.run_dir.name, f"[{style.get(i.state, '')}]{i.state}[/]" if i.state in style
                          else i.state, i.device or "", f"{i.seconds / 60:.1f}" if i.seconds else "")
        return table

    def __call__(self, items) -> None:
        if console.is_terminal:
            self.live.update(self.render(items), refresh=True)
            return
        # Not a terminal (a log file): one plain line per state change.
        from ubsmoe.experiments.sweep import sweep_eta

        state = [(i.run_dir.name, i.state) for i in items]
        if state != getattr(self, "_last", None):
            self._last = state
            eta = sweep_eta(items, self.slots)
            for i in items:
                if i.state in ("running", "done", "failed") and (i.run_dir.name, i.state) not in self._seen:
                    self._seen.add((i.run_dir.name, i.state))
                    console.print(f"{time.strftime('%H:%M:%S')} {i.run_dir.name}: {i.state}"
                                  f"{f' ({i.seconds / 60:.1f} min)' if i.seconds else ''}"
                                  f"{f' {i.message}' if i.message else ''}"
                                  f"{'' if eta is None else f'; sweep ETA {eta / 60:.1f} min'}",
                                  highlight=False, soft_wrap=True)


@app.command()
def sweep(
    overrides: Annotated[list[str] | None, typer.Argument(
        help="key=value overrides applied to every cell")] = None,
    config: Annotated[str, typer.Option(
        "--config", "-c", help="experiment: a file or a shipped name (`ubsmoe configs`)")] = ...,
    scale: Annotated[str, typer.Option(help="tiny (CPU minutes per run) or paper")] = "tiny",
    seeds: Annotated[int | None, typer.Option(help="run seeds 0..N-1 (default: the scale's)")] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated subset of the grid's methods")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="sweep directory (default runs/<experiment>-<scale>)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the cells and their states; run nothing")]
        = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Flower's and Ray's logs into each sweep.log")]
        = False,
) -> None:
    """Run every cell of an experiment's grid: one run directory each, done ones skipped, partial ones resumed.

    Exit codes: 0 every cell done, 1 some cell failed, 2 bad config (or a missing
    capability named by the experiment's `requires`), 130 interrupted.
    """
    from ubsmoe.config import ConfigError
    from ubsmoe.experiments import load_experiment
    from ubsmoe.experiments.sweep import plan_sweep, run_sweep, sweep_devices

    try:
        experiment = load_experiment(config)
        method_list = _parse_list("--methods", methods, str) if methods is not None else None
        out_dir = out or Path("runs") / f"{experiment.name}-{scale}"
        items = plan_sweep(experiment, out_dir, scale, method_list, seeds, list(overrides or []))
    except ConfigError as e:
        _fail(str(e).replace("\n", "; "))
    import torch

    devices = sweep_devices(items[0].cfg, torch.cuda.device_count())
    display = _SweepDisplay(f"{experiment.name} ({scale}) -> {out_dir}", len(devices))
    if dry_run:
        console.print(display.render(items))
        return
    _sweep_resources(items, devices)
    if not console.is_terminal:
        console.print(display.render(items))
    import signal

    def on_sigterm(signum, frame) -> None:
        """SIGTERM stops the sweep like Ctrl-C: the running `ubsmoe run` is stopped too."""
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with display.live if console.is_terminal else contextlib.nullcontext():
            run_sweep(items, devices=devices, on_change=display)
    except KeyboardInterrupt:
        _fail(f"interrupted; run the same command again to resume ({out_dir})", code=130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [i for i in items if i.state == "failed"]
    for i in failed:
        err_console.print(f"[red]failed:[/] {i.run_dir} ({i.message}); log: {i.run_dir / 'sweep.log'}",
                          highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command()
def certs(
    out: Annotated[Path, typer.Argument(help="folder for the CA, server certificate and node keys")],
    nodes: Annotated[int, typer.Option("--nodes", help="number of SuperNode key pairs")] = 3,
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="SuperLink host name or IP for the certificate (repeatable; "
                       "default 127.0.0.1 and localhost)")] = None,
) -> None:
    """A local CA, a SuperLink TLS certificate and SuperNode key pairs for a Flower deployment."""
    from ubsmoe.certs import DEFAULT_HOSTS, make_certs

    try:
        files = make_certs(out, nodes=nodes, hosts=host or list(DEFAULT_HOSTS))
    except ValueError as e:
        _fail(str(e))
    for path in (files.ca_cert, files.ca_key, files.server_cert, files.server_key,
                 *[p for pair in files.node_keys for p in pair]):
        console.print(str(path), highlight=False, soft_wrap=True)


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (a Hugging Face checkpoint)")],
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of weights, held-out split and data order")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue the interrupted run in --out")] = False,
    hidden: Annotated[int, typer.Option(help="hidden size")] = 64,
    layers: Annotated[int, typer.Option(help="decoder layers")] = 2,
    heads: Annotated[int, typer.Option(help="attention heads")] = 4,
    expert_size: Annotated[int, typer.Option(help="intermediate width of each expert")] = 32,
    experts: Annotated[int, typer.Option(help="experts per layer (OLMoE-1B-7B: 64)")] = 64,
    top_k: Annotated[int, typer.Option(help="experts per token in training (OLMoE-1B-7B: 8)")] = 8,
    vocab: Annotated[int, typer.Option(help="vocabulary of the locally trained tokenizer")] = 2048,
    seq_len: Annotated[int, typer.Option(help="tokens per training sequence")] = 256,
    batch: Annotated[int, typer.Option(help="sequences per step")] = 16,
    lr: Annotated[float, typer.Option(help="peak learning rate (warm-up, cosine to lr/10)")] = 3e-3,
    aux_loss_coef: Annotated[float, typer.Option(help="OLMoE router_aux_loss_coef")] = 0.01,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    text: Annotated[Path | None, typer.Option(help="extra folder of plain .txt files")] = None,
    hf_dataset: Annotated[str, typer.Option(help="extra Hugging Face dataset (needs the hub)")] = "",
    hf_column: Annotated[str, typer.Option(help="text column of --hf-dataset")] = "text",
    data: Annotated[Path | None, typer.Option(help="commonsense data folder (default: resolved)")] = None,
    finetune_seeds: Annotated[str, typer.Option(
        help="seeds whose fine-tuning samples are left out of the corpus, comma-separated")] = "0,1,2",
    checkpoint_every: Annotated[int, typer.Option(help="steps between resumable checkpoints")] = 100,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
) -> None:
    """Pretrain a small OLMoE-architecture base from scratch on local text (the testbed base)."""
    from ubsmoe.config import ConfigError
    from ubsmoe.models.pretrain import config_from_options
    from ubsmoe.models.pretrain import pretrain as run_pretrain

    try:
        cfg = config_from_options(
            out=str(out), steps=steps, seed=seed, hidden_size=hidden, num_layers=layers, num_heads=heads,
            expert_size=expert_size, num_experts=experts, top_k=top_k, vocab_size=vocab, seq_len=seq_len,
            batch_size=batch, lr=lr, aux_loss_coef=aux_loss_coef, threads=threads,
            text_dir=str(text) if text else "", hf_dataset=hf_dataset, hf_column=hf_column,
            data_path=str(data) if data else "", checkpoint_every=checkpoint_every,
            finetune_seeds=[int(v) for v in finetune_seeds.split(",") if v.strip()])
        card = run_pretrain(cfg, command=" ".join(["ubsmoe", *sys.argv[1:]]), resume=resume,
                            progress=progress)
    except (ConfigError, ValueError) as e:
        _fail(str(e))
    drop = ", ".join(f"K={k} {v['mean']:+.3f} (se {v['se']:.3f})" for k, v in card["k_drop"].items())
    console.print(f"saved {out}: held-out loss {card['heldout_loss'][str(top_k)]['mean']:.3f} at K={top_k}; "
                  f"K-drop {drop}; {card['wall_time_s']:.0f} s", highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ubsmoe")


if __name__ == "__main__":
    sys.exit(main())
