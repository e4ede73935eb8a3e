"""Flower ServerApp: moves messages between the grid and :class:`~ubsmoe.fl.server.Server`.

Both ``ubsmoe run`` (through the app shipped in ``ubsmoe/flwr_app``, see
:mod:`ubsmoe.fl.simulation`) and ``flwr run .`` run the module-level ``app``. It
reads the run config keys ``config-file`` (a ubsmoe YAML, optional), ``overrides``
(space-separated ``key=value``), ``out`` (run directory), ``resume`` (continue from
the run directory's latest checkpoint), ``progress-file`` (a JSON-lines file of
progress events for a live display; empty: none) and ``command`` (the invoking
command line, kept in the run's provenance; empty: unknown) from ``[tool.flwr.app.config]``
(:func:`config_from_run_config`) and logs its progress through Flower's logger.
"""

from __future__ import annotations

import json
import re
import time
import traceback
from collections.abc import Callable, Iterator
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from ubsmoe.budgets import NodeDeclaration, assign_clients
from ubsmoe.config import RunConfig, load_config
from ubsmoe.errors import DeclarationError
from ubsmoe.fl.client_runtime import SharedSetup, shared_setup
from ubsmoe.fl.fold import LeftOut, RoundIncomplete
from ubsmoe.fl.messages import (
    METRIC_BYTES_DOWN,
    METRIC_CLIENT_ID,
    METRIC_PARTITION_ID,
    train_content,
    update_from_content,
)
from ubsmoe.fl.payload import payload_nbytes
from ubsmoe.fl.run_dir import latest_checkpoint
from ubsmoe.fl.server import Server
from ubsmoe.fl.validate import RejectedUpdate, check_update, check_upload, update_norm
from ubsmoe.methods import ClientUpdate

ProgressFn = Callable[[str, dict[str, Any]], None]
POLL_S = 0.05


def _noop(event: str, info: dict[str, Any]) -> None:
    pass


def short_error(reason: str, limit: int = 240) -> str:
    """One readable line from a Flower error reason: ``ExceptionType: message``.

    Flower reports a ClientApp exception as ``<class 'pkg.Type'>:<'message'>``; under
    the simulation runtime the message is a Ray error whose text holds the whole
    remote traceback and ends with ``Message: <the original message>``. This keeps
    the exception's type name and the original message, on one line of at most
    ``limit`` characters (longer ones end in ``...``; the full reason stays in the
    Flower log).
    """
    text = " ".join(reason.split())
    m = re.fullmatch(r"<class '([\w.()]+)'>:<'(.*)'>", text)
    if m:
        kind, text = m.group(1).rsplit(".", 1)[-1], m.group(2)
        if "Message: " in text:  # a Ray error wrapping the ClientApp's exception
            text = text.rsplit("Message: ", 1)[1]
            kind = "ClientAppException"
        text = f"{kind}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _replies(grid: Grid, messages: list[Message], timeout_s: float = 0.0
             ) -> Iterator[tuple[int, Message | None, str | None]]:
    """Push ``messages`` and yield ``(index, reply, None)`` or ``(index, None, reason)`` as they come.

    ``index`` is the message's position in ``messages``. A reply carrying an error
    (the client raised, or Flower reports its node offline) yields its reason; once
    ``timeout_s`` (> 0) has passed, every message still unanswered yields
    ``timeout after <t> s`` and the generator ends. Only replies to these messages'
    ids are taken: a late reply to an earlier push (a retried round) is discarded.
    """
    ids = list(grid.push_messages(messages))
    pending = {mid: i for i, mid in enumerate(ids)}
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    while pending:
        for reply in grid.pull_messages(list(pending)):
            i = pending.pop(reply.metadata.reply_to_message_id, None)
            if i is None:
                continue  # not a reply to this push (e.g. late, to an earlier try)
            if reply.has_error():
                yield i, None, f"error: {short_error(reply.error.reason)}"
            else:
                yield i, reply, None
        if pending and deadline is not None and time.monotonic() >= deadline:
            for i in sorted(pending.values()):
                yield i, None, f"timeout after {timeout_s:g} s"
            return
        if pending:
            time.sleep(POLL_S)


