"""``ubsmoe sweep`` and ``ubsmoe configs``: run an experiment's grid; list the shipped experiments."""

from __future__ import annotations

import contextlib
import copy
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from ubsmoe.cli.app import app, console, err_console, fail, parse_list
from ubsmoe.errors import ConfigError
from ubsmoe.experiments import available_experiments, load_experiment


@app.command()
def configs() -> None:
    """List the shipped experiments (`-c NAME` of run / plan / sweep), one line each."""
    for name in available_experiments():
        exp = load_experiment(name)
        cells = len(exp.cells("tiny"))
        needs = f" [needs {exp.requires['capability']}]" if exp.requires else ""
        console.print(f"{name:14s} {cells:3d} runs  {exp.description}{needs}", highlight=False,
                      soft_wrap=True, markup=False)




class SweepDisplay:
    """Live table of a sweep (rich): each cell's state, device and time, counts and ETA."""

    def __init__(self, title: str, slots: int) -> None:
        self.title, self.slots, self.start = title, slots, time.monotonic()
        self.live = Live(console=console, refresh_per_second=1, transient=False)
        self._seen: set[tuple[str, str]] = set()

    def render(self, items) -> Any:
        """A rich Table of the items."""
        # imports torch (seconds): only when a sweep runs, so other commands start fast
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
            state = i.state + (" (reuse)" if i.reuse_from is not None else "")
            table.add_row(i.run_dir.name, f"[{style.get(i.state, '')}]{state}[/]" if i.state in style
                          else state, i.device or "", f"{i.seconds / 60:.1f}" if i.seconds else "")
        return table

    def __call__(self, items) -> None:
        if console.is_terminal:
            self.live.update(self.render(items), refresh=True)
            return
        # Not a terminal (a log file): one plain line per state change.
        from ubsmoe.experiments.sweep import sweep_eta  # torch: see render

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
    cells: Annotated[str | None, typer.Option(
        "--cells", help="i/n: run only part i of n of the cells (round robin in grid order), to split "
                        "a grid across processes sharing one --out")] = None,
    reuse: Annotated[list[Path] | None, typer.Option(
        "--reuse", help="folder of finished runs (repeatable): a cell whose config hash matches one is "
                        "copied, not run")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list the cells and their states; run nothing")]
        = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Flower's and Ray's logs into each sweep.log")]
        = False,
) -> None:
    """Run every cell of an experiment's grid: one run directory each, done ones skipped, partial ones resumed.

    Exit codes: 0 every cell done, 1 some cell failed, 2 bad config (or a missing
    capability named by the experiment's `requires`), 130 interrupted.
    """
    # torch, Ray (seconds): only when a sweep runs, so other commands start fast
    import torch

    from ubsmoe.experiments.sweep import (
        parse_part,
        plan_sweep,
        run_sweep,
        select_part,
        sweep_devices,
    )

    try:
        experiment = load_experiment(config)
        method_list = parse_list("--methods", methods, str) if methods is not None else None
        out_dir = out or Path("runs") / f"{experiment.name}-{scale}"
        part = parse_part(cells) if cells is not None else None
        missing = [str(d) for d in reuse or [] if not d.is_dir()]
        if missing:
            raise ConfigError(f"--reuse: {missing[0]!r} is not a folder")
        items = plan_sweep(experiment, out_dir, scale, method_list, seeds, list(overrides or []), reuse or [])
        if part is not None:
            total, items = len(items), select_part(items, *part)
            if not items:
                raise ConfigError(f"--cells: part {cells} holds no cell (the grid has {total})")
    except ConfigError as e:
        fail(str(e).replace("\n", "; "))
    devices = sweep_devices(items[0].cfg, torch.cuda.device_count())
    display = SweepDisplay(f"{experiment.name} ({scale}) -> {out_dir}", len(devices))
    if dry_run:
        console.print(display.render(items))
        return
    sweep_resources(items, devices)
    if not console.is_terminal:
        console.print(display.render(items))
    def on_sigterm(signum, frame) -> None:
        """SIGTERM stops the sweep like Ctrl-C: the running `ubsmoe run` is stopped too."""
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with display.live if console.is_terminal else contextlib.nullcontext():
            run_sweep(items, devices=devices, on_change=display)
    except KeyboardInterrupt:
        fail(f"interrupted; run the same command again to resume ({out_dir})", code=130)
    finally:
        signal.signal(signal.SIGTERM, previous)
    failed = [i for i in items if i.state == "failed"]
    for i in failed:
        err_console.print(f"[red]failed:[/] {i.run_dir} ({i.message}); log: {i.run_dir / 'sweep.log'}",
                          highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)




def sweep_resources(items, devices) -> None:
    """Stop a sweep (exit 2, one line) whose runs could not place their clients; print warnings.

    The first queued cell is checked with :func:`~ubsmoe.metrics.plan.check_resources`
    as its run will see the machine: with one run per GPU, one GPU and
    ``model.device=cuda`` (so ``fl.client_gpus`` must give the clients a share of it).
    The runs themselves start with ``--force``.
    """
    # imports torch (seconds): only when a sweep runs, so other commands start fast
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
        fail(f"{e} (each run of this sweep)" if gpus else str(e))


