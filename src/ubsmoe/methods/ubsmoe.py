"""UB-SMoE: Dynamic Modulated Routing (DMR) plus the Universal Pseudo-Gradient (PG).

UB-SMoE: "Universally Balanced Sparse Mixture-of-Experts for Resource-Adaptive
Federated Fine-Tuning of Foundation Models" (ICML 2026, arXiv 2605.16690);
DESIGN.md section 4.

Client side, per local step: routing uses the layer's modulation phi on each
token's N_p candidate experts (:func:`ubsmoe.routing.dmr_route`); phi is learned
with the range penalty (:func:`ubsmoe.routing.phi_range_penalty`) added to the task
loss; after backward, the inactive experts' LoRA gradients are filled with
pseudo-gradients (:class:`ubsmoe.pseudo_grad.UniversalPseudoGradient`).

Server side, per round: expert LoRA, attention LoRA and phi are p_c-weighted means
(section 4.3), then phi moves towards the utilization-aware target:
``phi <- zeta * phi_agg + (1 - zeta) * tanh(u* / (u~ + eps) - 1)``
(:func:`ubsmoe.routing.server_phi_update`).

Every part has an ablation switch (paper Table 5): ``pg``, ``dmr.learn_phi``,
``dmr.range_penalty`` and ``dmr.server_update``; all off is naive heterogeneous SMoE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ubsmoe.methods.base import (
    Aggregator,
    ClientUpdate,
    FedAvgAggregator,
    Method,
    data_weights,
    phi_layer_of,
    register_method,
    round_utilization,
)
from ubsmoe.models.loading import smoe_layers
from ubsmoe.pseudo_grad import UniversalPseudoGradient, apply_pseudo_gradients
from ubsmoe.routing import (
    DMRConfig,
    mean_top_k,
    phi_range_penalty,
    server_phi_update,
)


@dataclass
class UBSMoEConfig:
    """UB-SMoE hyperparameters.

    Attributes:
        pg: write pseudo-gradients into inactive experts after each backward.
        lambda_pg: lambda_pg >= 0 in rho_c = lambda_pg * M / K_c (DESIGN.md 4.2).
            The default comes from the lambda_pg sweep on the default run (README,
            "UB-SMoE").
        dmr: Dynamic Modulated Routing settings (:class:`ubsmoe.routing.DMRConfig`):
            ``num_candidates`` (N_p), ``momentum`` (zeta), ``phi_min``/``phi_max``/
            ``penalty_coef`` (range penalty), and the switches ``learn_phi``,
            ``range_penalty``, ``server_update``.

    Raises:
        ConfigError: ``lambda_pg`` negative or not finite.
    """

    pg: bool = True
    lambda_pg: float = 0.01
    dmr: DMRConfig = field(default_factory=DMRConfig)

    def __post_init__(self) -> None:
        from ubsmoe.config import ConfigError

        if isinstance(self.lambda_pg, bool) or not isinstance(self.lambda_pg, (int, float)) or not (
                math.isfinite(self.lambda_pg) and self.lambda_pg >= 0):
            raise ConfigError(
                f"ubsmoe.lambda_pg: got {self.lambda_pg!r}, expected a finite number >= 0"
            )


def _expert_params(layer: nn.Module) -> dict[str, nn.Parameter]:
    """``{"gate_up.A": [E, r, H], "gate_up.B": [E, 2I, r], "down.A": [E, r, I], "down.B": [E, H, r]}``."""
    return {f"{proj}.{part}": getattr(getattr(layer, f"{proj}_lora"), part)
            for proj in ("gate_up", "down") for part in ("A", "B")}


@register_method("ubsmoe")
class UBSMoE(Method):
    """Heterogeneous K_c with DMR and PG; FedAvg plus the utilization-aware phi update."""

    config_class = UBSMoEConfig

    def __init__(self, config: UBSMoEConfig | None = None) -> None:
        super().__init__(config)
        self._pg = UniversalPseudoGradient(self.config.lambda_pg)

    @property
    def pseudo_gradient(self) -> UniversalPseudoGradient | None:
        """The PG rule, or None when ``pg`` is off."""
        return self._pg if self.config.pg else None

    def prepare_model(self, model: nn.Module) -> None:
        """Enable DMR on every SMoE layer (phi becomes part of the adapters).

        Raises:
            ValueError: ``dmr.num_candidates`` exceeds the model's expert count.
        """
        for layer in smoe_layers(model):
            layer.enable_dmr(self.config.dmr.num_candidates)

    def extra_loss(self, model: nn.Module, top_k: int) -> torch.Tensor | None:
        """The range penalty on every layer's phi (None when off or phi is frozen)."""
        dmr = self.config.dmr
        if not (dmr.range_penalty and dmr.learn_phi):
            return None
        layers = smoe_layers(model)
        return sum(phi_range_penalty(m.phi, dmr.phi_min, dmr.phi_max, dmr.penalty_coef)
                   for m in layers)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """phi at ``dmr.phi_lr``, every other trainable parameter at ``lr``."""
        phis = {id(m.phi) for m in smoe_layers(model)}
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in phis], "lr": lr},
                  {"params": [p for p in trainable if id(p) in phis], "lr": self.config.dmr.phi_lr}]
        return [g for g in groups if g["params"]]

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        """``phi_penalty_max``: the range penalty in this step's loss (0 when it is off)."""
        dmr = self.config.dmr
        if not (dmr.range_penalty and dmr.learn_phi):
            return {"phi_penalty_max": 0.0}
        with torch.no_grad():
            penalty = sum(float(phi_range_penalty(m.phi, dmr.phi_min, dmr.phi_max, dmr.penalty_coef))
                          for m in smoe_layers(model))
        return {"phi_penalty_max": penalty}

    def phi_range(self) -> tuple[float, float]:
        """``(dmr.phi_min, dmr.phi_max)``."""
        return self.config.dmr.phi_min, self.config.dmr.phi_max

    def after_backward(self, model: nn.Module, top_k: int) -> None:
        """Drop phi's gradient when it is frozen; fill inactive experts' gradients with PG.

        Per SMoE layer, the active set is the experts with >= 1 token in this batch
        (``batch_expert_counts``) and pi is the batch's router probabilities.
        """
        for layer in smoe_layers(model):
            if not self.config.dmr.learn_phi:
                layer.phi.grad = None
            if self.config.pg and layer.batch_expert_counts is not None:
                apply_pseudo_gradients(_expert_params(layer), layer.router_prob_sum,
                                       layer.batch_expert_counts > 0, top_k, self._pg)

    def aggregator(self, global_adapters: dict[str, torch.Tensor]) -> Aggregator:
        """An incremental :class:`UBSMoEAggregator` (FedAvg, then the phi update)."""
        return UBSMoEAggregator(global_adapters, self.config.dmr)


