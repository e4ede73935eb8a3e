"""The allowed values of the config fields that take one of a fixed set (tasks, patterns, protocols, dtypes, presets)."""

from __future__ import annotations

from ubsmoe.budgets import BUDGET_PATTERNS  # noqa: F401  (re-exported: the budget rules own the pattern names)

COMMONSENSE_TASKS = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Challenge",
    "ARC-Easy",
    "openbookqa",
)
# How a simulated fleet's clock is charged: measured step time, or FLOPs / assumed throughput.
STEP_COSTS = ("measured", "flops")
PARTITIONS = ("iid", "dirichlet")
# Data sources (``data.name``): the LLM-Adapters commonsense suite, or any instruction data.
DATA_NAMES = ("commonsense", "instruction")
# Answer types of instruction tasks (``data.answer_types``), each with its own metric.
ANSWER_TYPES = ("label", "letter", "numeric", "text")
# Record fields an HF dataset's columns map onto (``data.columns``).
RECORD_FIELDS = ("instruction", "input", "output", "answer", "task", "category")
# Metric reported as a free-text task's value (``eval.text_metric``).
TEXT_METRICS = ("rouge_l", "bertscore_f1")
EVAL_PROTOCOLS = ("generation", "loglik", "loss")
# K a budget level is evaluated at: its own K_j (``budget``) or the model's native top-k.
EVAL_TOP_K = ("budget", "native")
# K a client trains at: the method's own choice (``auto``), K_c (``budget``) or native.
TRAIN_TOP_K = ("auto", "budget", "native")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MODEL_INITS = ("auto", "random", "pretrained")
# How a LoRA's scale follows its rank (``model.lora_scale_rule``): one scale for every rank
# (alpha = scale * r) or one alpha for every rank (scale = alpha / r, the old rule).
LORA_SCALE_RULES = ("rank_independent", "fixed_alpha")
# Random-weight OLMoE-architecture presets (sizes in ubsmoe.models.build.PRESETS).
MODEL_PRESETS = ("tiny", "medium", "tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-dense")


# Client-level DP (``privacy.mode``) and the parameter groups it may privatise (``privacy.groups``).
PRIVACY_MODES = ("off", "central", "local")
PRIVACY_GROUPS = ("experts", "shared", "router", "phi")
