"""The LoRA algebra shared by the heterogeneous-rank methods (pure tensor functions).

Papers:

- HetLoRA: Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
  Foundation Models", EMNLP 2024.
- FlexLoRA: Bai et al., "Federated Fine-tuning of Large Language Models under
  Heterogeneous Tasks and Client Resources", NeurIPS 2024.
- FLoRA: Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
  Heterogeneous Low-Rank Adaptations", NeurIPS 2024.
- FLoRIST: "FLoRIST: Singular Value Thresholding for Efficient and Accurate Federated
  Fine-Tuning of Large Language Models", arXiv 2506.09199.

Every function works on the factors of ONE LoRA module at a time; the method classes
loop over modules and clients. Shapes follow PEFT: ``A`` is ``[rank, in_features]``,
``B`` is ``[out_features, rank]``, the scale is ``s = alpha / rank`` and the module's
weight update is ``dW = s * B @ A`` (``[out_features, in_features]``). Whenever client
ranks differ, aggregation happens in this effective space ``s * B @ A``
(DESIGN.md section 5).

The FlexLoRA / FLoRA / FLoRIST path never materialises ``dW``: the clients' factors
are stacked (:func:`stack_lora`) so that ``B_st @ A_st = sum_c p_c s_c B_c A_c``
exactly, and the thin SVD of that product is computed from two QR factorisations and
the SVD of a small ``R x R`` matrix (:func:`factored_svd`), R = sum of client ranks.
For an OLMoE 2048 x 2048 module with eight clients (R = 184) this is far cheaper than
a dense 2048 x 2048 SVD (see ``benchmarks/flexlora_svd.py``).

Each method's own aggregation lives in that method's module
(:mod:`ubsmoe.methods.hetlora`, :mod:`ubsmoe.methods.flexlora`,
:mod:`ubsmoe.methods.florist`). No Flower imports here, and nothing modifies its
inputs in place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "FLOOR_EPS",
    "check_clients",
    "check_pair",
    "check_scale",
    "check_svd",
    "energy_rank",
    "factored_svd",
    "factors_from_svd",
    "lora_frobenius_norm",
    "merge_into_weight",
    "pad_lora",
    "stack_lora",
    "truncate_lora",
]

# Guards floor(gamma * r) against float error such as 0.29 * 100 = 28.999999999999996.
FLOOR_EPS = 1e-9


# ----- validation helpers ------------------------------------------------------------
def check_pair(A: torch.Tensor, B: torch.Tensor, where: str) -> None:
    """Raise ValueError unless A is [r, in] and B is [out, r] with matching r."""
    if A.ndim != 2 or B.ndim != 2:
        raise ValueError(
            f"{where}: A must be [rank, in] and B [out, rank]; got A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}"
        )
    if A.shape[0] != B.shape[1]:
        raise ValueError(
            f"{where}: rank mismatch, A {tuple(A.shape)} has rank {A.shape[0]} but "
            f"B {tuple(B.shape)} has rank {B.shape[1]}"
        )


def check_clients(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    where: str,
    weights: Sequence[float] | torch.Tensor | None = None,
) -> None:
    """Validate per-client factor lists: equal lengths, non-empty, same module shape."""
    n = len(As)
    if n == 0:
        raise ValueError(f"{where}: no clients")
    if len(Bs) != n or len(scales) != n:
        raise ValueError(
            f"{where}: got {n} A factors, {len(Bs)} B factors and {len(scales)} scales; "
            "all must have one entry per client"
        )
    if weights is not None and len(weights) != n:
        raise ValueError(f"{where}: got {len(weights)} weights for {n} clients")
    in_features, out_features = As[0].shape[-1], Bs[0].shape[0]
    for c, (A, B) in enumerate(zip(As, Bs)):
        check_pair(A, B, f"{where} (client {c})")
        if A.shape[1] != in_features or B.shape[0] != out_features:
            raise ValueError(
                f"{where}: client {c} has module shape [{B.shape[0]}, {A.shape[1]}], "
                f"client 0 has [{out_features}, {in_features}]"
            )


def _as_float_list(values: Sequence[float] | torch.Tensor) -> list[float]:
    if isinstance(values, torch.Tensor):
        return [float(v) for v in values.detach().reshape(-1).tolist()]
    return [float(v) for v in values]


# ----- rank change: truncation and zero padding -------------------------------------
def truncate_lora(
    A: torch.Tensor, B: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate global LoRA factors to a client's rank (HetLoRA distribution).

    ``A_c = A[:rank, :]``, ``B_c = B[:, :rank]``: the client gets the first ``rank``
    rank-one components of the global adapter.

    Args:
        A: ``[r_max, in_features]`` global down-projection.
        B: ``[out_features, r_max]`` global up-projection.
        rank: client rank, ``1 <= rank <= r_max``.

    Returns:
        ``(A[rank, in_features], B[out_features, rank])``, fresh copies (editing them
        does not touch the global factors).

    Raises:
        ValueError: shapes are inconsistent, or ``rank`` is outside ``[1, r_max]``.
    """
    check_pair(A, B, "truncate_lora")
    r_max = A.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_max:
        raise ValueError(f"truncate_lora: rank must be an int in [1, {r_max}], got {rank!r}")
    return A[:rank].clone(), B[:, :rank].clone()


