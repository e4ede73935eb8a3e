"""``ubsmoe pretrain``: pretrain the testbed base, a small OLMoE-architecture model, on local text."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ubsmoe.cli.app import app, console, fail
from ubsmoe.config.pretrain import config_from_options
from ubsmoe.errors import ConfigError


@app.command()
def pretrain(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (a Hugging Face checkpoint)")],
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of weights, held-out split and data order")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue the interrupted run in --out")] = False,
    hidden: Annotated[int, typer.Option(help="hidden size")] = 64,
    layers: Annotated[int, typer.Option(help="decoder layers")] = 2,
    heads: Annotated[int, typer.Option(help="attention heads")] = 4,
    expert_size: Annotated[int, typer.Option(help="intermediate width of each expert")] = 32,
    experts: Annotated[int, typer.Option(help="experts per layer (OLMoE-1B-7B: 64)")] = 64,
    top_k: Annotated[int, typer.Option(help="experts per token in training (OLMoE-1B-7B: 8)")] = 8,
    vocab: Annotated[int, typer.Option(help="vocabulary of the locally trained tokenizer")] = 2048,
    seq_len: Annotated[int, typer.Option(help="tokens per training sequence")] = 256,
    batch: Annotated[int, typer.Option(help="sequences per step")] = 16,
    lr: Annotated[float, typer.Option(help="peak learning rate (warm-up, cosine to lr/10)")] = 3e-3,
    aux_loss_coef: Annotated[float, typer.Option(help="OLMoE router_aux_loss_coef")] = 0.01,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    text: Annotated[Path | None, typer.Option(help="extra folder of plain .txt files")] = None,
    hf_dataset: Annotated[str, typer.Option(help="extra Hugging Face dataset (needs the hub)")] = "",
    hf_column: Annotated[str, typer.Option(help="text column of --hf-dataset")] = "text",
    data: Annotated[Path | None, typer.Option(help="commonsense data folder (default: resolved)")] = None,
    finetune_seeds: Annotated[str, typer.Option(
        help="seeds whose fine-tuning samples are left out of the corpus, comma-separated")] = "0,1,2",
    checkpoint_every: Annotated[int, typer.Option(help="steps between resumable checkpoints")] = 100,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
) -> None:
    """Pretrain a small OLMoE-architecture base from scratch on local text (the testbed base)."""
    # torch and transformers load only for this command (`ubsmoe --help` stays fast)
    from ubsmoe.data.pretrain_corpus import build_corpus
    from ubsmoe.models.pretrain import pretrain as run_pretrain

    try:
        cfg = config_from_options(
            out=str(out), steps=steps, seed=seed, hidden_size=hidden, num_layers=layers, num_heads=heads,
            expert_size=expert_size, num_experts=experts, top_k=top_k, vocab_size=vocab, seq_len=seq_len,
            batch_size=batch, lr=lr, aux_loss_coef=aux_loss_coef, threads=threads,
            text_dir=str(text) if text else "", hf_dataset=hf_dataset, hf_column=hf_column,
            data_path=str(data) if data else "", checkpoint_every=checkpoint_every,
            finetune_seeds=[int(v) for v in finetune_seeds.split(",") if v.strip()])
        card = run_pretrain(cfg, build_corpus(cfg), command=" ".join(["ubsmoe", *sys.argv[1:]]), resume=resume,
                            progress=progress)
    except (ConfigError, ValueError) as e:
        fail(str(e))
    drop = ", ".join(f"K={k} {v['mean']:+.3f} (se {v['se']:.3f})" for k, v in card["k_drop"].items())
    console.print(f"saved {out}: held-out loss {card['heldout_loss'][str(top_k)]['mean']:.3f} at K={top_k}; "
                  f"K-drop {drop}; {card['wall_time_s']:.0f} s", highlight=False, soft_wrap=True)
