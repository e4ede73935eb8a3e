"""Expert-utilization and UB-SMoE diagnostics (DESIGN.md section 6, "Diagnostics").

UB-SMoE: "Universally Balanced Sparse Mixture-of-Experts for Resource-Adaptive
Federated Fine-Tuning of Foundation Models" (ICML 2026, arXiv 2605.16690).

* :func:`utilization_entropy` and :func:`gini` measure how evenly the global
  utilization u~ (:func:`ubsmoe.core.routing.global_utilization`) spreads over experts;
* :func:`pearson` and :func:`spearman` correlate DMR's phi with utilization (the
  server update should make them negatively correlated);
* :func:`pg_alignment` scores the pseudo-gradient of each inactive expert against
  its true gradient with the expert forced on at its gate weight (paper §6.3.4).

Pure PyTorch; nothing here knows about Flower.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ubsmoe.core.pseudo_grad import PseudoGradient, pg_cosine_alignment
from ubsmoe.models.runtime import routing_mask, set_top_k, smoe_layers

__all__ = ["gini", "pearson", "pg_alignment", "spearman", "utilization_entropy",
           "utilization_summary"]


def _check_utilization(u: torch.Tensor) -> torch.Tensor:
    if u.dim() < 1 or u.shape[-1] < 1:
        raise ValueError(f"utilization: got shape {tuple(u.shape)}, expected [..., num_experts]")
    u = u.detach().to(torch.float64)
    if bool((u < 0).any()) or not bool(torch.isfinite(u).all()):
        raise ValueError("utilization: expected finite values >= 0")
    return u


def utilization_entropy(utilization: torch.Tensor) -> torch.Tensor:
    """Entropy ``H(u~ / sum u~)`` in nats over the last (expert) dimension.

    Implements ``H = -sum_i q_i log q_i`` with ``q = u~ / sum_i u~_i`` and
    ``0 log 0 = 0``. The maximum, ``log M``, is reached by uniform utilization; a row
    that is all zero gets entropy 0.

    Args:
        utilization: ``[..., num_experts]`` non-negative utilization (e.g.
            ``[num_layers, num_experts]``).

    Returns:
        ``[...]`` float64 entropies (nats).

    Raises:
        ValueError: empty last dimension, negative or non-finite values.
    """
    u = _check_utilization(utilization)
    total = u.sum(-1, keepdim=True)  # [..., 1]
    q = torch.where(total > 0, u / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    plogp = torch.where(q > 0, q * torch.log(q.clamp_min(torch.finfo(torch.float64).tiny)), 0.0)
    return -plogp.sum(-1)


def gini(utilization: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of utilization over the last (expert) dimension.

    Implements ``G = sum_i sum_j |u_i - u_j| / (2 M sum_i u_i)``: 0 for perfectly
    even use, ``1 - 1/M`` when one expert takes everything. A row that is all zero
    gets 0.

    Args:
        utilization: ``[..., num_experts]`` non-negative values.

    Returns:
        ``[...]`` float64 Gini coefficients in ``[0, 1 - 1/M]``.

    Raises:
        ValueError: empty last dimension, negative or non-finite values.
    """
    u = _check_utilization(utilization)
    m = u.shape[-1]
    diff = (u.unsqueeze(-1) - u.unsqueeze(-2)).abs().sum((-1, -2))  # [...]
    total = u.sum(-1)
    return torch.where(total > 0, diff / (2 * m * total.clamp_min(torch.finfo(torch.float64).tiny)), 0.0)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    """Raise ValueError unless ``x`` and ``y`` have one shape and >= 2 elements."""
    if x.shape != y.shape or x.numel() < 2:
        raise ValueError(
            f"x, y: got shapes {tuple(x.shape)}, {tuple(y.shape)}, expected equal shapes "
            "with >= 2 elements"
        )


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two equally shaped tensors (flattened).

    Returns:
        The correlation in [-1, 1], or NaN when either input is constant (the
        correlation is undefined; reported, not hidden).

    Raises:
        ValueError: shapes differ or fewer than 2 elements.
    """
    _check_pair(x, y)
    a = x.detach().to(torch.float64).flatten()
    b = y.detach().to(torch.float64).flatten()
    a = a - a.mean()
    b = b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else math.nan


def _ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their average rank."""
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v, dtype=torch.float64)
    ranks[order] = torch.arange(1, v.numel() + 1, dtype=torch.float64)
    _, inverse = torch.unique(v, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse).to(torch.float64)
    return (sums / counts)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson on average ranks; ties share a rank).

    Returns:
        The correlation in [-1, 1], or NaN when either input is constant.

    Raises:
        ValueError: shapes differ or fewer than 2 elements.
    """
    _check_pair(x, y)
    return pearson(_ranks(x.detach().to(torch.float64).flatten()),
                   _ranks(y.detach().to(torch.float64).flatten()))


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def utilization_summary(utilization: torch.Tensor, phi: torch.Tensor | None = None) -> dict:
    """The per-round utilization diagnostics recorded in metrics.jsonl.

    Args:
        utilization: ``[num_layers, num_experts]`` global utilization u~.
        phi: ``[num_layers, num_experts]`` DMR modulation after the server update,
            or None (no DMR).

    Returns:
        ``{"entropy": {"per_layer", "mean", "variance", "max", "global",
        "global_max"}, "gini": {"per_layer", "mean"}}`` (entropy in nats; ``max =
        log M``; variance across layers, population; ``global`` is the entropy over
        all L x M layer-expert pairs of ``u~ / sum u~``, the paper's Fig. 2 quantity
        (its H = 6.5 exceeds log 64, so it cannot be a per-layer entropy), with
        ``global_max = log(L M)``), plus ``"phi_utilization": {"pearson", "spearman"}`` when ``phi``
        is given: the mean over layers of the per-layer correlations between phi and
        u~ (NaN layers, where either is constant, are left out of the mean).

    Raises:
        ValueError: ``utilization`` is not 2-D, or ``phi`` has another shape.
    """
    if utilization.dim() != 2:
        raise ValueError(
            f"utilization: got shape {tuple(utilization.shape)}, expected [num_layers, num_experts]"
        )
    h = utilization_entropy(utilization)  # [L]
    g = gini(utilization)  # [L]
    out = {
        "entropy": {
            "per_layer": h.tolist(),
            "mean": float(h.mean()),
            "variance": float(h.var(unbiased=False)),
            "max": math.log(utilization.shape[-1]),
            "global": float(utilization_entropy(utilization.reshape(-1))),
            "global_max": math.log(utilization.numel()),
        },
        "gini": {"per_layer": g.tolist(), "mean": float(g.mean())},
    }
    if phi is not None:
        if phi.shape != utilization.shape:
            raise ValueError(
                f"phi: got shape {tuple(phi.shape)}, expected utilization's {tuple(utilization.shape)}"
            )
        out["phi_utilization"] = {
            "pearson": _finite_mean([pearson(phi[i], utilization[i]) for i in range(phi.shape[0])]),
            "spearman": _finite_mean([spearman(phi[i], utilization[i]) for i in range(phi.shape[0])]),
        }
    return out


def _expert_grads(layer: nn.Module) -> dict[str, torch.Tensor]:
    """``{"gate_up.A": grad [E, r, H], ...}`` of one SMoE layer (zeros where None)."""
    out = {}
    for proj in ("gate_up", "down"):
        lora = getattr(layer, f"{proj}_lora")
        for part in ("A", "B"):
            p = getattr(lora, part)
            out[f"{proj}.{part}"] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    return out


def _per_expert(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Concatenate a layer's per-expert gradients: ``[E, D]`` (D = all LoRA entries)."""
    return torch.cat([g.flatten(1) for _, g in sorted(grads.items())], dim=1)


