"""Flower ServerApp: moves messages between the grid and :class:`~ubsmoe.fl.server.Server`.

``ubsmoe run`` builds the app with :func:`make_server_app` around an already
validated config; ``flwr run .`` uses the module-level ``app``, which reads the run
config keys ``config-file`` (a ubsmoe YAML, optional), ``overrides`` (space-separated
``key=value``) and ``out`` (run directory) from ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from ubsmoe.config import RunConfig, load_config
from ubsmoe.fl.messages import METRIC_PARTITION_ID, train_content, update_from_content
from ubsmoe.fl.server import Server
from ubsmoe.fl.train import SharedSetup, shared_setup

ProgressFn = Callable[[str, dict[str, Any]], None]
POLL_S = 0.05


def _noop(event: str, info: dict[str, Any]) -> None:
    pass


def _collect(grid: Grid, messages: list[Message], on_reply: Callable[[Message], None]) -> list[Message]:
    """Push ``messages`` and pull replies as they arrive; raise on a client error."""
    pending = set(grid.push_messages(messages))
    replies = []
    while pending:
        for reply in grid.pull_messages(list(pending)):
            pending.discard(reply.metadata.reply_to_message_id)
            if reply.has_error():
                raise RuntimeError(f"a client failed: {reply.error.reason}")
            replies.append(reply)
            on_reply(reply)
        if pending:
            time.sleep(POLL_S)
    return replies


def discover_partitions(grid: Grid, num_clients: int) -> dict[int, int]:
    """Ask every node for its partition id; return partition id -> node id.

    Raises:
        RuntimeError: fewer nodes than ``num_clients`` or duplicate partitions.
    """
    node_ids = sorted(grid.get_node_ids())
    if len(node_ids) < num_clients:
        raise RuntimeError(f"fl.num_clients={num_clients} but only {len(node_ids)} nodes are connected")
    queries = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                       message_type=MessageType.QUERY) for n in node_ids]
    mapping: dict[int, int] = {}
    for reply in _collect(grid, queries, lambda _: None):
        pid = int(reply.content["metrics"][METRIC_PARTITION_ID])
        if pid in mapping:
            raise RuntimeError(f"two nodes hold partition {pid}")
        mapping[pid] = reply.metadata.src_node_id
    missing = [c for c in range(num_clients) if c not in mapping]
    if missing:
        raise RuntimeError(f"no node holds partitions {missing}")
    return mapping


def serve(grid: Grid, cfg: RunConfig, run_dir: Path, setup: SharedSetup, resume: bool = False,
          progress: ProgressFn = _noop) -> dict[str, Any]:
    """Run every remaining round of a federated run over ``grid``; return the summary."""
    server = Server(cfg, run_dir, setup, resume=resume)
    node_of = discover_partitions(grid, cfg.fl.num_clients)
    for r in range(server.state.round + 1, cfg.fl.rounds + 1):
        clients = server.sample_clients(r)
        progress("round_start", {"round": r, "clients": len(clients)})
        messages = [
            Message(train_content(cfg, **server.client_task(c, r)), dst_node_id=node_of[c],
                    message_type=MessageType.TRAIN)
            for c in clients
        ]
        t0 = time.time()
        replies = _collect(grid, messages, lambda _, r=r: progress("client_done", {"round": r}))
        train_s = time.time() - t0
        updates = [update_from_content(m.content) for m in replies]
        progress("aggregate", {"round": r})
        record = server.end_round(r, updates, {"train_phase_s": train_s})
        progress("round_end", {"round": r, "record": record, "eval": server.last_eval})
    if not server.last_eval:  # resumed after the last round: evaluate once more
        server.last_eval = server.evaluate(server.state.round)
    return server.finish()


def make_server_app(cfg: RunConfig, run_dir: Path, setup: SharedSetup, resume: bool = False,
                    progress: ProgressFn = _noop, result: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp running :func:`serve` on an already-built config and setup.

    ``result`` (if given) receives ``summary`` or ``error`` so the caller can report
    a failure raised inside the simulation's server thread.
    """
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            summary = serve(grid, cfg, run_dir, setup, resume=resume, progress=progress)
            if result is not None:
                result["summary"] = summary
        except BaseException as e:  # surfaced by the caller
            if result is None:
                raise
            result["error"] = e

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: config from the app's run config."""
    rc = context.run_config
    overrides = str(rc.get("overrides", "")).split()
    cfg = load_config(str(rc.get("config-file", "")) or None, overrides)
    out = str(rc.get("out", "")) or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}"
    serve(grid, cfg, Path(out), shared_setup(cfg))
