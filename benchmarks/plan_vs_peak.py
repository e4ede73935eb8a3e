"""Compare `ubsmoe plan`'s client-process memory with the measured peak RSS of local training.

Builds the configured preset (default ``medium``) on the CPU exactly as a client does
(random weights, LoRA, the method's own tensors), trains ``--steps`` local steps on
random token ids of ``train.batch_size x data.max_length`` (every token real and
labelled: the plan's padded-to-T assumption) at the highest budget's K, and prints one
JSON object: the plan's terms, the RSS before building the model (Python, torch and
imports, not in the plan), the peak RSS (``resource.getrusage``) and the peak minus
that baseline. Usage::

    python benchmarks/plan_vs_peak.py [--steps 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import resource

import psutil
import torch


def main() -> None:
    """Parse arguments, plan, build, train, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from ubsmoe.config import load_config
    from ubsmoe.fl.train import local_train
    from ubsmoe.methods import get_method_class
    from ubsmoe.metrics.plan import plan
    from ubsmoe.models import set_top_k
    from ubsmoe.models.build import prepare_model, random_olmoe
    from ubsmoe.models.devices import resolve_dtype

    cfg = load_config(None, ["model.name=medium", "model.device=cpu", *args.overrides])
    p = plan(cfg)
    baseline = psutil.Process().memory_info().rss
    vocab = p["model"]["shape"]["vocab_size"]
    model = random_olmoe(cfg.model, vocab, 0, 1, cfg.train.seed, "cpu",
                         resolve_dtype(cfg.model.dtype, torch.device("cpu")))
    model = prepare_model(model, cfg.model, cfg.train.seed)
    method = get_method_class(cfg.method)(cfg.method_config)
    method.prepare_model(model)
    k = max(r["top_k"] for r in p["params"]["per_budget"])
    set_top_k(model, k)
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.batch_size, cfg.data.max_length)
    batches = []
    for _ in range(args.steps):
        ids = torch.randint(2, vocab, shape, generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    stats = local_train(model, batches, method, cfg.train, k)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    gib = 1024 ** 3
    client = p["memory"]["client_process"]
    print(json.dumps({
        "config": {"model": cfg.model.name, "method": cfg.method, "batch": shape, "top_k": k,
                   "dtype": p["model"]["dtype"], "steps": stats["steps"]},
        "plan_client_gib": {t: round(v / gib, 3) for t, v in client.items()},
        "rss_before_model_gib": round(baseline / gib, 3),
        "peak_rss_gib": round(peak / gib, 3),
        "peak_minus_baseline_gib": round((peak - baseline) / gib, 3),
        "plan_over_measured": round(client["total"] / (peak - baseline), 3),
    }, indent=1))


if __name__ == "__main__":
    main()
