"""The whole run's config, :class:`RunConfig`, and the table through which methods enter their config sections."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ubsmoe.config.data import DataConfig
from ubsmoe.config.eval import EvalConfig, LogConfig
from ubsmoe.config.fl import FLConfig
from ubsmoe.config.model import ModelConfig
from ubsmoe.config.privacy import PrivacyConfig, privacy_run_errors
from ubsmoe.config.train import TrainConfig
from ubsmoe.errors import ConfigError


@dataclass
class RunConfig:
    """One federated run: model, data, local training, federation, evaluation, method.

    ``method_config`` is the selected method's own config dataclass; in YAML and
    overrides it is the section named after the method (e.g. ``a3smoe.gamma``).

    Attributes:
        method: the federated method, one of ``ubsmoe methods`` (the method
            registry): ``ubsmoe`` (the default), ``smoe``, ``smoe_llb``,
            ``a3smoe``, ``fedit``, the LoRA-rank baselines ``hetlora``,
            ``flexlora``, ``flora``, ``florist``, and ``a3smoe_flexlora``. An
            unknown name is a config error listing the available ones.
        model: which model to fine-tune and where its LoRA adapters go.
        data: the data, its splits and its partition over clients.
        train: local training on each client.
        fl: the federation: clients, rounds, budgets, failures, aggregation.
        eval: evaluation of the global model per budget level.
        log: TensorBoard and W&B logging.
        privacy: client-level differential privacy of the updates and the
            utilization counts (:class:`~ubsmoe.config.privacy.PrivacyConfig`; off
            by default, docs/privacy.md).
        method_config: the selected method's own config (the section named after
            the method).
    """

    method: str = "ubsmoe"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fl: FLConfig = field(default_factory=FLConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    method_config: Any = None

    def __post_init__(self) -> None:
        config_class = method_section(self.method)  # raises ConfigError naming the choices
        if self.method_config is None:
            self.method_config = config_class()
        elif not isinstance(self.method_config, config_class):
            raise ConfigError(
                f"method_config: expected {config_class.__name__} for method "
                f"'{self.method}', got {type(self.method_config).__name__}"
            )
        errors = privacy_run_errors(self.privacy, self.fl.aggregation, self.fl.reject_norm_multiple)
        if errors:
            raise ConfigError("\n".join(errors))
        for check in _RUN_CHECKS:
            check(self)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain YAML-able data, method section under its name."""
        out = {"method": self.method}
        for f in dataclasses.fields(self):
            if f.name in ("method", "method_config"):
                continue
            out[f.name] = dataclasses.asdict(getattr(self, f.name))
        out[self.method] = dataclasses.asdict(self.method_config)
        return out


# Method sections (see the module docstring): method name -> its config dataclass, and
# the cross-checks of a built run, both filled by the method registry.
BUILTIN_METHODS = "ubsmoe.methods"
_METHOD_SECTIONS: dict[str, type] = {}
_RUN_CHECKS: list[Callable[[RunConfig], None]] = []


def register_method_section(name: str, config_class: type) -> None:
    """Enter method ``name`` and its config dataclass (its YAML section ``name:``).

    Called by :func:`ubsmoe.methods.registry.register_method`.

    Raises:
        ValueError: ``name`` is entered already with another config class.
    """
    if _METHOD_SECTIONS.get(name, config_class) is not config_class:
        raise ValueError(f"method {name!r}: config section entered twice")
    _METHOD_SECTIONS[name] = config_class


def register_run_check(check: Callable[[RunConfig], None]) -> None:
    """Add ``check(run)``, run at the end of every :class:`RunConfig` construction.

    A check raises :class:`ConfigError` (one line naming the field and what is
    allowed); the method registry adds the method-against-run cross-check.
    """
    if check not in _RUN_CHECKS:
        _RUN_CHECKS.append(check)


def method_sections() -> list[str]:
    """The method names with a config section, sorted (the registered methods)."""
    _load_builtin_methods()
    return sorted(_METHOD_SECTIONS)


def method_section(name: str) -> type:
    """The config dataclass of method ``name``.

    Raises:
        ConfigError: unknown name; the message lists the available ones.
    """
    _load_builtin_methods()
    try:
        return _METHOD_SECTIONS[name]
    except KeyError:
        raise ConfigError(
            f"method: got {name!r}, expected one of {', '.join(sorted(_METHOD_SECTIONS))}"
        ) from None


def _load_builtin_methods() -> None:
    """Register the built-in methods (import :data:`BUILTIN_METHODS` by name) once."""
    if not _METHOD_SECTIONS:
        importlib.import_module(BUILTIN_METHODS)


