"""``ubsmoe bench``, ``ubsmoe flops`` and ``ubsmoe plan``: what a run costs, measured or counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ubsmoe.budgets import DEFAULT_RANKS
from ubsmoe.cli.app import app, console, fail, parse_list
from ubsmoe.cli.run import load_run_config
from ubsmoe.errors import ConfigError
from ubsmoe.io import atomic_write_json
from ubsmoe.report import bench_tables, flops_notes, flops_tables, plan_tables


@app.command()
def bench(
    suite: Annotated[list[str] | None, typer.Option(
        "--suite", "-s", help="suite to run (repeatable; default: all)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON report path")] = Path("bench.json"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="tiny shapes, 2 repeats: checks the suites run (not a measurement)")] = False,
    repeats: Annotated[int | None, typer.Option(help="timed runs per case (default per suite)")] = None,
    warmup: Annotated[int | None, typer.Option(help="untimed runs per case (default per suite)")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: unchanged)")] = None,
    seed: Annotated[int, typer.Option(help="seed of weights and inputs")] = 0,
) -> None:
    """Run the performance suites and write a JSON report (see `--suite`)."""
    # imports torch (seconds): only for this command, so the others start fast
    from ubsmoe.bench import BenchOptions, available_suites, run_bench

    try:
        options = BenchOptions(quick=quick, repeats=repeats, warmup=warmup, threads=threads, seed=seed)
    except ValueError as e:
        fail(str(e))
    names = suite or available_suites()
    unknown = [n for n in names if n not in available_suites()]
    if unknown:
        fail(f"--suite: got {', '.join(unknown)}, expected one of {', '.join(available_suites())}")
    parts = ["ubsmoe bench", *(f"--suite {n}" for n in suite or []), "--quick" if quick else "",
             f"--repeats {repeats}" if repeats is not None else "",
             f"--warmup {warmup}" if warmup is not None else "",
             f"--threads {threads}" if threads is not None else "", f"--seed {seed}" if seed else "",
             f"--out {out}"]
    command = " ".join(p for p in parts if p)
    report = run_bench(names, options, command=command,
                       progress=lambda name: console.print(f"suite {name} ...", highlight=False))
    atomic_write_json(out, report)
    for table in bench_tables(report):
        console.print(table)
    console.print(f"report: {out}", highlight=False)




@app.command()
def flops(
    model: Annotated[str, typer.Argument(
        help="shipped name, local config.json / model folder, or hub name (online)")]
        = "allenai/OLMoE-1B-7B-0924",
    budgets: Annotated[str, typer.Option(help="budget levels beta, comma-separated")] = "0.125,0.25,0.5,1.0",
    ranks: Annotated[str | None, typer.Option(
        help="LoRA rank per budget level at native top-k (default for dense models: 12,16,24,40)")] = None,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank of the K budgets of a MoE model")] = 20,
    seq_len: Annotated[int, typer.Option(help="sequence length for the attention-score FLOPs")] = 256,
    lora_targets: Annotated[str, typer.Option(
        help="LoRA on: all (attention + MLP/experts), attention, mlp")] = "all",
    frozen_backward: Annotated[bool, typer.Option(
        "--frozen-backward/--no-frozen-backward",
        help="count the input-gradient pass through frozen weights (a LoRA step computes it)")] = True,
    pg_probe_tokens: Annotated[int, typer.Option(
        help="also show the PG probe's extra FLOPs (ubsmoe.pg_rule=probe) at this many tokens per "
             "inactive expert (0: off)")] = 0,
    tokens_per_step: Annotated[int | None, typer.Option(
        help="tokens per local step, spreading the probe's per-step cost (default 16 x seq-len)")] = None,
    router_trainable: Annotated[bool, typer.Option(
        "--router-trainable/--frozen-router",
        help="count the router as trained (6 FLOPs/parameter, model.router_trainable) or frozen")] = True,
    lora_experts: Annotated[int, typer.Option(
        help="M LoRA experts sharing each dense MLP (model.lora_experts; dense models only, 0: off)")] = 0,
    lora_experts_top_k: Annotated[int, typer.Option(
        help="K_max of the LoRA experts (model.lora_experts_top_k)")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
) -> None:
    """Activated parameters and training FLOPs per token for each compute budget."""
    # imports torch (seconds): only for this command, so the others start fast
    from ubsmoe.metrics.flops import budget_table, default_budgets
    from ubsmoe.metrics.model_shape import load_model_shape

    betas = parse_list("--budgets", budgets, float)
    rank_list = parse_list("--ranks", ranks, int) if ranks is not None else None
    try:
        shape = load_model_shape(model, lora_experts, lora_experts_top_k)
        if rank_list is None and not shape.routed:
            if len(betas) != len(DEFAULT_RANKS):
                fail(f"--ranks: {model} is a dense model; give one LoRA rank per budget level")
            rank_list = list(DEFAULT_RANKS)
        table = budget_table(shape, default_budgets(shape, betas, rank_list, lora_rank),
                             seq_len=seq_len, lora_targets=lora_targets, frozen_backward=frozen_backward,
                             pg_probe_tokens=pg_probe_tokens, tokens_per_step=tokens_per_step,
                             router_trainable=router_trainable)
    except ValueError as e:
        fail(str(e))
    if as_json:
        console.print_json(json.dumps(table))
        return
    for t in flops_tables(table):
        console.print(t)
    for line in flops_notes(table):
        console.print(line, highlight=False, soft_wrap=True)




@app.command()
def plan(
    overrides: Annotated[list[str] | None, typer.Argument(
        help="key=value overrides, as for `ubsmoe run`")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="YAML config, or an experiment name/file with method=M (as for `run`)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of tables")] = False,
    scale: Annotated[str, typer.Option(help="an experiment's scale: tiny or paper")] = "tiny",
) -> None:
    """Parameters, memory per process, processes, FLOPs per round and disk of a run (meta device)."""
    # imports torch (seconds): only for this command, so the others start fast
    from ubsmoe.metrics.plan import plan as make_plan

    try:
        cfg, _ = load_run_config(config, list(overrides or []), scale)
        result = make_plan(cfg)
    except ConfigError as e:
        fail(str(e).replace("\n", "; "))
    except ValueError as e:
        fail(str(e))
    if as_json:
        print(json.dumps(result, indent=1))
        return
    for t in plan_tables(result):
        console.print(t)


