"""Switching the host model over to :mod:`ubsmoe.models.fused` for local training (``train.fused_ops``).

:func:`set_fused_ops` puts an instance-level ``forward`` on the host modules it knows:

- every RMSNorm of :data:`FUSED_NORMS` with a frozen weight: :func:`~ubsmoe.models.fused.rms_norm`;
- OLMoE's attention (:data:`FUSED_ATTENTION`): :func:`olmoe_attention_forward`, q, k and v
  through one :func:`~ubsmoe.models.fused.lora_qkv` when they are plain PEFT LoRA linears,
  q and k normalised and rotated as one tensor, the output projection through
  :func:`~ubsmoe.models.fused.lora_linear`;
- OLMoE's decoder layer (:data:`FUSED_DECODER`): :func:`olmoe_decoder_forward`, its two
  norms through :func:`~ubsmoe.models.fused.residual_rms_norm`.

Anything these do not cover (a KV cache, ``clip_qkv``, dropout, DoRA, another family)
runs the host's own forward. The classes, parameters and ``state_dict`` are untouched.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ubsmoe.models.fused import (
    apply_rotary,
    clear_caches,
    constant,
    lora_linear,
    lora_qkv,
    residual_rms_norm,
    rms_norm,
    rotary_sign,
)

# RMSNorm classes computing ``weight * (x * rsqrt(mean(x^2) + eps)).to(input dtype)``
# with ``variance_epsilon`` (checked against the class in tests/test_fused_ops.py).
FUSED_NORMS = ("OlmoeRMSNorm", "LlamaRMSNorm", "MixtralRMSNorm", "MistralRMSNorm",
               "Qwen2RMSNorm", "Qwen2MoeRMSNorm")
# Attention modules whose forward :func:`olmoe_attention_forward` reproduces.
FUSED_ATTENTION = ("OlmoeAttention",)
# Decoder layers whose forward :func:`olmoe_decoder_forward` reproduces.
FUSED_DECODER = ("OlmoeDecoderLayer",)


def _norm_forward(module: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """An RMSNorm module's forward through :func:`rms_norm` (float32 weight copy cached on the module)."""
    return rms_norm(hidden_states, module.weight, module.variance_epsilon, _weight32(module))


def _weight32(module: nn.Module) -> torch.Tensor:
    """A float32 copy of a norm's frozen weight, cached on the module while the weight is unchanged."""
    weight = module.weight
    key = (weight.data_ptr(), weight._version, weight.device)
    cached = module.__dict__.get("_ubsmoe_weight32")
    if cached is None or cached[0] != key:
        cached = module.__dict__["_ubsmoe_weight32"] = (key, weight.detach().to(torch.float32))
    return cached[1]


def _peft_factors(module: nn.Module, x: torch.Tensor):
    """``(weight, bias, A, B, scale)`` when ``module`` is a plain PEFT LoRA linear :func:`lora_linear` computes.

    None (the module runs its own forward) for anything else: no adapter, several or a
    disabled one, a merged adapter, dropout, a LoRA variant (DoRA), a LoRA bias, a
    trainable base, or factors in another dtype than ``x`` (PEFT would cast).
    """
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None or getattr(module, "merged", True) or getattr(module, "disable_adapters", True):
        return None
    active = module.active_adapters
    if len(active) != 1 or active[0] not in lora_a or active[0] in getattr(module, "lora_variant", {}):
        return None
    name = active[0]
    base = module.get_base_layer()
    a, b = lora_a[name], module.lora_B[name]
    if not isinstance(base, nn.Linear) or not isinstance(module.lora_dropout[name], nn.Identity) \
            or b.bias is not None or a.bias is not None or base.weight.requires_grad \
            or (base.bias is not None and base.bias.requires_grad):
        return None
    if not (a.weight.dtype == b.weight.dtype == base.weight.dtype == x.dtype):
        return None
    return base.weight, base.bias, a.weight, b.weight, module.scaling[name]


