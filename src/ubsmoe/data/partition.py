"""Spread training records over clients.

Non-IID partitioning is the label-Dirichlet scheme of Hsu et al., "Measuring the
Effects of Non-Identical Data Distribution for Federated Visual Classification"
(arXiv 1909.06335), applied to the task label, through Flower Datasets'
``DirichletPartitioner`` (https://flower.ai/docs/datasets/). Budget levels follow
UB-SMoE (ICML 2026, arXiv 2605.16690), DESIGN.md sections 2 and 6; which client gets
which level is :func:`ubsmoe.budgets.assign_budgets`, the budget -> K_c rule
:func:`ubsmoe.budgets.top_k_for_budget`.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import numpy as np

from ubsmoe.budgets import stable_seed
from ubsmoe.config import PARTITIONS
from ubsmoe.errors import ConfigError
from ubsmoe.io import atomic_write_json


def cached_partition_clients(labels: list[str], num_clients: int, partition: str, dirichlet_alpha: float,
                             seed: int, cache: Path | None) -> list[list[int]]:
    """:func:`partition_clients`, read from (or written to) a JSON file under ``cache/partitions``.

    Partitioning imports Flower Datasets, which imports ``datasets``, pandas, scipy and
    seaborn: about 2 CPU seconds of a deployed ClientApp's start, paid again by every
    ClientApp process (one per message). The partition is a pure function of its
    arguments, so it is cached by a SHA-256 of them and the installed
    ``flwr-datasets`` version (another version may partition differently); a cached
    file that does not hold a partition of ``0..len(labels)-1`` into ``num_clients``
    non-empty parts is recomputed.

    Args:
        labels, num_clients, partition, dirichlet_alpha, seed: as :func:`partition_clients`.
        cache: folder of the cache (``model.tokenizer_cache`` / ``$UBSMOE_CACHE`` /
            ``~/.cache/ubsmoe``); None: no cache.

    Raises:
        ConfigError: as :func:`partition_clients`.
    """
    if cache is None:
        return partition_clients(labels, num_clients, partition, dirichlet_alpha, seed)
    try:
        version = metadata.version("flwr-datasets")
    except metadata.PackageNotFoundError:  # pragma: no cover - a dependency
        version = "?"
    key = json.dumps([[str(x) for x in labels], num_clients, partition, float(dirichlet_alpha), seed, version])
    path = Path(cache) / "partitions" / (hashlib.sha256(key.encode("utf-8")).hexdigest()[:24] + ".json")
    try:
        clients = json.loads(path.read_text(encoding="utf-8"))
        flat = sorted(i for c in clients for i in c)
        if len(clients) == num_clients and all(clients) and flat == list(range(len(labels))):
            return clients
    except (OSError, ValueError, TypeError):
        pass  # missing or unreadable: compute it
    clients = partition_clients(labels, num_clients, partition, dirichlet_alpha, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, clients)
    except OSError:
        pass  # a read-only cache only costs the next process the computation
    return clients


def partition_clients(
    labels: list[str],
    num_clients: int,
    partition: str,
    dirichlet_alpha: float,
    seed: int,
) -> list[list[int]]:
    """Split record indices ``0..len(labels)-1`` over ``num_clients`` clients.

    ``iid``: the records are shuffled (seeded) and cut into equal contiguous shards
    (Flower Datasets ``IidPartitioner``). ``dirichlet``: for each task label a
    Dirichlet(alpha) draw over clients gives the share of that task's records each
    client receives (``DirichletPartitioner``, ``min_partition_size=0`` so it never
    resamples and always terminates, ``self_balancing=False``). Smaller alpha means
    more skew. A client left empty by the draw then receives one record from the
    currently largest client (seeded choice), so every client has data.

    Args:
        labels: task label of every record, ``[num_records]``.
        num_clients: number of clients (``fl.num_clients``).
        partition: ``"iid"`` or ``"dirichlet"`` (``data.partition``).
        dirichlet_alpha: Dirichlet concentration (``data.dirichlet_alpha``), > 0.
        seed: seed; the same inputs give the same partition.

    Returns:
        For each client id, the sorted record indices it holds; every index appears
        in exactly one client and no client is empty.

    Raises:
        ConfigError: ``num_clients < 1``, fewer records than clients, an unknown
            ``partition``, or ``dirichlet_alpha <= 0`` (one line naming the field).
    """
    # lazy: datasets is heavy and only needed when data is read
    from datasets import Dataset

    # lazy: flwr_datasets imports datasets (heavy); only the partitioner needs it
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    n = len(labels)
    if num_clients < 1:
        raise ConfigError(f"fl.num_clients: got {num_clients}, expected an integer >= 1")
    if n < num_clients:
        raise ConfigError(
            f"fl.num_clients: {num_clients} clients but only {n} training records; "
            "lower fl.num_clients or raise data.train_examples"
        )
    if partition not in PARTITIONS:
        raise ConfigError(f"data.partition: got {partition!r}, expected one of {', '.join(PARTITIONS)}")
    if not dirichlet_alpha > 0:
        raise ConfigError(f"data.dirichlet_alpha: got {dirichlet_alpha}, expected a number > 0")

    dataset = Dataset.from_dict({"task": [str(x) for x in labels], "idx": list(range(n))})
    if partition == "iid":
        # IidPartitioner shards contiguously; shuffle first or shards follow task order.
        partitioner = IidPartitioner(num_partitions=num_clients)
        partitioner.dataset = dataset.shuffle(seed=stable_seed(seed, "iid"))
    else:
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="task",
            alpha=float(dirichlet_alpha),
            min_partition_size=0,
            self_balancing=False,
            shuffle=False,
            seed=stable_seed(seed, "dirichlet"),
        )
        partitioner.dataset = dataset
    clients = [sorted(partitioner.load_partition(c)["idx"]) for c in range(num_clients)]

    rng = np.random.default_rng(stable_seed(seed, "fill-empty"))
    for c in range(num_clients):
        if not clients[c]:
            donor = max(range(num_clients), key=lambda d: len(clients[d]))
            moved = clients[donor].pop(int(rng.integers(len(clients[donor]))))
            clients[c] = [moved]
    return clients


def partition_labels(records: list[dict], partition_field: str, default_by: str = "task"
                     ) -> tuple[list[str], str]:
    """The label of every training record that the client partition is drawn over.

    Args:
        records: the pooled training records (each with ``"task"``).
        partition_field: a record field (``data.partition_field``, e.g. a category);
            empty: the task.
        default_by: what to use without ``partition_field``: ``task``, or ``iid``
            when the records carry no task (the loader's ``partition_by``).

    Returns:
        ``(labels [num_records], by)``: ``by`` is ``partition_field``, ``task`` or
        ``iid`` (then every label is ``""`` and the partition must be IID).

    Raises:
        ValueError: a record lacks ``partition_field`` (names the field and the count).
    """
    if partition_field:
        missing = sum(r.get(partition_field) in (None, "") for r in records)
        if missing:
            raise ValueError(f"data.partition_field: {partition_field!r} is missing from {missing} of "
                             f"{len(records)} training records")
        return [str(r[partition_field]) for r in records], partition_field
    if default_by == "iid":
        return [""] * len(records), "iid"
    return [str(r["task"]) for r in records], "task"
