"""``train.fused_ops``: hand-written forward and backward for the host model's hot paths (issue 24).

On a GPU a small model's local step is bound by the host: every ATen operation is a
kernel launch, however small. ``ubsmoe bench --suite dispatch`` showed that after the
SMoE layer's own work, most of a step's operations are the host model's
(transformers + PEFT): its RMSNorms (about 22 operations forward + backward each, 17
of them in ``olmoe_medium``), the rotary application (24 per layer) and PEFT's LoRA
wrappers around the attention projections. This module gives each of them one
:class:`torch.autograd.Function` with a hand-written backward that launches fewer
operations, and :func:`set_fused_ops` switches them on for local training:

- **RMSNorm** (every RMSNorm of the families in :data:`FUSED_NORMS`, weight frozen):
  ``y = w * (x * rsqrt(mean(x^2) + eps)).to(dtype)`` in float32 as transformers
  computes it, 6 operations forward and 5 backward (the mean of squares plus eps is
  one ``baddbmm``; the backward ``dx = r (g w - x_hat mean(g w x_hat))`` is one
  ``bmm`` and one ``addcmul``).
- **Rotary application** (OLMoE attention): ``x cos + rotate_half(x) sin`` as
  ``addcmul(x cos, swap_halves(x), sin_signed)`` with ``sin_signed = [-sin_1, sin_2]``
  made once per model forward; 3 operations forward and 3 backward per tensor
  (rotate_half is a permutation with a sign, so its transpose is the same swap).
- **LoRA projection** (OLMoE attention, PEFT LoRA on a frozen ``nn.Linear``, factors in
  the input's dtype, i.e. a float32 model or ``train.adapter_dtype=compute``):
  ``y = x W^T + s (x A^T) B^T`` as ``mm`` and ``addmm``; 3 forward, 5 backward (no
  gradient for W, ``alpha`` carries the scale).

Each function computes what the host computes up to the rounding of float32 sums
(the order of additions differs) and of bfloat16 intermediates (the host rounds
``g * w`` and ``x cos`` to bfloat16 before the next step; these keep float32 there).
tests/test_fused_ops.py holds outputs and gradients against the host modules.
Off by default (``train.fused_ops: false``) until a GPU shows it pays; the CPU count
is in docs/dispatch.md.
"""

from __future__ import annotations

import torch

