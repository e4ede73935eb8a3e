"""The cost of client-level DP (issue 25), measured on the testbed base or the tiny preset: loss, accuracy, entropy vs epsilon.

For each method and privacy budget, one in-process federated run (Server + ClientRuntime,
as tests/conftest.py's ``run_rounds``; no Flower) on ``--model`` (``testbed``: the shipped
pretrained base, the default; ``tiny``: the random-weight preset), then the final
held-out ``loss`` and ``loglik`` accuracy per budget level and the eval-time
utilization entropy. Epsilon targets are turned into noise multipliers with Opacus's
RDP accountant over the run's rounds (full participation); with the counts released
too, the combined multiplier is split evenly (sigma_u = sigma_k = sqrt(2) sigma).
The clipping norm C is the median clean update norm of the privatised group over the
clients' first round (the usual choice: about half the updates are clipped).

Writes ``OUT/results.json``, ``OUT/table.md`` and ``OUT/privacy_cost.png``.

Usage (docs/privacy.md quotes the command and its table)::

    PYTHONPATH=src UBSMOE_DATA=/work/shared/data OMP_NUM_THREADS=1 \\
        nice -n 5 python benchmarks/privacy_cost.py --out /tmp/privacy_cost [--model tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from ubsmoe.config import load_config
from ubsmoe.core.accountant import calibrate_noise_multiplier
from ubsmoe.core.privacy import select_groups
from ubsmoe.fl.client_runtime import ClientRuntime, shared_setup
from ubsmoe.fl.server import Server
from ubsmoe.methods import get_method_class

MODELS = {"testbed": ["model.name=testbed"], "tiny": ["model.name=tiny", "model.tiny.vocab_size=512"]}
SETTING = [
    "data.tasks=[boolq,piqa,ARC-Easy]", "data.train_examples=400", "data.max_length=128",
    "data.partition=dirichlet", "fl.num_clients=8", "train.batch_size=8", "train.max_local_steps=4",
    "eval.protocols=[loss,loglik]", "eval.examples_per_task=24", "eval.batch_size=8",
    "privacy.delta=1e-5", "privacy.noise_seed=0",
]


def run(overrides: list[str], setup, out: Path) -> dict:
    """One in-process run; returns its summary and train records."""
    cfg = load_config(overrides=overrides)
    server = Server(cfg, out, setup)
    runtime = ClientRuntime(cfg, setup)
    for r in range(1, cfg.fl.rounds + 1):
        updates = [runtime.train_round(**server.client_task(c, r)) for c in server.sample_clients(r)]
        server.end_round(r, updates)
    summary = server.finish()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": summary, "train": [r for r in records if r.get("type") == "train"]}


def initial(overrides: list[str], setup, out: Path) -> dict:
    """The untrained global model (round 0) evaluated as a run's last round is."""
    server = Server(load_config(overrides=overrides), out, setup)
    rows = server.evaluate(0)
    return {"summary": {"accuracy": rows}, "train": []}


def median_norm(overrides: list[str], setup, groups: list[str]) -> float:
    """Median over clients of ``||x_c - x_sent||`` of ``groups`` in round 1 without DP."""
    cfg = load_config(overrides=overrides)
    server = Server(cfg, Path("/tmp/privacy_cost_probe") / cfg.method, setup)
    runtime = ClientRuntime(cfg, setup)
    sent = server.state.adapters
    private, _ = select_groups(list(sent), groups)
    norms = []
    for c in server.sample_clients(1):
        u = runtime.train_round(**server.client_task(c, 1))
        norms.append(math.sqrt(sum(float((u.adapters[n].double() - sent[n].double()).pow(2).sum())
                                   for n in private)))
    return statistics.median(norms)


