"""Local training on one client (plain PyTorch, no Flower).

One function, :func:`local_train`, reads like the algorithm: forward, loss, method
loss hook, backward, method gradient hook, clip, step, method update hook (UB-SMoE's
pseudo-gradient acts here, in the space of updates), log. Around it: the loss, the
per-client seed and the batch order. The client's run setup (data, tokenizer,
partitions, the model it keeps between rounds) is :mod:`ubsmoe.fl.client_runtime`.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.config import TrainConfig
from ubsmoe.core.grouped import cached_arange
from ubsmoe.data.prompts import collate
from ubsmoe.methods import Method
from ubsmoe.models import routing_mask, set_activation_checkpointing, step_stats
from ubsmoe.models.compiled import set_compiled
from ubsmoe.models.fused_host import set_fused_ops
from ubsmoe.models.precision import AdapterMasters


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, labelled: int | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled (response) tokens.

    Args:
        logits: ``[batch, seq, vocab]``.
        labels: ``[batch, seq]`` token ids, -100 where no loss is taken (prompt, padding).
        labelled: the number of labelled next-token targets (``labels[:, 1:] != -100``)
            when the caller has counted them on the host; None: checked here, which
            reads a flag back from the device (a synchronisation on a GPU).

    Returns:
        Scalar loss in float32 (0 with no labelled token).
    """
    return next_token_loss(logits, labels[:, 1:], labelled)


def next_token_loss(logits: torch.Tensor, next_labels: torch.Tensor, labelled: int | None = None) -> torch.Tensor:
    """:func:`causal_lm_loss` with the labels already shifted: ``next_labels = labels[:, 1:]``.

    Args:
        logits: ``[batch, seq, vocab]``.
        next_labels: ``[batch, seq - 1]``, the target of each position but the last
            (contiguous: :func:`local_train` shifts them on the host, so the device copies
            nothing).
        labelled: as for :func:`causal_lm_loss`.

    Returns:
        Scalar loss in float32 (0 with no labelled token).
    """
    shift_logits = logits[:, :-1, :].float()  # [B, T-1, V]
    if (labelled == 0) if labelled is not None else not (next_labels != -100).any():
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                           next_labels.reshape(-1), ignore_index=-100)


def client_seed(base_seed: int, client_id: int, round_idx: int) -> int:
    """Per-client, per-round seed derived from the base seed (stable across runs)."""
    digest = hashlib.sha256(f"{base_seed}:{client_id}:{round_idx}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def batch_indices(num_examples: int, batch_size: int, epochs: int, max_steps: int,
                  seed: int) -> list[list[int]]:
    """The example indices of each batch of a round: a seeded shuffle per epoch.

    Args:
        num_examples: size of the client's partition.
        batch_size: examples per batch (the last batch of an epoch may be smaller).
        epochs: passes over the partition.
        max_steps: stop after this many batches (0: no cap).
        seed: seed of the ``torch.Generator`` drawing the permutations.

    Returns:
        One list of partition indices per batch, in training order.
    """
    gen = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    for _ in range(epochs):
        order = torch.randperm(num_examples, generator=gen).tolist()
        for start in range(0, len(order), batch_size):
            batches.append(order[start:start + batch_size])
            if max_steps and len(batches) >= max_steps:
                return batches
    return batches


