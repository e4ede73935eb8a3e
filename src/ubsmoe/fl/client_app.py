"""Flower ClientApp: converts messages to ubsmoe types and calls the local trainer.

The node's ``--node-config`` declarations (:mod:`ubsmoe.budgets`: ``partition-id`` or
``data-path``, ``device``, a budget) are sent to the server in the ``query`` reply
and applied here in ``train`` (device; own data with the server's tokenizer).

Test hook (testing only, never set in a real run): the environment variable
``UBSMOE_FAULTS`` makes chosen clients misbehave, to exercise the server's failure
handling through the real Flower path. It is a comma-separated list of
``<client>:<fault>[@<round>]`` (no round: every round), e.g.
``UBSMOE_FAULTS="1:raise@1,2:timeout@1,3:nan,0:shape@2"``. Faults: ``raise`` (the
ClientApp raises), ``timeout`` (sleeps ``fl.round_timeout_s`` + ``UBSMOE_FAULT_LATE_S``
seconds, default 10, then replies normally: a late reply), ``nan`` / ``inf`` (a NaN
/ Inf in the upload), ``shape`` (an adapter with one extra row), ``int`` (an
adapter as int32), ``keys`` (an extra tensor), ``counts`` (expert counts that do not
sum to K_c x tokens) and ``bf16`` (the upload in bfloat16: cast, not rejected).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ubsmoe.budgets import NodeDeclaration, parse_node_config
from ubsmoe.errors import DeclarationError
from ubsmoe.fl.autobudget import AutoState, fleet_round
from ubsmoe.fl.client_runtime import ClientRuntime, node_setup, runtime_key, tokenizer_from_files
from ubsmoe.fl.messages import METRIC_PARTITION_ID, train_task_from_content, update_to_content

# Keys of the query reply's "node" ConfigRecord beside the declaration's fields.
NODE_ERROR = "error"

app = ClientApp()

# One runtime (model, tokenizer, partitions) per process and run config: a simulation
# worker builds it for the first client it serves and reuses it for every later
# client and round. _BUILDS counts the builds in this process (reported per reply).
_RUNTIMES: dict[str, ClientRuntime] = {}
_BUILDS = 0
FAULTS_ENV = "UBSMOE_FAULTS"
FAULT_KINDS = ("raise", "timeout", "nan", "inf", "shape", "int", "keys", "counts", "bf16")


class InjectedFault(RuntimeError):
    """The failure ``UBSMOE_FAULTS`` asked this client to raise (test hook)."""


def injected_fault(client_id: int, round_idx: int) -> str | None:
    """The fault ``UBSMOE_FAULTS`` gives ``client_id`` in ``round_idx`` (None: behave).

    Raises:
        ValueError: a malformed ``UBSMOE_FAULTS`` entry or an unknown fault.
    """
    for entry in filter(None, (e.strip() for e in os.environ.get(FAULTS_ENV, "").split(","))):
        client, _, rest = entry.partition(":")
        kind, _, rnd = rest.partition("@")
        if kind not in FAULT_KINDS or not client.isdigit() or (rnd and not rnd.isdigit()):
            raise ValueError(f"{FAULTS_ENV}: bad entry {entry!r}, expected <client>:<fault>[@<round>] "
                             f"with fault one of {', '.join(FAULT_KINDS)}")
        if int(client) == client_id and (not rnd or int(rnd) == round_idx):
            return kind
    return None


def _corrupt(kind: str, content: RecordDict, received: dict[str, torch.Tensor]) -> RecordDict:
    """Apply a data fault (``nan`` ... ``bf16``) to a reply's content (test hook).

    The faulty tensor is the first received adapter by name, sent whole.
    """
    upload = content["adapters"].to_torch_state_dict()
    name = min(received)
    upload.pop(name + ".rows", None)
    x = upload.get(name, received[name]).clone()
    if x.shape != received[name].shape:  # a row upload: send the received tensor whole instead
        x = received[name].clone()
    if kind in ("nan", "inf"):
        x.view(-1)[0] = float("nan") if kind == "nan" else float("inf")
        upload[name] = x
    elif kind == "shape":
        upload[name] = torch.cat([x, x[:1]])  # one extra row
    elif kind == "int":
        upload[name] = x.to(torch.int32)
    elif kind == "keys":
        upload["not_an_adapter.weight"] = torch.zeros(2)
    elif kind == "bf16":
        upload = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in upload.items()}
    content["adapters"] = ArrayRecord(upload)
    if kind == "counts":
        stats = content["stats"].to_torch_state_dict()
        stats["expert_counts"] = stats["expert_counts"].clone()
        stats["expert_counts"][0, 0] += 1
        content["stats"] = ArrayRecord(stats)
    return content


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


AUTO_STATE = "ubsmoe.autobudget"  # Context.state key of a budget=auto client's AutoState (JSON)


def _train(runtime: ClientRuntime, task: dict, cfg, decl: NodeDeclaration, context: Context):
    """Train the round; as a fleet member (simulated clock, budget=auto) when the run or node says so.

    A ``budget=auto`` client's :class:`~ubsmoe.fl.autobudget.AutoState` lives in
    ``context.state`` (kept by the SuperNode between rounds; a ClientApp process may
    serve one message only). In simulation one node serves one client.
    """
    auto = cfg.fl.budget_pattern == "auto" or decl.auto_budget
    if not (auto or cfg.fl.simulated_fleet):
        return runtime.train_round(**task)
    state = None
    if AUTO_STATE in context.state:
        state = AutoState.from_dict(json.loads(str(context.state[AUTO_STATE]["json"])))
    cap = int(decl.memory_gib * 1024 ** 3) if decl.memory_gib else None
    update, state = fleet_round(runtime, task, state, auto=auto, cap_bytes=cap)
    if state is not None:
        context.state[AUTO_STATE] = ConfigRecord({"json": json.dumps(state.to_dict())})
    return update


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train one round on this node's partition at the K_c and LoRA rank the server sent.

    On the node's declared ``device`` (if any); with ``data-path``, on the node's own
    data tokenized with the tokenizer the server sent.

    Adds ``setup_s`` (building the runtime on first use) and ``work_start`` /
    ``work_end`` (epoch seconds) to the metrics, for the server's overhead account,
    and ``pid`` / ``runtime_builds`` (this process and how many runtimes it has built
    so far), which show the model is built once per worker process, not per client.
    Honors the ``UBSMOE_FAULTS`` test hook (module docstring).

    Raises:
        InjectedFault: ``UBSMOE_FAULTS`` asks this client to raise.
    """
    start = time.time()
    cfg, task = train_task_from_content(msg.content)
    fault = injected_fault(task["client_id"], task["round_idx"])
    if fault == "raise":
        raise InjectedFault(f"client {task['client_id']}: injected failure (UBSMOE_FAULTS)")
    if fault == "timeout":
        time.sleep(cfg.fl.round_timeout_s + float(os.environ.get("UBSMOE_FAULT_LATE_S", "10")))
    tokenizer_files = task.pop("tokenizer_files", None)
    decl = _declaration(context)
    if decl.device is not None and decl.device != cfg.model.device:
        cfg = replace(cfg, model=replace(cfg.model, device=decl.device))
    runtime = _runtime(cfg, decl, task["client_id"], tokenizer_files)
    setup_s = time.time() - start
    update = _train(runtime, task, cfg, decl, context)
    update.metrics.update({"setup_s": setup_s, "work_start": start, "work_end": time.time(),
                           "pid": os.getpid(), "runtime_builds": _BUILDS})
    content = update_to_content(update, task["global_adapters"], dense=cfg.privacy.enabled)
    if fault not in (None, "timeout"):
        content = _corrupt(fault, content, task["global_adapters"])
    return Message(content, reply_to=msg)
