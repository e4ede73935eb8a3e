"""One cell of an experiment: its resolved config, config hash, run-directory name and record.

A cell's resolved config is, last wins: the embedded default, the experiment's
``base``, the scale's ``overrides``, the method overrides, the cell's setting
overrides, ``train.seed``, then the command line's ``key=value`` overrides
(:mod:`ubsmoe.experiments.grid` describes the experiment file).
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from ubsmoe.config import (
    RunConfig,
    config_from_dict,
    default_config_dict,
    flatten,
    merge_trees,
    parse_overrides,
    unflatten,
)
from ubsmoe.errors import ConfigError
from ubsmoe.experiments.grid import Cell, Experiment, RequirementError

# Keys of the resolved config that do not change what a run computes (left out of the hash).
_HASH_EXCLUDE = ("model.device",)


def cell_tree(cell: Cell, overrides: list[str] | None = None) -> dict[str, Any]:
    """The cell's resolved nested config dict (before validation).

    Sections of methods other than the cell's are dropped (an experiment's base may
    set several methods' hyperparameters).

    Raises:
        ConfigError: a malformed ``key=value`` override.
    """
    from ubsmoe.methods import available_methods  # torch: see parse_experiment

    tree = default_config_dict()
    tree = merge_trees(tree, unflatten(cell.overrides))
    if overrides:
        over = parse_overrides(overrides)
        if "method" in over:
            raise ConfigError("method: choose the cell with method=M as the first override "
                              "(it is part of the grid)")
        tree = merge_trees(tree, over)
    tree["method"] = cell.method
    for other in available_methods():
        if other != cell.method:
            tree.pop(other, None)
    return tree


def resolve_cell(experiment: Experiment, cell: Cell, overrides: list[str] | None = None) -> RunConfig:
    """Validate a cell's resolved config, model architecture included.

    The fields are validated (:func:`~ubsmoe.config.config_from_dict`) and the
    model's architecture config is resolved offline from the preset or the shipped /
    local config.json (:func:`~ubsmoe.models.architecture.olmoe_config`; no weights, no
    model built), so a model the package cannot build yet fails here.

    Raises:
        RequirementError: the experiment has ``requires`` and the config does not
            validate: the experiment's one-line message (the capability is missing).
        ConfigError: any other invalid field.
    """
    # model loading imports torch and transformers (seconds); only when a cell is resolved
    from ubsmoe.models.architecture import olmoe_config

    try:
        cfg = config_from_dict(cell_tree(cell, overrides))
        try:
            olmoe_config(cfg.model)
        except ValueError as e:  # ConfigError is a ValueError too
            raise ConfigError(f"model.name: {str(e).splitlines()[0]}") from e
        return cfg
    except ConfigError as e:
        if experiment.requires is not None:
            raise RequirementError(experiment.requires["message"]) from e
        raise


def config_hash(cfg: RunConfig) -> str:
    """8 hex digits of the SHA-256 of the resolved config (``model.device`` left out).

    Stable across processes and Python versions: canonical JSON with sorted keys.
    """
    flat = {k: v for k, v in flatten(cfg.to_dict()).items() if k not in _HASH_EXCLUDE}
    text = json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]


def cell_dir_name(cell: Cell, cfg: RunConfig) -> str:
    """``<label>-<hash>``: the cell's run directory name under a sweep's ``--out``."""
    return f"{cell.label}-{config_hash(cfg)}"


def cell_record(cell: Cell, cfg: RunConfig) -> dict[str, Any]:
    """``cell.json``: experiment, scale, label, settings (incl. method), seed, config_hash."""
    return {"experiment": cell.experiment, "scale": cell.scale, "label": cell.label,
            "settings": copy.deepcopy(cell.settings()), "seed": cell.seed,
            "config_hash": config_hash(cfg)}


def find_cell(experiment: Experiment, scale: str, overrides: list[str]) -> tuple[Cell, list[str]]:
    """Pick one cell for ``ubsmoe run -c NAME method=M [setting=value ...] [key=value ...]``.

    ``method=M`` and ``NAME=value`` for a setting axis (or ``seed=N``) select the
    cell; setting axes not given must have a single value; the other ``key=value``
    items are returned as config overrides.

    Raises:
        ConfigError: no ``method=``, an unknown method or setting value, or an axis
            with several values left open.
    """
    chosen: dict[str, str] = {}
    rest: list[str] = []
    names = {s.name for s in experiment.settings} | {
        s.name for s in experiment.scales.get(scale, {}).get("settings") or []}
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and key.strip() in names | {"method", "seed"}:
            chosen[key.strip()] = value.strip()
        else:
            rest.append(item)
    if "method" not in chosen:
        raise ConfigError(f"method: required to pick a cell of {experiment.name}, expected "
                          f"method=M with M one of {', '.join(experiment.methods)}")
    seeds = [int(chosen["seed"])] if "seed" in chosen else None
    cells = experiment.cells(scale, methods=[chosen["method"]], seeds=seeds)
    if seeds is None:
        first = cells[0].seed
        cells = [c for c in cells if c.seed == first]
    for name in sorted(names):
        values = sorted({str(c.values[name]) for c in cells})
        if name in chosen:
            if chosen[name] not in values:
                raise ConfigError(f"{name}: got {chosen[name]!r}, expected one of {', '.join(values)}")
            cells = [c for c in cells if str(c.values[name]) == chosen[name]]
        elif len(values) > 1:
            raise ConfigError(f"{name}: {experiment.name} has several values ({', '.join(values)}); "
                              f"pick one with {name}=VALUE")
    return cells[0], rest
