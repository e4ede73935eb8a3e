"""The method protocol, the method registry and FedAvg, the default aggregation.

A method is a pair: what changes on the client during local training (K_c it runs
at, an extra loss, a gradient hook) and how the server aggregates the clients'
adapters. Each method is one module under ``ubsmoe/methods/`` holding its config
dataclass and a :class:`Method` subclass registered with :func:`register_method`.
No code outside this registry compares method names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

_REGISTRY: dict[str, type[Method]] = {}

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


@dataclass
class ClientUpdate:
    """What a client returns after local training in one round.

    Attributes:
        client_id: partition id of the client (0..num_clients-1).
        num_examples: distinct examples the client trained on in this round (its
            partition size unless ``train.max_local_steps`` ended the round before
            the partition was covered; local epochs do not multiply it); the
            data-size weight p_c is proportional to it.
        adapters: trained LoRA parameters, name -> tensor (same names and shapes as
            the global adapters).
        expert_counts: ``[L, E]`` tokens routed to each expert per SMoE layer (a_{c,i}).
        token_counts: ``[L]`` tokens processed per SMoE layer (n_c).
        top_k: K_c the client trained with.
        loss: mean training loss over the round's steps (task loss only).
        metrics: further scalar metrics.
    """

    client_id: int
    num_examples: int
    adapters: dict[str, torch.Tensor]
    expert_counts: torch.Tensor
    token_counts: torch.Tensor
    top_k: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def register_method(name: str):
    """Class decorator registering a :class:`Method` under a lower-case ``name``.

    Raises:
        ValueError: the name is not lower-case or is registered already.
    """

    def wrap(cls: type[Method]) -> type[Method]:
        """Register ``cls`` and set its ``name``."""
        if name != name.lower() or not name:
            raise ValueError(f"method name {name!r} must be non-empty lower-case")
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    """The method class registered under ``name``.

    Raises:
        ConfigError: unknown name; the message lists the available ones.
    """
    from ubsmoe.config import ConfigError

    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"method: got {name!r}, expected one of {', '.join(available_methods())}"
        ) from None


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


def data_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """p_c = n_c / sum_c n_c over the round's participants (DESIGN.md section 2).

    Returns:
        ``[num_updates]`` float64, summing to 1 (uniform if every n_c is 0).
    """
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    if n.sum() <= 0:
        return torch.full_like(n, 1.0 / len(updates))
    return n / n.sum()


def round_utilization(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """Global expert utilization of a round, ``u~_i = sum_c p_c a_{c,i} / n_c`` (DESIGN.md 4.1).

    Returns:
        ``[L, E]`` float64 (see :func:`ubsmoe.routing.global_utilization`).

    Raises:
        ValueError: no updates, or updates with different ``[L, E]`` shapes.
    """
    from ubsmoe.routing import global_utilization

    if not updates:
        raise ValueError("round_utilization: no client updates")
    counts = torch.stack([u.expert_counts for u in updates])  # [C, L, E]
    tokens = torch.stack([u.token_counts for u in updates])  # [C, L]
    return global_utilization(counts, tokens, data_weights(updates))


class Aggregator:
    """Folds one round's client updates into new global adapters, one reply at a time.

    The server calls :meth:`add` for each reply (in client-id order, so results do
    not depend on arrival order) and drops the reply right after, then
    :meth:`result` once. An incremental aggregator holds O(model) memory whatever
    the number of clients (issue: server memory independent of the client count).
    """

    def add(self, update: ClientUpdate) -> None:
        """Fold in one client's update."""
        raise NotImplementedError

    def result(self) -> dict[str, torch.Tensor]:
        """The new global adapters, name -> tensor.

        Raises:
            ValueError: nothing was added.
        """
        raise NotImplementedError


