"""Dynamic Modulated Routing, DMR (DESIGN.md section 4.1; notation in section 2).

UB-SMoE: "Universally Balanced Sparse Mixture-of-Experts for Resource-Adaptive
Federated Fine-Tuning of Foundation Models" (ICML 2026, arXiv 2605.16690).

DMR counters the "rich get richer" expert imbalance that heterogeneous top-K_c
budgets cause. Every SMoE layer carries a modulation vector ``phi`` ``[E]``, shared by
all clients:

* client side (:func:`modulate_logits`, :func:`dmr_route`): per token, ``phi`` is
  added to the router affinities of the N_p candidates only (the experts with the
  largest raw affinity), then routing proceeds as usual. ``phi`` is learnable during
  local training under the range penalty :func:`phi_range_penalty`;
* server side (:func:`global_utilization`, :func:`server_phi_update`): after each
  round the server measures global expert utilization and moves ``phi`` towards a
  target that pushes over-used experts down and under-used ones up.

Pure PyTorch; nothing here knows about Flower.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ubsmoe.errors import ConfigError

__all__ = [
    "DMRConfig",
    "candidate_mask",
    "dmr_route",
    "global_utilization",
    "mean_top_k",
    "modulate_logits",
    "phi_range_penalty",
    "server_phi_update",
    "target_modulation",
]


@dataclass
class DMRConfig:
    """Hyperparameters of Dynamic Modulated Routing (DESIGN.md section 4.1).

    Attributes:
        num_candidates: N_p, candidate experts per token whose logit phi modulates
            (the N_p largest raw affinities). Must also be <= the number of experts; that is
            checked where the model is known (:func:`modulate_logits`).
        momentum: zeta in ``phi <- zeta * phi_agg + (1 - zeta) * phi~``, in [0, 1],
            the utilization-aware server update
            ``phi <- zeta phi_agg + (1 - zeta) tanh(u* / (u~ + eps) - 1)``.
        phi_min: lower end of the range penalty's free interval.
        phi_max: upper end of the range penalty's free interval (> ``phi_min``).
        penalty_coef: lambda of the range penalty, >= 0.
        range_penalty: add the range penalty
            ``lambda * (||ReLU(phi_min - phi)||^2 + ||ReLU(phi - phi_max)||^2)`` to
            the local loss (ablation switch, paper Table 5).
        server_update: utilization-aware server update of phi (ablation switch,
            paper Table 5); off keeps the aggregated phi.
        learn_phi: phi is trained locally on clients; off keeps it frozen there
            (clients keep the phi they were sent).
        phi_lr: Adam learning rate of phi in local training (its own optimizer
            parameter group; every other parameter keeps ``train.lr``), > 0. Adam
            moves a parameter by about its lr per step whatever the gradient's scale.
            Default 0.01, chosen on the testbed (docs page "The testbed base", phi_lr
            sweep): after each round's server update phi's Spearman correlation with
            utilization was -0.96 / -0.96 / -0.95 / -0.95 (rounds 1-4) at 0.01 and
            -0.33 / -0.33 / -0.35 / -0.35 at the earlier default 0.1, where the
            clients' task-loss steps outweigh DMR's push of over-used experts down
            (1e-3: -1.00 to -0.99, phi then is nearly the server's tanh target alone).
            At 0.01 phi stayed inside [phi_min, phi_max] for 4 rounds (the penalty had
            nothing to correct); when phi is outside, the penalty's pull moves it back
            at up to 0.01 per local step.

    Raises:
        ConfigError: (a ``ValueError``) listing every invalid field, one per line,
            each as ``dmr.<field>: got <value>, expected <allowed>``.
    """

    num_candidates: int = 2
    momentum: float = 0.9
    phi_min: float = -1.0
    phi_max: float = 1.0
    penalty_coef: float = 1e-2
    range_penalty: bool = True
    server_update: bool = True
    learn_phi: bool = True
    phi_lr: float = 0.01

    def __post_init__(self) -> None:
        errors: list[str] = []

        def bad(name: str, allowed: str) -> None:
            """Record that field ``name`` is invalid and what is allowed."""
            errors.append(f"dmr.{name}: got {getattr(self, name)!r}, expected {allowed}")

        if not _is_int(self.num_candidates) or self.num_candidates < 1:
            bad("num_candidates", "an integer >= 1")
        if not _is_real(self.momentum) or not 0.0 <= self.momentum <= 1.0:
            bad("momentum", "a number in [0, 1]")
        range_ok = True
        for name in ("phi_min", "phi_max"):
            if not _is_real(getattr(self, name)) or not math.isfinite(getattr(self, name)):
                bad(name, "a finite number")
                range_ok = False
        if range_ok and not self.phi_min < self.phi_max:
            bad("phi_max", f"a number > dmr.phi_min ({self.phi_min!r})")
        if (not _is_real(self.penalty_coef) or not math.isfinite(self.penalty_coef)
                or self.penalty_coef < 0):
            bad("penalty_coef", "a finite number >= 0")
        if not _is_real(self.phi_lr) or not math.isfinite(self.phi_lr) or self.phi_lr <= 0:
            bad("phi_lr", "a finite number > 0")
        for name in ("range_penalty", "server_update", "learn_phi"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        if errors:
            raise ConfigError("\n".join(errors))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def candidate_mask(logits: torch.Tensor, num_candidates: int = 2) -> torch.Tensor:
    """The DMR candidate set T per token: its ``num_candidates`` largest raw affinities.

    Ties are broken as :func:`torch.topk` breaks them.

    Args:
        logits: ``[num_tokens, num_experts]`` raw router affinities ``s = W_r x``,
            any floating dtype.
        num_candidates: N_p, in ``[1, num_experts]``.

    Returns:
        ``[num_tokens, num_experts]`` bool, True for i in T.

    Raises:
        ValueError: ``logits`` is not 2-D, or ``num_candidates`` is not an integer
            in ``[1, num_experts]``.
    """
    if logits.dim() != 2:
        raise ValueError(
            f"logits: got shape {tuple(logits.shape)}, expected [num_tokens, num_experts]"
        )
    num_experts = logits.shape[-1]
    if not _is_int(num_candidates) or not 1 <= num_candidates <= num_experts:
        raise ValueError(
            f"num_candidates: got {num_candidates!r}, expected an integer in [1, {num_experts}]"
        )
    cand = torch.topk(logits.detach(), num_candidates, dim=-1).indices  # [N, N_p]
    mask = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    return mask.scatter_(-1, cand, True)  # [N, E]


def modulate_logits(logits: torch.Tensor, phi: torch.Tensor,
                    num_candidates: int = 2) -> torch.Tensor:
    """Add the modulation phi to each token's candidate experts only (DMR, client side).

    Implements, per token with candidate set T (the N_p largest raw affinities):

        m_i = s_i + phi_i   for i in T,
        m_i = s_i           otherwise.

    Non-candidate entries are the raw logits exactly (whatever ``phi`` holds, even
    ``inf``), and receive no gradient for ``phi``. The result is differentiable with
    respect to both ``logits`` and ``phi`` (phi is learnable on clients).

    Args:
        logits: ``[num_tokens, num_experts]`` raw router affinities s.
        phi: ``[num_experts]`` modulation of this SMoE layer.
        num_candidates: N_p, in ``[1, num_experts]`` (default 2).

    Returns:
        ``[num_tokens, num_experts]`` modulated logits m, in the promoted dtype of
        ``logits`` and ``phi`` (float32 for bfloat16 logits and a float32 phi).

    Raises:
        ValueError: ``logits`` is not 2-D, ``phi`` is not ``[num_experts]``, or
            ``num_candidates`` is outside ``[1, num_experts]``.
    """
    is_cand = candidate_mask(logits, num_candidates)  # [N, E]; validates logits
    num_experts = logits.shape[-1]
    if phi.shape != (num_experts,):
        raise ValueError(
            f"phi: got shape {tuple(phi.shape)}, expected [num_experts] = [{num_experts}]"
        )
    return torch.where(is_cand, logits + phi, logits)  # [N, E]


def dmr_route(logits: torch.Tensor, phi: torch.Tensor | None, top_k: int,
              num_candidates: int = 2,
              norm_topk_prob: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-K_c routing on DMR-modulated logits (DESIGN.md section 3, steps 2-3).

    Implements ``p = softmax(m)`` (float32), the top-K_c experts of p, and gate
    weights ``w = p[top]`` (OLMoE) or ``w = p[top] / sum(p[top])``
    (``norm_topk_prob``, Mixtral/Qwen). With ``phi = 0`` or ``None`` the result is
    identical to plain top-k routing (:meth:`ubsmoe.core.smoe.SMoELayer.route`).

    Args:
        logits: ``[num_tokens, num_experts]`` raw router affinities s.
        phi: ``[num_experts]`` modulation, or ``None`` for no modulation.
        top_k: K_c, in ``[1, num_experts]``.
        num_candidates: N_p, in ``[1, num_experts]``.
        norm_topk_prob: renormalise the gate weights over the selected experts.

    Returns:
        ``(probs, top_weights, top_index)``: ``probs`` ``[num_tokens, num_experts]``
        float32 router probabilities p over the modulated logits; ``top_weights``
        ``[num_tokens, top_k]`` gate weights in ``logits``' dtype; ``top_index``
        ``[num_tokens, top_k]`` int64 selected experts, by decreasing p.

    Raises:
        ValueError: bad shapes, ``top_k`` or ``num_candidates`` outside
            ``[1, num_experts]``.
    """
    if logits.dim() != 2:
        raise ValueError(
            f"logits: got shape {tuple(logits.shape)}, expected [num_tokens, num_experts]"
        )
    num_experts = logits.shape[-1]
    if not _is_int(top_k) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: got {top_k!r}, expected an integer in [1, {num_experts}]")
    m = logits if phi is None else modulate_logits(logits, phi, num_candidates)  # [N, E]
    probs = torch.softmax(m, dim=-1, dtype=torch.float32)  # [N, E]
    top_weights, top_index = torch.topk(probs, top_k, dim=-1)  # [N, K]
    if norm_topk_prob:
        top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
    return probs, top_weights.to(logits.dtype), top_index


def _client_weights(weights: torch.Tensor | Sequence[float], num_clients: int,
                    name: str = "weights") -> torch.Tensor:
    """Validate client weights and normalise them to sum 1 (float64, ``[C]``)."""
    w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    if w.shape != (num_clients,):
        raise ValueError(f"{name}: got shape {tuple(w.shape)}, expected [{num_clients}]")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name}: got {w.tolist()}, expected finite numbers >= 0")
    total = float(w.sum())
    if not total > 0:
        raise ValueError(f"{name}: got {w.tolist()}, expected a positive sum")
    return w / total


