"""Sparse client uploads: send only the expert rows (and tensors) a client changed.

A client that runs K_c experts without the pseudo-gradient leaves every expert that
received no token bitwise untouched (its LoRA rows get no gradient, so Adam does
not move them). :func:`sparse_upload` drops those rows, and whole tensors that did
not change, relative to the adapters the client received; :func:`dense_from_upload`
rebuilds the full adapters on the server from the global adapters it sent. The
round trip is exact: the rebuilt adapters are bitwise the client's trained ones.

Pure PyTorch; the Flower glue (:mod:`ubsmoe.fl.messages`) only packs the result.
"""

from __future__ import annotations

import torch

from ubsmoe.methods.base import EXPERT_PARAM_RE

ROWS_SUFFIX = ".rows"

__all__ = ["ROWS_SUFFIX", "dense_from_upload", "payload_nbytes", "sparse_upload"]


def sparse_upload(trained: dict[str, torch.Tensor],
                  received: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a client must send so the server can rebuild ``trained``.

    Per name: a tensor equal to the received one is omitted; a per-expert LoRA
    tensor (``[num_experts, ...]``, names matching ``*_lora.A|B``) with some rows
    unchanged is sent as its changed rows ``[n_changed, ...]`` plus
    ``<name>.rows`` (``[n_changed]`` int64 expert indices); anything else is sent
    whole.

    Args:
        trained: name -> the client's adapters after local training.
        received: name -> the global adapters it started from (same names/shapes).

    Returns:
        The upload, name -> tensor.

    Raises:
        KeyError: the two dicts have different names.
        ValueError: a shape differs.
    """
    if set(trained) != set(received):
        raise KeyError(f"trained vs received adapters: names differ "
                       f"({sorted(set(trained) ^ set(received))[:3]})")
    out: dict[str, torch.Tensor] = {}
    for name, x in trained.items():
        ref = received[name]
        if x.shape != ref.shape:
            raise ValueError(f"{name}: shape {tuple(x.shape)} != received {tuple(ref.shape)}")
        if torch.equal(x, ref):
            continue
        if EXPERT_PARAM_RE.search(name) and x.dim() >= 2:
            changed = (x != ref).flatten(1).any(dim=1)  # [E]
            if not bool(changed.all()):
                rows = changed.nonzero().squeeze(-1)  # [n_changed]
                out[name] = x[rows].clone()  # [n_changed, ...]
                out[name + ROWS_SUFFIX] = rows
                continue
        out[name] = x
    return out


def dense_from_upload(upload: dict[str, torch.Tensor],
                      global_adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rebuild a client's full adapters from its upload and the adapters it was sent.

    Inverse of :func:`sparse_upload`: missing tensors are the global value, row
    uploads are scattered into a copy of the global tensor.

    Args:
        upload: from :func:`sparse_upload`.
        global_adapters: the adapters the server sent this round.

    Returns:
        name -> tensor for every global adapter name.

    Raises:
        KeyError: the upload holds a name the global adapters do not.
        ValueError: a shape or row index does not fit.
    """
    extra = sorted(n for n in upload if not n.endswith(ROWS_SUFFIX) and n not in global_adapters)
    if extra:
        raise KeyError(f"upload: unknown tensors {extra[:3]}")
    out: dict[str, torch.Tensor] = {}
    for name, ref in global_adapters.items():
        if name not in upload:
            out[name] = ref
            continue
        x = upload[name]
        rows = upload.get(name + ROWS_SUFFIX)
        if rows is None:
            if x.shape != ref.shape:
                raise ValueError(f"upload {name}: shape {tuple(x.shape)} != {tuple(ref.shape)}")
            out[name] = x
            continue
        rows = rows.to(torch.int64)
        if x.shape[1:] != ref.shape[1:] or rows.shape != (x.shape[0],) or (
                rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= ref.shape[0])):
            raise ValueError(f"upload {name}: rows {tuple(rows.shape)} / values {tuple(x.shape)} "
                             f"do not fit {tuple(ref.shape)}")
        full = ref.clone()
        full[rows] = x.to(ref.dtype)
        out[name] = full
    return out


def payload_nbytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data in a payload (``numel * element size``, no framing)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
