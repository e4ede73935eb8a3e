"""The testbed base's Hugging Face folder and model card (README.md + pretrain.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ubsmoe.io import atomic_write_json, atomic_write_text

CARD_FILE = "pretrain.json"
# Last steps averaged into the reported final training loss.
FINAL_LOSS_STEPS = 50
# What the model card (README.md and pretrain.json) must state; tests check every one.
REQUIRED_CARD_FIELDS = (
    "command", "corpus_sha256", "heldout_sha256", "records", "excluded", "corpus_tokens",
    "heldout_tokens", "steps", "tokens_trained", "final_train_loss", "heldout_loss",
    "k_drop", "wall_time_s", "tokens_per_s", "parameters", "config",
)


def save_base(out: Path, model: torch.nn.Module, tokenizer: Any, card: dict[str, Any]) -> None:
    """Write the Hugging Face folder: config, safetensors, tokenizer, card JSON and README."""

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    atomic_write_json(out / CARD_FILE, card)
    atomic_write_text(out / "README.md", model_card(card))
    for path in out.iterdir():  # save_pretrained may leave a private (0600) file; package data is 0644
        if path.is_file():
            path.chmod(0o644)


def model_card(card: dict[str, Any]) -> str:
    """The ``README.md`` model card of a pretrained base (every :data:`REQUIRED_CARD_FIELDS` entry)."""
    c = card["config"]
    native = str(c["top_k"])
    loss = card["heldout_loss"]
    lines = [
        "---", "library_name: transformers", "tags: [olmoe, moe, ubsmoe, testbed]", "---", "",
        "# ubsmoe testbed base (OLMoE architecture, pretrained from scratch offline)", "",
        (f"An `OlmoeForCausalLM` with {c['num_experts']} experts, top-{c['top_k']}, hidden {c['hidden_size']}, "
        f"{c['num_layers']} layers, {c['num_heads']} heads, expert size {c['expert_size']}, vocabulary "
        f"{card['vocab_size']} ({card['parameters']:,} parameters), trained by `ubsmoe pretrain` "
        f"(`ubsmoe.models.pretrain`) at native top-{c['top_k']} with the next-token loss plus OLMoE's "
        f"load-balancing loss (transformers' own, `router_aux_loss_coef` = {c['aux_loss_coef']})."), "",
        "Regenerate it only with this exact command:", "", "```", card["command"], "```", "",
        "## Corpus", "",
        (f"Training records (`train.json`) of the commonsense tasks in `{card['data_dir']}`, each formatted "
        "with the project's prompt template plus its response; never a record whose (instruction, input) "
        f"key equals a test record of any task ({card['records']['test_records']} test keys checked), and "
        f"never a record of the fine-tuning samples of seeds {c['finetune_seeds']} "
        f"({c['finetune_examples']} records each)."), "",
        "| count | value |", "|---|---|",
        *[f"| {k.replace('_', ' ')} | {v} |" for k, v in card["records"].items()],
        *[f"| excluded ({k}) | {v} |" for k, v in card["excluded"].items()],
        f"| training tokens (corpus_tokens) | {card['corpus_tokens']} |",
        f"| held-out tokens | {card['heldout_tokens']} |",
        (f"| training / held-out sequences of {c['seq_len']} | {card['train_sequences']} / "
         f"{card['heldout_sequences']} |"), "",
        f"Corpus digest (sha256 of the training token stream, int32 little-endian): `{card['corpus_sha256']}`  ",
        f"Held-out digest: `{card['heldout_sha256']}`", "",
        "## Training", "",
        "| | |", "|---|---|",
        f"| steps | {card['steps']} |",
        f"| batch x seq_len | {c['batch_size']} x {c['seq_len']} |",
        f"| tokens trained | {card['tokens_trained']} ({card['epochs']:.1f} epochs) |",
        f"| lr, warm-up, weight decay | {c['lr']}, {c['warmup_steps']}, {c['weight_decay']} |",
        f"| seed, torch threads | {c['seed']}, {c['threads']} |",
        f"| final train loss (mean of last {FINAL_LOSS_STEPS} steps) | {card['final_train_loss']:.4f} |",
        f"| final load-balancing loss | {card['final_aux_loss']:.4f} |",
        f"| throughput | {card['tokens_per_s']:,.0f} tokens/s |",
        f"| wall time (all sessions: corpus, tokenizer, training, evaluation) | {card['wall_time_s']:.0f} s |",
        f"| versions | torch {card['versions']['torch']}, transformers {card['versions']['transformers']} |",
        "",
        "## Held-out loss per K", "",
        (f"Mean next-token loss (nats/token) over {card['heldout_sequences']} held-out sequences; K-drop = "
         f"mean paired per-sequence difference to K = {native}, +- one standard error."), "",
        "| K | held-out loss | K-drop |", "|---|---|---|",
        *[f"| {k} | {v['mean']:.4f} +- {v['se']:.4f} | "
          + (f"{card['k_drop'][k]['mean']:+.4f} +- {card['k_drop'][k]['se']:.4f}" if k in card["k_drop"]
             else "(native)") + " |" for k, v in loss.items()],
        "",
    ]
    return "\n".join(lines)



def card_data(path: str | Path) -> dict[str, Any]:
    """The card data (``pretrain.json``) of a pretrained folder."""
    return json.loads((Path(path) / CARD_FILE).read_text(encoding="utf-8"))
