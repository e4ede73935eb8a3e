"""Typed run configuration: nested dataclasses, YAML files and `key=value` overrides.

A run is described by one :class:`RunConfig`. It is built once, at the edge (CLI or
the Flower adapter), from the embedded default YAML, an optional user YAML and
dotted overrides such as ``fl.rounds=3`` or ``a3smoe.gamma=2``. Unknown keys are
rejected, and every invalid field is reported in one :class:`ConfigError` that
names the dotted field, the bad value and what is allowed.

Each method's own hyperparameters live in that method's config class (see
:mod:`ubsmoe.methods`); in YAML they sit in a section named after the method.

This module is the foundation layer: it imports no method and no model. Method
sections reach it through a small table (:func:`register_method_section`): the
method registry (:mod:`ubsmoe.methods.registry`) enters every method's config class
and its cross-check of a whole run (:func:`register_run_check`, which checks the
method against the model) when a method is registered. The built-in methods are
registered by importing the package named :data:`BUILTIN_METHODS`; :func:`method_section`
imports it by that name on first use when the table is still empty, as a plugin
loader would, so ``load_config(...)`` works in a fresh process that imported only
``ubsmoe.config``.
"""

from ubsmoe.config.choices import (
    ANSWER_TYPES,
    BUDGET_PATTERNS,
    COMMONSENSE_TASKS,
    DATA_NAMES,
    DTYPES,
    EVAL_PROTOCOLS,
    EVAL_TOP_K,
    MODEL_INITS,
    MODEL_PRESETS,
    PARTITIONS,
    RECORD_FIELDS,
    TEXT_METRICS,
    TRAIN_TOP_K,
)
from ubsmoe.config.data import (
    DataConfig,
)
from ubsmoe.config.eval import (
    EvalConfig,
    LogConfig,
)
from ubsmoe.config.fl import (
    AGGREGATIONS,
    FLConfig,
)
from ubsmoe.config.model import (
    ModelConfig,
    TinyModelConfig,
)
from ubsmoe.config.parse import (
    config_from_dict,
    default_config_dict,
    flatten,
    load_config,
    load_saved_config,
    merge_trees,
    parse_overrides,
    save_config,
    unflatten,
)
from ubsmoe.config.privacy import (
    PrivacyConfig,
)
from ubsmoe.config.run import (
    BUILTIN_METHODS,
    RunConfig,
    method_section,
    method_sections,
    register_method_section,
    register_run_check,
)
from ubsmoe.config.train import (
    TrainConfig,
)
from ubsmoe.errors import ConfigError

__all__ = [
    "AGGREGATIONS",
    "ANSWER_TYPES",
    "BUDGET_PATTERNS",
    "BUILTIN_METHODS",
    "COMMONSENSE_TASKS",
    "DATA_NAMES",
    "DTYPES",
    "EVAL_PROTOCOLS",
    "EVAL_TOP_K",
    "MODEL_INITS",
    "MODEL_PRESETS",
    "PARTITIONS",
    "RECORD_FIELDS",
    "TEXT_METRICS",
    "TRAIN_TOP_K",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FLConfig",
    "LogConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "TinyModelConfig",
    "TrainConfig",
    "config_from_dict",
    "default_config_dict",
    "flatten",
    "load_config",
    "load_saved_config",
    "merge_trees",
    "method_section",
    "method_sections",
    "parse_overrides",
    "register_method_section",
    "register_run_check",
    "save_config",
    "unflatten",
]