def pg_alignment(model: nn.Module, batch: dict[str, torch.Tensor], top_k: int,
                 pg: PseudoGradient,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict:
    """Cosine between each inactive expert's pseudo-gradient and its true gradient.

    Paper §6.3.4 / DESIGN.md section 4.2. On a fixed probe batch at K_c = ``top_k``:

    1. forward and backward as in training (with the layer's probe on when the rule
       has ``probe_tokens`` > 0, :class:`ubsmoe.core.pseudo_grad.ProbePseudoGradient`);
       per SMoE layer, A = experts that got a token, I = the others; the rule ``pg``
       turns the gradients into pseudo-gradients for I (not written into the model);
    2. forward and backward again with every expert of I forced on for every token
       at its gate weight (``SMoELayer.force_on``: a zero-valued contribution, so
       the loss and routing are unchanged and each forced expert's LoRA receives
       exactly the gradient it would get as an extra selected expert);
    3. per inactive expert, the cosine of the two (all four LoRA tensors
       concatenated, :func:`ubsmoe.core.pseudo_grad.pg_cosine_alignment`).

    The model's gradients, K_c, ``force_on`` and ``probe_tokens`` settings and
    utilization counters are restored afterwards; its parameters are not changed.

    The score is of the rule's gradient-space output; with ``pg_space=update`` the
    rule acts on the step's parameter changes instead, but what sets the direction is
    the same: for the universal rule the active experts' shared signal, whose cosine
    with an inactive expert's own gradient is about 0 by construction (that gradient
    depends on the expert's own frozen weights and its tokens); for the probe rule the
    expert's own gradient on a few tokens.

    Args:
        model: the patched model (LoRA parameters trainable).
        batch: ``input_ids``, ``attention_mask``, ``labels``, each ``[batch, seq]``.
        top_k: K_c to probe at.
        pg: the pseudo-gradient rule (its scale does not affect a cosine; an integer
            attribute ``probe_tokens`` > 0 turns the layers' probe on for pass 1).
        loss_fn: ``(logits [batch, seq, vocab], labels [batch, seq]) -> scalar``.

    Returns:
        ``{"top_k", "mean", "min", "max", "positive_fraction", "n"}``: statistics of
        the cosines over every inactive expert of every layer (``n`` of them; the
        statistics are NaN when no expert was inactive).

    Raises:
        ValueError: the model has no SMoE layer or ``top_k`` is out of range.
    """
    layers = smoe_layers(model)
    if not layers:
        raise ValueError("model: no SMoE layer to probe")
    saved_k = layers[0].top_k
    saved_probe = [m.probe_tokens for m in layers]
    probe_tokens = int(getattr(pg, "probe_tokens", 0))
    saved_counts = [(m.expert_counts.clone(), m.token_count.clone()) for m in layers]
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()  # no dropout in either pass, so the passes see the same function
    cosines: list[torch.Tensor] = []
    try:
        set_top_k(model, top_k)

        def backward() -> None:
            """One forward/backward of the probe batch into fresh gradients."""
            for p in params:
                p.grad = None
            with routing_mask(model, batch["attention_mask"]):
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
            loss_fn(logits, batch["labels"]).backward()

        for layer in layers:
            layer.probe_tokens = probe_tokens
        backward()
        pseudo, inactive = [], []
        for layer in layers:
            active = layer.batch_expert_counts > 0  # [E]
            grads = _expert_grads(layer)
            pseudo.append(_per_expert(pg(grads, layer.router_prob_sum, active, top_k)))  # [E, D]
            inactive.append(~active)
        for layer, mask in zip(layers, inactive):
            layer.force_on = mask
            layer.probe_tokens = 0
        backward()
        for layer, ps, mask in zip(layers, pseudo, inactive):
            if bool(mask.any()):
                true = _per_expert(_expert_grads(layer))  # [E, D]
                cosines.append(pg_cosine_alignment(ps, true, mask))
    finally:
        for layer, (counts, tokens), probe in zip(layers, saved_counts, saved_probe):
            layer.force_on = None
            layer.probe_tokens = probe
            layer.expert_counts.copy_(counts)
            layer.token_count.copy_(tokens)
        for p in params:
            p.grad = None
        set_top_k(model, saved_k)
        model.train(was_training)
    cos = torch.cat(cosines) if cosines else torch.empty(0)
    if cos.numel() == 0:
        return {"top_k": top_k, "mean": math.nan, "min": math.nan, "max": math.nan,
                "positive_fraction": math.nan, "n": 0}
    return {"top_k": top_k, "mean": float(cos.mean()), "min": float(cos.min()),
            "max": float(cos.max()), "positive_fraction": float((cos > 0).double().mean()),
            "n": int(cos.numel())}
