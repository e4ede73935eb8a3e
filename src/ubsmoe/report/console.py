"""Console tables (rich) of a run's summary.json, a FLOPs table, a plan and a bench report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from ubsmoe.report.loss import loss_table


def accuracy_table(summary: dict[str, Any], protocol: str, mode: str | None = None) -> Table:
    """Accuracy per task (rows) and budget level (columns) of one protocol.

    One column per evaluated row of the summary: its budget level beta, the K it ran
    at and where that K came from (``budget``: the level's own K_j; ``native``: the
    model's top-k, see ``eval.top_k``; ``-`` for summaries written before that key)
    and its LoRA rank. One row per task (its test examples scored, and its metric for
    instruction data: accuracy, rouge_l, ...), then the average. Tasks as rows keep
    the table narrow (budget levels are few, tasks many), so no number is cut off in
    an 80-column log.

    Args:
        summary: a run's summary (``summary.json``).
        protocol: ``generation``, ``loglik`` or ``loss`` (``loss``: the table of
            :func:`ubsmoe.report.loss.loss_table`, nats per token, lower is better).
        mode: only the rows of this K mode (``budget`` / ``native``); None: all.
    """
    if protocol == "loss":  # lower is better, with standard errors: its own table
        return loss_table(summary, mode)
    rows = [r for r in summary.get("accuracy", [])
            if r["protocol"] == protocol and (mode is None or r.get("top_k_mode") == mode)]
    tasks = sorted({t for r in rows for t in r["per_task"]})
    n = summary.get("data", {}).get("test_examples_scored", {})
    metric = {t: m for r in rows for t, m in r.get("per_task_metric", {}).items()}
    table = Table(title=f"{summary.get('method')}: accuracy ({protocol}), round {rows[0]['round'] if rows else '-'}")
    table.add_column("task", no_wrap=True)
    for r in rows:
        rank = f"\nr={r['lora_rank']}" if "lora_rank" in r else ""
        table.add_column(f"β={r['budget']:g}\nK={r['top_k']} {r.get('top_k_mode', '-')}{rank}",
                         justify="right", no_wrap=True)
    for t in tasks:  # instruction data: the task's metric beside its name (accuracy, rouge_l, ...)
        label = f"{t} (n={n.get(t, '?')}" + (f", {metric[t]})" if t in metric else ")")
        table.add_row(label, *[f"{r['per_task'][t]:.3f}" if t in r["per_task"] else "-" for r in rows])
    table.add_row("average", *[f"{r['average']:.3f}" for r in rows], style="bold")
    return table


def change_table(summary: dict[str, Any], mode: str | None = None) -> Table | None:
    """What fine-tuning did per budget level: round 0 against the final round, per protocol.

    One row per (protocol, level) present in both the summary's ``initial_accuracy``
    (round 0, ``eval.before_training``) and ``accuracy`` (the last evaluation): the
    task average at round 0, at the final round and the change (final - round 0). For
    ``loss`` (nats per token) lower is better, so a negative change is an improvement;
    for accuracies a positive one. A row's level is matched by beta and K mode.

    Args:
        summary: a run's summary (``summary.json``).
        mode: only the rows of this K mode (``budget`` / ``native``); None: all.

    Returns:
        The table, or None when the summary has no round-0 rows.
    """
    def pick(rows):
        """Rows keyed by (protocol, K mode, budget), kept to ``mode`` when one is given."""
        return {(r["protocol"], r.get("top_k_mode"), r["budget"]): r for r in rows
                if mode is None or r.get("top_k_mode") == mode}

    before, after = pick(summary.get("initial_accuracy") or []), pick(summary.get("accuracy", []))
    keys = sorted(set(before) & set(after), key=lambda k: (k[0], k[1] or "", k[2]))
    if not keys:
        return None
    final_round = after[keys[0]].get("round", "-")
    table = Table(title=f"{summary.get('method')}: round 0 (before fine-tuning) -> round {final_round}, "
                        "task average per level")
    for col in ("protocol", "level"):
        table.add_column(col, no_wrap=True)
    for col in ("round 0", "final", "change"):
        table.add_column(col, justify="right", no_wrap=True)
    for key in keys:
        b, a = before[key], after[key]
        better = "lower" if key[0] == "loss" else "higher"
        table.add_row(f"{key[0]} ({better} is better)", f"β={key[2]:g} K={a['top_k']}",
                      f"{b['average']:.3f}", f"{a['average']:.3f}", f"{a['average'] - b['average']:+.3f}")
    return table


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """Read ``run_dir/summary.json``.

    Raises:
        FileNotFoundError: no summary (the run has not finished).
    """
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"run directory {str(run_dir)!r}: no summary.json (unfinished run?)")
    return json.loads(path.read_text(encoding="utf-8"))


def flops_tables(result: dict[str, Any]) -> list[Table]:
    """Per-budget activated parameters and training FLOPs per token, and their terms.

    Args:
        result: from :func:`ubsmoe.metrics.flops.budget_table`.

    Returns:
        Two tables: the totals per budget, and the FLOPs per token by term (GFLOP).
    """
    model = result["model"]
    settings = result["settings"]
    moe = model["num_experts"] > 0 or model.get("lora_experts", 0) > 0
    main = Table(title=(f"{model['name']} ({result['total_params'] / 1e9:.2f}B parameters): "
                        "per token, per budget"))
    for col in ("beta", "K", "LoRA r", "activated params (B)", "ratio", "train GFLOP", "ratio"):
        main.add_column(col, justify="right")
    terms = Table(title=(f"training GFLOP per token by term (seq_len {settings['seq_len']}, LoRA on "
                         f"{settings['lora_targets']}, frozen backward "
                         f"{'counted' if settings['frozen_backward'] else 'not counted'})"))
    for col in ("beta", "attn proj", "attn scores", "router", "experts" if moe else "MLP", "LM head",
                "LoRA"):
        terms.add_column(col, justify="right")
    for row in result["rows"]:
        f = row["flops_per_token"]
        main.add_row(f"{row['beta']:g}", str(row["top_k"]) if moe else "-", str(row["lora_rank"]),
                     f"{row['activated_params'] / 1e9:.3f}", f"{row['params_ratio_to_highest']:.3f}",
                     f"{f['total'] / 1e9:.3f}", f"{row['flops_ratio_to_highest']:.3f}")
        terms.add_row(f"{row['beta']:g}", *[f"{f[k] / 1e9:.3f}" for k in
                                             ("attention_proj", "attention_scores", "router", "mlp",
                                              "lm_head", "lora")])
    tables = [main, terms]
    if settings.get("pg_probe_tokens"):
        probe = Table(title=(f"PG probe (ubsmoe.pg_rule=probe, {settings['pg_probe_tokens']} tokens per "
                             f"inactive expert, {settings['tokens_per_step']} tokens per step): "
                             "extra training FLOPs, upper bound"))
        for col in ("beta", "K", "MFLOP per slot", "max inactive per layer", "max GFLOP per token",
                    "max share of step"):
            probe.add_column(col, justify="right")
        for row in result["rows"]:
            p = row["pg_probe"]
            probe.add_row(f"{row['beta']:g}", str(row["top_k"]), f"{p['flops_per_slot'] / 1e6:.3f}",
                          str(p["max_inactive"]), f"{p['max_flops_per_token'] / 1e9:.4f}",
                          f"{100 * p['max_share']:.2f}%")
        tables.append(probe)
    return tables


def flops_notes(result: dict[str, Any]) -> list[str]:
    """The lowest-vs-highest budget comparison and the counting conventions, as lines."""
    rows = result["rows"]
    low, high = rows[0], rows[-1]
    moe = result["model"]["num_experts"] > 0 or result["model"].get("lora_experts", 0) > 0
    label = (lambda r: f"K={r['top_k']}") if moe else (lambda r: f"r={r['lora_rank']}")
    cmp = result["lowest_vs_highest"]
    counted = result["settings"]["frozen_backward"]
    frozen = "4 (forward + input gradient)" if counted else "2 (forward only)"
    router_trained = result["settings"].get("router_trainable", False)
    frozen_mats = "attention q/k/v/o, experts/MLP, LM head" if router_trained else \
        "attention q/k/v/o, router, experts/MLP, LM head"
    trained = "LoRA and the router" if router_trained else "LoRA"
    experts = result["model"].get("lora_experts", 0)
    shared = ([(f"LoRA experts (M={experts}, K_max={result['model']['top_k']}): every expert shares the "
               "one frozen dense MLP, so a token runs that MLP K times (MLP term = K dense-MLP passes) "
               "plus K expert LoRA pairs and the [M, H] router; the MLP's parameters are counted once, "
               "so the activated parameters do not grow with K.")] if experts else [])
    return [*shared,
        (f"lowest vs highest budget ({label(low)} vs {label(high)}): training FLOPs ratio "
        f"{cmp['flops_ratio']:.3f} (reduction {100 * cmp['flops_reduction']:.1f}%), "
        f"activated-parameter ratio {cmp['activated_params_ratio']:.3f}"),
        (f"counted per token: frozen matmuls ({frozen_mats}) "
        f"{frozen} FLOPs per weight; {trained} 6 FLOPs per parameter (forward, input and weight "
        f"gradients); attention scores QK^T and AV over a full {result['settings']['seq_len']}^2 "
        f"score matrix ({'backward 2x forward' if counted else 'forward only'}). Not counted: "
        "embedding lookup, norms, activations, "
        "softmax, loss, optimizer. Activated parameters: all but the unused experts, embeddings "
        "included."),
    ]


def plan_tables(plan: dict[str, Any]) -> list[Table]:
    """Rich tables of a :func:`ubsmoe.metrics.plan.plan` result: run, budgets, memory."""
    gib = 1024 ** 3
    m, params, procs = plan["model"], plan["params"], plan["processes"]
    run = Table(title=f"ubsmoe plan: {m['name']} ({m['init']} weights) on {m['device']}, {m['dtype']}")
    run.add_column("quantity")
    run.add_column("value", justify="right")
    a = plan["assumptions"]
    run.add_row("parameters (base model)", f"{params['total'] / 1e9:.3f} B")
    run.add_row("trainable per client (max rank)", f"{params['trainable_per_client'] / 1e6:.2f} M")
    run.add_row("processes", f"1 server + {procs['workers']['at_once']} worker(s) at once "
                f"({procs['workers']['limited_by']})")
    run.add_row("micro-batch x seq_len", f"{a['micro_batch']} x {a['seq_len']} "
                f"(accumulation {a['grad_accumulation_steps']}, checkpointing "
                f"{'on' if a['activation_checkpointing'] else 'off'})")
    run.add_row("local steps per round", str(a["steps_per_round"]))
    run.add_row("training FLOPs per round", f"{plan['flops_per_round'] / 1e12:.1f} TFLOP")
    disk = plan["disk"]
    run.add_row("disk (checkpoints + final adapter)",
                f"{disk['total'] / gib:.2f} GiB ({disk['kept_checkpoints']} kept x "
                f"{disk['checkpoint_bytes'] / gib:.2f} GiB + 1)")
    budgets = Table(title="per budget level")
    for col in ("beta", "K", "rank", "activated params", "GFLOP/token", "clients/round", "TFLOP/round"):
        budgets.add_column(col, justify="right")
    for r in params["per_budget"]:
        budgets.add_row(f"{r['beta']:g}", str(r["top_k"]), str(r["lora_rank"]),
                        f"{r['activated_params'] / 1e9:.3f} B", f"{r['flops_per_token'] / 1e9:.2f}",
                        f"{r['clients_per_round']:g}", f"{r['flops_per_round'] / 1e12:.1f}")
    mem = Table(title="memory per process (GiB)")
    mem.add_column("term")
    mem.add_column("client (each worker)", justify="right")
    mem.add_column("server", justify="right")
    client, server = plan["memory"]["client_process"], plan["memory"]["server_process"]
    for term in ("base_weights", "adapters", "gradients", "optimizer", "activations", "evaluation",
                 "total"):
        mem.add_row(term.replace("_", " "),
                    f"{client[term] / gib:.2f}" if term in client else "-",
                    f"{server[term] / gib:.2f}" if term in server else "-")
    mem.add_row(f"on {m['device']}: server + {procs['workers']['at_once']} worker(s)", "",
                f"{plan['memory']['device_total'] / gib:.2f}")
    return [run, budgets, mem]


def bench_tables(report: dict[str, Any]) -> list[Table]:
    """Summary tables of a ``ubsmoe bench`` report (every built-in suite).

    Args:
        report: from :func:`ubsmoe.bench.run_bench`.

    Returns:
        One table per suite present that has a known layout (others are left to the JSON).
    """
    tables = []
    layer = report["suites"].get("layer")
    if layer is not None:
        shape = layer["shape"]
        t = Table(title=(f"SMoE layer fwd+bwd, H={shape['hidden']} I={shape['intermediate']} "
                         f"E={shape['num_experts']} tokens={shape['num_tokens']} r={shape['lora_rank']} "
                         f"({report['environment']['torch_threads']} threads; median of "
                         f"{layer['timing']['repeats']})"))
        for col in ("dtype", "case", "median ms", "min ms", "max ms", "GFLOP"):
            t.add_column(col, justify="right")
        for dtype, entry in layer["dtypes"].items():
            for name, c in entry["cases"].items():
                t.add_row(dtype, name, f"{1e3 * c['median_s']:.1f}", f"{1e3 * c['min_s']:.1f}",
                          f"{1e3 * c['max_s']:.1f}", f"{c['flops']['total'] / 1e9:.2f}")
        tables.append(t)
        s = Table(title="SMoE layer: ratios (median of ours vs reference, same process) and targets")
        for col in ("dtype", "speedup K=1 (>= 2.0)", "speedup K=8 (>= 1.3)", "ours K1/K8 (<= 0.20)",
                    "FLOP ratio K1/K8"):
            s.add_column(col, justify="right")
        for dtype, v in layer["summary"].items():
            if dtype == "targets":
                continue
            met = v["targets_met"]

            def fmt(x, ok):
                """A ratio, marked when it misses its target."""
                return "-" if x is None else f"{x:.2f}{'' if ok else ' (missed)'}"

            s.add_row(dtype, fmt(v["speedup_k1"], met["speedup_k1"]), fmt(v["speedup_k8"], met["speedup_k8"]),
                      fmt(v["k1_over_k8"], met["k1_over_k8"]), f"{v['flop_ratio_k1_over_k8']:.3f}")
        tables.append(s)
    step = report["suites"].get("model_step")
    if step is not None:
        for name, res in step["models"].items():
            t = Table(title=(f"local training step, {name} ({res['tokens_per_step']} tokens/step; "
                             f"median of {res['timing']['repeats']})"))
            for col in ("case", "K", "LoRA r", "median s", "time ratio", "FLOP ratio (measured)",
                        "GFLOP measured", "GFLOP analytic"):
                t.add_column(col, justify="right")
            for group in ("smoe", "lora_rank"):
                for case, ratios in res[group]["budgets"].items():
                    c = res["cases"][case]
                    t.add_row(case, str(c["top_k"]), str(c["lora_rank"]), f"{c['median_s']:.3f}",
                              f"{ratios['time_ratio']['of_medians']:.3f}", f"{ratios['flops_ratio']:.3f}",
                              f"{c['flops_measured'] / 1e9:.2f}", f"{c['flops_analytic'] / 1e9:.2f}")
            tables.append(t)
    mem = report["suites"].get("server_memory")
    if mem is not None:
        t = Table(title=(f"server memory: folding N updates of {mem['runs'][0]['adapter_mib']:.0f} MiB "
                         f"(peak RSS of a fresh process)"))
        for col in ("clients", "peak RSS MiB", "aggregate s", "growth vs first (<= 1.25)"):
            t.add_column(col, justify="right")
        first = mem["runs"][0]["peak_rss_mib"]
        for run in mem["runs"]:
            t.add_row(str(run["num_clients"]), f"{run['peak_rss_mib']:.0f}", f"{run['aggregate_s']:.1f}",
                      f"{run['peak_rss_mib'] / first:.2f}")
        tables.append(t)
    fed = report["suites"].get("federated")
    if fed is not None:
        t = Table(title=f"Flower simulation ({fed['method']}): per round")
        for col in ("round", "wall s", "overhead s", "overhead share (<= 0.15)", "aggregate s",
                    "MiB down/client", "MiB up/client (mean)"):
            t.add_column(col, justify="right")
        for r in fed["rounds"]:
            up = sum(c["bytes_up"] for c in r["clients"]) / len(r["clients"])
            t.add_row(str(r["round"]), f"{r['round_wall_s']:.1f}", f"{r['overhead_s']:.2f}",
                      f"{r['overhead_share']:.3f}", f"{r['aggregate_s']:.2f}",
                      f"{r['clients'][0]['bytes_down'] / 2**20:.2f}", f"{up / 2**20:.2f}")
        tables.append(t)
        u = Table(title="naive SMoE, one client round: upload of changed expert rows vs all")
        for col in ("K_c", "dense MiB", "sparse MiB", "sparse / dense"):
            u.add_column(col, justify="right")
        for k, v in fed["smoe_upload_per_k"].items():
            u.add_row(k[1:], f"{v['dense_bytes'] / 2**20:.2f}", f"{v['sparse_bytes'] / 2**20:.2f}",
                      f"{v['sparse_over_dense']:.3f}")
        tables.append(u)
    base = report["suites"].get("base")
    if base is not None:
        held, thr = base["heldout"], base["pretrain_throughput"]
        t = Table(title=(f"testbed base: held-out loss over {held['sequences']} sequences of {held['seq_len']} "
                         f"tokens (digest {'matches' if held['digest_matches'] else 'DIFFERS FROM'} the card); "
                         f"pretraining {thr['tokens_per_s']:,.0f} tokens/s"))
        for col in ("K", "loss nats/token (± se)", "K-drop vs native (± se)", "z"):
            t.add_column(col, justify="right")
        for k, v in held["loss"].items():
            d = held["k_drop"].get(k)
            t.add_row(k, f"{v['mean']:.4f} ± {v['se']:.4f}",
                      "-" if d is None else f"{d['mean']:+.4f} ± {d['se']:.4f}",
                      "-" if d is None else f"{d['z']:.1f}")
        tables.append(t)
    return tables
