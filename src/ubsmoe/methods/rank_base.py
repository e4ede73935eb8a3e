"""Shared parts of the heterogeneous-rank LoRA baselines (HetLoRA, FlexLoRA, FLoRA, FLoRIST).

DESIGN.md section 5. These methods vary the LoRA rank per client instead of the
experts: on the SMoE backbone every client trains at the model's native top-k by
default (``train.top_k``; evaluation runs level j at K_j, ``eval.top_k``), and a
client at budget level beta_j trains rank ``ranks[j]`` (default 12, 16, 24, 40 for
beta_1..beta_4) on every LoRA of the model, attention (PEFT, ``lora_A.default.weight``
``[r, in]`` / ``lora_B.default.weight`` ``[out, r]``) and per-expert
(``gate_up_lora.A`` ``[E, r, in]`` / ``.B`` ``[E, out, r]``), all with one scale
``s``: ``model.lora_scale`` at every rank (``model.lora_scale_rule=rank_independent``,
the default) or ``s = alpha / r`` with this section's ``alpha`` (``fixed_alpha``, the
old rule). The per-module aggregation math lives in
:mod:`ubsmoe.core.lora` and works on 2-D factors; :func:`map_experts` applies it
to each expert of a batched per-expert LoRA.

This module holds the config every rank method shares (:class:`LoRARankConfig`), the
pairing of adapter tensor names into LoRA modules (:func:`lora_pairs`) and
:class:`RankMethod`, the base class of the four methods.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ubsmoe.budgets import DEFAULT_RANKS, check_ranks_per_level, global_rank, rank_for_level
from ubsmoe.core.lora import truncate_lora
from ubsmoe.errors import ConfigError
from ubsmoe.methods.aggregation import ClientUpdate, fedavg
from ubsmoe.methods.base import EXPERT_PARAM_RE, Method

_PEFT_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>A|B)\.[^.]+\.weight$")


@dataclass
class LoRARankConfig:
    """Client LoRA ranks per budget level, shared by every heterogeneous-rank method.

    Attributes:
        ranks: LoRA rank of a client at each budget level, aligned with ``fl.budgets``
            (one rank per level, else a config error; default 12, 16, 24, 40 for
            beta_1..beta_4). The server's global adapters have rank ``max(ranks)``.
        alpha: LoRA alpha of every client adapter under
            ``model.lora_scale_rule=fixed_alpha`` (scale ``alpha / rank``); unused
            under ``rank_independent`` (scale ``model.lora_scale`` at every rank). Rank
            methods set the rank of every LoRA from this section;
            ``model.lora_rank`` and ``model.lora_alpha`` apply to the other methods.
    """

    section: ClassVar[str] = "rank"

    ranks: list[int] = field(default_factory=lambda: list(DEFAULT_RANKS))
    alpha: float = 16.0

    def __post_init__(self) -> None:

        errors = []
        if not self.ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1
                                 for r in self.ranks):
            errors.append(f"{self.section}.ranks: got {self.ranks!r}, expected a non-empty list "
                          "of integers >= 1 (one per fl.budgets level)")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            errors.append(f"{self.section}.alpha: got {self.alpha!r}, expected a number > 0")
        errors.extend(self._check_extra())
        if errors:
            raise ConfigError("\n".join(errors))

    def _check_extra(self) -> list[str]:
        """Errors of a subclass's own fields (one message per bad field)."""
        return []

    def check_run(self, run: Any) -> None:
        """Check the ranks against the run: one rank per budget level.

        Args:
            run: the :class:`~ubsmoe.config.RunConfig` this section belongs to.

        Raises:
            ConfigError: ``len(ranks) != len(fl.budgets)``.
        """
        check_ranks_per_level(self.ranks, run.fl.budgets, self.section)


@dataclass(frozen=True)
class LoRAPair:
    """The two factor tensors of one LoRA module in an adapter dict.

    Attributes:
        module: the LoRA module's name (``...self_attn.q_proj`` or ``...mlp.gate_up_lora``).
        a: name of A, ``[r, in]`` (attention) or ``[E, r, in]`` (per expert).
        b: name of B, ``[out, r]`` or ``[E, out, r]``.
    """

    module: str
    a: str
    b: str


