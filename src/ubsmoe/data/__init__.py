"""Instruction data (LLM-Adapters commonsense format), prompt template, tokenization,
client partitioning and compute-budget assignment."""

from ubsmoe.budgets import assign_budgets, top_k_for_budget
from ubsmoe.data.commonsense import (
    CommonsenseData,
    answer_choices,
    download_commonsense,
    load_commonsense,
    resolve_data_dir,
)
from ubsmoe.data.partition import partition_clients
from ubsmoe.data.prompts import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_NO_INPUT,
    collate,
    format_prompt,
    tokenize_example,
)

__all__ = [
    "IGNORE_INDEX",
    "PROMPT_TEMPLATE",
    "PROMPT_TEMPLATE_NO_INPUT",
    "CommonsenseData",
    "answer_choices",
    "assign_budgets",
    "collate",
    "download_commonsense",
    "format_prompt",
    "load_commonsense",
    "partition_clients",
    "resolve_data_dir",
    "tokenize_example",
    "top_k_for_budget",
]