def global_utilization(expert_counts: torch.Tensor, token_counts: torch.Tensor,
                       weights: torch.Tensor | Sequence[float], signed: bool = False) -> torch.Tensor:
    """Global expert utilization of a round (DMR server side).

    Implements, per SMoE layer l and expert i,

        u~_i = sum_c p_c * a_{c,i} / n_c,

    with p_c = ``weights`` normalised to sum 1 (the data-size weights). When every
    client's counts satisfy ``sum_i a_{c,i} = K_c * n_c``, ``u~`` sums over experts to
    ``K_bar = sum_c p_c K_c`` (see :func:`mean_top_k`).

    A client that processed no tokens at a layer (``n_c = 0``) contributes 0 to that
    layer; the weights are *not* renormalised over the remaining clients, so such a
    layer's utilization sums to less than K_bar.

    Args:
        expert_counts: ``[num_clients, num_layers, num_experts]`` tokens routed to each
            expert (a_{c,i}; tokens, not examples), any real dtype.
        token_counts: ``[num_clients, num_layers]`` tokens processed per layer (n_c).
        weights: ``[num_clients]`` non-negative client weights (e.g. example counts).
        signed: accept negative ``expert_counts``: the noisy histograms of local DP
            (:mod:`ubsmoe.core.privacy`), whose mean the caller post-processes
            (clamps) after averaging; the mean is then unbiased.

    Returns:
        ``[num_layers, num_experts]`` float64 utilization u~.

    Raises:
        ValueError: mismatched shapes, negative counts (unless ``signed``; negative
            token counts always), or weights that are negative, non-finite or sum to 0.
    """
    if expert_counts.dim() != 3:
        raise ValueError(
            f"expert_counts: got shape {tuple(expert_counts.shape)}, "
            "expected [num_clients, num_layers, num_experts]"
        )
    num_clients, num_layers, _ = expert_counts.shape
    if token_counts.shape != (num_clients, num_layers):
        raise ValueError(
            f"token_counts: got shape {tuple(token_counts.shape)}, "
            f"expected [num_clients, num_layers] = [{num_clients}, {num_layers}]"
        )
    a = expert_counts.detach().to(torch.float64)  # [C, L, E]
    n = token_counts.detach().to(torch.float64).to(a.device)  # [C, L]
    if (not signed and bool((a < 0).any())) or bool((n < 0).any()):
        raise ValueError("expert_counts / token_counts: expected counts >= 0")
    p = _client_weights(weights, num_clients).to(a.device)  # [C]
    has_tokens = n > 0  # [C, L]
    frac = a / torch.where(has_tokens, n, torch.ones_like(n)).unsqueeze(-1)  # [C, L, E]
    frac = torch.where(has_tokens.unsqueeze(-1), frac, torch.zeros_like(frac))
    return torch.einsum("c,cle->le", p, frac)  # [L, E]