def discover_partitions(grid: Grid, num_clients: int,
                        declarations: dict[int, NodeDeclaration] | None = None) -> dict[int, int]:
    """Ask every node what it declares (:mod:`ubsmoe.budgets`); return client id -> node id.

    A node holding ``partition-id=K`` serves client K; a node with its own data
    (``data-path``) gets the lowest client id left (nodes in node-id order).

    Args:
        grid: the Flower grid.
        num_clients: ``fl.num_clients``.
        declarations: filled with client id -> the node's declaration, if given.

    Raises:
        RuntimeError: fewer nodes than ``num_clients``.
        DeclarationError: a node config that does not parse, duplicate or out-of-range
            partitions, or too few usable nodes (one line naming the node).
    """
    node_ids = sorted(grid.get_node_ids())
    if len(node_ids) < num_clients:
        raise RuntimeError(f"fl.num_clients={num_clients} but only {len(node_ids)} nodes are connected")
    queries = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n,
                       message_type=MessageType.QUERY) for n in node_ids]
    declared: dict[int, NodeDeclaration] = {}
    for _, reply, error in _replies(grid, queries):
        if reply is None:
            raise RuntimeError(f"a node failed to tell its partition and budget: {error}")
        node = reply.metadata.src_node_id
        info = dict(reply.content["node"]) if "node" in reply.content else {}
        if "error" in info:
            raise DeclarationError(str(info["error"]))
        if not info:  # a ClientApp that only reports its partition
            info = {"partition_id": int(reply.content["metrics"][METRIC_PARTITION_ID])}
        declared[node] = NodeDeclaration.from_dict(info)
    mapping = assign_clients(declared, num_clients)
    if declarations is not None:
        declarations.update({c: declared[n] for c, n in mapping.items()})
    return mapping


def _unpack(reply: Message, sent: dict[str, Any], server: Server, want_norm: bool) -> ClientUpdate:
    """A reply as a validated :class:`ClientUpdate` (dtypes cast to what was sent).

    Raises:
        RejectedUpdate: the reply fails a check of :mod:`ubsmoe.fl.validate`.
    """
    try:
        check_upload(reply.content["adapters"].to_torch_state_dict(), sent["global_adapters"])
        update = update_from_content(reply.content, sent["global_adapters"])
    except RejectedUpdate:
        raise
    except (KeyError, ValueError, TypeError) as e:
        raise RejectedUpdate(f"malformed reply: {e}".replace("\n", "; ")) from None
    update = check_update(update, sent["global_adapters"], sent["top_k"], server.counts_shape,
                          private_counts=server.cfg.privacy.enabled)
    update.metrics[METRIC_BYTES_DOWN] = float(
        payload_nbytes(sent["global_adapters"])
        + sum(payload_nbytes(factors) for _, factors in sent["base_merges"]))
    if want_norm:
        update.metrics["update_norm"] = update_norm(update.adapters, sent["global_adapters"])
    return update


