"""The ``ubsmoe`` command: wires configs, the federated run and reports together.

One module per command group, each registering its commands on :data:`app`:
:mod:`~ubsmoe.cli.run` (run, eval), :mod:`~ubsmoe.cli.sweep` (sweep, configs),
:mod:`~ubsmoe.cli.report`, :mod:`~ubsmoe.cli.measure` (bench, flops, plan),
:mod:`~ubsmoe.cli.certs`, :mod:`~ubsmoe.cli.methods` and :mod:`~ubsmoe.cli.pretrain`. Subcommands take an optional
YAML config plus ``key=value`` overrides and call library functions; nothing parses
argv at import time.
"""

# The import order is the order of `ubsmoe --help`.
# isort: off
from ubsmoe.cli import run, report, methods, measure, sweep, certs, pretrain  # noqa: F401  (registers the commands)
# isort: on

from ubsmoe.cli.app import app, main
from ubsmoe.cli.progress import RunDisplay, eta_seconds, format_duration

__all__ = ["RunDisplay", "app", "eta_seconds", "format_duration", "main"]
