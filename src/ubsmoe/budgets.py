"""What a SuperNode declares about itself, and the budget level it maps to (no Flower).

In a deployment each SuperNode is started with ``--node-config`` (Flower's
space-separated ``key=value`` pairs, values typed by TOML rules). ubsmoe reads:

- ``partition-id=K``: the node trains client K's partition of the run's data; or
  ``data-path=/path``: the node trains on its own data file/folder (its client id
  is then assigned by the server: the lowest id no partition-holding node took,
  nodes in node-id order);
- ``device=auto|cpu|cuda|cuda:N``: where the node trains (default: the run's
  ``model.device``);
- at most one budget declaration (none: the run's ``fl.budget_pattern`` decides):
  ``budget=B`` (one of the run's ``fl.budgets``), ``budget=auto`` (the node picks
  its level from its measured step times and memory, :mod:`ubsmoe.fl.autobudget`), ``top-k=K`` (the level whose
  training K_j equals K; only for a run whose levels differ in K) or
  ``lora-rank=R`` (the level whose rank in ``<method>.ranks`` is R; only for the
  heterogeneous-rank methods);
- ``memory-gib=M``: the memory a ``budget=auto`` node may use, in GiB (default: the
  device's free memory).

``num-partitions`` (set by Flower's simulation) is accepted and ignored. Every error
is one line naming the node, the key and the allowed values.

The budget rules themselves live here too (pure functions, no data or torch):

- which client gets which level: :func:`assign_budgets` (``fl.budget_pattern``);
- the experts a level activates: :func:`top_k_for_budget` (K_c from beta_c);
- the LoRA rank of a level for the heterogeneous-rank methods: :func:`rank_for_level`
  (r_j = ``<method>.ranks[j]``, :data:`DEFAULT_RANKS` by default),
  :func:`check_ranks_per_level` (one rank per level) and :func:`global_rank`
  (the server's adapters hold ``max(ranks)``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ubsmoe.errors import ConfigError, DeclarationError

BUDGET_KEYS = ("budget", "top-k", "lora-rank")
# How clients spread over the budget levels (``fl.budget_pattern``, :func:`assign_budgets`).
# ``auto``: every client starts at the lowest level and chooses its own (ubsmoe.fl.autobudget);
# ``top``: every client at the highest level (the fleet comparison's "no budgets" arm).
BUDGET_PATTERNS = ("uniform", "long_tail", "reverse_long_tail", "auto", "top")
LONG_TAIL_SHARE = 0.75  # share of clients at the tail level in (reverse) long-tail patterns
# LoRA ranks of budget levels beta_1..beta_4 in the LoRA-rank baselines (DESIGN.md section 6).
DEFAULT_RANKS = (12, 16, 24, 40)
NODE_KEYS = ("partition-id", "data-path", "device", *BUDGET_KEYS, "memory-gib", "num-partitions")


@dataclass(frozen=True)
class NodeDeclaration:
    """A node's parsed ``--node-config``.

    Attributes:
        partition_id: client id whose partition of the run's data the node holds, or None.
        data_path: the node's own data (a path on the node), or None.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; None: the run's ``model.device``.
        budget: declared budget level beta (``budget=``), or None.
        top_k: declared experts per token (``top-k=``), or None.
        lora_rank: declared LoRA rank (``lora-rank=``), or None.
        auto_budget: True for ``budget=auto`` (the node chooses its own level).
        memory_gib: the memory cap a ``budget=auto`` node declared (``memory-gib=``), or None.
    """

    partition_id: int | None = None
    data_path: str | None = None
    device: str | None = None
    budget: float | None = None
    top_k: int | None = None
    lora_rank: int | None = None
    auto_budget: bool = False
    memory_gib: float | None = None

    @property
    def budget_key(self) -> str | None:
        """The budget key the node declared (``budget``, ``top-k``, ``lora-rank``) or None."""
        if self.auto_budget:
            return "budget"
        for key, value in zip(BUDGET_KEYS, (self.budget, self.top_k, self.lora_rank)):
            if value is not None:
                return key
        return None

    @property
    def budget_value(self) -> float | int | None:
        """The declared budget value (as written; ``"auto"`` for ``budget=auto``), or None."""
        if self.auto_budget:
            return "auto"
        return next((v for v in (self.budget, self.top_k, self.lora_rank) if v is not None), None)

    def to_dict(self) -> dict[str, Any]:
        """The declaration without its None (and False) fields (for a Flower ConfigRecord or JSON)."""
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NodeDeclaration:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        fields = ("partition_id", "data_path", "device", "budget", "top_k", "lora_rank", "auto_budget",
                  "memory_gib")
        return cls(**{k: d[k] for k in fields if k in d})


def _int(node: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str)
                                                                   and value.strip().isdigit())):
        raise DeclarationError(f"node {node}: {key}={value!r} is not an integer >= {minimum}")
    n = int(value)
    if n < minimum:
        raise DeclarationError(f"node {node}: {key}={n} is not an integer >= {minimum}")
    return n


def top_k_for_budget(beta: float, k_max: int, k_min: int = 1) -> int:
    """Activated experts per token for budget ``beta``.

    K_c = clamp(floor(K_max * beta), K_min, K_max), with a 1e-9 tolerance inside the
    floor so that e.g. 0.125 * 8 gives exactly 1 despite float rounding
    (UB-SMoE, arXiv 2605.16690; DESIGN.md section 2).

    Args:
        beta: the client's budget level (``fl.budgets`` entry), in (0, 1].
        k_max: the model's native top-k (OLMoE-1B-7B: 8).
        k_min: the smallest allowed K, 1 <= k_min <= k_max.

    Returns:
        K_c, an integer in [k_min, k_max].

    Raises:
        ValueError: ``beta`` outside (0, 1] (names ``fl.budgets``) or ``k_max < 1``.
        ConfigError: ``k_min`` outside [1, k_max] (names ``model.k_min``).
    """
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"fl.budgets: got level {beta!r}, expected a number in (0, 1]")
    if k_max < 1:
        raise ValueError(f"k_max: got {k_max}, expected an integer >= 1")
    if not 1 <= k_min <= k_max:
        raise ConfigError(f"model.k_min: got {k_min}, expected an integer in [1, {k_max}] "
                          f"(the model's native top-k K_max={k_max})")
    return max(k_min, min(k_max, math.floor(k_max * beta + 1e-9)))


def check_ranks_per_level(ranks: Sequence[int], budgets: Sequence[float], section: str) -> None:
    """Check that a rank method gives one LoRA rank per budget level (DESIGN.md section 6).

    Args:
        ranks: ``<section>.ranks``, r_j per level.
        budgets: the run's ``fl.budgets``.
        section: the method's config section, for the message.

    Raises:
        ConfigError: ``len(ranks) != len(budgets)``.
    """
    if len(ranks) != len(budgets):
        raise ConfigError(
            f"{section}.ranks: got {ranks!r} ({len(ranks)} ranks), expected one "
            f"rank per fl.budgets level ({len(budgets)}: {budgets!r})"
        )


def rank_for_level(ranks: Sequence[int], level: int, section: str) -> int:
    """LoRA rank r_j of budget level ``level`` (0-based) for a heterogeneous-rank method.

    Args:
        ranks: ``<section>.ranks``, one rank per ``fl.budgets`` level.
        level: the client's 0-based budget level j.
        section: the method's config section, for the message.

    Returns:
        ``int(ranks[level])``.

    Raises:
        ValueError: ``level`` has no rank (``len(ranks) != len(fl.budgets)``).
    """
    if not 0 <= level < len(ranks):
        raise ValueError(f"budget level {level}: {section}.ranks has {len(ranks)} "
                         "entries, one per fl.budgets level")
    return int(ranks[level])


def global_rank(ranks: Sequence[int]) -> int:
    """The rank of the server's global adapters: ``max(ranks)``, the largest client's rank."""
    return max(ranks)


def stable_seed(*keys: object) -> int:
    """A 32-bit seed from ``keys`` via SHA-256 (stable across processes, any int seed)."""
    digest = hashlib.sha256("/".join(str(k) for k in keys).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little")


def _spread(levels: list[float], count: int) -> list[float]:
    """``count`` clients over ``levels``: round-robin when there are enough clients,
    otherwise evenly spaced levels including both ends."""
    m = len(levels)
    if count <= 0 or m == 0:
        return []
    if count >= m:
        return [levels[j % m] for j in range(count)]
    if count == 1:
        return [levels[-1]]
    return [levels[math.floor(j * (m - 1) / (count - 1) + 0.5)] for j in range(count)]


def assign_budgets(num_clients: int, budgets: list[float], pattern: str, seed: int) -> list[float]:
    """The budget level beta_c of every client.

    ``uniform``: the levels round-robin, so each gets ``num_clients / len(budgets)``
    clients (lower levels take the remainder). ``long_tail``: ``round(0.75 *
    num_clients)`` (half up) clients at the lowest level, the rest spread over the
    other levels. ``reverse_long_tail``: the same at the highest level. "Spread"
    is round-robin when there are at least as many remaining clients as other
    levels, else evenly spaced levels including both ends (8 clients, 4 levels,
    long_tail: 6 x beta_1, 1 x beta_2, 1 x beta_4). The resulting multiset is then
    assigned to client ids by a seeded permutation. ``auto``: every client starts at
    the lowest level (it reports the level it chose with its first reply,
    :mod:`ubsmoe.fl.autobudget`). ``top``: every client at the highest level.

    Args:
        num_clients: number of clients (``fl.num_clients``), >= 1.
        budgets: the levels beta_1 < ... < beta_n (``fl.budgets``), each in (0, 1].
        pattern: ``uniform``, ``long_tail``, ``reverse_long_tail``, ``auto`` or ``top``
            (``fl.budget_pattern``).
        seed: seed of the client-order permutation.

    Returns:
        ``[num_clients]`` budget levels, index = client id.

    Raises:
        ValueError: unknown ``pattern`` (names ``fl.budget_pattern``), empty
            ``budgets`` or ``num_clients < 1``.
    """
    if pattern not in BUDGET_PATTERNS:
        raise ValueError(
            f"fl.budget_pattern: got {pattern!r}, expected one of {', '.join(BUDGET_PATTERNS)}"
        )
    if not budgets:
        raise ValueError("fl.budgets: got an empty list, expected at least one level in (0, 1]")
    if num_clients < 1:
        raise ValueError(f"fl.num_clients: got {num_clients}, expected an integer >= 1")
    levels = sorted(float(b) for b in budgets)
    if pattern == "auto":  # each client chooses its level after its first round
        return [levels[0]] * num_clients
    if pattern == "top":
        return [levels[-1]] * num_clients
    if pattern == "uniform" or len(levels) == 1:
        assigned = [levels[c % len(levels)] for c in range(num_clients)]
    else:
        n_tail = min(num_clients, math.floor(LONG_TAIL_SHARE * num_clients + 0.5))
        if pattern == "long_tail":
            assigned = [levels[0]] * n_tail + _spread(levels[1:], num_clients - n_tail)
        else:
            # reverse: the rest favour the far (lowest) end first, mirroring long_tail
            rest = _spread(levels[-2::-1], num_clients - n_tail)
            assigned = [levels[-1]] * n_tail + rest
    # lazy: numpy (~0.1 s) is needed only for the permutation; `import ubsmoe.config` stays light
    import numpy as np

    order = np.random.default_rng(stable_seed(seed, "budgets")).permutation(num_clients)
    return [assigned[i] for i in order]


DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


def valid_device_name(name: str) -> bool:
    """True for ``auto``, ``cpu``, ``cuda`` and ``cuda:N`` (N a non-negative integer).

    The one device-name rule of ``model.device``, a node's ``device=`` declaration and
    :func:`ubsmoe.models.devices.resolve_device` (which also checks the visible devices).
    """
    if name in ("auto", "cpu", "cuda"):
        return True
    head, sep, index = name.partition(":")
    return head == "cuda" and bool(sep) and index.isdigit()


def parse_node_config(node_config: Mapping[str, Any], node: int | str = "?") -> NodeDeclaration:
    """Parse and check a SuperNode's node config (values as Flower parsed them).

    Args:
        node_config: ``Context.node_config`` (str/int/float/bool values).
        node: how the node is named in errors (its node id, or a label).

    Returns:
        The declaration.

    Raises:
        DeclarationError: an unknown key (the allowed keys are listed), neither or
            both of ``partition-id`` / ``data-path``, more than one budget key, a
            ``budget`` outside (0, 1], a ``top-k`` / ``lora-rank`` / ``partition-id``
            that is not a positive (non-negative for the partition) integer, or an
            unknown device.
    """
    unknown = sorted(k for k in node_config if k not in NODE_KEYS)
    if unknown:
        raise DeclarationError(f"node {node}: unknown node-config key {unknown[0]!r}; "
                               f"allowed: {', '.join(NODE_KEYS[:-1])}")
    has_pid, has_path = "partition-id" in node_config, "data-path" in node_config
    if has_pid == has_path:
        raise DeclarationError(f"node {node}: declare exactly one of partition-id=K or data-path=/path "
                               f"(got {'both' if has_pid else 'neither'})")
    declared = [k for k in BUDGET_KEYS if k in node_config]
    if len(declared) > 1:
        raise DeclarationError(f"node {node}: declares {' and '.join(declared)}; "
                               "declare at most one of budget=, top-k=, lora-rank=")
    pid = _int(node, "partition-id", node_config["partition-id"], 0) if has_pid else None
    path = None
    if has_path:
        path = str(node_config["data-path"]).strip()
        if not path:
            raise DeclarationError(f"node {node}: data-path is empty; expected a path on the node")
    device = None
    if "device" in node_config:
        device = str(node_config["device"]).strip()
        if not valid_device_name(device):
            raise DeclarationError(f"node {node}: device={device!r} is not one of auto, cpu, cuda, cuda:N")
    budget = top_k = lora_rank = memory = None
    auto = "budget" in node_config and str(node_config["budget"]).strip() == "auto"
    if "memory-gib" in node_config:
        value = node_config["memory-gib"]
        try:
            memory = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            memory = math.nan
        if not memory > 0 or math.isinf(memory):
            raise DeclarationError(f"node {node}: memory-gib={value!r} is not a number of GiB > 0")
        if not auto:
            raise DeclarationError(f"node {node}: memory-gib= is used only with budget=auto")
    if "budget" in node_config and not auto:
        value = node_config["budget"]
        try:
            budget = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            budget = math.nan
        if not 0.0 < budget <= 1.0:  # also false for NaN
            raise DeclarationError(f"node {node}: budget={value!r} is not a number in (0, 1] or auto")
    if "top-k" in node_config:
        top_k = _int(node, "top-k", node_config["top-k"], 1)
    if "lora-rank" in node_config:
        lora_rank = _int(node, "lora-rank", node_config["lora-rank"], 1)
    return NodeDeclaration(partition_id=pid, data_path=path, device=device, budget=budget,
                           top_k=top_k, lora_rank=lora_rank, auto_budget=auto, memory_gib=memory)


def _fmt(values: Sequence[Any]) -> str:
    return "[" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + "]"


def declared_level(decl: NodeDeclaration, node: int | str, method: str, budgets: Sequence[float],
                   level_top_k: Sequence[int], ranks: Sequence[int] | None) -> int | None:
    """The 0-based ``fl.budgets`` level a node's budget declaration selects.

    Args:
        decl: the node's declaration.
        node: how the node is named in errors.
        method: the run's method name (for messages).
        budgets: the run's ``fl.budgets`` (strictly increasing).
        level_top_k: the K a client of each level trains at (``len(budgets)`` ints;
            all equal when the run's levels do not differ in K, e.g. FedIT or a rank
            method at ``train.top_k=native``).
        ranks: the method's per-level LoRA ranks (``<method>.ranks``), or None for a
            method whose levels are K budgets (no per-level rank).

    Returns:
        The level index, or None when the node declared no budget or ``budget=auto``
        (the server starts it at the lowest level).

    Raises:
        DeclarationError: ``budget`` not in ``budgets``; ``top-k`` on a run whose levels
            all train at one K, or matching no level or several; ``lora-rank`` on a
            method without per-level ranks, not in ``ranks``, or matching several levels.
    """
    if decl.budget is not None:
        for j, beta in enumerate(budgets):
            if math.isclose(decl.budget, beta, rel_tol=1e-9, abs_tol=1e-12):
                return j
        raise DeclarationError(f"node {node}: budget={decl.budget:g} is not one of fl.budgets {_fmt(budgets)}")
    if decl.top_k is not None:
        if len(set(level_top_k)) <= 1:
            raise DeclarationError(
                f"node {node}: top-k={decl.top_k} cannot be used by method {method} (every level trains at "
                f"K={level_top_k[0] if level_top_k else '?'}); use budget="
                + (" or lora-rank=" if ranks is not None else ""))
        hits = [j for j, k in enumerate(level_top_k) if k == decl.top_k]
        if not hits:
            raise DeclarationError(f"node {node}: top-k={decl.top_k} is not the K of any fl.budgets level "
                                   f"(K per level: {_fmt(list(level_top_k))})")
        if len(hits) > 1:
            raise DeclarationError(f"node {node}: top-k={decl.top_k} is the K of several levels "
                                   f"{_fmt([budgets[j] for j in hits])}; use budget=")
        return hits[0]
    if decl.lora_rank is not None:
        if ranks is None:
            raise DeclarationError(f"node {node}: lora-rank={decl.lora_rank} cannot be used by method "
                                   f"{method} (K budgets); use budget= or top-k=")
        hits = [j for j, r in enumerate(ranks) if r == decl.lora_rank]
        if not hits:
            raise DeclarationError(f"node {node}: lora-rank={decl.lora_rank} is not one of "
                                   f"{method}.ranks {_fmt(list(ranks))}")
        if len(hits) > 1:
            raise DeclarationError(f"node {node}: lora-rank={decl.lora_rank} is the rank of several levels "
                                   f"{_fmt([budgets[j] for j in hits])}; use budget=")
        return hits[0]
    return None


def assign_clients(declarations: Mapping[int, NodeDeclaration], num_clients: int) -> dict[int, int]:
    """Client id of every node: its ``partition-id``, else the lowest free id.

    Args:
        declarations: node id -> declaration, for every connected node.
        num_clients: the run's ``fl.num_clients``.

    Returns:
        client id -> node id for clients ``0..num_clients-1`` (nodes left over, once
        every client has a node, are not used).

    Raises:
        DeclarationError: a partition id outside ``[0, num_clients)``, two nodes with
            one partition id, or fewer usable nodes than clients.
    """
    mapping: dict[int, int] = {}
    for node in sorted(declarations):
        pid = declarations[node].partition_id
        if pid is None:
            continue
        if pid >= num_clients:
            raise DeclarationError(f"node {node}: partition-id={pid} is not in 0..{num_clients - 1} "
                                   f"(fl.num_clients={num_clients})")
        if pid in mapping:
            raise DeclarationError(f"node {node}: partition-id={pid} is also held by node {mapping[pid]}")
        mapping[pid] = node
    free = iter(c for c in range(num_clients) if c not in mapping)
    for node in sorted(declarations):
        if declarations[node].partition_id is None:
            client = next(free, None)
            if client is None:
                break
            mapping[client] = node
    missing = [c for c in range(num_clients) if c not in mapping]
    if missing:
        raise DeclarationError(f"fl.num_clients={num_clients} but no node holds clients {missing} "
                               f"({len(declarations)} nodes connected)")
    return dict(sorted(mapping.items()))
