"""Instruction data (LLM-Adapters commonsense format), prompt template, tokenization,
client partitioning and compute-budget assignment."""

from ubsmoe.budgets import top_k_for_budget
from ubsmoe.data.commonsense import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_NO_INPUT,
    CommonsenseData,
    answer_choices,
    collate,
    download_commonsense,
    format_prompt,
    load_commonsense,
    resolve_data_dir,
    tokenize_example,
)
from ubsmoe.data.partition import assign_budgets, partition_clients

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
