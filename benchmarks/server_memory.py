"""Server memory of aggregating 8 versus 32 client updates at OLMoE-1B-7B adapter sizes.

Issue 5, item 5: the server folds each reply into a running accumulator as it
arrives and drops it (:class:`ubsmoe.fl.server.OrderedFold` around the method's
:class:`~ubsmoe.methods.base.Aggregator`), so its memory must not grow with the
number of clients. Each measurement runs in a fresh subprocess and reports that
process's peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``,
KiB on Linux): the adapters sent, the accumulator, one reply at a time and the
result. Client updates are synthesised in the subprocess one at a time (random
tensors of the real shapes: rank 20 LoRA on all 64 experts of 16 layers, gate_up and
down, plus q/k/v/o attention LoRA and phi), as replies would arrive.

Usage: ``python benchmarks/server_memory.py [--out FILE] [--clients 8 32] [--method ubsmoe]``.
Writes a JSON report; the growth ratio peak(32) / peak(8) must be <= 1.25.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, EXPERT_INTER, EXPERTS, LAYERS, RANK = 2048, 1024, 64, 16, 20


def adapter_shapes() -> dict[str, tuple[int, ...]]:
    """OLMoE-1B-7B adapter tensor names -> shapes (PEFT/SMoELayer naming)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(LAYERS):
        attn = f"base_model.model.model.layers.{layer}.self_attn"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{attn}.{proj}.lora_A.default.weight"] = (RANK, HIDDEN)
            shapes[f"{attn}.{proj}.lora_B.default.weight"] = (HIDDEN, RANK)
        mlp = f"base_model.model.model.layers.{layer}.mlp"
        shapes[f"{mlp}.gate_up_lora.A"] = (EXPERTS, RANK, HIDDEN)
        shapes[f"{mlp}.gate_up_lora.B"] = (EXPERTS, 2 * EXPERT_INTER, RANK)
        shapes[f"{mlp}.down_lora.A"] = (EXPERTS, RANK, EXPERT_INTER)
        shapes[f"{mlp}.down_lora.B"] = (EXPERTS, HIDDEN, RANK)
        shapes[f"{mlp}.phi"] = (EXPERTS,)
    return shapes


def _child(num_clients: int, method_name: str) -> dict:
    """Aggregate ``num_clients`` synthetic replies incrementally; return this process's figures."""
    import torch

    from ubsmoe.fl.server import OrderedFold
    from ubsmoe.methods import ClientUpdate, get_method_class

    torch.manual_seed(0)
    shapes = adapter_shapes()
    sent = {k: torch.randn(s) * 0.01 for k, s in shapes.items()}
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    method = get_method_class(method_name)()
    fold = OrderedFold(method.aggregator(sent), list(range(num_clients)))
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for c in range(num_clients):
        # A reply as it would arrive: a fresh set of tensors, dropped after folding.
        adapters = {k: v * (1.0 + 1e-3 * (c + 1)) for k, v in sent.items()}
        counts = torch.randint(0, 50, (LAYERS, EXPERTS), generator=gen).to(torch.float64)
        fold.add(ClientUpdate(client_id=c, num_examples=100 + c, adapters=adapters,
                              expert_counts=counts, token_counts=counts.sum(-1) / 8, top_k=8, loss=0.0))
        del adapters
    result = fold.result()
    seconds = time.perf_counter() - start
    adapter_bytes = sum(t.numel() * t.element_size() for t in result.values())
    return {
        "num_clients": num_clients,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_setup_mib": baseline_kib / 1024,
        "adapter_mib": adapter_bytes / 2**20,
        "max_buffered_replies": fold.max_buffered,
        "aggregate_s": seconds,
    }


def run(clients: list[int], method: str) -> dict:
    """Measure each client count in its own subprocess; return the JSON report."""
    runs = []
    for n in clients:
        proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--method", method],
                              capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    import torch

    peaks = {r["num_clients"]: r["peak_rss_mib"] for r in runs}
    lo, hi = min(clients), max(clients)
    return {
        "benchmark": "server_memory",
        "method": method,
        "shapes": {"hidden": HIDDEN, "expert_intermediate": EXPERT_INTER, "experts": EXPERTS,
                   "layers": LAYERS, "rank": RANK, "dtype": "float32",
                   "adapter_tensors": len(adapter_shapes())},
        "measure": "peak resident set size of a fresh process (ru_maxrss), MiB",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "runs": runs,
        f"growth_{hi}_vs_{lo}": peaks[hi] / peaks[lo],
    }


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--method", default="ubsmoe")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/server_memory.json"))
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.method)))
        return
    report = run(args.clients, args.method)
    from ubsmoe.io import atomic_write_json

    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
