"""Flower ClientApp: converts messages to ubsmoe types and calls the local trainer.

The node's ``--node-config`` declarations (:mod:`ubsmoe.budgets`: ``partition-id`` or
``data-path``, ``device``, a budget) are sent to the server in the ``query`` reply
and applied here in ``train`` (device; own data with the server's tokenizer).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ubsmoe.budgets import DeclarationError, NodeDeclaration, parse_node_config
from ubsmoe.fl.messages import METRIC_PARTITION_ID, train_task_from_content, update_to_content
from ubsmoe.fl.train import ClientRuntime, node_setup, runtime_key, tokenizer_from_files

# Keys of the query reply's "node" ConfigRecord beside the declaration's fields.
NODE_ERROR = "error"

app = ClientApp()

# One runtime (model, tokenizer, partitions) per process and run config: a simulation
# worker builds it for the first client it serves and reuses it for every later
# client and round. _BUILDS counts the builds in this process (reported per reply).
_RUNTIMES: dict[str, ClientRuntime] = {}
_BUILDS = 0


def _runtime(cfg, decl: NodeDeclaration | None = None, client_id: int = 0,
             tokenizer_files: dict[str, str] | None = None) -> ClientRuntime:
    global _BUILDS
    key = runtime_key(cfg)
    if decl is not None and decl.data_path is not None:
        key += f":{decl.data_path}:{client_id}"
    if key not in _RUNTIMES:
        _RUNTIMES.clear()
        setup = None
        if decl is not None and decl.data_path is not None:
            if not tokenizer_files:
                raise RuntimeError("this node trains on its own data (data-path) but the server "
                                   "sent no tokenizer")
            setup = node_setup(cfg, client_id, decl.data_path, tokenizer_from_files(tokenizer_files))
        _RUNTIMES[key] = ClientRuntime(cfg, setup)
        _BUILDS += 1
    return _RUNTIMES[key]


def _declaration(context: Context) -> NodeDeclaration:
    """This node's declaration (raises DeclarationError on a bad node config)."""
    return parse_node_config(dict(context.node_config), node=context.node_id)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server what this node declares (:mod:`ubsmoe.budgets`).

    The reply's ``node`` ConfigRecord holds the declaration's fields (or ``error``:
    one line, for a node config that does not parse); ``metrics`` holds the
    partition id when the node has one.
    """
    try:
        decl = _declaration(context)
    except DeclarationError as e:
        return Message(RecordDict({"node": ConfigRecord({NODE_ERROR: str(e)})}), reply_to=msg)
    content = {"node": ConfigRecord(decl.to_dict())}
    if decl.partition_id is not None:
        content["metrics"] = MetricRecord({METRIC_PARTITION_ID: decl.partition_id})
    return Message(RecordDict(content), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round on this node's partition at the K_c and LoRA rank the server sent.

    On the node's declared ``device`` (if any); with ``data-path``, on the node's own
    data tokenized with the tokenizer the server sent.

    Adds ``setup_s`` (building the runtime on first use) and ``work_start`` /
    ``work_end`` (epoch seconds) to the metrics, for the server's overhead account,
    and ``pid`` / ``runtime_builds`` (this process and how many runtimes it has built
    so far), which show the model is built once per worker process, not per client.
    """
    start = time.time()
    cfg, task = train_task_from_content(msg.content)
    tokenizer_files = task.pop("tokenizer_files", None)
    decl = _declaration(context)
    if decl.device is not None and decl.device != cfg.model.device:
        cfg = replace(cfg, model=replace(cfg.model, device=decl.device))
    runtime = _runtime(cfg, decl, task["client_id"], tokenizer_files)
    setup_s = time.time() - start
    update = runtime.train_round(**task)
    update.metrics.update({"setup_s": setup_s, "work_start": start, "work_end": time.time(),
                           "pid": os.getpid(), "runtime_builds": _BUILDS})
    return Message(update_to_content(update, task["global_adapters"]), reply_to=msg)
