"""Flower ClientApp: converts messages to ubsmoe types and calls the local trainer."""

from __future__ import annotations

import os
import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ubsmoe.fl.messages import METRIC_PARTITION_ID, train_task_from_content, update_to_content
from ubsmoe.fl.train import ClientRuntime, runtime_key

app = ClientApp()

# One runtime (model, tokenizer, partitions) per process and run config: a simulation
# worker builds it for the first client it serves and reuses it for every later
# client and round. _BUILDS counts the builds in this process (reported per reply).
_RUNTIMES: dict[str, ClientRuntime] = {}
_BUILDS = 0


def _runtime(cfg) -> ClientRuntime:
    global _BUILDS
    key = runtime_key(cfg)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()
        _RUNTIMES[key] = ClientRuntime(cfg)
        _BUILDS += 1
    return _RUNTIMES[key]


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({METRIC_PARTITION_ID: pid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round on this node's partition at the K_c and LoRA rank the server sent.

    Adds ``setup_s`` (building the runtime on first use) and ``work_start`` /
    ``work_end`` (epoch seconds) to the metrics, for the server's overhead account,
    and ``pid`` / ``runtime_builds`` (this process and how many runtimes it has built
    so far), which show the model is built once per worker process, not per client.
    """
    start = time.time()
    cfg, task = train_task_from_content(msg.content)
    runtime = _runtime(cfg)
    setup_s = time.time() - start
    update = runtime.train_round(**task)
    update.metrics.update({"setup_s": setup_s, "work_start": start, "work_end": time.time(),
                           "pid": os.getpid(), "runtime_builds": _BUILDS})
    return Message(update_to_content(update, task["global_adapters"]), reply_to=msg)
