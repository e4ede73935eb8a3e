"""The ``ubsmoe`` command: wires configs, the federated run and reports together.

Subcommands take an optional YAML config plus ``key=value`` overrides and call
library functions; nothing parses argv at import time.
"""

from __future__ import annotations

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


class _Display:
    """Live progress of a run (rounds, client replies, evaluation) with rich."""

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
        self.rounds = self.progress.add_task("rounds", total=rounds)
        self.clients = self.progress.add_task("clients", total=1, visible=False)

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        p = self.progress
        if event == "round_start":
            p.reset(self.clients, total=info["clients"], visible=True,
                    description=f"round {info['round']}: local training")
        elif event == "client_done":
            p.advance(self.clients)
        elif event == "aggregate":
            p.update(self.clients, description=f"round {info['round']}: aggregate + evaluate")
        elif event == "round_end":
            rec = info["record"]
            p.advance(self.rounds)
            p.console.print(f"round {rec['round']}: train loss {rec['loss']:.4f}", highlight=False)


@app.command()
def run(
    overrides: Annotated[list[str] | None, typer.Argument(
        help="key=value overrides, e.g. method=a3smoe fl.rounds=2")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML config (on top of the embedded default)")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="run directory (default runs/<timestamp>-<method>)")] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="continue the run in this directory from its latest checkpoint")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="show Flower's and Ray's logs")] = False,
) -> None:
    """Run a federated fine-tuning job (Flower simulation, in-process)."""
    from ubsmoe.config import ConfigError, load_config
    from ubsmoe.fl.train import shared_setup

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
            cfg = load_config(config, list(overrides or []))
            run_dir = out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            setup = shared_setup(cfg)
        for w in caught:
            if "ubsmoe" in str(w.filename) or "config section" in str(w.message):
                err_console.print(f"[yellow]warning:[/] {w.message}", highlight=False)
    except ConfigError as e:
        _fail(str(e).replace("\n", "; "))
    except (FileNotFoundError, OSError) as e:
        _fail(str(e))
    console.print(f"ubsmoe run: method={cfg.method} model={cfg.model.name} clients={cfg.fl.num_clients} "
                  f"rounds={cfg.fl.rounds} -> {run_dir}", highlight=False)
    skipped = setup.data.skipped
    if skipped:
        console.print(f"skipped tasks: {', '.join(f'{t} ({why})' for t, why in skipped.items())}", highlight=False)
    from ubsmoe.fl.simulation import run_federated

    display = _Display(cfg.fl.rounds)
    with display.progress:
        if resume is not None:
            from ubsmoe.fl.server import latest_checkpoint

            ckpt = latest_checkpoint(run_dir)
            if ckpt is None:
                _fail(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
            display.progress.update(display.rounds, completed=int(ckpt.stem.split("_")[1]))
        summary = run_federated(cfg, run_dir, resume=resume is not None, progress=display,
                                setup=setup, verbose=verbose)
    _print_summary(summary, run_dir)


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    from ubsmoe.report import accuracy_table

    for protocol in sorted({r["protocol"] for r in summary.get("accuracy", [])}):
        console.print(accuracy_table(summary, protocol))
    console.print(f"run directory: {run_dir} (summary.json, metrics.jsonl, config.yaml, checkpoints/)",
                  highlight=False)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a finished run directory")]) -> None:
    """Print the per-budget accuracy tables of a finished run."""
    from ubsmoe.report import load_summary

    try:
        summary = load_summary(run_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    _print_summary(summary, run_dir)


@app.command()
def methods() -> None:
    """List the registered methods."""
    from ubsmoe.methods import available_methods, get_method_class

    for name in available_methods():
        doc = (get_method_class(name).__doc__ or "").strip().splitlines()[0]
        console.print(f"{name:10s} {doc}", highlight=False)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="ubsmoe")


if __name__ == "__main__":
    sys.exit(main())
