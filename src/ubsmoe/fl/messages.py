"""Conversion between ubsmoe types and Flower records (the only Flower-typed glue).

Message layout, server -> client (``train``): ``adapters`` (ArrayRecord, global LoRA
parameters), ``config`` (ConfigRecord: the flattened resolved run config plus the
instruction keys below). Client -> server: ``adapters`` (ArrayRecord, the sparse
upload of :func:`ubsmoe.fl.payload.sparse_upload`: only the tensors and expert rows
the client changed), ``stats`` (ArrayRecord: ``expert_counts [L, E]``,
``token_counts [L]``) and ``metrics`` (MetricRecord).
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ubsmoe.config import RunConfig, config_from_dict, flatten, unflatten
from ubsmoe.fl.payload import dense_from_upload, payload_nbytes, sparse_upload
from ubsmoe.methods import ClientUpdate

# Instruction keys sent with each train message (beside the flattened config). The
# prefix starts with "_" so that it can never be a config section: a method's section is
# named after the method, e.g. "ubsmoe.lambda_pg".
INSTRUCTION_PREFIX = "_instruction."
KEY_ROUND = INSTRUCTION_PREFIX + "round"
KEY_CLIENT_ID = INSTRUCTION_PREFIX + "client_id"
KEY_TOP_K = INSTRUCTION_PREFIX + "top_k"
# Metric keys of a reply.
METRIC_CLIENT_ID = "client_id"
METRIC_NUM_EXAMPLES = "num_examples"
METRIC_TOP_K = "top_k"
METRIC_LOSS = "loss"
METRIC_PARTITION_ID = "partition_id"
METRIC_BYTES_DOWN = "bytes_down"  # tensor bytes the client received this round
METRIC_BYTES_UP = "bytes_up"  # tensor bytes it sent back (sparse adapters + stats)


def config_to_record(cfg: RunConfig, **instruction: Any) -> ConfigRecord:
    """Flatten the resolved config (and instruction keys) into a ConfigRecord."""
    return ConfigRecord({**flatten(cfg.to_dict()), **instruction})


def config_from_record(record: ConfigRecord) -> tuple[RunConfig, dict[str, Any]]:
    """Inverse of :func:`config_to_record`: ``(config, instruction keys)``.

    Raises:
        ConfigError: the record does not hold a valid config.
    """
    flat = dict(record)
    instruction = {k: flat.pop(k) for k in list(flat) if k.startswith(INSTRUCTION_PREFIX)}
    return config_from_dict(unflatten(flat)), instruction


def train_content(cfg: RunConfig, adapters: dict[str, torch.Tensor], round_idx: int,
                  client_id: int, top_k: int) -> RecordDict:
    """The content of one ``train`` message."""
    return RecordDict({
        "adapters": ArrayRecord(adapters),
        "config": config_to_record(cfg, **{KEY_ROUND: round_idx, KEY_CLIENT_ID: client_id,
                                           KEY_TOP_K: top_k}),
    })


def update_to_content(update: ClientUpdate, received: dict[str, torch.Tensor]) -> RecordDict:
    """Pack a :class:`ClientUpdate` as a reply's content, adapters as a sparse upload.

    Args:
        update: the client's update (full adapters).
        received: the global adapters the client was sent this round.
    """
    return RecordDict({
        "adapters": ArrayRecord(sparse_upload(update.adapters, received)),
        "stats": ArrayRecord({"expert_counts": update.expert_counts, "token_counts": update.token_counts}),
        "metrics": MetricRecord({
            METRIC_CLIENT_ID: update.client_id,
            METRIC_NUM_EXAMPLES: update.num_examples,
            METRIC_TOP_K: update.top_k,
            METRIC_LOSS: update.loss,
            **update.metrics,
        }),
    })


def update_from_content(content: RecordDict, global_adapters: dict[str, torch.Tensor]) -> ClientUpdate:
    """Unpack a reply's content into a :class:`ClientUpdate` with full adapters.

    ``metrics[bytes_up]`` is set to the tensor bytes of the reply (upload + stats).

    Args:
        content: the reply's content.
        global_adapters: the adapters the server sent this round (the base the
            sparse upload is relative to).

    Raises:
        KeyError, ValueError: the upload does not fit the global adapters.
    """
    metrics = dict(content["metrics"])
    stats = content["stats"].to_torch_state_dict()
    upload = content["adapters"].to_torch_state_dict()
    core = {METRIC_CLIENT_ID, METRIC_NUM_EXAMPLES, METRIC_TOP_K, METRIC_LOSS}
    extra = {k: float(v) for k, v in metrics.items() if k not in core}
    extra[METRIC_BYTES_UP] = float(payload_nbytes(upload) + payload_nbytes(stats))
    return ClientUpdate(
        client_id=int(metrics[METRIC_CLIENT_ID]),
        num_examples=int(metrics[METRIC_NUM_EXAMPLES]),
        adapters=dense_from_upload(upload, global_adapters),
        expert_counts=stats["expert_counts"],
        token_counts=stats["token_counts"],
        top_k=int(metrics[METRIC_TOP_K]),
        loss=float(metrics[METRIC_LOSS]),
        metrics=extra,
    )
