"""Building a :class:`~ubsmoe.config.RunConfig` from YAML and ``key=value`` overrides, once, at the edge; saving it."""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ubsmoe.config.run import RunConfig, method_section, method_sections
from ubsmoe.errors import ConfigError
from ubsmoe.errors import bad_value as _bad
from ubsmoe.io import atomic_write_text


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert ``value`` (from YAML or an override string) to the annotated type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(name, value, args[0])
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(_bad(name, value, "a list"))
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(_bad(name, value, "true or false"))
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(_bad(name, value, "an integer"))
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(_bad(name, value, "an integer")) from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(_bad(name, value, "an integer"))
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(_bad(name, value, "a number"))
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(_bad(name, value, "a number")) from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(_bad(name, value, "a string"))
        return "" if value is None else str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, errors: list[str], **fixed: Any) -> Any:
    """Build dataclass ``cls`` from a nested dict, collecting errors with dotted names.

    ``fixed`` keyword arguments are passed to ``cls`` as they are (already built).
    """
    if not isinstance(data, dict):
        errors.append(_bad(prefix.rstrip("."), data, "a mapping of keys"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields or key == "method_config":
            allowed = ", ".join(sorted(k for k in fields if k != "method_config"))
            errors.append(f"{name}: unknown key (allowed: {allowed})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            sub = _build(tp, value, f"{name}.", errors)
            if sub is not None:
                kwargs[key] = sub
            continue
        try:
            kwargs[key] = _coerce(name, value, tp)
        except ConfigError as e:
            errors.append(str(e))
    kwargs.update(fixed)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        errors.extend(str(e).splitlines())
    except TypeError as e:  # pragma: no cover - a dataclass without defaults
        errors.append(f"{prefix.rstrip('.')}: {e}")
    return None


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: '{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["fl.rounds=3", "method=a3smoe"]`` into a nested dict of YAML-parsed values.

    Raises:
        ConfigError: an override without ``=`` or with an empty key.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. fl.rounds=3")
        value = yaml.safe_load(raw) if raw.strip() else ""
        _set_dotted(tree, key, value)
    return tree


def merge_trees(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``extra`` merged in: nested dicts merge key by key, other values replace."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def default_config_dict() -> dict[str, Any]:
    """The embedded default run (``ubsmoe/configs/default.yaml``) as a nested dict."""
    text = resources.files("ubsmoe").joinpath("configs/default.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Validate a nested dict into a :class:`RunConfig`, reporting every problem at once.

    Raises:
        ConfigError: unknown keys, wrong types or out-of-range values (one per line).
    """
    tree = dict(tree)
    errors: list[str] = []
    method = tree.pop("method", "ubsmoe")
    try:
        config_class = method_section(method)
    except ConfigError as e:
        raise ConfigError(str(e)) from None
    method_tree = tree.pop(method, {}) or {}
    for other in method_sections():
        if other != method and other in tree:
            warnings.warn(
                f"config section '{other}' is ignored: the selected method is '{method}'",
                stacklevel=2,
            )
            tree.pop(other)
    method_config = _build(config_class, method_tree, f"{method}.", errors)
    run = (_build(RunConfig, {**tree, "method": method}, "", errors, method_config=method_config)
           if not errors else None)
    if errors:
        raise ConfigError("\n".join(errors))
    return run


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Resolve a run config: embedded default <- YAML file <- ``key=value`` overrides.

    Args:
        path: optional YAML file; its keys override the embedded default.
        overrides: dotted ``key=value`` strings, applied last.

    Raises:
        ConfigError: a missing or unreadable file, or any invalid field.
    """
    tree = default_config_dict()
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file: {str(p)!r} does not exist")
        try:
            user = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r}: not valid YAML ({e})") from e
        if not isinstance(user, dict):
            raise ConfigError(f"config file {str(p)!r}: expected a mapping at the top level")
        tree = merge_trees(tree, user)
    if overrides:
        over = parse_overrides(overrides)
        # A new method discards the default's method section rather than merging it.
        if "method" in over and over["method"] != tree.get("method"):
            tree.pop(tree.get("method", ""), None)
        tree = merge_trees(tree, over)
    return config_from_dict(tree)


def load_saved_config(path: str | Path) -> RunConfig:
    """A run directory's saved ``config.yaml`` (``--resume``, ``load_run``, ``ubsmoe eval``, sweeps).

    A run saved before ``model.lora_scale_rule`` existed trained every LoRA at
    ``alpha / r``: a saved file whose ``model`` section lacks ``lora_scale_rule`` loads
    with ``fixed_alpha``, so the run resumes and evaluates at the scale it trained at.
    (:func:`save_config` writes every field, so every newer run states its rule.)

    Raises:
        ConfigError: as :func:`load_config`.
    """
    p = Path(path)
    try:
        saved = yaml.safe_load(p.read_text(encoding="utf-8")) if p.is_file() else None
    except yaml.YAMLError:
        saved = None  # load_config names the error
    old = isinstance(saved, dict) and isinstance(saved.get("model"), dict) \
        and "lora_scale_rule" not in saved["model"]
    return load_config(p, ["model.lora_scale_rule=fixed_alpha"] if old else None)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dict to dotted keys (``{"fl": {"rounds": 2}} -> {"fl.rounds": 2}``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten`."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        _set_dotted(tree, key, value)
    return tree