def pad_lora(
    A: torch.Tensor, B: torch.Tensor, rank_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad LoRA factors from rank r to ``rank_max`` (HetLoRA aggregation).

    ``A_pad = [[A], [0]]`` (zero rows appended), ``B_pad = [B, 0]`` (zero columns
    appended), so ``B_pad @ A_pad = B @ A``. Rank-0 inputs are accepted, which turns
    the zero-rank factors of a guarded :func:`florist_aggregate` into rank-``rank_max``
    zeros.

    Args:
        A: ``[r, in_features]``.
        B: ``[out_features, r]``.
        rank_max: target rank, ``rank_max >= max(r, 1)``.

    Returns:
        ``(A[rank_max, in_features], B[out_features, rank_max])``, new tensors with the
        input dtype and device.

    Raises:
        ValueError: shapes are inconsistent, or ``rank_max < r`` or ``rank_max < 1``.
    """
    check_pair(A, B, "pad_lora")
    r = A.shape[0]
    if (
        isinstance(rank_max, bool)
        or not isinstance(rank_max, int)
        or rank_max < max(r, 1)
    ):
        raise ValueError(
            f"pad_lora: rank_max must be an int >= max(rank, 1) = {max(r, 1)}, got {rank_max!r}"
        )
    A_pad = A.new_zeros(rank_max, A.shape[1])  # [rank_max, in]
    B_pad = B.new_zeros(B.shape[0], rank_max)  # [out, rank_max]
    A_pad[:r] = A
    B_pad[:, :r] = B
    return A_pad, B_pad


# ----- norms -----------------------------------------------------------------------
def lora_frobenius_norm(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """Frobenius norm of a LoRA update, ``||s B A||_F``, without forming ``B A``.

    ``||B A||_F^2 = tr((B^T B)(A A^T)) = sum_ij (B^T B)_ij (A A^T)_ij`` (both Gram
    matrices are symmetric), which costs O(r^2 (in + out)) instead of
    O(r in out). The sum is computed in float64; a tiny negative value from rounding
    is clamped to 0 before the square root.

    Args:
        A: ``[r, in_features]``.
        B: ``[out_features, r]``.
        scale: LoRA scale ``s = alpha / r``.

    Returns:
        0-dim tensor ``|s| * ||B A||_F`` in the promoted dtype of ``A`` and ``B``.
        Not meant for backpropagation (detach-safe, but the clamp and sqrt at 0 have
        no useful gradient).

    Raises:
        ValueError: shapes are inconsistent.
    """
    check_pair(A, B, "lora_frobenius_norm")
    out_dtype = torch.promote_types(A.dtype, B.dtype)
    A64, B64 = A.to(torch.float64), B.to(torch.float64)
    gram_b = B64.T @ B64  # [r, r]
    gram_a = A64 @ A64.T  # [r, r]
    sq = (gram_b * gram_a).sum().clamp_min(0.0)
    return (abs(float(scale)) * sq.sqrt()).to(out_dtype)


# ----- FLoRA: stacking and merging ---------------------------------------------------
def stack_lora(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scales: Sequence[float],
    weights: Sequence[float] | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking of heterogeneous-rank client factors.

    ::

        A_st = vstack_c(p_c s_c A_c)     [sum_c r_c, in_features]
        B_st = hstack_c(B_c)             [out_features, sum_c r_c]
        B_st @ A_st = sum_c p_c s_c B_c A_c   (exactly; no cross terms)

    The weights are used as given (pass data weights p_c summing to 1 for a weighted
    mean; nothing is renormalised). Ranks may differ and may be 0. The result has the
    dtype torch.cat promotes the inputs to.

    Args:
        As: per client, ``[r_c, in_features]``.
        Bs: per client, ``[out_features, r_c]``.
        scales: per client, the LoRA scale ``s_c``.
        weights: per client, the aggregation weight ``p_c`` (sequence or 1-D tensor).

    Returns:
        ``(A_st[sum_c r_c, in_features], B_st[out_features, sum_c r_c])``.

    Raises:
        ValueError: empty or mismatched lists or inconsistent shapes.
    """
    check_clients(As, Bs, scales, "stack_lora", weights)
    coeffs = [p * float(s) for p, s in zip(_as_float_list(weights), scales)]
    A_st = torch.cat([c * A for c, A in zip(coeffs, As)], dim=0)  # [R, in]
    B_st = torch.cat(list(Bs), dim=1)  # [out, R]
    return A_st, B_st


def merge_into_weight(
    W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float
) -> torch.Tensor:
    """Merge a LoRA update into a frozen weight (FLoRA): ``W + s * B @ A``.

    ``W`` is not modified. The product is accumulated in at least float32 (float64
    if ``W`` is float64) and the result is returned in ``W``'s dtype.

    Args:
        W: ``[out_features, in_features]`` base weight.
        A: ``[r, in_features]``.
        B: ``[out_features, r]``.
        scale: LoRA scale ``s``.

    Returns:
        New ``[out_features, in_features]`` tensor, dtype of ``W``.

    Raises:
        ValueError: shapes are inconsistent.
    """
    check_pair(A, B, "merge_into_weight")
    if W.ndim != 2 or W.shape != (B.shape[0], A.shape[1]):
        raise ValueError(
            f"merge_into_weight: W {tuple(W.shape)} does not match B @ A "
            f"[{B.shape[0]}, {A.shape[1]}]"
        )
    work = torch.promote_types(W.dtype, torch.float32)
    merged = torch.addmm(W.to(work), B.to(work), A.to(work), alpha=float(scale))
    return merged.to(W.dtype)


# ----- FlexLoRA / FLoRIST: factored SVD and redistribution ---------------------------
def factored_svd(
    B_st: torch.Tensor, A_st: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of ``B_st @ A_st`` without forming the ``[out, in]`` product.

    ::

        B_st   = Q_B R_B          (reduced QR, Q_B [out, m_B], R_B [m_B, R])
        A_st^T = Q_A R_A          (reduced QR, Q_A [in, m_A],  R_A [m_A, R])
        R_B R_A^T = U' diag(S) V'^T     (small SVD, [m_B, m_A])
        U  = Q_B U',  Vh = V'^T Q_A^T
        => B_st @ A_st = Q_B (R_B R_A^T) Q_A^T = U diag(S) Vh

    with ``m_B = min(out, R)``, ``m_A = min(in, R)`` and ``q = min(out, in, R)``.
    Cost O((out + in) R^2 + R^3) instead of O(out * in * min(out, in)).

    Precision: computed in float64 internally (QR of a tall matrix and the small SVD
    are cheap), the outputs are cast back to the promoted input dtype. Singular
    values are descending; singular vectors are unique only up to sign (and rotation
    within repeated singular values), so compare products or projectors, not raw
    vectors.

    Args:
        B_st: ``[out_features, R]`` stacked up-projections (see :func:`stack_lora`).
        A_st: ``[R, in_features]`` stacked, weighted down-projections.

    Returns:
        ``(U[out_features, q], S[q], Vh[q, in_features])`` with
        ``U @ diag(S) @ Vh == B_st @ A_st`` up to rounding. ``q = 0`` (empty
        tensors) when ``R = 0``.

    Raises:
        ValueError: ``B_st`` and ``A_st`` are not 2-D with matching inner size.
    """
    if B_st.ndim != 2 or A_st.ndim != 2 or B_st.shape[1] != A_st.shape[0]:
        raise ValueError(
            f"factored_svd: need B_st [out, R] and A_st [R, in]; got {tuple(B_st.shape)} "
            f"and {tuple(A_st.shape)}"
        )
    out_dtype = torch.promote_types(B_st.dtype, A_st.dtype)
    out_features, R = B_st.shape
    in_features = A_st.shape[1]
    q = min(out_features, in_features, R)
    if q == 0:
        return (
            B_st.new_zeros(out_features, 0, dtype=out_dtype),
            B_st.new_zeros(0, dtype=out_dtype),
            A_st.new_zeros(0, in_features, dtype=out_dtype),
        )
    Q_B, R_B = torch.linalg.qr(B_st.to(torch.float64), mode="reduced")  # [out, m_B], [m_B, R]
    Q_A, R_A = torch.linalg.qr(A_st.to(torch.float64).T, mode="reduced")  # [in, m_A], [m_A, R]
    core = R_B @ R_A.T  # [m_B, m_A]
    U_s, S, Vh_s = torch.linalg.svd(core, full_matrices=False)  # [m_B, q], [q], [q, m_A]
    U = Q_B @ U_s  # [out, q]
    Vh = Vh_s @ Q_A.T  # [q, in]
    return U.to(out_dtype), S.to(out_dtype), Vh.to(out_dtype)


def factors_from_svd(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = Vh[:rank]``, ``B = U[:, :rank] S[:rank] / scale``, zero-padded past q."""
    q = S.shape[0]
    k = min(rank, q)
    A = Vh[:k]  # [k, in]
    B = U[:, :k] * (S[:k] / float(scale))  # [out, k], column j scaled by S_j / s
    if rank > k:
        return pad_lora(A, B, rank)
    return A.clone(), B.clone()


def check_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, where: str) -> None:
    """Check a thin SVD's shapes: ``U [out, q]``, ``S [q]``, ``Vh [q, in]``.

    Raises:
        ValueError: other ranks or mismatched ``q`` (the message starts with ``where``).
    """
    if U.ndim != 2 or S.ndim != 1 or Vh.ndim != 2 or not U.shape[1] == S.shape[0] == Vh.shape[0]:
        raise ValueError(
            f"{where}: need U [out, q], S [q], Vh [q, in]; got {tuple(U.shape)}, "
            f"{tuple(S.shape)}, {tuple(Vh.shape)}"
        )


def check_scale(scale: float, where: str) -> None:
    """Check a LoRA scale ``alpha / r`` is finite and non-zero.

    Raises:
        ValueError: otherwise (the message starts with ``where``).
    """
    if not (math.isfinite(float(scale)) and float(scale) != 0.0):
        raise ValueError(f"{where}: scale must be finite and non-zero, got {scale!r}")


def energy_rank(S: torch.Tensor, tau: float) -> int:
    """Smallest rank keeping a fraction ``tau`` of the spectral energy (FLoRIST).

    ::

        k = min { k : sum_{i<=k} S_i^2 / sum_i S_i^2 >= tau }

    The ratio is computed in float64 from one cumulative sum (its last entry is the
    total, so ``tau = 1`` yields the number of singular values, and a ratio that
    equals ``tau`` exactly counts as reaching it). If ``sum S^2 == 0`` (a zero update)
    the result is 0.

    Args:
        S: ``[q]`` singular values, descending, non-negative.
        tau: energy threshold in ``(0, 1]``.

    Returns:
        ``k`` in ``[0, q]`` (0 only for a zero or empty ``S``).

    Raises:
        ValueError: ``tau`` not in ``(0, 1]``, ``S`` not 1-D, or ``S`` holding a
            negative or non-finite value.
    """
    if not 0.0 < float(tau) <= 1.0:
        raise ValueError(f"energy_rank: tau must be in (0, 1], got {tau!r}")
    if S.ndim != 1:
        raise ValueError(f"energy_rank: S must be 1-D, got shape {tuple(S.shape)}")
    S64 = S.detach().to(torch.float64)
    if not bool(torch.isfinite(S64).all()) or bool((S64 < 0).any()):
        raise ValueError("energy_rank: S must be finite and non-negative")
    if S64.numel() == 0:
        return 0
    cum = torch.cumsum(S64 * S64, dim=0)  # [q], non-decreasing
    total = cum[-1]
    if total == 0:
        return 0
    ratio = cum / total  # [q], last entry exactly 1
    k = int((ratio < float(tau)).sum()) + 1
    return min(k, S64.numel())


