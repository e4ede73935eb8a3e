"""Flower ClientApp: converts messages to ubsmoe types and calls the local trainer."""

from __future__ import annotations

import time

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ubsmoe.fl.messages import (
    KEY_CLIENT_ID,
    KEY_ROUND,
    KEY_TOP_K,
    METRIC_PARTITION_ID,
    config_from_record,
    update_to_content,
)
from ubsmoe.fl.train import ClientRuntime, runtime_key

app = ClientApp()

# One runtime (model, tokenizer, partitions) per process and run config.
_RUNTIMES: dict[str, ClientRuntime] = {}


def _runtime(cfg) -> ClientRuntime:
    key = runtime_key(cfg)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()
        _RUNTIMES[key] = ClientRuntime(cfg)
    return _RUNTIMES[key]


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which data partition this node holds."""
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({METRIC_PARTITION_ID: pid})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round on this node's partition at the K_c the server sent.

    Adds ``setup_s`` (building the runtime on first use) and ``work_start`` /
    ``work_end`` (epoch seconds) to the metrics, for the server's overhead account.
    """
    start = time.time()
    cfg, instruction = config_from_record(msg.content["config"])
    runtime = _runtime(cfg)
    setup_s = time.time() - start
    received = msg.content["adapters"].to_torch_state_dict()
    update = runtime.train_round(
        client_id=int(instruction[KEY_CLIENT_ID]),
        round_idx=int(instruction[KEY_ROUND]),
        top_k=int(instruction[KEY_TOP_K]),
        global_adapters=received,
    )
    update.metrics.update({"setup_s": setup_s, "work_start": start, "work_end": time.time()})
    return Message(update_to_content(update, received), reply_to=msg)