class FedAvgAggregator(Aggregator):
    """Running p_c-weighted mean, ``sum_c n_c x_c / sum_c n_c`` (FedAvg / FedIT).

    Accumulates ``n_c * x_c`` in float64 (n_c: the client's example count) and
    divides once at the end, casting back to each tensor's dtype; memory is one
    float64 copy of the named tensors.

    With ``robust=(rule, trim_fraction)`` (``fl.aggregation``: ``median`` or
    ``trimmed_mean``, :mod:`ubsmoe.methods.robust`) it instead keeps every reply's
    tensors and returns their unweighted coordinate-wise median / trimmed mean:
    memory then grows with the number of clients.

    Args:
        names: the tensors to average (the global adapter names).
        robust: None (weighted mean) or ``(rule, trim_fraction)``.
    """

    def __init__(self, names: Sequence[str], robust: tuple[str, float] | None = None) -> None:
        self.names = list(names)
        self.robust = robust
        self.kept: dict[str, list[torch.Tensor]] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.total = 0.0
        self.count = 0

    def add(self, update: ClientUpdate) -> None:
        """Add ``n_c * x_c`` for every named tensor.

        Raises:
            ValueError: negative example count, or a named tensor missing from the update.
        """
        n = float(update.num_examples)
        if n < 0:
            raise ValueError(f"client {update.client_id}: num_examples {update.num_examples} < 0")
        for k in self.names:
            if k not in update.adapters:
                raise ValueError(f"client {update.client_id}: adapters lack {k!r}")
            x = update.adapters[k]
            if k not in self.sums:
                self.sums[k] = torch.zeros_like(x, dtype=torch.float64)
                self.dtypes[k] = x.dtype
            if self.robust is not None:
                self.kept.setdefault(k, []).append(x)
                continue
            self.sums[k].add_(x, alpha=n)  # promotes to float64 without a copy of x
        self.total += n
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """``sum_c n_c x_c / sum_c n_c`` per tensor.

        Raises:
            ValueError: no update was added, or every client reported 0 examples.
        """
        if not self.count:
            raise ValueError("aggregate: no client updates")
        if self.robust is not None:
            from ubsmoe.methods.robust import robust_aggregate

            rule, trim = self.robust
            return {k: robust_aggregate(torch.stack(xs).to(torch.float64), rule, trim).to(self.dtypes[k])
                    for k, xs in self.kept.items()}
        if self.total <= 0:
            raise ValueError("aggregate: every client reported 0 training examples")
        return {k: (v / self.total).to(self.dtypes[k]) for k, v in self.sums.items()}


class BufferedAggregator(Aggregator):
    """Keeps every update and calls an all-at-once ``aggregate(updates)`` at the end.

    For methods whose aggregation needs every reply at once (e.g. stacking LoRA
    factors); memory grows with the number of clients by the size of an adapter.
    """

    def __init__(self, aggregate_all) -> None:
        self.aggregate_all = aggregate_all
        self.updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        """Keep ``update``."""
        self.updates.append(update)

    def result(self) -> dict[str, torch.Tensor]:
        """``aggregate_all(updates)`` over the kept updates (in the order added).

        Raises:
            ValueError: nothing was added.
        """
        if not self.updates:
            raise ValueError("aggregate: no client updates")
        return self.aggregate_all(self.updates)


def fold(aggregator: Aggregator, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Add ``updates`` to ``aggregator`` in the given order and return its result.

    Raises:
        ValueError: no updates.
    """
    if not updates:
        raise ValueError("aggregate: no client updates")
    for u in updates:
        aggregator.add(u)
    return aggregator.result()


def fedavg(updates: Sequence[ClientUpdate], names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """p_c-weighted mean of the clients' adapters (FedAvg / FedIT), all at once.

    ``names`` restricts the keys (default: all of the first update's).

    Raises:
        ValueError: no updates, or every client reported 0 examples.
    """
    if not updates:
        raise ValueError("aggregate: no client updates")
    return fold(FedAvgAggregator(list(names) if names is not None else list(updates[0].adapters)),
                updates)


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
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = NoConfig
    own_train_top_k: ClassVar[str] = "budget"
    train_top_k_modes: ClassVar[tuple[str, ...]] = ("auto", "budget")
    needs_moe: ClassVar[bool] = True

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()
        # fl.aggregation: None (the weighted mean) or (rule, trim_fraction), see set_robust.
        self.robust: tuple[str, float] | None = None

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
        from ubsmoe.config import ConfigError

        if rule == "mean":
            self.robust = None
            return
        if type(self).aggregate is not Method.aggregate:
            raise ConfigError(f"fl.aggregation: got {rule!r}, method {self.name} supports only mean "
                              "(it stacks or factorizes the clients' LoRA factors)")
        self.robust = (rule, float(trim_fraction))

    # ----- client side -------------------------------------------------------------
    def prepare_model(self, model: nn.Module) -> None:
        """Configure a freshly built model for this method (server and every client).

        Called once after :func:`ubsmoe.models.build_model`, before the first
        ``adapter_state``; e.g. UB-SMoE turns on DMR here, which adds each layer's
        phi to the adapters. Default: nothing.
        """

    @property
    def pseudo_gradient(self):
        """The method's :class:`~ubsmoe.pseudo_grad.PseudoGradient` rule, or None.

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
        ``(model.lora_rank, model.lora_alpha)`` for every level.

        Args:
            level: 0-based index of the client's level in ``fl.budgets`` (0: beta_1).
            model_rank: ``model.lora_rank``.
            model_alpha: ``model.lora_alpha``.
        """
        return model_rank, model_alpha

    def global_lora(self, model_rank: int, model_alpha: float) -> tuple[int, float]:
        """``(rank, alpha)`` of the server's global adapters. Default: the model's."""
        return model_rank, model_alpha

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
        so the update is ``B @ A`` (see :func:`ubsmoe.models.loading.merge_into_base`).
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
        return FedAvgAggregator(list(global_adapters), self.robust)

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
        return fold(self.aggregator(global_adapters), updates)
