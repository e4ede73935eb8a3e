"""Conversion between ubsmoe types and Flower records (the only Flower-typed glue).

Message layout, server -> client (``train``): ``adapters`` (ArrayRecord, the LoRA
parameters the client starts from, at its rank), ``config`` (ConfigRecord: the
flattened resolved run config plus the instruction keys below) and, for methods that
merge into the base weights, ``base_merges`` (ArrayRecord, ``"<index>:<name>"`` ->
factor, merge ids in order under :data:`KEY_MERGE_IDS`). Client -> server:
``adapters`` (ArrayRecord, the sparse upload of :func:`ubsmoe.fl.payload.sparse_upload`
relative to the adapters it was sent: only the tensors and expert rows the client
changed), ``stats`` (ArrayRecord: ``expert_counts [L, E]``, ``token_counts [L]``) and
``metrics`` (MetricRecord).
"""

from __future__ import annotations

from collections.abc import Sequence
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
KEY_LORA_RANK = INSTRUCTION_PREFIX + "lora_rank"
KEY_LORA_ALPHA = INSTRUCTION_PREFIX + "lora_alpha"
KEY_MERGE_IDS = INSTRUCTION_PREFIX + "base_merge_ids"
# The server's tokenizer files, one key per file, sent to a node with its own data.
KEY_TOKENIZER_FILE = INSTRUCTION_PREFIX + "tokenizer_file."
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


def train_content(cfg: RunConfig, global_adapters: dict[str, torch.Tensor], round_idx: int,
                  client_id: int, top_k: int, lora_rank: int | None = None,
                  lora_alpha: float | None = None,
                  base_merges: Sequence[tuple[str, dict[str, torch.Tensor]]] = (),
                  tokenizer_files: dict[str, str] | None = None) -> RecordDict:
    """The content of one ``train`` message (arguments as :meth:`Server.client_task`).

    ``tokenizer_files`` (``{file name: text}``, :func:`ubsmoe.fl.client_runtime.tokenizer_to_files`)
    is sent to a node that trains on its own data, so it uses the server's tokenizer.
    """
    instruction: dict[str, Any] = {KEY_ROUND: round_idx, KEY_CLIENT_ID: client_id, KEY_TOP_K: top_k}
    for name, text in (tokenizer_files or {}).items():
        instruction[KEY_TOKENIZER_FILE + name] = text
    if lora_rank is not None:
        instruction[KEY_LORA_RANK] = int(lora_rank)
    if lora_alpha is not None:
        instruction[KEY_LORA_ALPHA] = float(lora_alpha)
    content = {"adapters": ArrayRecord(global_adapters)}
    if base_merges:
        instruction[KEY_MERGE_IDS] = [mid for mid, _ in base_merges]
        content["base_merges"] = ArrayRecord({f"{i}:{name}": t for i, (_, factors) in enumerate(base_merges)
                                              for name, t in factors.items()})
    return RecordDict({**content, "config": config_to_record(cfg, **instruction)})


def train_task_from_content(content: RecordDict) -> tuple[RunConfig, dict[str, Any]]:
    """Inverse of :func:`train_content`: ``(config, keyword arguments of ClientRuntime.train_round)``.

    When the server sent its tokenizer, the task also holds ``tokenizer_files``
    (``{file name: text}``), which the ClientApp removes before training.

    Raises:
        ConfigError: the record does not hold a valid config.
    """
    cfg, instruction = config_from_record(content["config"])
    merges: list[tuple[str, dict[str, torch.Tensor]]] = [
        (str(mid), {}) for mid in instruction.get(KEY_MERGE_IDS, [])]
    if merges:
        for key, t in content["base_merges"].to_torch_state_dict().items():
            index, _, name = key.partition(":")
            merges[int(index)][1][name] = t
    task = {
        "client_id": int(instruction[KEY_CLIENT_ID]),
        "round_idx": int(instruction[KEY_ROUND]),
        "top_k": int(instruction[KEY_TOP_K]),
        "global_adapters": content["adapters"].to_torch_state_dict(),
        "lora_rank": int(instruction[KEY_LORA_RANK]) if KEY_LORA_RANK in instruction else None,
        "lora_alpha": float(instruction[KEY_LORA_ALPHA]) if KEY_LORA_ALPHA in instruction else None,
        "base_merges": merges,
    }
    tokenizer_files = {k[len(KEY_TOKENIZER_FILE):]: str(v) for k, v in instruction.items()
                       if k.startswith(KEY_TOKENIZER_FILE)}
    if tokenizer_files:
        task["tokenizer_files"] = tokenizer_files
    return cfg, task


def update_to_content(update: ClientUpdate, received: dict[str, torch.Tensor],
                      dense: bool = False) -> RecordDict:
    """Pack a :class:`ClientUpdate` as a reply's content, adapters as a sparse upload.

    Args:
        update: the client's update (full adapters).
        received: the global adapters the client was sent this round.
        dense: send every adapter tensor whole (``privacy.mode`` on: the sparse
            upload's changed rows reveal which experts the client used).
    """
    upload = dict(update.adapters) if dense else sparse_upload(update.adapters, received)
    return RecordDict({
        "adapters": ArrayRecord(upload),
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
