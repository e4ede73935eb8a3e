"""Suites ``server_memory`` and ``federated``: the server's memory, traffic and overhead.

``server_memory`` (issue 5, item 5): peak resident memory of aggregating 8 versus 32
client updates at OLMoE-1B-7B adapter sizes (rank 20 LoRA on the gate_up and down
projections of all 64 experts in 16 layers, q/k/v/o attention LoRA and phi: 580 MiB
per update in float32). The server folds each reply into the method's running
aggregator as it arrives and drops it (:class:`ubsmoe.fl.fold.OrderedFold`), so
the figure must not grow with the client count (target: at most 1.25x from 8 to 32).
Each count runs in a fresh subprocess (``python -m ubsmoe.bench.memory_child N``)
whose peak RSS (``ru_maxrss``) is the measure; replies are synthesised there one at a
time, as they would arrive.

``federated`` (items 6 and 7): a federated run through Flower's simulation (the
embedded default, or a small one with ``--quick``), reporting per round the share of
wall time spent neither in client work nor in aggregation (the Flower overhead;
target at most 15%), and per client the tensor bytes received and sent. Beside it,
at library level, the upload of one client round per K_c for a method without PG
(naive SMoE), dense versus sparse (only the expert rows the client changed).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ubsmoe.bench.harness import BenchOptions, register_suite
from ubsmoe.config import load_config
from ubsmoe.fl.client_runtime import ClientRuntime, shared_setup
from ubsmoe.fl.fold import OrderedFold
from ubsmoe.fl.payload import payload_nbytes, sparse_upload
from ubsmoe.io import read_jsonl
from ubsmoe.methods import ClientUpdate, get_method_class
from ubsmoe.models import adapter_state

# OLMoE-1B-7B: hidden, expert intermediate, experts, layers; the paper's SMoE LoRA rank.
OLMOE_ADAPTERS = {"hidden": 2048, "expert_intermediate": 1024, "experts": 64, "layers": 16, "rank": 20}
QUICK_ADAPTERS = {"hidden": 64, "expert_intermediate": 32, "experts": 8, "layers": 2, "rank": 4}


def adapter_shapes(hidden: int, expert_intermediate: int, experts: int, layers: int,
                   rank: int) -> dict[str, tuple[int, ...]]:
    """Adapter tensor names -> shapes of a patched OLMoE model (PEFT / SMoELayer naming).

    Per layer: q/k/v/o LoRA A ``[r, H]`` / B ``[H, r]``; expert LoRA gate_up A
    ``[E, r, H]``, B ``[E, 2I, r]``, down A ``[E, r, I]``, B ``[E, H, r]``; phi ``[E]``.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(layers):
        attn = f"base_model.model.model.layers.{layer}.self_attn"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{attn}.{proj}.lora_A.default.weight"] = (rank, hidden)
            shapes[f"{attn}.{proj}.lora_B.default.weight"] = (hidden, rank)
        mlp = f"base_model.model.model.layers.{layer}.mlp"
        shapes[f"{mlp}.gate_up_lora.A"] = (experts, rank, hidden)
        shapes[f"{mlp}.gate_up_lora.B"] = (experts, 2 * expert_intermediate, rank)
        shapes[f"{mlp}.down_lora.A"] = (experts, rank, expert_intermediate)
        shapes[f"{mlp}.down_lora.B"] = (experts, hidden, rank)
        shapes[f"{mlp}.phi"] = (experts,)
    return shapes


def aggregate_synthetic(num_clients: int, sizes: dict[str, int], method: str = "ubsmoe",
                        seed: int = 0) -> dict[str, Any]:
    """Fold ``num_clients`` synthetic replies into ``method``'s aggregator, one at a time.

    Meant to run alone in a process whose peak RSS is then the measurement.

    Returns:
        ``num_clients``, ``peak_rss_mib`` (this process, MiB), ``adapter_mib`` (one
        update), ``max_buffered_replies`` and ``aggregate_s`` (folding, seconds).
    """
    torch.manual_seed(seed)
    shapes = adapter_shapes(**sizes)
    sent = {k: torch.randn(s) * 0.01 for k, s in shapes.items()}
    fold = OrderedFold(get_method_class(method)().aggregator(sent), list(range(num_clients)))
    gen = torch.Generator().manual_seed(seed + 1)
    layers, experts = sizes["layers"], sizes["experts"]
    fold_s = 0.0
    for c in range(num_clients):
        # A reply as it would arrive: fresh tensors, dropped once folded.
        adapters = {k: v * (1.0 + 1e-3 * (c + 1)) for k, v in sent.items()}
        counts = torch.randint(0, 50, (layers, experts), generator=gen).to(torch.float64)
        update = ClientUpdate(client_id=c, num_examples=100 + c, adapters=adapters,
                              expert_counts=counts, token_counts=counts.sum(-1) / 8, top_k=8, loss=0.0)
        del adapters
        start = time.perf_counter()
        fold.add(update)
        fold_s += time.perf_counter() - start
        del update
    start = time.perf_counter()
    result = fold.result()
    fold_s += time.perf_counter() - start
    return {
        "num_clients": num_clients,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "adapter_mib": sum(t.numel() * t.element_size() for t in result.values()) / 2**20,
        "max_buffered_replies": fold.max_buffered,
        "aggregate_s": fold_s,
    }


