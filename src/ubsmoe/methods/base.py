"""The method protocol (:class:`Method`) and the adapter-name conventions every method shares.

A method is a pair: what changes on the client during local training (K_c it runs
at, an extra loss, a gradient hook) and how the server aggregates the clients'
adapters (default: FedAvg, :mod:`ubsmoe.methods.aggregation`). Each method is one
module under ``ubsmoe/methods/`` holding its config dataclass and a :class:`Method`
subclass registered with :func:`ubsmoe.methods.registry.register_method`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ubsmoe.config.model import DEFAULT_LORA_SCALE, DEFAULT_LORA_SCALE_RULE, lora_alpha_for
from ubsmoe.errors import ConfigError
from ubsmoe.methods.aggregation import (
    Aggregator,
    BufferedAggregator,
    ClientUpdate,
    FedAvgAggregator,
    aggregate_with,
)

# Names of per-expert LoRA tensors ([num_experts, ...] along dim 0), see SMoELayer.
EXPERT_PARAM_RE = re.compile(r"\.(gate_up_lora|down_lora)\.(A|B)$")
# Name of an SMoE layer's DMR modulation phi ([num_experts]), see SMoELayer.enable_dmr.
PHI_PARAM_RE = re.compile(r"\.phi$")
# Name of an SMoE layer's router W_r ([num_experts, hidden]) when model.router_trainable.
ROUTER_PARAM_RE = re.compile(r"\.router_weight$")
_LAYER_RE = re.compile(r"layers\.(\d+)\.")


@dataclass
class NoConfig:
    """A method without hyperparameters of its own."""


def _layer_index(names: Sequence[str], pattern: re.Pattern) -> dict[str, int]:
    """Map each name matching ``pattern`` to the depth order of its module prefix."""
    matched = [n for n in names if pattern.search(n)]
    prefixes = sorted({pattern.split(n)[0] for n in matched},
                      key=lambda p: [int(x) for x in _LAYER_RE.findall(p + ".")] or [0])
    index = {p: i for i, p in enumerate(prefixes)}
    return {n: index[pattern.split(n)[0]] for n in matched}


def expert_layer_of(names: Sequence[str]) -> dict[str, int]:
    """Map each per-expert LoRA tensor name to its SMoE layer index (depth order).

    Layer indices count SMoE layers in model order, matching the rows of
    :attr:`ClientUpdate.expert_counts`.
    """
    return _layer_index(names, EXPERT_PARAM_RE)


def phi_layer_of(names: Sequence[str]) -> dict[str, int]:
    """Map each DMR ``phi`` tensor name to its SMoE layer index (depth order).

    The same order as :func:`expert_layer_of` and the rows of
    :attr:`ClientUpdate.expert_counts` (every SMoE layer has one phi).
    """
    return _layer_index(names, PHI_PARAM_RE)


class Method:
    """Base method: clients train at their K_c, the server runs FedAvg.

    Subclasses override only what differs. ``config`` is an instance of
    ``config_class``.

    Class attributes:
        name: registry name (set by :func:`register_method`).
        config_class: the method's hyperparameter dataclass.
        own_train_top_k: what ``train.top_k=auto`` means for the method:
            ``budget`` (each client trains at its level's K_c, the SMoE methods) or
            ``native`` (the model's top-k, FedIT and the rank methods).
        train_top_k_modes: the ``train.top_k`` values the method accepts; the SMoE
            methods, which exist to vary K, leave out ``native``.
        needs_moe: the method needs a sparse-MoE model (the SMoE methods); False
            for the LoRA-only methods (FedIT and the rank methods), which also run
            on a dense backbone.
        privacy_modes: the ``privacy.mode`` values besides ``off`` the method
            supports (docs/privacy.md); empty: client-level DP is refused with
            :attr:`privacy_refusal` as the reason.
        privacy_refusal: why the modes left out of :attr:`privacy_modes` are refused.
        uses_counts: the server step consumes the clients' expert counts (DMR's phi
            update, A3SMoE's weights), so DP must release them
            (``privacy.counts_noise_multiplier > 0``).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = NoConfig
    own_train_top_k: ClassVar[str] = "budget"
    train_top_k_modes: ClassVar[tuple[str, ...]] = ("auto", "budget")
    needs_moe: ClassVar[bool] = True
    privacy_modes: ClassVar[tuple[str, ...]] = ()
    privacy_refusal: ClassVar[str] = "no privacy analysis for it"
    uses_counts: ClassVar[bool] = False

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()
        # fl.aggregation: None (the weighted mean) or (rule, trim_fraction), see set_robust.
        self.robust: tuple[str, float] | None = None
        # model.lora_scale_rule / model.lora_scale, see set_lora_scale (bare method: the defaults).
        self.lora_scale_rule = DEFAULT_LORA_SCALE_RULE
        self.lora_scale = DEFAULT_LORA_SCALE
        # DP's server-side release (ubsmoe.fl.privacy.ServerRelease), see set_release.
        self.release: Any = None

    def set_lora_scale(self, rule: str, scale: float) -> None:
        """Size every LoRA by ``model.lora_scale_rule`` and ``model.lora_scale`` (DESIGN.md section 5).

        ``rank_independent``: every LoRA of every rank has scale ``scale`` (alpha =
        scale * r); ``fixed_alpha``: scale ``alpha / r`` with the model's or the rank
        method's alpha. The server, every client runtime and the planner call it with
        the run's values; a bare method uses the config defaults.

        Raises:
            ValueError: an unknown rule or a scale that is not > 0.
        """
        lora_alpha_for(rule, scale, 1.0, 1)  # raises on an unknown rule
        if not float(scale) > 0:
            raise ValueError(f"model.lora_scale: got {scale!r}, expected a number > 0")
        self.lora_scale_rule, self.lora_scale = rule, float(scale)

    def lora_alpha(self, rank: int, fixed_alpha: float) -> float:
        """Alpha of a rank-``rank`` LoRA under the method's scale rule (``fixed_alpha``: that alpha)."""
        return lora_alpha_for(self.lora_scale_rule, self.lora_scale, fixed_alpha, rank)

    def set_robust(self, rule: str, trim_fraction: float = 0.1) -> None:
        """Use a robust rule (``fl.aggregation``) for the tensors the method averages with p_c.

        ``mean`` restores the weighted mean. Applies to every tensor of FedAvg /
        FedIT / SMoE / SMoE-LLB, to the non-expert tensors of A3SMoE (its experts keep
        their activation weights) and to everything UB-SMoE averages before its
        server phi update; not to the rank methods, whose aggregation stacks or
        factorizes the clients' LoRA factors.

        Raises:
            ConfigError: a robust rule for a method that aggregates all at once.
        """
        if rule == "mean":
            self.robust = None
            return
        if type(self).aggregate is not Method.aggregate:
            raise ConfigError(f"fl.aggregation: got {rule!r}, method {self.name} supports only mean "
                              "(it stacks or factorizes the clients' LoRA factors)")
        self.robust = (rule, float(trim_fraction))

    def set_release(self, release: Any) -> None:
        """Use DP's server-side release for the next :meth:`aggregator` (None: DP off).

        ``release.adapters(mean, n)`` noises the uniform mean of the privatised
        tensors and ``release.utilization(u, n)`` the ``[L, E]`` utilization
        before the server uses it (:class:`ubsmoe.fl.privacy.ServerRelease`). The
        FedAvg aggregator and UB-SMoE's (before its phi update) call it.
        """
        self.release = release

    # ----- client side -------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        """Configure a freshly built model for this method (server and every client).

        Called once after :func:`ubsmoe.models.build_model`, before the first
        ``adapter_state``; e.g. UB-SMoE turns on DMR here, which adds each layer's
        phi to the adapters. Default: nothing.
        """

    @property
    def pseudo_gradient(self):
        """The method's :class:`~ubsmoe.core.pseudo_grad.PseudoGradient` rule, or None.

        Used by the server's PG-alignment diagnostic; None skips it.
        """
        return None

    def client_top_k(self, k_c: int, k_max: int, mode: str = "auto") -> int:
        """Experts per token at a budget level of K_c under a ``train.top_k`` / ``eval.top_k`` mode.

        Args:
            k_c: the level's K (``top_k_for_budget``).
            k_max: the model's native top-k.
            mode: ``auto`` (the method's :attr:`own_train_top_k`), ``budget`` or ``native``.

        Returns:
            ``k_c`` for ``budget``, ``k_max`` for ``native``.

        Raises:
            ValueError: an unknown mode.
        """
        resolved = self.own_train_top_k if mode == "auto" else mode
        if resolved == "budget":
            return k_c
        if resolved == "native":
            return k_max
        raise ValueError(f"top-k mode: got {mode!r}, expected auto, budget or native")

    def extra_loss(self, model: nn.Module, top_k: int) -> torch.Tensor | None:
        """An extra training loss added to the task loss (None: nothing)."""
        return None

    def after_backward(self, model: nn.Module, top_k: int) -> None:
        """Gradient hook run after backward, before clipping and the optimizer step."""

    def after_step(self, model: nn.Module, top_k: int) -> None:
        """Update hook run right after the optimizer step (e.g. PG in update space).

        Default: nothing.
        """

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups for local training.

        Default: one group of every trainable parameter at ``lr``. A method may give
        some parameters their own learning rate (UB-SMoE: phi at ``dmr.phi_lr``);
        every trainable parameter must be in exactly one group.

        Args:
            model: the client's model.
            lr: ``train.lr``.

        Returns:
            ``torch.optim`` parameter groups (``{"params": [...], "lr": float}``).
        """
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def step_metrics(self, model: nn.Module) -> dict[str, float]:
        """Scalars measured at every local step, after the forward and the extra loss.

        ``local_train`` reports the maximum of each over the round's steps, under the
        same key (e.g. UB-SMoE's ``phi_penalty_max``). Default: none.
        """
        return {}

    def phi_range(self) -> tuple[float, float] | None:
        """``(phi_min, phi_max)`` of the method's DMR range penalty, or None (no phi).

        The server's diagnostics report the share of global phi entries outside it.
        """
        return None

    # ----- LoRA rank (heterogeneous-rank methods) ------------------------------------
    def client_lora(self, level: int, model_rank: int, model_alpha: float) -> tuple[int, float]:
        """``(rank, alpha)`` of every LoRA a client at budget level ``level`` trains.

        A budget level is evaluated at the same rank. Default: the model's own
        ``model.lora_rank`` for every level, with the alpha of the scale rule
        (:meth:`lora_alpha`: ``model.lora_alpha`` under ``fixed_alpha``).

        Args:
            level: 0-based index of the client's level in ``fl.budgets`` (0: beta_1).
            model_rank: ``model.lora_rank``.
            model_alpha: ``model.lora_alpha``.
        """
        return model_rank, self.lora_alpha(model_rank, model_alpha)

    def global_lora(self, model_rank: int, model_alpha: float) -> tuple[int, float]:
        """``(rank, alpha)`` of the server's global adapters. Default: the model's."""
        return model_rank, self.lora_alpha(model_rank, model_alpha)

    def current_lora(self, client_id: int, rank: int, alpha: float) -> tuple[int, float]:
        """``(rank, alpha)`` client ``client_id`` trains this round, given its level's.

        Default: its level's ``(rank, alpha)`` (:meth:`client_lora`). HetLoRA returns
        the client's self-pruned rank (never above its level's).
        """
        return rank, alpha

    def client_adapters(self, global_adapters: dict[str, torch.Tensor], rank: int,
                        seed: int) -> dict[str, torch.Tensor]:
        """The adapters a client of LoRA rank ``rank`` starts its round from.

        Also what a budget level of that rank is evaluated with. Default: the global
        adapters themselves (every client at the global rank).

        Args:
            global_adapters: the server's global adapters, name -> tensor.
            rank: the client's LoRA rank (from :meth:`client_lora`).
            seed: per-client, per-round seed for methods that draw fresh factors.

        Returns:
            name -> tensor with the shapes of a rank-``rank`` model's adapters.
        """
        return global_adapters

    def base_merges(self) -> list[tuple[str, dict[str, torch.Tensor]]]:
        """Low-rank updates merged into the frozen base weights so far, oldest first.

        Each entry is ``(merge id, factors)``: ids are unique within a run and
        identify the merge history a model has applied; ``factors`` maps
        ``"<LoRA module>.A"`` ``[r, in]`` (``[E, r, in]`` per expert) and
        ``"<LoRA module>.B"`` ``[out, r]`` (``[E, out, r]``) with the scale folded in,
        so the update is ``B @ A`` (see :func:`ubsmoe.models.adapters.merge_into_base`).
        Default: none (the base weights stay frozen).
        """
        return []

    def state_dict(self) -> dict[str, Any]:
        """Server-side method state kept in checkpoints (tensors, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` when a run resumes.

        Raises:
            ValueError: a non-empty state for a method without state.
        """
        if state:
            raise ValueError(f"method {self.name!r} keeps no state, got keys {sorted(state)}")

    # ----- server side -------------------------------------------------------------
    def aggregator(self, global_adapters: dict[str, torch.Tensor]) -> Aggregator:
        """A fresh :class:`Aggregator` for one round.

        Default: incremental FedAvg over the global adapter names; a method that
        overrides :meth:`aggregate` instead (an all-at-once rule) gets a
        :class:`BufferedAggregator` calling it.

        Args:
            global_adapters: the adapters sent this round, name -> tensor.
        """
        if type(self).aggregate is not Method.aggregate:
            return BufferedAggregator(lambda updates: self.aggregate(global_adapters, updates))
        return FedAvgAggregator(list(global_adapters), self.robust, self.release)

    def aggregate(self, global_adapters: dict[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """New global adapters from the round's updates (given in client-id order).

        The default folds ``updates`` through :meth:`aggregator`, so the all-at-once
        and the incremental paths are one computation.

        Args:
            global_adapters: the adapters sent this round, name -> tensor.
            updates: the participants' replies, sorted by ``client_id``.

        Returns:
            New global adapters with the same names and shapes.

        Raises:
            ValueError: no updates.
        """
        return aggregate_with(self.aggregator(global_adapters), updates)
