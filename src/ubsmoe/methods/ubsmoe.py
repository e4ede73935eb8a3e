"""UB-SMoE: Dynamic Modulated Routing (DMR) plus the Universal Pseudo-Gradient (PG).

UB-SMoE: "Universally Balanced Sparse Mixture-of-Experts for Resource-Adaptive
Federated Fine-Tuning of Foundation Models" (ICML 2026, arXiv 2605.16690);
DESIGN.md section 4.

Client side, per local step: routing uses the layer's modulation phi on each
token's N_p candidate experts (:func:`ubsmoe.core.routing.dmr_route`); phi is learned
with the range penalty (:func:`ubsmoe.core.routing.phi_range_penalty`) added to the task
loss; after the optimizer step, the inactive experts' LoRA parameters move by the PG
rule applied to the step's actual parameter changes (``pg_space=update``; the
earlier rule, pseudo-gradients written into ``.grad`` before clipping and the step,
is ``pg_space=gradient``). Rules: :class:`ubsmoe.core.pseudo_grad.UniversalPseudoGradient`
(``pg_rule=universal``) and :class:`ubsmoe.core.pseudo_grad.ProbePseudoGradient`
(``pg_rule=probe``).

Server side, per round: expert LoRA, attention LoRA and phi are p_c-weighted means
(section 4.3), then phi moves towards the utilization-aware target:
``phi <- zeta * phi_agg + (1 - zeta) * tanh(u* / (u~ + eps) - 1)``
(:func:`ubsmoe.core.routing.server_phi_update`).

Every part has an ablation switch (paper Table 5): ``pg``, ``dmr.learn_phi``,
``dmr.range_penalty`` and ``dmr.server_update``; all off is naive heterogeneous SMoE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ubsmoe.core.pg_apply import apply_pseudo_gradients, apply_pseudo_updates, snapshot_before_step
from ubsmoe.core.pg_fixed import FixedSnapshot, apply_fixed, snapshot_fixed, supports_fixed
from ubsmoe.core.pseudo_grad import ProbePseudoGradient, PseudoGradient, UniversalPseudoGradient
from ubsmoe.core.routing import DMRConfig, mean_top_k, phi_range_penalty, server_phi_update
from ubsmoe.errors import ConfigError
from ubsmoe.methods.aggregation import (
    Aggregator,
    ClientUpdate,
    FedAvgAggregator,
    data_weights,
    round_utilization,
)
from ubsmoe.methods.base import Method, phi_layer_of
from ubsmoe.methods.registry import register_method
from ubsmoe.models.runtime import smoe_layers

PG_SPACES = ("update", "gradient")
PG_RULES = ("universal", "probe")


@dataclass
class UBSMoEConfig:
    """UB-SMoE hyperparameters.

    Attributes:
        pg: give inactive experts a pseudo-gradient (PG) in every local step (on/off).
        lambda_pg: lambda_pg >= 0 in rho_c = lambda_pg * M / K_c (DESIGN.md 4.2).
            Default 0.01: at K_c = 1 of M = 64 an inactive expert of average router
            probability moves 0.64x the active experts' weighted mean move (the
            lambda_pg sweep on the default run does not separate the values; docs
            page "UB-SMoE: DMR and PG").
        pg_space: ``update`` (default): after the optimizer step, inactive experts
            move by the rule applied to the active experts' actual changes in that
            step (:func:`ubsmoe.core.pg_apply.apply_pseudo_updates`), so lambda_pg
            sets their move relative to the active experts' and PG stays out of
            gradient clipping; ``gradient``: the earlier rule, pseudo-gradients
            written into ``.grad`` before clipping and the step (Adam then erases
            their scale).
        pg_rule: ``universal`` (the paper's description: the pi-weighted mean of the
            active experts' signal) or ``probe`` (each inactive expert's own true
            gradient on its ``pg_probe_tokens`` highest-probability tokens, at the
            universal rule's norm; costs extra FLOPs: ``ubsmoe flops
            --pg-probe-tokens N``).
        pg_probe_tokens: tokens per inactive expert for ``pg_rule=probe``, >= 1.
        dmr: Dynamic Modulated Routing settings (:class:`ubsmoe.core.routing.DMRConfig`):
            ``num_candidates`` (N_p), ``momentum`` (zeta), ``phi_min``/``phi_max``/
            ``penalty_coef`` (range penalty), and the switches ``learn_phi``,
            ``range_penalty``, ``server_update``.

    Raises:
        ConfigError: ``lambda_pg`` negative or not finite.
    """

    pg: bool = True
    lambda_pg: float = 0.01
    pg_space: str = "update"
    pg_rule: str = "universal"
    pg_probe_tokens: int = 4
    dmr: DMRConfig = field(default_factory=DMRConfig)

    def __post_init__(self) -> None:

        errors = []
        if isinstance(self.lambda_pg, bool) or not isinstance(self.lambda_pg, (int, float)) or not (
                math.isfinite(self.lambda_pg) and self.lambda_pg >= 0):
            errors.append(f"ubsmoe.lambda_pg: got {self.lambda_pg!r}, expected a finite number >= 0")
        if self.pg_space not in PG_SPACES:
            errors.append(f"ubsmoe.pg_space: got {self.pg_space!r}, expected one of {', '.join(PG_SPACES)}")
        if self.pg_rule not in PG_RULES:
            errors.append(f"ubsmoe.pg_rule: got {self.pg_rule!r}, expected one of {', '.join(PG_RULES)}")
        if (isinstance(self.pg_probe_tokens, bool) or not isinstance(self.pg_probe_tokens, int)
                or self.pg_probe_tokens < 1):
            errors.append(f"ubsmoe.pg_probe_tokens: got {self.pg_probe_tokens!r}, expected an integer >= 1")
        if errors:
            raise ConfigError("\n".join(errors))


def _expert_params(layer: nn.Module) -> dict[str, nn.Parameter]:
    """``{"gate_up.A": [E, r, H], "gate_up.B": [E, 2I, r], "down.A": [E, r, I], "down.B": [E, H, r]}``."""
    return {f"{proj}.{part}": getattr(getattr(layer, f"{proj}_lora"), part)
            for proj in ("gate_up", "down") for part in ("A", "B")}


@register_method("ubsmoe")
class UBSMoE(Method):
    """Heterogeneous K_c with DMR and PG; FedAvg plus the utilization-aware phi update."""

    config_class = UBSMoEConfig
    privacy_modes = ("central", "local")
    uses_counts = True  # DMR's server phi update

    def __init__(self, config: UBSMoEConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self._pg: PseudoGradient = (ProbePseudoGradient(cfg.lambda_pg, cfg.pg_probe_tokens)
                                    if cfg.pg_rule == "probe" else UniversalPseudoGradient(cfg.lambda_pg))
        # (layer params, snapshot) per SMoE layer, from after_backward to after_step.
        self._pending: list = []
        # (phi versions, detached penalty) of the last extra_loss, for step_metrics.
        self._penalty: tuple[tuple[int, ...], torch.Tensor] | None = None

    @property
    def pseudo_gradient(self) -> PseudoGradient | None:
        """The PG rule, or None when ``pg`` is off."""
        return self._pg if self.config.pg else None

    def prepare_model(self, model: nn.Module) -> None:
        """Enable DMR on every SMoE layer (phi becomes part of the adapters); set the PG probe.

        With ``pg_rule=probe`` (and PG on) every layer's probe runs in training
        forwards (``SMoELayer.probe_tokens``).

        Raises:
            ValueError: ``dmr.num_candidates`` exceeds the model's expert count.
        """
        probe = self._pg.probe_tokens if self.config.pg else 0
        for layer in smoe_layers(model):
            layer.enable_dmr(self.config.dmr.num_candidates)
            layer.probe_tokens = probe

    def _penalty_of(self, model: nn.Module) -> torch.Tensor:
        """The range penalty summed over every layer's phi: one stacked computation ``[L, E]``."""
        dmr = self.config.dmr
        phis = torch.stack([m.phi for m in smoe_layers(model)])  # [L, E]
        return phi_range_penalty(phis, dmr.phi_min, dmr.phi_max, dmr.penalty_coef)

    def extra_loss(self, model: nn.Module, top_k: int) -> torch.Tensor | None:
        """The range penalty on every layer's phi (None when off or phi is frozen).

        One stacked computation over the ``[L, E]`` phi of all layers (a fixed number
        of operations whatever the depth); equal to the sum of the per-layer
        penalties up to summation order.
        """
        dmr = self.config.dmr
        if not (dmr.range_penalty and dmr.learn_phi) or not smoe_layers(model):
            return None
        penalty = self._penalty_of(model)
        self._penalty = (self._phi_versions(model), penalty.detach())
        return penalty

    @staticmethod
    def _phi_versions(model: nn.Module) -> tuple[int, ...]:
        """phi's in-place version counters (a host read of no tensor: no launch)."""
        return tuple(m.phi._version for m in smoe_layers(model))

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """phi at ``dmr.phi_lr``, every other trainable parameter at ``lr``."""
        phis = {id(m.phi) for m in smoe_layers(model)}
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in phis], "lr": lr},
                  {"params": [p for p in trainable if id(p) in phis], "lr": self.config.dmr.phi_lr}]
        return [g for g in groups if g["params"]]

    def step_metrics(self, model: nn.Module) -> dict[str, float | torch.Tensor]:
        """``phi_penalty_max``: the range penalty in this step's loss (0 when it is off).

        A ``[]`` tensor on the model's device (no host read here; ``local_train``
        takes the maximum on the device and reads it once per round): the value
        ``extra_loss`` computed when phi has not changed since, else recomputed.
        """
        dmr = self.config.dmr
        if not (dmr.range_penalty and dmr.learn_phi) or not smoe_layers(model):
            return {"phi_penalty_max": 0.0}
        if self._penalty is not None and self._penalty[0] == self._phi_versions(model):
            return {"phi_penalty_max": self._penalty[1]}
        with torch.no_grad():
            return {"phi_penalty_max": self._penalty_of(model)}

    def phi_range(self) -> tuple[float, float]:
        """``(dmr.phi_min, dmr.phi_max)``."""
        return self.config.dmr.phi_min, self.config.dmr.phi_max

    def after_backward(self, model: nn.Module, top_k: int) -> None:
        """Drop phi's gradient when it is frozen; prepare or apply PG.

        Per SMoE layer, the active set is the experts with >= 1 token in this batch
        (``batch_expert_counts``) and pi is the batch's router probabilities.
        ``pg_space=update``: snapshot the active experts' rows and take the
        inactive rows out of ``.grad`` (:func:`ubsmoe.core.pg_apply.snapshot_before_step`),
        so clipping sees only real gradients; ``gradient``: write pseudo-gradients
        into ``.grad`` (they then enter clipping and the optimizer).
        """
        self._pending = []
        for layer in smoe_layers(model):
            if not self.config.dmr.learn_phi:
                layer.phi.grad = None
            if not (self.config.pg and layer.batch_expert_counts is not None):
                continue
            params = _expert_params(layer)
            active = layer.batch_expert_counts > 0  # [E]
            if self.config.pg_space == "gradient":
                apply_pseudo_gradients(params, layer.router_prob_sum, active, top_k, self._pg)
            elif supports_fixed(self._pg):  # masks, fixed shapes, no host read (issue 24)
                self._pending.append((params, snapshot_fixed(params, layer.router_prob_sum, active)))
            else:
                snapshot = snapshot_before_step(params, layer.router_prob_sum, active)
                if snapshot is not None:
                    self._pending.append((params, snapshot))

    def after_step(self, model: nn.Module, top_k: int) -> None:
        """``pg_space=update``: move the inactive experts by PG on the step's changes.

        Inactive expert i of each layer moves by the rule applied to the active
        experts' actual changes delta_j in this step, on top of the optimizer's own
        change of i's rows (:func:`ubsmoe.core.pg_apply.apply_pseudo_updates`).
        """
        for params, snapshot in self._pending:
            if isinstance(snapshot, FixedSnapshot):
                apply_fixed(params, snapshot, top_k, self._pg)
            else:
                apply_pseudo_updates(params, snapshot, top_k, self._pg)
        self._pending = []

    def aggregator(self, global_adapters: dict[str, torch.Tensor]) -> Aggregator:
        """An incremental :class:`UBSMoEAggregator` (FedAvg, then the phi update)."""
        return UBSMoEAggregator(global_adapters, self.config.dmr, self.robust, self.release)