@register_suite("server_memory")
def server_memory_suite(options: BenchOptions) -> dict[str, Any]:
    """Peak RSS of aggregating 8 vs 32 updates (2 vs 8 in quick mode), one subprocess each."""
    sizes = QUICK_ADAPTERS if options.quick else OLMOE_ADAPTERS
    counts = [2, 8] if options.quick else [8, 32]
    runs = []
    for n in counts:
        proc = subprocess.run(
            [sys.executable, "-m", "ubsmoe.bench.memory_child", str(n), json.dumps(sizes),
             str(options.seed)],
            capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    growth = runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    return {
        "description": "peak RSS of a fresh process folding N client updates into the ubsmoe "
                       "aggregator (FedAvg + counts), replies synthesised one at a time",
        "method": "ubsmoe",
        "adapter_sizes": sizes,
        "measure": "ru_maxrss of the subprocess, MiB (includes Python, torch and the sent adapters)",
        "runs": runs,
        "summary": {f"peak_rss_growth_{counts[1]}_vs_{counts[0]}": growth,
                    "target_growth_at_most": 1.25,
                    "adapter_mib_per_update": runs[0]["adapter_mib"]},
    }


def _upload_sizes(cfg, top_ks: list[int]) -> dict[str, Any]:
    """Dense vs sparse upload of client 0's first round at each K_c (library level)."""
    runtime = ClientRuntime(cfg, shared_setup(cfg))
    sent = adapter_state(runtime.model)
    out = {}
    for k in top_ks:
        update = runtime.train_round(0, 1, k, sent)
        dense = payload_nbytes(update.adapters)
        sparse = payload_nbytes(sparse_upload(update.adapters, sent))
        out[f"k{k}"] = {"dense_bytes": dense, "sparse_bytes": sparse, "sparse_over_dense": sparse / dense}
    return out


@register_suite("federated")
def federated_suite(options: BenchOptions) -> dict[str, Any]:
    """Flower overhead share and bytes per client per round of a simulated run."""
    # Flower: absent on the GPU machine, where gpu_check imports this package without running this suite
    from ubsmoe.fl.simulation import run_federated
    quick = ["fl.rounds=1", "data.train_examples=160", "data.max_length=96", "fl.num_clients=4",
             "train.max_local_steps=2", "train.batch_size=8", "eval.examples_per_task=2",
             "eval.max_new_tokens=2", "data.tasks=[boolq,ARC-Easy]", "eval.pg_probe_examples=2"]
    overrides = [*quick] if options.quick else []
    cfg = load_config(overrides=overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run_federated(cfg, Path(tmp) / "run")
        records = read_jsonl(Path(tmp) / "run" / "metrics.jsonl")
    rounds = []
    for rec in (r for r in records if r["type"] == "train"):
        rounds.append({
            "round": rec["round"],
            "round_wall_s": rec["round_wall_s"],
            "overhead_s": rec["overhead_s"],
            "overhead_share": rec["overhead_share"],
            "aggregate_s": rec["aggregate_s"],
            "clients": [{"id": c["id"], "top_k": c["top_k"], "train_s": c["train_s"],
                         "setup_s": c.get("setup_s"), "bytes_down": c["bytes_down"],
                         "bytes_up": c["bytes_up"]} for c in rec["clients"]],
        })
    smoe_cfg = load_config(overrides=[*overrides, "method=smoe"])
    uploads = _upload_sizes(smoe_cfg, [1, 8] if options.quick else [1, 2, 4, 8])
    shares = [r["overhead_share"] for r in rounds]
    return {
        "description": "a Flower simulation of the embedded default run (quick: a small one): "
                       "per round the share of wall time outside client work (setup + local "
                       "training) and aggregation, and tensor bytes per client; plus naive "
                       "SMoE's dense vs sparse upload for one client round per K_c",
        "config_overrides": overrides,
        "method": cfg.method,
        "rounds": rounds,
        "smoe_upload_per_k": uploads,
        "summary": {
            "overhead_share_per_round": shares,
            "overhead_share_max": max(shares),
            "overhead_share_after_round_1_max": max(shares[1:]) if len(shares) > 1 else None,
            "target_overhead_share_at_most": 0.15,
            "bytes_down_per_client_round": rounds[0]["clients"][0]["bytes_down"],
            "bytes_up_per_client_round_mean": sum(c["bytes_up"] for r in rounds for c in r["clients"])
            / sum(len(r["clients"]) for r in rounds),
            "smoe_sparse_over_dense_upload": {k: v["sparse_over_dense"] for k, v in uploads.items()},
        },
    }
