"""The papers' experiments as shipped YAML files: a base, a grid and two scales.

An experiment file (``ubsmoe/experiments/<name>.yaml``, or any path) holds::

    description: one line shown by `ubsmoe configs`
    paper: which table or figure it reproduces
    requires: optional {capability, message}: a feature the experiment needs
    base: overrides on top of the embedded default run (nested or dotted keys)
    grid:
      methods: [ubsmoe, a3smoe, ...]
      settings:                # named axes, crossed with each other and the methods
        num_clients: {key: fl.num_clients, values: [8, 40]}     # one key, plain values
        ablation: {values: {none: {ubsmoe.pg: false}, full: {}}}  # named override sets
      seeds: [0, 1, 2]         # -> train.seed
      method_overrides: {fedit: {...}}
    scales:
      tiny: {overrides: {...}, seeds: [0], method_overrides: {...}, settings: {...}}
      paper: {...}

A cell is one (method, setting values, seed). Its resolved config is, in order of
precedence (last wins): the embedded default, ``base``, the scale's ``overrides``,
``grid.method_overrides[method]``, the scale's ``method_overrides[method]``, the
cell's setting overrides, ``train.seed``, then the command line's ``key=value``
overrides. A scale's ``settings`` and ``seeds`` replace the grid's (per axis).

Cells are named by a readable label (``method-setting=value-seed0``) plus an
8-hex-digit hash of the resolved config (:func:`config_hash`; ``model.device`` left
out, so a sweep may place a cell on any GPU), so two experiments with the same
runs (``table1`` and ``table3``) share run directories.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ubsmoe.config import flatten
from ubsmoe.errors import ConfigError

SCALES = ("tiny", "paper")
_TOP_KEYS = ("description", "paper", "requires", "base", "grid", "scales")
_GRID_KEYS = ("methods", "settings", "seeds", "method_overrides")
_SCALE_KEYS = ("overrides", "settings", "seeds", "method_overrides")


class RequirementError(ConfigError):
    """A cell of an experiment with ``requires`` does not validate: its one-line message."""


@dataclass
class Setting:
    """One named grid axis.

    Attributes:
        name: the axis name (a column of the cell label and of ``cell.json`` settings).
        values: value label -> flat dotted overrides it applies.
        labels: the value labels in file order (the values as written: ``8``, ``0.5``,
            ``long_tail``, ``full``).
    """

    name: str
    values: dict[str, dict[str, Any]]
    labels: list[Any]


@dataclass
class Experiment:
    """A parsed experiment file (see the module docstring for the schema).

    Attributes:
        name: the experiment's name (file stem).
        description: one line.
        paper: the table or figure it reproduces.
        requires: ``{"capability", "message"}`` or None.
        base: flat dotted overrides on the embedded default.
        methods: the grid's methods.
        settings: the grid's named axes.
        seeds: the grid's seeds.
        method_overrides: method -> flat dotted overrides.
        scales: scale name -> its parsed section (``overrides``, ``settings``,
            ``seeds``, ``method_overrides``).
        source: the file it came from.
    """

    name: str
    description: str
    paper: str
    requires: dict[str, str] | None
    base: dict[str, Any]
    methods: list[str]
    settings: list[Setting]
    seeds: list[int]
    method_overrides: dict[str, dict[str, Any]]
    scales: dict[str, dict[str, Any]]
    source: str = ""

    def cells(self, scale: str = "tiny", methods: list[str] | None = None,
              seeds: int | list[int] | None = None) -> list[Cell]:
        """Expand the grid at ``scale`` into cells (methods x settings x seeds).

        Args:
            scale: ``tiny`` or ``paper``.
            methods: keep only these methods (each must be in the grid).
            seeds: an int N: the first N seeds ``0..N-1``; a list: those seeds;
                None: the scale's (else the grid's) seeds.

        Returns:
            Cells in grid order: method outermost, then settings in file order, seed innermost.

        Raises:
            ConfigError: an unknown scale, a method not in the grid, N < 1.
        """
        if scale not in self.scales:
            raise ConfigError(f"--scale: got {scale!r}, expected one of {', '.join(self.scales)}")
        sc = self.scales[scale]
        if methods is not None:
            bad = [m for m in methods if m not in self.methods]
            if bad or not methods:
                raise ConfigError(f"--methods: got {','.join(methods)!r}, expected a subset of "
                                  f"{', '.join(self.methods)} (experiment {self.name})")
        chosen = [m for m in self.methods if methods is None or m in methods]
        if isinstance(seeds, int):
            if seeds < 1:
                raise ConfigError(f"--seeds: got {seeds}, expected an integer >= 1")
            seed_list = list(range(seeds))
        else:
            seed_list = list(seeds) if seeds is not None else list(sc.get("seeds") or self.seeds)
        axes = list(sc.get("settings") or {})
        settings = [next((s for s in axes if s.name == base.name), base) for base in self.settings]
        settings += [s for s in axes if s.name not in {b.name for b in self.settings}]
        out = []
        for method in chosen:
            for combo in itertools.product(*[[(s, v) for v in s.labels] for s in settings]):
                for seed in seed_list:
                    over = dict(self.base)
                    over.update(sc.get("overrides") or {})
                    over.update(self.method_overrides.get(method, {}))
                    over.update((sc.get("method_overrides") or {}).get(method, {}))
                    for s, v in combo:
                        over.update(s.values[_key(v)])
                    over["train.seed"] = seed
                    values = {s.name: v for s, v in combo}
                    out.append(Cell(self.name, scale, method, values, seed, over))
        return out


@dataclass
class Cell:
    """One run of an experiment's grid.

    Attributes:
        experiment: the experiment's name.
        scale: ``tiny`` or ``paper``.
        method: the method.
        values: setting name -> value label.
        seed: ``train.seed``.
        overrides: flat dotted overrides on the embedded default (everything but the method).
    """

    experiment: str
    scale: str
    method: str
    values: dict[str, Any]
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Readable name: ``method[-setting=value...]-seedN`` (no path separators)."""
        parts = [self.method, *(f"{k}={v}" for k, v in self.values.items()), f"seed{self.seed}"]
        return "-".join(str(p).replace("/", "_").replace(" ", "_") for p in parts)

    def settings(self) -> dict[str, Any]:
        """``cell.json``'s settings: every axis value plus ``method``."""
        return {"method": self.method, **self.values}


