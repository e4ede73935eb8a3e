"""``ubsmoe certs``: a local CA, the SuperLink's TLS certificate and SuperNode keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ubsmoe.certs import DEFAULT_HOSTS, make_certs
from ubsmoe.cli.app import app, console, fail


@app.command()
def certs(
    out: Annotated[Path, typer.Argument(help="folder for the CA, server certificate and node keys")],
    nodes: Annotated[int, typer.Option("--nodes", help="number of SuperNode key pairs")] = 3,
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="SuperLink host name or IP for the certificate (repeatable; "
                       "default 127.0.0.1 and localhost)")] = None,
) -> None:
    """A local CA, a SuperLink TLS certificate and SuperNode key pairs for a Flower deployment."""
    try:
        files = make_certs(out, nodes=nodes, hosts=host or list(DEFAULT_HOSTS))
    except ValueError as e:
        fail(str(e))
    for path in (files.ca_cert, files.ca_key, files.server_cert, files.server_key,
                 *[p for pair in files.node_keys for p in pair]):
        console.print(str(path), highlight=False, soft_wrap=True)