def lora_pairs(names: Sequence[str]) -> tuple[list[LoRAPair], list[str]]:
    """Group adapter tensor names into LoRA modules.

    Recognises PEFT names (``<module>.lora_A.<adapter>.weight`` / ``lora_B``) and the
    per-expert LoRA (``<module>.A`` / ``<module>.B`` for ``gate_up_lora`` and
    ``down_lora``).

    Returns:
        ``(pairs in name order of their A factor, other names)``: names that are not
        a complete A/B pair are returned as "other" tensors (aggregated by FedAvg).
    """
    found: dict[str, dict[str, str]] = {}
    for name in names:
        m = _PEFT_RE.match(name)
        if m:
            found.setdefault(m["module"], {})[m["factor"]] = name
        elif EXPERT_PARAM_RE.search(name):
            module, _, factor = name.rpartition(".")
            found.setdefault(module, {})[factor] = name
    pairs = [LoRAPair(mod, f["A"], f["B"]) for mod, f in found.items() if set(f) == {"A", "B"}]
    paired = {n for p in pairs for n in (p.a, p.b)}
    return pairs, [n for n in names if n not in paired]


def pair_rank(adapters: dict[str, torch.Tensor], pair: LoRAPair) -> int:
    """Rank r of one LoRA module's factors (A ``[..., r, in]``, B ``[..., out, r]``).

    Raises:
        ValueError: A and B disagree on the rank or on the expert dimension.
    """
    A, B = adapters[pair.a], adapters[pair.b]
    if A.dim() != B.dim() or A.dim() not in (2, 3) or A.shape[-2] != B.shape[-1] \
            or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(f"{pair.module}: A {tuple(A.shape)} and B {tuple(B.shape)} are not "
                         "LoRA factors [.., r, in] / [.., out, r] of one rank")
    return int(A.shape[-2])


def map_experts(fn: Callable[..., Any], *tensors: torch.Tensor) -> Any:
    """Apply a function of 2-D LoRA factors to every expert of batched factors.

    Args:
        fn: takes 2-D tensors (e.g. ``A [r, in], B [out, r]``) and returns a tensor or a
            tuple of tensors.
        tensors: all 2-D (``fn`` is called once) or all 3-D ``[E, ...]`` (``fn`` is
            called per expert ``e`` on ``t[e]``, outputs stacked along a new dim 0).

    Returns:
        ``fn``'s output, with a leading ``[E]`` dimension for 3-D inputs.
    """
    if tensors[0].dim() == 2:
        return fn(*tensors)
    outs = [fn(*(t[e] for t in tensors)) for e in range(tensors[0].shape[0])]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outs, strict=True))
    return torch.stack(outs)


