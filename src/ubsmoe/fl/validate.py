"""Checks on a client's reply before the server folds it (plain PyTorch, no Flower).

A reply that fails a check is left out of its round with a one-line reason naming
the client (:class:`RejectedUpdate`); the server never folds it, so the global model
is never built from a bad reply. Floating tensors in another floating dtype (a
bfloat16 node) are cast to the dtype the server sent, not rejected.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import replace

import torch

from ubsmoe.fl.payload import ROWS_SUFFIX
from ubsmoe.methods import ClientUpdate


class RejectedUpdate(ValueError):
    """A reply the server leaves out of its round; ``str(e)`` is the one-line reason."""


def check_upload(upload: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> None:
    """Check a sparse upload (:func:`~ubsmoe.fl.payload.sparse_upload`) before it is unpacked.

    Args:
        upload: name -> tensor as received (``<name>.rows`` int index tensors beside row uploads).
        sent: the adapters the server sent the client this round.

    Raises:
        RejectedUpdate: an unknown tensor name, a non-floating value tensor, a
            non-integer row index tensor, or a NaN / Inf value.
    """
    for name, x in upload.items():
        if name.endswith(ROWS_SUFFIX) and name[:-len(ROWS_SUFFIX)] in sent:
            if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise RejectedUpdate(f"{name}: row indices of dtype {x.dtype}, expected an integer dtype")
            continue
        if name not in sent:
            raise RejectedUpdate(f"extra tensor {name!r} (not among the {len(sent)} adapters sent)")
        if not x.is_floating_point():
            raise RejectedUpdate(f"{name}: dtype {x.dtype}, expected a floating dtype")
        if not bool(torch.isfinite(x).all()):
            raise RejectedUpdate(f"{name}: NaN or Inf values")


def check_update(update: ClientUpdate, sent: dict[str, torch.Tensor], top_k: int,
                 counts_shape: tuple[int, int], private_counts: bool = False) -> ClientUpdate:
    """Validate an unpacked update against what its client was sent; cast its dtypes.

    Args:
        update: the client's reply with full adapters.
        sent: name -> tensor, the adapters the client was sent (names, shapes and dtypes expected back).
        top_k: the K_c the client was told to train at.
        counts_shape: ``(L, E)``: SMoE layers and experts per layer of the model.
        private_counts: ``privacy.mode`` on: the counts are a (local: noisy)
            histogram ``a / n`` with token counts 1 (:func:`ubsmoe.fl.privacy.privatise_update`),
            so only their shapes and finiteness are checked.

    Returns:
        The update with every adapter in its sent dtype (the same object when nothing was cast).

    Raises:
        RejectedUpdate: missing or extra adapter names, a shape differing from the
            sent one, a non-floating or non-finite tensor, a reported K_c other than
            ``top_k``, a negative example count, a non-finite loss, expert counts
            not ``[L, E]`` / token counts not ``[L]``, negative counts, or per-layer
            expert counts that do not sum to ``K_c x tokens`` (every token is routed
            to exactly K_c experts).
    """
    missing = sorted(set(sent) - set(update.adapters))
    extra = sorted(set(update.adapters) - set(sent))
    if missing:
        raise RejectedUpdate(f"missing adapters {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    if extra:
        raise RejectedUpdate(f"extra adapters {extra[:3]}{' ...' if len(extra) > 3 else ''}")
    adapters = dict(update.adapters)
    cast = False
    for name, ref in sent.items():
        x = adapters[name]
        if x.shape != ref.shape:
            raise RejectedUpdate(f"{name}: shape {tuple(x.shape)}, sent {tuple(ref.shape)}")
        if not x.is_floating_point():
            raise RejectedUpdate(f"{name}: dtype {x.dtype}, expected a floating dtype")
        if not bool(torch.isfinite(x).all()):
            raise RejectedUpdate(f"{name}: NaN or Inf values")
        if x.dtype != ref.dtype:
            adapters[name] = x.to(ref.dtype)
            cast = True
    if update.top_k != top_k:
        raise RejectedUpdate(f"reported K_c={update.top_k}, was sent K_c={top_k}")
    if update.num_examples < 0:
        raise RejectedUpdate(f"num_examples {update.num_examples} < 0")
    if not math.isfinite(update.loss):
        raise RejectedUpdate(f"loss {update.loss}")
    counts, tokens = update.expert_counts, update.token_counts
    if tuple(counts.shape) != tuple(counts_shape) or tuple(tokens.shape) != (counts_shape[0],):
        raise RejectedUpdate(f"expert_counts {tuple(counts.shape)} / token_counts {tuple(tokens.shape)}, "
                             f"expected {tuple(counts_shape)} / ({counts_shape[0]},)")
    c64, t64 = counts.to(torch.float64), tokens.to(torch.float64)
    if private_counts:
        if not (bool(torch.isfinite(c64).all()) and bool(torch.isfinite(t64).all())):
            raise RejectedUpdate("expert_counts / token_counts: non-finite values")
        return replace(update, adapters=adapters) if cast else update
    if not (bool(torch.isfinite(c64).all()) and bool(torch.isfinite(t64).all())) or (
            bool((c64 < 0).any()) or bool((t64 < 0).any())):
        raise RejectedUpdate("expert_counts / token_counts: negative or non-finite counts")
    routed = c64.sum(-1)  # [L]
    if not torch.equal(routed, top_k * t64):
        layer = int((routed != top_k * t64).nonzero()[0])
        raise RejectedUpdate(f"expert counts of layer {layer} sum to {routed[layer]:.0f}, expected "
                             f"K_c x tokens = {top_k} x {t64[layer]:.0f}")
    return replace(update, adapters=adapters) if cast else update


def update_norm(adapters: dict[str, torch.Tensor], sent: dict[str, torch.Tensor]) -> float:
    """``||x_c - x_sent||_2`` over every adapter tensor (float64), the norm of a client's update."""
    total = 0.0
    for name, ref in sent.items():
        total += float((adapters[name].to(torch.float64) - ref.to(torch.float64)).pow(2).sum())
    return math.sqrt(total)


def norm_outliers(norms: Sequence[float], multiple: float) -> list[int]:
    """Indices of norms above ``multiple`` x their median (the norm check of ``fl.reject_norm_multiple``).

    Args:
        norms: one update norm per reply of the round.
        multiple: > 0; 0 disables the check (returns []).

    Returns:
        Sorted indices into ``norms``.
    """
    if multiple <= 0 or not norms:
        return []
    median = statistics.median(norms)
    return [i for i, n in enumerate(norms) if n > multiple * median]