def make_batches(examples: list[dict], indices: list[list[int]],
                 pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """Collate the examples of each batch of :func:`batch_indices`.

    Args:
        examples: tokenized examples ``{"input_ids": [...], "labels": [...]}``.
        indices: partition indices per batch, in training order.
        pad_token_id: the tokenizer's padding id.

    Returns:
        Batches of ``input_ids``/``attention_mask``/``labels``, each ``[batch, seq]``.
    """
    return [collate([examples[i] for i in idx], pad_token_id) for idx in indices]


def split_batch(batch: dict[str, torch.Tensor], micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split a right-padded batch into micro-batches of ``micro_batch_size`` rows.

    Columns that are padding in every row of a micro-batch are dropped at the right
    (exact for right padding and a causal model: no real token attends to them).

    Args:
        batch: ``input_ids``/``attention_mask``/``labels``, each ``[batch, seq]``.
        micro_batch_size: rows per micro-batch (the last may hold fewer).

    Returns:
        Micro-batches with the same keys, each ``[<= micro_batch_size, <= seq]``.
    """
    rows = batch["input_ids"].shape[0]
    parts = []
    for start in range(0, rows, micro_batch_size):
        part = {k: v[start:start + micro_batch_size] for k, v in batch.items()}
        width = int(part["attention_mask"].sum(1).max())
        parts.append({k: v[:, :max(width, 1)] for k, v in part.items()})
    return parts


def local_train(model: nn.Module, batches: list[dict[str, torch.Tensor]], method: Method,
                train_cfg: TrainConfig, top_k: int) -> dict[str, float]:
    """Train the model's LoRA parameters on ``batches`` with a fresh Adam optimizer.

    One optimizer step per batch (the effective batch, ``train.batch_size``): zero
    the gradients, clear the SMoE layers' per-step routing statistics, then per
    micro-batch (``train.grad_accumulation_steps`` of them) forward, task loss,
    method loss, backward; then the method's gradient hook once on the accumulated
    gradients (UB-SMoE's PG sees the active set of the whole batch), clipping and
    the optimizer step. A micro-batch's task loss is its mean token loss weighted by
    its share of the step's labelled tokens, so the accumulated gradient is the full
    batch's mean-token-loss gradient; the method's extra loss is averaged over the
    micro-batches (exact for losses of the parameters alone, e.g. UB-SMoE's range
    penalty; SMoE-LLB's load-balancing loss is a per-micro-batch statistic).
    With ``train.activation_checkpointing`` the decoder layers are recomputed in the
    backward pass (:func:`~ubsmoe.models.runtime.set_activation_checkpointing`).

    Args:
        model: patched model; only parameters with ``requires_grad`` are trained.
        batches: from :func:`make_batches`, each of up to ``train.batch_size`` rows.
        method: supplies the extra loss, the optimizer's parameter groups
            (:meth:`Method.param_groups`), the gradient hook (after backward), the
            update hook (after the optimizer step) and per-step metrics
            (:meth:`Method.step_metrics`, once per optimizer step).
        train_cfg: lr, gradient clipping (over all trainable parameters),
            accumulation and checkpointing.
        top_k: K_c the client runs at (already set on the model).

    Returns:
        ``{"loss": mean task loss over steps, "steps": n, "examples": n, "tokens": n}``
        (steps: optimizer steps; tokens: labelled tokens, i.e. response tokens) plus,
        per key of :meth:`Method.step_metrics`, its maximum over the steps.

    Batches may live on the CPU; each is split into micro-batches and counted there,
    then moved to the model's device. On CUDA the optimizer is fused Adam (same update
    rule, fewer kernels); on CPU torch's default Adam.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = next(model.parameters()).device
    # On CUDA, fused Adam updates every tensor in a few kernels (the per-tensor foreach
    # path is torch's default); on CPU torch's default keeps CPU runs as they were.
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.Adam(method.param_groups(model, train_cfg.lr), lr=train_cfg.lr, **fused)
    micro_batch_size = train_cfg.batch_size // train_cfg.grad_accumulation_steps
    set_activation_checkpointing(model, train_cfg.activation_checkpointing)
    set_compiled(model, train_cfg.compile)
    set_fused_ops(model, train_cfg.fused_ops)
    masters = AdapterMasters(model, train_cfg.adapter_dtype)  # train.adapter_dtype=compute: bf16 copies
    model.train()
    total_loss, steps, examples, tokens = 0.0, 0, 0, 0
    step_max: dict[str, float | torch.Tensor] = {}  # tensors stay on the device until the end
    try:
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            masters.to_compute()
            # Split and count labelled tokens where the batch lives (the CPU, as batches
            # arrive), so nothing waits for the device before the optimizer step.
            parts = split_batch(batch, micro_batch_size)
            step_tokens = int((batch["labels"][:, 1:] != -100).sum())  # labelled tokens of the step
            part_tokens = [int((part["labels"][:, 1:] != -100).sum()) for part in parts]
            # No padding: every token is routed, and the SMoE layers need no mask (resolving
            # one reads it back from the device once per forward).
            part_padded = [not bool(part["attention_mask"].all()) for part in parts]
            for part in parts:  # shifted on the host: the loss copies nothing on the device
                part["next_labels"] = part["labels"][:, 1:].contiguous()
            parts = [{k: v.to(device, non_blocking=True) for k, v in part.items()} for part in parts]
            part_losses = []  # detached, read once after the step (no host sync before it)
            with step_stats(model):
                for part, n_tokens, padded in zip(parts, part_tokens, part_padded, strict=True):
                    with routing_mask(model, part["attention_mask"] if padded else None):
                        logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"],
                                       # the model's default positions, from a cached range
                                       position_ids=cached_arange(part["input_ids"].shape[1], device)[None],
                                       use_cache=False).logits
                    weight = n_tokens / step_tokens if step_tokens else 1.0 / len(parts)
                    loss = next_token_loss(logits, part["next_labels"], n_tokens) * weight  # no host read
                    extra = method.extra_loss(model, top_k)
                    objective = loss if extra is None else loss + extra / len(parts)
                    objective.backward()
                    masters.accumulate()
                    part_losses.append(loss.detach())
                masters.to_master()  # float32 parameters and gradients from here on
                # Once per optimizer step, after every micro-batch's forward and extra loss
                # (the parameters, e.g. UB-SMoE's phi, are those of this step's loss).
                for key, value in method.step_metrics(model).items():
                    step_max[key] = _running_max(step_max.get(key), value)
                method.after_backward(model, top_k)  # once, on the accumulated gradients
            if train_cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, train_cfg.max_grad_norm)
            optimizer.step()
            method.after_step(model, top_k)
            step_loss = 0.0
            for value in torch.stack(part_losses).tolist() if part_losses else []:  # one host sync
                step_loss += value
            total_loss += step_loss
            steps += 1
            examples += batch["input_ids"].shape[0]
            tokens += step_tokens
    finally:
        masters.restore()
        set_compiled(model, False)
        set_fused_ops(model, False)
        set_activation_checkpointing(model, False)
        model.eval()
    return {"loss": total_loss / max(steps, 1), "steps": steps, "examples": examples, "tokens": tokens,
            **{k: float(v) for k, v in step_max.items()}}  # one host read per metric


def _running_max(old: float | torch.Tensor | None, value: float | torch.Tensor) -> float | torch.Tensor:
    """max(old, value); on the device when either is a tensor (no host read per step)."""
    if old is None:
        return value
    if isinstance(old, torch.Tensor) or isinstance(value, torch.Tensor):
        return torch.maximum(torch.as_tensor(old), torch.as_tensor(value))
    return max(old, value)