def serve(grid: Grid, cfg: RunConfig, run_dir: Path, setup: SharedSetup, resume: bool = False,
          progress: ProgressFn = _noop, command: str | None = None) -> dict[str, Any]:
    """Run every remaining round of a federated run over ``grid``; return the summary.

    ``command`` (the invoking command line) goes into the run's provenance. Each round
    is tried up to ``1 + fl.round_retries`` times with the same clients and seeds: a
    client that fails, times out (``fl.round_timeout_s``) or sends a reply that
    :mod:`ubsmoe.fl.validate` rejects is left out (a ``client_failed`` progress event
    and the round record's ``failed``), and a try with fewer good replies than
    :meth:`Server.required_replies` commits nothing.

    Raises:
        RoundFailed: a round stayed incomplete after every retry (the run directory
            holds the last complete round's checkpoint).
        DeclarationError: a node's declaration is refused.
    """
    server = Server(cfg, run_dir, setup, resume=resume, command=command)
    declared: dict[int, NodeDeclaration] = {}
    node_of = discover_partitions(grid, cfg.fl.num_clients, declared)
    budgets = server.declare_nodes(declared, node_of)
    if budgets:
        log(INFO, "ubsmoe: budgets declared by nodes: %s", "; ".join(
            f"client {c} (node {d.get('node')}): {d['declared']}={d['value']} -> level "
            f"{server.budgets[c]:g}, K={server.top_k[c]}, rank {server.lora[c][0]}"
            for c, d in budgets.items()))
    want_norm = cfg.fl.reject_norm_multiple > 0
    if cfg.eval.before_training and server.state.round == 0:
        progress("evaluate_before", {"round": 0})
        server.evaluate_before_training()  # round 0: every level before fine-tuning
    for r in range(server.state.round + 1, cfg.fl.rounds + 1):
        clients = server.sample_clients(r)
        for attempt in range(1, cfg.fl.round_retries + 2):
            progress("round_start", {"round": r, "clients": len(clients), "try": attempt})
            tasks = {c: server.client_task(c, r) for c in clients}
            messages = [Message(train_content(cfg, **tasks[c]), dst_node_id=node_of[c],
                                message_type=MessageType.TRAIN) for c in clients]
            round_start = time.time()

            def updates(r: int = r, messages: list[Message] = messages, attempt: int = attempt,
                        tasks: dict[int, dict[str, Any]] = tasks, clients: list[int] = clients) -> Iterator[ClientUpdate | LeftOut]:
                """Replies as they arrive, unpacked against the adapters each client was sent."""
                # A simulated fleet applies fl.round_timeout_s to its simulated clock (Server.screen_fleet).
                wait_s = 0.0 if cfg.fl.simulated_fleet else cfg.fl.round_timeout_s
                for i, reply, error in _replies(grid, messages, wait_s):
                    cid = clients[i]
                    sent = tasks.pop(cid)  # drop the reference once the reply is in
                    if reply is not None:
                        try:
                            if int(reply.content["metrics"][METRIC_CLIENT_ID]) != cid:
                                raise RejectedUpdate(f"reply names client "
                                                     f"{reply.content['metrics'][METRIC_CLIENT_ID]}")
                            update = _unpack(reply, sent, server, want_norm)
                        except RejectedUpdate as e:
                            error = f"rejected: {e}"
                    if error is not None:
                        progress("client_failed", {"round": r, "try": attempt, "client": cid, "reason": error})
                        yield LeftOut(cid, error)
                        continue
                    progress("client_done", {"round": r})
                    yield update
                progress("aggregate", {"round": r})

            try:
                record = server.end_round(r, updates(), clients=clients, round_start=round_start,
                                          attempt=attempt)
                break
            except RoundIncomplete as e:
                incomplete = e
                progress("round_retry" if attempt <= cfg.fl.round_retries else "round_failed",
                         {"round": r, "try": attempt, "message": str(e),
                          "replies": e.replies, "needed": e.needed})
        else:
            last = latest_checkpoint(server.run_dir)
            raise RoundFailed(f"{incomplete} after {cfg.fl.round_retries + 1} tries "
                              f"(fl.min_replies={cfg.fl.min_replies}, "
                              f"fl.min_reply_fraction={cfg.fl.min_reply_fraction:g}, "
                              f"fl.round_retries={cfg.fl.round_retries}); the run stopped, its last "
                              f"complete round is {server.state.round}"
                              f"{f' ({last.name}, resume with --resume)' if last else ''}")
        progress("round_end", {"round": r, "record": record, "eval": server.last_eval})
    if not server.last_eval:  # resumed after the last round: evaluate once more
        server.last_eval = server.evaluate(server.state.round)
    return server.finish()


