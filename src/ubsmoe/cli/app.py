"""The ``ubsmoe`` Typer app, its consoles and the one-line failure every command uses."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="UB-SMoE: resource-adaptive federated fine-tuning of sparse MoE models.")
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: MESSAGE`` (one line, stderr) and exit with ``code`` (2: bad input).

    Raises:
        typer.Exit: always.
    """
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def parse_list(option: str, text: str, kind: type) -> list:
    """Parse a comma-separated option value, failing with the option's name.

    Raises:
        typer.Exit: code 2, a value that is not a ``kind`` or no value at all.
    """
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{option}: got {text!r}, expected comma-separated {kind.__name__} values")
    if not values:
        fail(f"{option}: got {text!r}, expected at least one value")
    return values


def main() -> None:
    """Console-script entry point (``ubsmoe = "ubsmoe.cli:main"``).

    Importing this module imports the :mod:`ubsmoe.cli` package first, which
    registers every command on :data:`app`.
    """
    app(prog_name="ubsmoe")