def row(method: str, label: str, eps: float | None, res: dict) -> dict:
    """The table's numbers for one run."""
    acc = res["summary"]["accuracy"]
    loss = {a["budget"]: a["average"] for a in acc if a["protocol"] == "loss"}
    loglik = {a["budget"]: a["average"] for a in acc if a["protocol"] == "loglik"}
    ent = [a["utilization"]["entropy"]["mean"] for a in acc
           if a["protocol"] == "loss" and a.get("utilization")]
    snr = [t["privacy"]["snr"] for t in res["train"] if t.get("privacy")]
    dp = res["summary"].get("privacy", {})
    return {"method": method, "privatised": label, "target_epsilon": eps,
            "epsilon": dp.get("epsilon"), "sigma": dp.get("noise_multiplier"),
            "sigma_k": dp.get("counts_noise_multiplier"), "C": dp.get("clipping_norm"),
            "loss": loss, "loglik": loglik, "entropy": statistics.mean(ent) if ent else None,
            "snr": snr}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 1.0])
    ap.add_argument("--methods", nargs="+", default=["fedit", "smoe", "ubsmoe"])
    ap.add_argument("--model", choices=sorted(MODELS), default="testbed",
                    help="testbed: the shipped pretrained base; tiny: the random-weight preset")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw OUT/table.md and OUT/privacy_cost.png from OUT/results.json")
    args = ap.parse_args()
    if args.replot:
        rows = json.loads((args.out / "results.json").read_text())
        for r in rows:  # JSON object keys are strings: the budget levels back to floats
            r["loss"], r["loglik"] = ({float(b): v for b, v in r[k].items()} for k in ("loss", "loglik"))
        write_table(rows, args.out / "table.md")
        figure(rows, args.out / "privacy_cost.png", args.model)
        return
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    base = [*MODELS[args.model], *SETTING, f"fl.rounds={args.rounds}",
            f"model.tokenizer_cache={args.out / 'cache'}"]
    setup = shared_setup(load_config(overrides=base))
    rows = []
    for method in args.methods:
        m = [*base, f"method={method}"]
        # (label, groups, counts released): full privatisation; counts + phi alone (DMR methods).
        uses_counts = get_method_class(method).uses_counts  # DMR's phi update needs the counts
        variants = [("all", ["all"], uses_counts)]
        if uses_counts:  # the counts and DMR's phi alone
            variants.append(("counts+phi", ["phi"], True))
        start = time.time()
        rows.append(row(method, "(untrained: round 0)", None, initial(m, setup, args.out / f"{method}_init")))
        rows.append(row(method, "none (no DP)", None, run(m, setup, args.out / f"{method}_off")))
        print(f"{method} no DP: {time.time() - start:.0f}s", flush=True)
        for label, groups, counts in variants:
            clip = median_norm(m, setup, groups)
            for eps in args.epsilons:
                sigma = calibrate_noise_multiplier(eps, 1e-5, args.rounds, 1.0)
                sigma_u, sigma_k = (sigma * math.sqrt(2), sigma * math.sqrt(2)) if counts else (sigma, 0.0)
                dp = ["privacy.mode=central", f"privacy.noise_multiplier={sigma_u}",
                      f"privacy.clipping_norm={clip}", f"privacy.counts_noise_multiplier={sigma_k}",
                      f"privacy.groups=[{','.join(groups)}]"]
                start = time.time()
                res = run([*m, *dp], setup, args.out / f"{method}_{label}_eps{eps:g}")
                rows.append(row(method, label, eps, res))
                print(f"{method} {label} eps {eps:g}: {time.time() - start:.0f}s", flush=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    write_table(rows, args.out / "table.md")
    figure(rows, args.out / "privacy_cost.png", args.model)


def write_table(rows: list[dict], path: Path) -> None:
    """Markdown: one line per run, loss and loglik accuracy per budget level."""
    budgets = sorted(rows[0]["loss"])
    head = ["method", "privatised", "epsilon (target)", "sigma / sigma_k", "C",
            *[f"loss beta={b:g}" for b in budgets], *[f"acc beta={b:g}" for b in budgets],
            "entropy (nats)", "SNR per round"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        eps = "-" if r["target_epsilon"] is None else (
            f"{r['epsilon']:.2f} ({r['target_epsilon']:g})" if r["epsilon"] is not None else "inf")
        sig = "-" if r["sigma"] is None else f"{r['sigma']:.2f} / {r['sigma_k']:.2f}"
        c = "-" if r["C"] is None else f"{r['C']:.3g}"
        snr = "-" if not r["snr"] else ", ".join(f"{s:.2g}" for s in r["snr"])
        lines.append("| " + " | ".join([
            r["method"], r["privatised"], eps, sig, c,
            *[f"{r['loss'][b]:.3f}" for b in budgets], *[f"{r['loglik'][b]:.3f}" for b in budgets],
            "-" if r["entropy"] is None else f"{r['entropy']:.3f}", snr]) + " |")
    path.write_text("\n".join(lines) + "\n")


def figure(rows: list[dict], path: Path, model: str = "testbed") -> None:
    """Held-out loss (mean over budget levels) and entropy against epsilon, one line per method/variant."""
    # lazy: matplotlib takes a second to import; only the figure needs it
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    series: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["target_epsilon"] is not None:
            series.setdefault((r["method"], r["privatised"]), []).append(r)
    off = {r["method"]: r for r in rows if r["privatised"] == "none (no DP)"}
    init = {r["method"]: r for r in rows if r["privatised"].startswith("(untrained")}
    keys = [("loss", "held-out loss (nats/token)"),
            ("loglik", "loglik accuracy (fraction)"),
            ("entropy", "eval utilization entropy (nats)")]
    eps_ticks = sorted({r["target_epsilon"] for r in rows if r["target_epsilon"] is not None})
    for ax, (key, label) in zip(axes, keys):
        for i, ((method, variant), rs) in enumerate(sorted(series.items())):
            rs = sorted(rs, key=lambda r: r["target_epsilon"])
            xs = [r["target_epsilon"] for r in rs]
            ys = [_value(r, key) for r in rs]
            line, = ax.plot(xs, ys, marker="o", label=f"{method}, DP on {variant}")
            ax.axhline(_value(off[method], key), color=line.get_color(), ls=":", lw=1)
            if method in init:
                ax.axhline(_value(init[method], key), color=line.get_color(), ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xticks(eps_ticks, [f"{e:g}" for e in eps_ticks])
        ax.minorticks_off()
        ax.set_xlabel("epsilon at delta 1e-5 (log scale)")
        ax.set_ylabel(label)
    axes[0].plot([], [], color="gray", ls=":", label="no DP (dotted, same colour)")
    axes[0].plot([], [], color="gray", ls="--", label="untrained, round 0 (dashed)")
    axes[0].legend(fontsize=7)
    name = {"testbed": "testbed base", "tiny": "tiny preset"}[model]
    fig.suptitle(f"Cost of client-level DP (central, 8 clients, {name}); "
                 "each value is the mean over the 4 budget levels (entropy: over layers too)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _value(r: dict, key: str) -> float:
    if key == "entropy":
        return r["entropy"]
    return statistics.mean(r[key].values())


if __name__ == "__main__":
    main()