class RoundFailed(RuntimeError):
    """A round stayed below ``fl.min_replies`` / ``fl.min_reply_fraction`` after every retry."""


app = ServerApp()


def config_from_run_config(run_config: dict[str, Any]) -> tuple[RunConfig, Path]:
    """The validated config and absolute run directory of a ``flwr run`` run config.

    Keys (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``):
    ``config-file`` (a ubsmoe YAML on top of the embedded default; empty for none),
    ``overrides`` (space-separated ``key=value``) and ``out`` (run directory; empty:
    ``runs/<timestamp>-<method>``). A relative ``out`` is resolved against the
    working directory of the process running the ServerApp, which for ``flwr run``
    is the directory the local SuperLink was started from, so the path is made
    absolute here and logged.

    Raises:
        ConfigError: an invalid config file or override.
    """
    overrides = str(run_config.get("overrides", "")).split()
    cfg = load_config(str(run_config.get("config-file", "")) or None, overrides)
    out = str(run_config.get("out", "")) or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.method}"
    return cfg, Path(out).expanduser().resolve()


class ProgressLog:
    """Progress callback for :func:`serve`: Flower's log plus an optional events file.

    Each event is appended to ``path`` as one JSON line ``{"event": ..., **info}``
    and flushed at once, so a launcher in another process (``ubsmoe run``) can
    follow the run: ``round_start`` (round, clients), ``client_done`` (round),
    ``aggregate`` (round), ``round_end`` (round, loss), then ``done`` (run_dir) or
    ``error`` (message: one line; traceback: the full text). A line is written in
    one ``write`` call well under the pipe-buffer size, so a reader polling the
    file sees whole lines or an unterminated tail it skips.

    Args:
        path: the events file (appended to; created with its folder); None: log only.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **info: Any) -> None:
        """Append one event to the file (no-op without a file)."""
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"event": event, **info}) + "\n")

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event == "round_end":
            rec = info["record"]
            log(INFO, "ubsmoe: round %d: train loss %.4f", rec["round"], rec["loss"])
            dp = rec.get("privacy")  # privacy.mode on: the accountant's epsilon and the round's SNR
            self.emit(event, round=rec["round"], loss=rec["loss"],
                      **({"epsilon": dp["epsilon"], "epsilon_round": dp["epsilon_round"],
                          "snr": dp.get("snr")} if dp else {}))
        else:
            self.emit(event, **info)


def _truthy(value: Any) -> bool:
    return value is True or str(value).strip().lower() in ("true", "1", "yes", "on")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run`` and ``ubsmoe run``: config from the app's run config.

    A failure is written to the progress file as an ``error`` event, then re-raised
    so Flower marks the run failed.
    """
    run_config = dict(context.run_config)
    progress = ProgressLog(Path(str(run_config["progress-file"])).expanduser().resolve()
                           if str(run_config.get("progress-file", "")) else None)
    try:
        cfg, run_dir = config_from_run_config(run_config)
        resume = _truthy(run_config.get("resume", False))
        log(INFO, "ubsmoe: method %s, %d clients, %d rounds; run directory %s%s",
            cfg.method, cfg.fl.num_clients, cfg.fl.rounds, run_dir, " (resumed)" if resume else "")
        summary = serve(grid, cfg, run_dir, shared_setup(cfg), resume=resume, progress=progress,
                        command=str(run_config.get("command", "")) or None)
    except BaseException as e:
        message = f"{type(e).__name__}: {e}".replace("\n", "; ")
        progress.emit("error", message=message, traceback=traceback.format_exc())
        raise
    last = summary["rounds_completed"]
    for row in summary["accuracy"]:
        if row["round"] == last:
            log(INFO, "ubsmoe: budget %g (K=%d, %s) %s accuracy %.4f", row["budget"], row["top_k"],
                row["top_k_mode"], row["protocol"], row["average"])
    log(INFO, "ubsmoe: wrote %s", run_dir / "summary.json")
    progress.emit("done", run_dir=str(run_dir))