def client_factors(updates: Sequence[ClientUpdate], pair: LoRAPair
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """Every client's A and B of one LoRA module and their ranks r_c.

    Raises:
        ValueError: a client's factors are inconsistent, or clients disagree on the
            module's shape apart from the rank.
    """
    As = [u.adapters[pair.a] for u in updates]
    Bs = [u.adapters[pair.b] for u in updates]
    ranks = [pair_rank(u.adapters, pair) for u in updates]
    shapes = {(A.shape[:-2], A.shape[-1], B.shape[-2]) for A, B in zip(As, Bs, strict=True)}
    if len(shapes) != 1:
        raise ValueError(f"{pair.module}: clients' LoRA factors differ in shape beyond the rank: "
                         f"{sorted(shapes)}")
    return As, Bs, ranks


def fresh_factors(A_like: torch.Tensor, B_like: torch.Tensor, rank: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """New LoRA factors at ``rank`` with PEFT's default init: A Kaiming-uniform, B = 0.

    ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (``kaiming_uniform_(a=sqrt(5))`` per expert, as
    PEFT and :class:`~ubsmoe.core.smoe.ExpertLoRA`), so ``s * B @ A = 0``.

    Args:
        A_like: ``[..., r', in]`` giving dtype, device, expert dimension and ``in``.
        B_like: ``[..., out, r']`` giving ``out``.
        rank: the new rank.
        generator: CPU random generator the draw comes from.

    Returns:
        ``(A [..., rank, in], B [..., out, rank])``.
    """
    A = torch.empty(*A_like.shape[:-2], rank, A_like.shape[-1], dtype=torch.float32)
    for a in A.reshape(-1, rank, A.shape[-1]):
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    B = torch.zeros(*B_like.shape[:-1], rank, dtype=B_like.dtype, device=B_like.device)
    return A.to(dtype=A_like.dtype, device=A_like.device), B


class RankMethod(Method):
    """Base of the heterogeneous-rank methods: native top-k, rank ``ranks[level]`` per client.

    Clients train at the native top-k by default (these methods vary rank, not
    experts; ``train.top_k=budget`` trains them at K_c too); every level is evaluated
    at its rank r_j and, by default, its K_j (``eval.top_k``).

    Subclasses implement :meth:`aggregate` and, if clients do not start from the
    global adapters truncated to their rank, :meth:`client_adapters`.
    """

    config_class: ClassVar[type] = LoRARankConfig
    own_train_top_k: ClassVar[str] = "native"
    train_top_k_modes: ClassVar[tuple[str, ...]] = ("auto", "budget", "native")
    needs_moe: ClassVar[bool] = False

    def scale(self, rank: int) -> float:
        """LoRA scale of a rank-``rank`` adapter.

        ``model.lora_scale`` at every rank under ``rank_independent`` (exactly, so
        the truncation and padding factors ``s_g / s_r`` are exactly 1), else
        ``alpha / rank`` with the section's ``alpha``.
        """
        if self.lora_scale_rule == "rank_independent":
            return self.lora_scale
        return float(self.config.alpha) / rank

    def client_lora(self, level: int, model_rank: int, model_alpha: float) -> tuple[int, float]:
        """``(ranks[level], alpha)``: the section's rank, the scale rule's alpha at that rank.

        Raises:
            ValueError: ``level`` has no rank (``len(ranks) != len(fl.budgets)``).
        """
        rank = rank_for_level(self.config.ranks, level, self.name)
        return rank, self.lora_alpha(rank, float(self.config.alpha))

    def global_lora(self, model_rank: int, model_alpha: float) -> tuple[int, float]:
        """``(max(ranks), alpha)``: the global adapters hold the largest client's rank."""
        rank = global_rank(self.config.ranks)
        return rank, self.lora_alpha(rank, float(self.config.alpha))

    def client_adapters(self, global_adapters: dict[str, torch.Tensor], rank: int,
                        seed: int) -> dict[str, torch.Tensor]:
        """The global adapters truncated to ``rank`` in the effective space.

        ``A_c = A[..., :r, :]`` and ``B_c = B[..., :r] * s_g / s_r`` (:meth:`scale`;
        the factor is 1 under the rank-independent scale, so B is not rescaled), so ``s_r B_c A_c`` is exactly the first ``r`` rank-one
        components of the global update ``s_g B A`` (DESIGN.md section 5: ranks differ,
        so the effective space ``s B A`` is what is shared). For FlexLoRA's global SVD
        factors this is its redistribution ``A = V_r^T, B = U_r diag(S_r) / s_r``.

        Raises:
            ValueError: ``rank`` is above the global rank or below 1.
        """
        pairs, _ = lora_pairs(list(global_adapters))
        out = dict(global_adapters)
        for pair in pairs:
            r_g = pair_rank(global_adapters, pair)
            A, B = map_experts(lambda a, b: truncate_lora(a, b, rank),
                               global_adapters[pair.a], global_adapters[pair.b])
            ratio = self.scale(r_g) / self.scale(rank)
            out[pair.a], out[pair.b] = A, (B if ratio == 1.0 else B * ratio)
        return out

    def _others(self, global_adapters: dict[str, torch.Tensor],
                updates: Sequence[ClientUpdate]) -> tuple[list[LoRAPair], dict[str, torch.Tensor]]:
        """The LoRA pairs of the adapters and the FedAvg of every non-LoRA tensor.

        Raises:
            ValueError: no updates.
        """
        if not updates:
            raise ValueError("aggregate: no client updates")
        pairs, others = lora_pairs(list(global_adapters))
        return pairs, (fedavg(updates, others) if others else {})