class UBSMoEAggregator(Aggregator):
    """p_c-weighted mean of everything, then the server's phi update (DESIGN.md 4.1, 4.3).

    Folds adapters into a running FedAvg and keeps only each client's utilization
    counts (``[L, E]``, no adapters) for u~ and K_bar, so memory stays O(model).

    Args:
        global_adapters: the adapters sent this round.
        dmr: DMR settings (``server_update``, ``momentum``).
    """

    def __init__(self, global_adapters: dict[str, torch.Tensor], dmr: DMRConfig) -> None:
        self.dmr = dmr
        self.fedavg = FedAvgAggregator(list(global_adapters))
        self.stats: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        """Fold in the adapters; keep the counts only."""
        self.fedavg.add(update)
        self.stats.append(replace(update, adapters={}))

    def result(self) -> dict[str, torch.Tensor]:
        """phi <- zeta phi_agg + (1 - zeta) tanh(u*/(u~ + eps) - 1); the rest is FedAvg.

        Raises:
            ValueError: nothing was added.
        """
        out = self.fedavg.result()
        layer_of = phi_layer_of(list(out))
        if not (self.dmr.server_update and layer_of):
            return out
        names = sorted(layer_of, key=layer_of.get)
        phi_agg = torch.stack([out[n] for n in names])  # [L, E]
        utilization = round_utilization(self.stats)  # [L, E]
        k_bar = mean_top_k([u.top_k for u in self.stats], data_weights(self.stats))
        phi = server_phi_update(phi_agg, utilization, k_bar, self.dmr.momentum)  # [L, E]
        for i, n in enumerate(names):
            out[n] = phi[i].clone()
        return out