_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant(value: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached 0-dim tensor of ``value`` (made once, not per call; ``set_fused_ops`` makes them up front)."""
    key = (torch.device(device), dtype, float(value))
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(value, dtype=dtype, device=device)
    return t


def _normalise(ctx, x: torch.Tensor, weight: torch.Tensor, weight32: torch.Tensor,
               eps: torch.Tensor) -> torch.Tensor:
    """The norms' forward: ``y = w * (x r).to(x.dtype)``; saves ``x_hat`` ``[N, 1, H]``, ``r`` ``[N, 1, 1]``."""
    hidden = x.shape[-1]
    rows = x.to(torch.float32).reshape(-1, 1, hidden)  # [N, 1, H]
    # eps + mean(x^2) in one batched dot product: [N, 1, H] @ [N, H, 1] -> [N, 1, 1]
    r = torch.baddbmm(eps, rows, rows.transpose(1, 2), alpha=1.0 / hidden).rsqrt_()
    x_hat = rows * r  # [N, 1, H]
    ctx.save_for_backward(x_hat, r, weight32)
    ctx.input_dtype = x.dtype
    return weight * x_hat.to(x.dtype).reshape(x.shape)


def _norm_grad(ctx, grad_y: torch.Tensor, grad_residual: torch.Tensor | None = None) -> torch.Tensor:
    """``dx = r (g w - x_hat mean(g w x_hat))`` (+ ``grad_residual``) in float32, in the input's dtype."""
    x_hat, r, weight32 = ctx.saved_tensors
    gw = (grad_y * weight32).reshape(x_hat.shape)  # [N, 1, H] float32
    dot = torch.bmm(gw, x_hat.transpose(1, 2))  # [N, 1, 1]
    t = torch.addcmul(gw, x_hat, dot, value=-1.0 / x_hat.shape[-1])
    grad = t.mul_(r) if grad_residual is None else torch.addcmul(grad_residual.reshape(x_hat.shape), t, r)
    return grad.to(ctx.input_dtype).reshape(grad_y.shape)


class _RMSNorm(torch.autograd.Function):
    """``y = w * (x r).to(x.dtype)``, ``r = rsqrt(mean(x^2) + eps)`` in float32; ``w`` frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, weight32: torch.Tensor,
                eps: torch.Tensor) -> torch.Tensor:
        """``x [..., H] -> [..., H]``; saves ``x_hat`` ``[N, 1, H]`` and ``r`` ``[N, 1, 1]`` (float32)."""
        return _normalise(ctx, x, weight, weight32, eps)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        """``dx = r (g w - x_hat mean(g w x_hat))`` in float32, cast to the input's dtype."""
        return _norm_grad(ctx, grad_y), None, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             weight32: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm with a frozen weight, as transformers' Llama-family ``*RMSNorm`` computes it.

    Args:
        x: ``[..., H]`` in any floating dtype.
        weight: ``[H]`` frozen (no gradient is formed for it), in ``x``'s dtype.
        eps: the variance epsilon.
        weight32: ``weight`` in float32 (the backward's ``g w``); made here when None.

    Returns:
        ``[..., H]`` in ``x``'s dtype: ``weight * (x * rsqrt(mean(x^2, -1) + eps)).to(x.dtype)``
        with the normalisation in float32. Source: Zhang & Sennrich (2019), "Root Mean
        Square Layer Normalization", eq. 4.

    Raises:
        ValueError: ``weight`` requires a gradient (the backward has none for it).
    """
    if weight.requires_grad:
        raise ValueError("rms_norm: weight requires grad; the fused RMSNorm is for a frozen weight")
    if weight32 is None:
        weight32 = weight.to(torch.float32)
    return _RMSNorm.apply(x, weight, weight32, constant(eps, x.device, torch.float32))


class _ResidualRMSNorm(torch.autograd.Function):
    """``(x, rms_norm(x))`` with one backward: ``dx = g_x + r (g_y w - x_hat mean(g_y w x_hat))``.

    A pre-norm decoder uses its input twice, as the residual and through the norm;
    autograd would add the two gradients with one more operation. Here the residual's
    gradient is the last ``addcmul``'s input instead.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, weight32: torch.Tensor,
                eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [..., H] -> (x, y [..., H])``; saves as :class:`_RMSNorm`."""
        return x.view_as(x), _normalise(ctx, x, weight, weight32, eps)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor | None, grad_y: torch.Tensor | None):
        """The residual's gradient plus the norm's, in float32, cast to the input's dtype."""
        if grad_y is None:
            return grad_x, None, None, None
        return _norm_grad(ctx, grad_y, grad_x), None, None, None


def residual_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                      weight32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, rms_norm(x, weight, eps))``: the residual and the normalised input of a pre-norm block.

    Same values as ``(x, rms_norm(...))``; the backward adds the two gradients of ``x``
    inside the norm's last operation (no separate add).

    Args:
        x: ``[..., H]``; weight ``[H]`` frozen; weight32 its float32 copy; eps the variance epsilon.

    Returns:
        ``x`` (an alias) and the normalised ``[..., H]``.
    """
    return _ResidualRMSNorm.apply(x, weight, weight32, constant(eps, x.device, torch.float32))


class _Rotary(torch.autograd.Function):
    """``y = x cos + swap_halves(x) sin_signed`` (= ``x cos + rotate_half(x) sin``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """``x [B, h, T, d]``, ``cos``/``sin_signed`` broadcastable (``[B, 1, T, d]``)."""
        ctx.save_for_backward(cos, sin_signed)
        return torch.addcmul(x * cos, _swap_halves(x), sin_signed)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        """``dx = g cos + swap_halves(g sin_signed)`` (the swap is its own transpose)."""
        cos, sin_signed = ctx.saved_tensors
        return torch.addcmul(_swap_halves(grad_y * sin_signed), grad_y, cos), None, None


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """``[x_2, x_1]`` for ``x = [x_1, x_2]`` along the last dimension (one ``cat``)."""
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


_SIGNED_SIN: list = [None, None]  # [sin, sin_signed] of the last model forward


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``[-sin_1, sin_2]`` for ``sin = [sin_1, sin_2]`` (last dimension), cached for the same tensor.

    The model computes its rotary table once per forward and hands the same ``sin``
    tensor to every layer, so this runs once per forward (one multiplication by a
    cached sign vector), not once per layer.
    """
    if _SIGNED_SIN[0] is not sin:
        _SIGNED_SIN[:] = [sin, sin * rotary_sign(sin.shape[-1], sin.dtype, sin.device)]
    return _SIGNED_SIN[1]


def rotary_sign(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[-1] * (dim // 2) + [1] * (dim - dim // 2)``, ``[dim]``, cached (``set_fused_ops`` makes it up front)."""
    key = ("rotary_sign", dim, dtype, torch.device(device))
    sign = _CONSTANTS.get(key)
    if sign is None:
        sign = _CONSTANTS[key] = torch.cat((-torch.ones(dim // 2, dtype=dtype, device=device),
                                           torch.ones(dim - dim // 2, dtype=dtype, device=device)))
    return sign


def clear_caches() -> None:
    """Drop the cached rotary table reference (:func:`signed_sin`)."""
    _SIGNED_SIN[:] = [None, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x``, as transformers' ``apply_rotary_pos_emb`` for one tensor.

    Args:
        x: ``[batch, heads, seq, head_dim]``.
        cos, sin: ``[batch, seq, head_dim]`` rotary tables (no gradient flows to them).

    Returns:
        ``x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x_2, x_1]``, same
        shape and dtype. Source: Su et al. (2021), "RoFormer", eq. 34 (the half-split
        layout of GPT-NeoX / transformers).
    """
    return _Rotary.apply(x, cos.unsqueeze(1), signed_sin(sin).unsqueeze(1))


class _LoRALinear(torch.autograd.Function):
    """``y = x W^T (+ b) + s (x A^T) B^T`` with ``W`` (and ``b``) frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                zero: torch.Tensor) -> torch.Tensor:
        """``x [..., in] -> [..., out]``; saves ``x`` and ``h = x A^T`` ``[N, r]``."""
        rows = x.reshape(-1, x.shape[-1])  # [N, in]
        y = rows @ weight.t() if bias is None else torch.addmm(bias, rows, weight.t())  # [N, out]
        h = rows @ lora_a.t()  # [N, r]
        y.addmm_(h, lora_b.t(), alpha=scale)
        ctx.save_for_backward(rows, h, weight, lora_a, lora_b, zero)
        ctx.scale = scale
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        """Input, A and B gradients (none for the frozen weight and bias)."""
        rows, h, weight, lora_a, lora_b, zero = ctx.saved_tensors
        scale = ctx.scale
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad_y.reshape(-1, grad_y.shape[-1])  # [N, out]
        grad_h = g @ lora_b  # [N, r], gradient of the unscaled h, times 1/s
        grad_x = grad_a = grad_b = None
        if need_x:
            grad_x = (g @ weight).addmm_(grad_h, lora_a, alpha=scale).reshape(*grad_y.shape[:-1], -1)
        if need_a:  # s * grad_h^T x, beta = 0 ignores the (0-dim) input
            grad_a = torch.addmm(zero, grad_h.t(), rows, beta=0, alpha=scale)  # [r, in]
        if need_b:
            grad_b = torch.addmm(zero, g.t(), h, beta=0, alpha=scale)  # [out, r]
        return grad_x, None, None, grad_a, grad_b, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """A frozen linear layer plus its LoRA: ``x W^T + b + scale (x A^T) B^T``.

    Args:
        x: ``[..., in]``.
        weight: ``[out, in]`` frozen; bias ``[out]`` frozen or None.
        lora_a: ``[r, in]`` LoRA A; lora_b: ``[out, r]`` LoRA B; both in ``x``'s dtype.
        scale: ``alpha / r`` (PEFT's ``scaling``). Source: Hu et al. (2021), "LoRA", eq. 3.

    Returns:
        ``[..., out]`` in ``x``'s dtype.
    """
    return _LoRALinear.apply(x, weight, bias, lora_a, lora_b, scale, constant(0.0, x.device, x.dtype))


class _LoRAQKV(torch.autograd.Function):
    """q, k, v projections of one input with their LoRA; q and k written into one ``[N, 2, H]`` tensor.

    One A matmul for the three adapters (``A_qkv = [A_q; A_k; A_v]``), and in the
    backward one input-gradient chain (``addmm_`` into one buffer instead of three
    gradients summed by autograd) and one A gradient.
    """

    @staticmethod
    def forward(ctx, x, w_q, w_k, w_v, a_q, a_k, a_v, b_q, b_k, b_v, scale, zero):
        """``x [..., in] -> (qk [..., 2, H], v [..., H_v])``; saves x, ``h = x A_qkv^T`` and the factors."""
        rows = x.reshape(-1, x.shape[-1])  # [N, in]
        r = a_q.shape[0]
        a_qkv = torch.cat((a_q, a_k, a_v))  # [3r, in]
        h = rows @ a_qkv.t()  # [N, 3r]
        qk = rows.new_empty(rows.shape[0], 2, w_q.shape[0])  # [N, 2, H]
        for i, (w, b) in enumerate(((w_q, b_q), (w_k, b_k))):
            torch.mm(rows, w.t(), out=qk[:, i]).addmm_(h[:, i * r:(i + 1) * r], b.t(), alpha=scale)
        v = (rows @ w_v.t()).addmm_(h[:, 2 * r:], b_v.t(), alpha=scale)  # [N, H_v]
        ctx.save_for_backward(rows, h, a_qkv, w_q, w_k, w_v, b_q, b_k, b_v, zero)
        ctx.scale = scale
        lead = x.shape[:-1]
        return qk.view(*lead, 2, -1), v.view(*lead, -1)

    @staticmethod
    def backward(ctx, grad_qk: torch.Tensor, grad_v: torch.Tensor):
        """Input gradient and the A, B gradients of the three adapters (none for the frozen weights)."""
        rows, h, a_qkv, w_q, w_k, w_v, b_q, b_k, b_v, zero = ctx.saved_tensors
        scale, r = ctx.scale, b_q.shape[1]
        g_qk = grad_qk.reshape(-1, 2, grad_qk.shape[-1])  # [N, 2, H]
        grads = (g_qk[:, 0], g_qk[:, 1], grad_v.reshape(-1, grad_v.shape[-1]))
        grad_h = rows.new_empty(rows.shape[0], 3 * r)  # [N, 3r], gradient of h times 1/s
        for i, (g, b) in enumerate(zip(grads, (b_q, b_k, b_v), strict=True)):
            torch.mm(g, b, out=grad_h[:, i * r:(i + 1) * r])
        need = ctx.needs_input_grad
        grad_x = None
        if need[0]:  # not for a first layer's input (the frozen embedding's output)
            grad_x = grads[0] @ w_q
            grad_x.addmm_(grads[1], w_k).addmm_(grads[2], w_v).addmm_(grad_h, a_qkv, alpha=scale)
            grad_x = grad_x.view(*grad_v.shape[:-1], -1)
        grad_a = [None] * 3
        if any(need[4:7]):
            grad_a_qkv = torch.addmm(zero, grad_h.t(), rows, beta=0, alpha=scale)  # [3r, in]
            grad_a = [grad_a_qkv[i * r:(i + 1) * r] if need[4 + i] else None for i in range(3)]
        grad_b = [torch.addmm(zero, g.t(), h[:, i * r:(i + 1) * r], beta=0, alpha=scale) if need[7 + i] else None
                  for i, g in enumerate(grads)]
        return (grad_x, None, None, None, *grad_a, *grad_b, None, None)


def lora_qkv(x: torch.Tensor, w_q, w_k, w_v, a_q, a_k, a_v, b_q, b_k, b_v, scale: float):
    """q, k and v projections of ``x`` with their LoRA, q and k stacked: ``(qk [..., 2, H], v [..., H_v])``.

    Args:
        x: ``[..., in]``.
        w_q, w_k: ``[H, in]``; w_v ``[H_v, in]`` frozen (no bias).
        a_q, a_k, a_v: ``[r, in]`` LoRA A; b_q, b_k ``[H, r]``, b_v ``[H_v, r]`` LoRA B; all in ``x``'s dtype.
        scale: ``alpha / r``, one for the three. Source: Hu et al. (2021), "LoRA", eq. 3.

    Returns:
        ``qk[..., 0, :] = x W_q^T + s (x A_q^T) B_q^T``, ``qk[..., 1, :]`` the same for k, and v.
    """
    return _LoRAQKV.apply(x, w_q, w_k, w_v, a_q, a_k, a_v, b_q, b_k, b_v, scale,
                          constant(0.0, x.device, x.dtype))