def _project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a projection, through :func:`lora_linear` when it is a plain PEFT LoRA."""
    factors = _peft_factors(module, x)
    return module(x) if factors is None else lora_linear(x, *factors)


def _fusable_norm(norm: nn.Module) -> bool:
    """A frozen RMSNorm of :data:`FUSED_NORMS`."""
    return type(norm).__name__ in FUSED_NORMS and not norm.weight.requires_grad


def _qk_norm_weights(module: nn.Module) -> tuple[torch.Tensor, float, torch.Tensor] | None:
    """``(weight [2, H], eps, weight32 [2, H])`` of an attention's q and k norms stacked, or None.

    None unless both norms are frozen RMSNorms of :data:`FUSED_NORMS` with one shape and
    one epsilon (then q and k, stacked, are normalised in one call). Cached on the module
    while both weights are unchanged.
    """
    q_norm, k_norm = module.q_norm, module.k_norm
    if not (_fusable_norm(q_norm) and _fusable_norm(k_norm) and q_norm.weight.shape == k_norm.weight.shape
            and q_norm.variance_epsilon == k_norm.variance_epsilon):
        return None
    key = tuple((w.data_ptr(), w._version, w.device) for w in (q_norm.weight, k_norm.weight))
    cached = module.__dict__.get("_ubsmoe_qk_norm")
    if cached is None or cached[0] != key:
        weight = torch.stack((q_norm.weight.detach(), k_norm.weight.detach()))  # [2, H]
        cached = module.__dict__["_ubsmoe_qk_norm"] = (key, (weight, q_norm.variance_epsilon,
                                                             weight.to(torch.float32)))
    return cached[1]


def _qkv_factors(module: nn.Module, x: torch.Tensor):
    """Arguments of :func:`~ubsmoe.models.fused.lora_qkv` when q, k and v are plain PEFT LoRA linears it computes, else None.

    Needs :func:`_peft_factors` for each, no biases, one LoRA rank and scale, and q
    and k of one width (no grouped-query attention).
    """
    factors = [_peft_factors(getattr(module, name), x) for name in ("q_proj", "k_proj", "v_proj")]
    if any(f is None for f in factors):
        return None
    (w_q, bias_q, a_q, b_q, s_q), (w_k, bias_k, a_k, b_k, s_k), (w_v, bias_v, a_v, b_v, s_v) = factors
    if bias_q is not None or bias_k is not None or bias_v is not None or not s_q == s_k == s_v \
            or not a_q.shape[0] == a_k.shape[0] == a_v.shape[0] or w_q.shape != w_k.shape:
        return None
    return (w_q, w_k, w_v, a_q, a_k, a_v, b_q, b_k, b_v, s_q)


def olmoe_attention_forward(module: nn.Module, hidden_states: torch.Tensor,
                            position_embeddings: tuple[torch.Tensor, torch.Tensor],
                            attention_mask: torch.Tensor | None, cache=None, **kwargs):
    """transformers' ``OlmoeAttention.forward`` with the fused projections, norms and rotary.

    Same inputs and outputs as the host forward (transformers 5.x): ``hidden_states``
    ``[batch, seq, hidden]`` -> ``(attn_output [batch, seq, hidden], attn_weights)``.
    With a KV cache (generation) or ``clip_qkv`` it runs the host forward unchanged.
    """
    if cache is not None or kwargs.get("past_key_values") is not None or module.config.clip_qkv is not None:
        return type(module).forward(module, hidden_states, position_embeddings, attention_mask,
                                    cache=cache, **kwargs)
    # lazy: transformers takes seconds to import; only this path needs it
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.olmoe.modeling_olmoe import eager_attention_forward

    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    cos, sin = position_embeddings
    qk_weights = _qk_norm_weights(module)
    qkv = _qkv_factors(module, hidden_states) if qk_weights is not None else None
    if qkv is not None:  # one function for q, k (as one [..., 2, H] tensor) and v
        qk, value = lora_qkv(hidden_states, *qkv)
    else:
        query, key = _project(module.q_proj, hidden_states), _project(module.k_proj, hidden_states)
        value = _project(module.v_proj, hidden_states)
        qk = torch.stack((query, key), dim=-2) if qk_weights is not None and query.shape == key.shape else None
    if qk is not None:  # q and k normalised and rotated as one tensor
        qk = rms_norm(qk, *qk_weights)  # [batch, seq, 2, H]
        qk = apply_rotary(qk.view(hidden_shape).transpose(1, 2), cos, sin)  # [batch, 2 heads, seq, d]
        query, key = qk.chunk(2, dim=1)
    else:
        query = module.q_norm(query).view(hidden_shape).transpose(1, 2)
        key = module.k_norm(key).view(hidden_shape).transpose(1, 2)
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
    value = value.view(hidden_shape).transpose(1, 2)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation,
                                                      eager_attention_forward)
    out, weights = attention(module, query, key, value, attention_mask,
                             dropout=0.0 if not module.training else module.attention_dropout,
                             scaling=module.scaling, sliding_window=getattr(module.config, "sliding_window", None),
                             **kwargs)
    out = out.reshape(*input_shape, -1).contiguous()
    return _project(module.o_proj, out), weights


def olmoe_decoder_forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask=None,
                          position_ids=None, cache=None, use_cache=False, position_embeddings=None,
                          **kwargs) -> torch.Tensor:
    """transformers' ``OlmoeDecoderLayer.forward`` with both residual norms through
    :func:`~ubsmoe.models.fused.residual_rms_norm`.

    ``hidden_states [batch, seq, hidden] -> [batch, seq, hidden]``:
    ``h = x + attn(norm_1(x))``, ``out = h + mlp(norm_2(h))``. Norms it cannot fuse run
    the host's forward.
    """
    if not (_fusable_norm(layer.input_layernorm) and _fusable_norm(layer.post_attention_layernorm)):
        return type(layer).forward(layer, hidden_states, attention_mask=attention_mask,
                                   position_ids=position_ids, cache=cache, use_cache=use_cache,
                                   position_embeddings=position_embeddings, **kwargs)
    norm = layer.input_layernorm
    residual, hidden = residual_rms_norm(hidden_states, norm.weight, norm.variance_epsilon, _weight32(norm))
    hidden, _ = layer.self_attn(hidden_states=hidden, attention_mask=attention_mask, position_ids=position_ids,
                                cache=cache, use_cache=use_cache, position_embeddings=position_embeddings,
                                **kwargs)
    norm = layer.post_attention_layernorm
    residual, hidden = residual_rms_norm(residual + hidden, norm.weight, norm.variance_epsilon,
                                         _weight32(norm))
    return residual + layer.mlp(hidden)


def set_fused_ops(model: nn.Module, enabled: bool) -> int:
    """Run the model's RMSNorms and OLMoE attention and decoder layers through the fused functions.

    Installs (True) or removes (False) an instance-level ``forward`` on every module
    whose class is in :data:`FUSED_NORMS` (frozen weight), :data:`FUSED_ATTENTION` or
    :data:`FUSED_DECODER`; the classes, weights and ``state_dict`` are untouched. :func:`~ubsmoe.fl.train.local_train`
    switches it on for the step and off after, so evaluation and generation run the host.

    Args:
        model: any ``nn.Module`` (modules of other classes are left alone).
        enabled: install (True) or remove (False).

    Returns:
        The number of modules switched.
    """
    switched = 0
    for module in model.modules():
        name = type(module).__name__
        fused = None
        if _fusable_norm(module):
            fused = _norm_forward
            if enabled:
                _weight32(module)
        elif name in FUSED_ATTENTION:
            fused = olmoe_attention_forward
            if enabled:
                _qk_norm_weights(module)
        elif name in FUSED_DECODER:
            fused = olmoe_decoder_forward
        if fused is None:
            continue
        if enabled:
            module.forward = functools.partial(fused, module)
            for p in module.parameters():  # the constants the fused functions take, made now
                constant(0.0, p.device, p.dtype)
                constant(getattr(module, "variance_epsilon", 0.0), p.device, torch.float32)
                if name in FUSED_ATTENTION:
                    rotary_sign(module.head_dim, p.dtype, p.device)
        else:
            module.__dict__.pop("forward", None)
            module.__dict__.pop("_ubsmoe_weight32", None)
            module.__dict__.pop("_ubsmoe_qk_norm", None)
        switched += 1
    if not enabled:
        clear_caches()
    return switched