def _key(value: Any) -> str:
    """A setting value's dictionary key (values are stored under their string form)."""
    return str(value)


def _flat(name: str, data: Any, errors: list[str]) -> dict[str, Any]:
    """Flatten a nested or dotted overrides mapping; an error line if it is not a mapping."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        errors.append(f"{name}: got {data!r}, expected a mapping of config keys")
        return {}
    return flatten(data)


def _parse_settings(name: str, data: Any, errors: list[str]) -> list[Setting]:
    """Parse a ``settings`` mapping (see the module docstring) into axes."""
    if data is None:
        return []
    if not isinstance(data, dict):
        errors.append(f"{name}: got {data!r}, expected a mapping of setting name -> {{key, values}}")
        return []
    out = []
    for axis, spec in data.items():
        where = f"{name}.{axis}"
        if not isinstance(spec, dict) or "values" not in spec or set(spec) - {"key", "values"}:
            errors.append(f"{where}: expected {{key: dotted.config.key, values: [...]}} or "
                          "{values: {label: {overrides}}}")
            continue
        vals = spec["values"]
        if "key" in spec:
            if not isinstance(vals, list) or not vals:
                errors.append(f"{where}.values: got {vals!r}, expected a non-empty list")
                continue
            out.append(Setting(axis, {_key(v): {str(spec["key"]): v} for v in vals}, list(vals)))
        else:
            if not isinstance(vals, dict) or not vals:
                errors.append(f"{where}.values: got {vals!r}, expected a non-empty mapping "
                              "label -> overrides (or give `key`)")
                continue
            out.append(Setting(axis, {_key(k): _flat(f"{where}.values.{k}", v, errors)
                                      for k, v in vals.items()}, list(vals)))
    return out


def _parse_seeds(name: str, data: Any, errors: list[str]) -> list[int]:
    if data is None:
        return []
    if not isinstance(data, list) or not data or any(isinstance(s, bool) or not isinstance(s, int)
                                                     for s in data):
        errors.append(f"{name}: got {data!r}, expected a non-empty list of integers")
        return []
    return list(data)


def _parse_method_overrides(name: str, data: Any, errors: list[str]) -> dict[str, dict[str, Any]]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        errors.append(f"{name}: got {data!r}, expected a mapping method -> overrides")
        return {}
    return {m: _flat(f"{name}.{m}", v, errors) for m, v in data.items()}


def parse_experiment(data: Any, name: str, source: str = "") -> Experiment:
    """Validate an experiment file's data (see the module docstring).

    Args:
        data: the parsed YAML.
        name: the experiment's name (used in messages and cell.json).
        source: where it came from (for messages).

    Returns:
        The parsed :class:`Experiment` (cell configs are validated by :func:`resolve_cell`).

    Raises:
        ConfigError: every schema problem, one line each, naming the field.
    """
    # the method registry imports torch (seconds); `ubsmoe configs` and --help stay fast without it
    from ubsmoe.methods import available_methods

    errors: list[str] = []
    where = f"experiment {name}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    for key in data:
        if key not in _TOP_KEYS:
            errors.append(f"{where}: {key}: unknown key (allowed: {', '.join(_TOP_KEYS)})")
    requires = data.get("requires")
    if requires is not None and not (isinstance(requires, dict) and set(requires) == {"capability", "message"}
                                     and all(isinstance(v, str) and v for v in requires.values())):
        errors.append(f"{where}: requires: got {requires!r}, expected {{capability: NAME, message: TEXT}}")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict):
        errors.append(f"{where}: grid: got {grid!r}, expected a mapping")
        grid = {}
    for key in grid:
        if key not in _GRID_KEYS:
            errors.append(f"{where}: grid.{key}: unknown key (allowed: {', '.join(_GRID_KEYS)})")
    methods = grid.get("methods")
    if not isinstance(methods, list) or not methods or any(m not in available_methods() for m in methods):
        errors.append(f"{where}: grid.methods: got {methods!r}, expected a non-empty list from "
                      f"{', '.join(available_methods())}")
        methods = []
    settings = _parse_settings(f"{where}: grid.settings", grid.get("settings"), errors)
    seeds = _parse_seeds(f"{where}: grid.seeds", grid.get("seeds", [0]), errors)
    method_overrides = _parse_method_overrides(f"{where}: grid.method_overrides",
                                               grid.get("method_overrides"), errors)
    scales_data = data.get("scales")
    scales: dict[str, dict[str, Any]] = {}
    if not isinstance(scales_data, dict) or set(scales_data) != set(SCALES):
        errors.append(f"{where}: scales: expected exactly the sections {', '.join(SCALES)}")
        scales_data = {}
    for scale, sec in scales_data.items():
        sec = sec or {}
        w = f"{where}: scales.{scale}"
        if not isinstance(sec, dict):
            errors.append(f"{w}: got {sec!r}, expected a mapping")
            continue
        for key in sec:
            if key not in _SCALE_KEYS:
                errors.append(f"{w}.{key}: unknown key (allowed: {', '.join(_SCALE_KEYS)})")
        scales[scale] = {
            "overrides": _flat(f"{w}.overrides", sec.get("overrides"), errors),
            "settings": _parse_settings(f"{w}.settings", sec.get("settings"), errors),
            "seeds": _parse_seeds(f"{w}.seeds", sec.get("seeds"), errors),
            "method_overrides": _parse_method_overrides(f"{w}.method_overrides",
                                                        sec.get("method_overrides"), errors),
        }
    base = _flat(f"{where}: base", data.get("base"), errors)
    for key in ("description", "paper"):
        if not isinstance(data.get(key), str) or not data.get(key):
            errors.append(f"{where}: {key}: expected a non-empty string")
    if errors:
        raise ConfigError("\n".join(errors))
    return Experiment(name=name, description=data["description"], paper=data["paper"],
                      requires=requires, base=base, methods=methods,
                      settings=settings, seeds=seeds, method_overrides=method_overrides,
                      scales=scales, source=source)


def available_experiments() -> list[str]:
    """Names of the shipped experiments (``ubsmoe/experiments/*.yaml``), sorted."""
    root = resources.files("ubsmoe").joinpath("experiments")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def is_experiment_file(path: str | Path) -> bool:
    """True when a YAML file is an experiment (has ``grid`` and ``scales``), not a run config."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "grid" in data and "scales" in data


def load_experiment(name_or_path: str | Path) -> Experiment:
    """Load an experiment: an existing file path, else a shipped experiment name.

    Raises:
        ConfigError: neither a file nor a shipped name (the names are listed), bad
            YAML, or a schema problem.
    """
    p = Path(name_or_path)
    if p.is_file():
        text, name, source = p.read_text(encoding="utf-8"), p.stem, str(p)
    else:
        name = str(name_or_path)
        if name not in available_experiments():
            raise ConfigError(f"-c: got {name!r}, expected an existing file or one of "
                              f"{', '.join(available_experiments())}")
        text = resources.files("ubsmoe").joinpath(f"experiments/{name}.yaml").read_text(encoding="utf-8")
        source = f"ubsmoe/experiments/{name}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"experiment {name}: not valid YAML ({e})") from e
    return parse_experiment(data, name, source)
