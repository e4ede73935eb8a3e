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
_LAYER_RE = re.compile(r"layers\.(\d+)\.")


@dataclass
class NoConfig:
    """A method without hyperparameters of its own."""


@dataclass
class ClientUpdate:
    """What a client returns after local training in one round.

    Attributes:
        client_id: partition id of the client (0..num_clients-1).
        num_examples: size of the client's training partition (examples); the
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


def expert_layer_of(names: Sequence[str]) -> dict[str, int]:
    """Map each per-expert LoRA tensor name to its SMoE layer index (depth order).

    Layer indices count SMoE layers in model order, matching the rows of
    :attr:`ClientUpdate.expert_counts`.
    """
    expert_names = [n for n in names if EXPERT_PARAM_RE.search(n)]
    prefixes = sorted({EXPERT_PARAM_RE.split(n)[0] for n in expert_names},
                      key=lambda p: [int(x) for x in _LAYER_RE.findall(p + ".")] or [0])
    index = {p: i for i, p in enumerate(prefixes)}
    return {n: index[EXPERT_PARAM_RE.split(n)[0]] for n in expert_names}


def data_weights(updates: Sequence[ClientUpdate]) -> torch.Tensor:
    """p_c = n_c / sum_c n_c over the round's participants (DESIGN.md section 2).

    Returns:
        ``[num_updates]`` float64, summing to 1 (uniform if every n_c is 0).
    """
    n = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    if n.sum() <= 0:
        return torch.full_like(n, 1.0 / len(updates))
    return n / n.sum()


def fedavg(updates: Sequence[ClientUpdate], names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """p_c-weighted mean of the clients' adapters (FedAvg / FedIT).

    Accumulates in float64 and casts back, so the result does not depend on float32
    rounding order. ``names`` restricts the keys (default: all).
    """
    w = data_weights(updates)
    keys = list(names) if names is not None else list(updates[0].adapters)
    out = {}
    for k in keys:
        acc = torch.zeros_like(updates[0].adapters[k], dtype=torch.float64)
        for wc, u in zip(w, updates):
            acc += wc * u.adapters[k].to(torch.float64)
        out[k] = acc.to(updates[0].adapters[k].dtype)
    return out


class Method:
    """Base method: clients train at their K_c, the server runs FedAvg.

    Subclasses override only what differs. ``config`` is an instance of
    ``config_class``.

    Class attributes:
        name: registry name (set by :func:`register_method`).
        config_class: the method's hyperparameter dataclass.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = NoConfig

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.config_class()

    # ----- client side -------------------------------------------------------------
    def client_top_k(self, k_c: int, k_max: int) -> int:
        """Experts per token a client of budget K_c trains and is evaluated with."""
        return k_c

    def extra_loss(self, model: nn.Module, top_k: int) -> torch.Tensor | None:
        """An extra training loss added to the task loss (None: nothing)."""
        return None

    def after_backward(self, model: nn.Module, top_k: int) -> None:
        """Gradient hook run after backward, before clipping and the optimizer step."""

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
    def aggregate(self, global_adapters: dict[str, torch.Tensor],
                  updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor]:
        """New global adapters from the round's updates (given in client-id order).

        Args:
            global_adapters: the adapters sent this round, name -> tensor.
            updates: the participants' replies, sorted by ``client_id``.

        Returns:
            New global adapters with the same names and shapes.

        Raises:
            ValueError: no updates.
        """
        if not updates:
            raise ValueError("aggregate: no client updates")
        return fedavg(updates)
