"""The model card (``README.md``) of a run's adapter folder (plain Python, no Flower).

:class:`RunInfo` holds what the card says about the run; :func:`model_card` writes
the Markdown (base model, method, budget levels, how to load it with transformers +
PEFT, what the adapter holds, the summary's accuracy table).
:func:`ubsmoe.fl.export.export_adapters` writes it next to the adapter files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunInfo:
    """What the model card says about the run.

    Attributes:
        base_model: hub name or local path of the base model (``base_model_name_or_path``).
        random_base: the base is a randomly initialised preset/architecture (``model.init=random``).
        method: the method name.
        levels: per budget level ``{"budget": beta, "top_k": K_j, "lora_rank": r_j}``.
        rounds: rounds completed.
        clients: number of clients (and ``fraction`` sampled per round).
        fraction: share of clients sampled per round.
        seed: ``train.seed`` (rebuilds a random base).
        accuracy: the summary's accuracy rows (``budget``, ``top_k``, ``top_k_mode``,
            ``lora_rank``, ``protocol``, ``per_task``, ``average``).
        phi: the run trained UB-SMoE's DMR modulation phi.
    """

    base_model: str
    random_base: bool
    method: str
    levels: list[dict[str, Any]]
    rounds: int
    clients: int
    fraction: float = 1.0
    seed: int = 0
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    phi: bool = False


def _number(row: dict[str, Any], value: float) -> str:
    """A value of ``row`` as the card shows it: percent, or nats per token for ``loss`` rows."""
    return f"{value:.4f} nats/token" if row["protocol"] == "loss" else f"{100 * value:.2f}"


def _table(rows: list[dict[str, Any]]) -> str:
    """The summary's accuracy rows as a Markdown table (percent, one column per task;
    ``loss`` rows in nats per token, lower is better)."""
    if not rows:
        return "(no evaluation in the summary)\n"
    tasks = sorted({t for row in rows for t in row["per_task"]})
    head = ["budget", "K", "K mode", "rank", "protocol", *tasks, "average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row['budget']:g}", str(row["top_k"]), str(row.get("top_k_mode", "")),
                 str(row.get("lora_rank", "")), row["protocol"],
                 *(_number(row, row["per_task"][t]) if t in row["per_task"] else "" for t in tasks),
                 _number(row, row["average"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def model_card(run: RunInfo, info: dict[str, Any]) -> str:
    """The adapter folder's ``README.md``: base, method, budgets, rounds, clients, accuracy.

    Args:
        run: what the run was (:class:`RunInfo`).
        info: :func:`peft_export`'s info (rank, alpha, stacked merges, router).

    Returns:
        Markdown text (with a YAML header naming the base model and PEFT as library).
    """
    base = run.base_model
    if run.random_base:
        base_note = (f"`{base}` is a **randomly initialised** model (ubsmoe preset or architecture, "
                     f"`model.init=random`, seed {run.seed}), not a hub checkpoint. Rebuild it "
                     "into a folder, then load from there:\n\n"
                     "```python\nimport ubsmoe\nbase_dir = ubsmoe.save_base_model(\"RUN_DIR\", \"base\")\n```\n")
        yaml_base = ""
    else:
        base_note = f"Base model: `{base}`.\n"
        yaml_base = f"base_model: {base}\n"
    levels = "\n".join(f"| {lv['budget']:g} | {lv['top_k']} | {lv['lora_rank']} |" for lv in run.levels)
    experts = info.get("lora_experts")
    what = [
        "- attention LoRA (`q_proj k_proj v_proj o_proj`, PEFT `target_modules`),",
        ("- per-expert LoRA on OLMoE's fused expert weights (`mlp.experts.gate_up_proj`, "
         "`mlp.experts.down_proj`, PEFT `target_parameters`),"),
    ]
    if experts:
        what = what[:1] if info.get("peft", True) else ["- nothing PEFT can load (no attention LoRA),"]
        what.append(f"- **not in PEFT**: the {experts['experts']} LoRA experts (top-{experts['top_k']}) "
                    f"on the dense MLP. {experts['note']},")
    if info.get("router"):
        what.append("- the trained router of every layer (`mlp.gate`, PEFT `modules_to_save`),")
    if info.get("stacked"):
        what.append(f"- {run.method} merged its updates into the base weights ({info['merges']} merges): "
                    f"they are stacked into this one LoRA of rank {info['r']} (scaling 1), exact; load it "
                    "on the **pretrained** base, not on merged weights,")
    if experts:
        what.append("- LoRA experts on a dense MLP are beyond the UB-SMoE and A3SMoE papers "
                    "(README, \"Mixture of LoRA experts on a dense model\"),")
    phi = ("UB-SMoE's DMR modulation phi (`phi.safetensors`) and routing at K below the native "
           "top-k are not expressible in PEFT: use `ubsmoe.load_run(RUN_DIR, budget=beta)` for them."
           if run.phi else
           "Routing at K below the native top-k (the budget levels) is not expressible in PEFT: "
           "use `ubsmoe.load_run(RUN_DIR, budget=beta)` for it.")
    tags = "\n".join(f"- {t}" for t in dict.fromkeys(["ubsmoe", run.method]))
    return f"""---
{yaml_base}library_name: peft
tags:
{tags}
- olmoe
- lora
---

# {run.method} adapters (ubsmoe)

Federated fine-tuning with ubsmoe (UB-SMoE, ICML 2026, arXiv 2605.16690), method
**{run.method}**: {run.rounds} rounds, {run.clients} clients (a share {run.fraction:g} of them sampled per round).

{base_note}
## Budget levels

| budget beta | K (experts per token) | LoRA rank |
|---|---|---|
{levels}

## Load with transformers + PEFT

```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained("{base if not run.random_base else 'base'}")
model = PeftModel.from_pretrained(model, "path/to/this/folder")
```

This adapter (LoRA r={info['r']}, alpha={info['lora_alpha']:g}) holds:
{chr(10).join(what)}

The plain PEFT model routes at the base model's native top-k. {phi}

## Accuracy (from the run's summary, percent)

{_table(run.accuracy)}"""