class UBSMoEAggregator(Aggregator):
    """p_c-weighted mean of everything, then the server's phi update (DESIGN.md 4.1, 4.3).

    Folds adapters into a running FedAvg and keeps only each client's utilization
    counts (``[L, E]``, no adapters) for u~ and K_bar, so memory stays O(model).

    Args:
        global_adapters: the adapters sent this round.
        dmr: DMR settings (``server_update``, ``momentum``).
        robust: None (weighted mean) or ``(rule, trim_fraction)`` for the averaged
            tensors (``fl.aggregation``, see :class:`FedAvgAggregator`).
        release: DP's server-side release or None (DP off): it noises the mean of
            the privatised tensors (phi included) and the utilization u~ before the
            phi update (:class:`ubsmoe.fl.privacy.ServerRelease`).
    """

    def __init__(self, global_adapters: dict[str, torch.Tensor], dmr: DMRConfig,
                 robust: tuple[str, float] | None = None, release: Any = None) -> None:
        self.dmr = dmr
        self.release = release
        self.fedavg = FedAvgAggregator(list(global_adapters), robust, release)
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
        utilization = round_utilization(self.stats, signed=self.release is not None)  # [L, E]
        if self.release is not None:
            utilization = self.release.utilization(utilization, len(self.stats))  # [L, E]
        k_bar = mean_top_k([u.top_k for u in self.stats], data_weights(self.stats))
        phi = server_phi_update(phi_agg, utilization, k_bar, self.dmr.momentum)  # [L, E]
        for i, n in enumerate(names):
            out[n] = phi[i].clone()
        return out