def mean_top_k(top_ks: Sequence[int], weights: torch.Tensor | Sequence[float]) -> float:
    """Weighted mean activated experts ``K_bar = sum_c p_c K_c`` (DMR server side).

    Args:
        top_ks: K_c of each participating client, length ``num_clients``.
        weights: ``[num_clients]`` non-negative client weights, normalised to sum 1.

    Returns:
        K_bar as a Python float.

    Raises:
        ValueError: empty ``top_ks``, a K_c < 1, or invalid weights (wrong length,
            negative, non-finite, zero sum).
    """
    ks = [int(k) for k in top_ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(
            f"top_ks: got {list(top_ks)!r}, expected a non-empty list of integers >= 1"
        )
    p = _client_weights(weights, len(ks))  # [C]
    return float((p * torch.tensor(ks, dtype=torch.float64)).sum())


def target_modulation(utilization: torch.Tensor, k_bar: float,
                      eps: float = 1e-6) -> torch.Tensor:
    """The utilization-aware target ``phi~`` (DMR server side).

    Implements, with M = ``utilization.shape[-1]`` experts,

        u* = K_bar / M,    phi~_i = tanh(u* / (u~_i + eps) - 1).

    Over-used experts (u~_i > u*) get a value in (-tanh(1), 0), under-used ones a
    value in (0, 1); an unused expert gets about +1 (exactly 1.0 once tanh
    saturates in floating point). So ``|phi~| <= 1`` always.

    Args:
        utilization: ``[..., num_experts]`` global utilization u~ (typically
            ``[num_layers, num_experts]``, see :func:`global_utilization`).
        k_bar: K_bar > 0, the weighted mean activated experts (:func:`mean_top_k`).
        eps: eps >= 0 guarding against u~ = 0.

    Returns:
        ``[..., num_experts]`` float64 phi~.

    Raises:
        ValueError: ``k_bar`` not > 0, ``eps`` < 0, or negative utilization.
    """
    if not (_is_real(k_bar) and math.isfinite(k_bar) and k_bar > 0):
        raise ValueError(f"k_bar: got {k_bar!r}, expected a finite number > 0")
    if not (_is_real(eps) and eps >= 0):
        raise ValueError(f"eps: got {eps!r}, expected a number >= 0")
    u = utilization.detach().to(torch.float64)  # [..., E]
    if bool((u < 0).any()):
        raise ValueError("utilization: expected values >= 0")
    u_star = k_bar / u.shape[-1]
    return torch.tanh(u_star / (u + eps) - 1.0)  # [..., E]


def server_phi_update(phi_agg: torch.Tensor, utilization: torch.Tensor, k_bar: float,
                      momentum: float = 0.9, eps: float = 1e-6,
                      utilization_aware: bool = True) -> torch.Tensor:
    """Utilization-aware server update of phi after a round (DMR server side).

    Implements ``phi <- zeta * phi_agg + (1 - zeta) * phi~`` with zeta = ``momentum``
    and phi~ from :func:`target_modulation`. With ``utilization_aware=False``
    (ablation, paper Table 5) ``phi_agg`` is returned unchanged.

    Args:
        phi_agg: ``[num_layers, num_experts]`` p_c-weighted mean of the clients'
            locally trained phi (the sent phi when local phi learning is off).
        utilization: ``[num_layers, num_experts]`` global utilization u~.
        k_bar: K_bar > 0 (:func:`mean_top_k`).
        momentum: zeta in [0, 1].
        eps: eps >= 0 in phi~.
        utilization_aware: apply the update; False returns ``phi_agg`` itself.

    Returns:
        ``[num_layers, num_experts]`` new phi, in ``phi_agg``'s dtype and device,
        detached from any graph.

    Raises:
        ValueError: shapes differ, ``momentum`` outside [0, 1], ``k_bar`` not > 0,
            ``eps`` < 0, or negative utilization.
    """
    if not utilization_aware:
        return phi_agg
    if utilization.shape != phi_agg.shape:
        raise ValueError(
            f"utilization: got shape {tuple(utilization.shape)}, expected phi_agg's "
            f"{tuple(phi_agg.shape)}"
        )
    if not (_is_real(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"momentum: got {momentum!r}, expected a number in [0, 1]")
    phi_tilde = target_modulation(utilization, k_bar, eps).to(phi_agg.device)  # [L, E]
    new = momentum * phi_agg.detach().to(torch.float64) + (1.0 - momentum) * phi_tilde
    return new.to(phi_agg.dtype)  # [L, E]


def phi_range_penalty(phi: torch.Tensor, phi_min: float = -1.0, phi_max: float = 1.0,
                      coef: float = 1e-2) -> torch.Tensor:
    """Range penalty keeping the locally learned phi in ``[phi_min, phi_max]``.

    Implements

        L_reg = lambda * (||ReLU(phi_min - phi)||^2 + ||ReLU(phi - phi_max)||^2)

    summed over every element of ``phi``. Its gradient is 0 inside the range,
    ``2 * lambda * (phi - phi_max)`` above it and ``2 * lambda * (phi - phi_min)``
    below it.

    Args:
        phi: any shape (``[num_experts]`` or ``[num_layers, num_experts]``), floating.
        phi_min: lower bound, < ``phi_max``.
        phi_max: upper bound.
        coef: lambda >= 0.

    Returns:
        ``[]`` scalar in ``phi``'s dtype, differentiable w.r.t. ``phi``.

    Raises:
        ValueError: ``phi_min >= phi_max`` or ``coef < 0``.
    """
    if not phi_min < phi_max:
        raise ValueError(
            f"phi_min, phi_max: got {phi_min!r}, {phi_max!r}, expected phi_min < phi_max"
        )
    if not coef >= 0:
        raise ValueError(f"coef: got {coef!r}, expected a number >= 0")
    below = torch.relu(phi_min - phi)
    above = torch.relu(phi - phi_max)
    return coef * (below.pow(2).sum() + above.pow(2).sum())
