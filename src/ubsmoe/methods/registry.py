"""The method registry: method name -> :class:`~ubsmoe.methods.base.Method` subclass.

:func:`register_method` also enters the method's config dataclass into the config's
method-section table (:func:`ubsmoe.config.register_method_section`), and this module
adds :func:`check_method_against_run` to the checks every
:class:`~ubsmoe.config.RunConfig` runs (:func:`ubsmoe.config.register_run_check`), so
``ubsmoe.config`` never imports a method or a model. No code outside this registry
compares method names.
"""

from __future__ import annotations

from ubsmoe.config import RunConfig, register_method_section, register_run_check
from ubsmoe.errors import ConfigError
from ubsmoe.errors import bad_value as _bad
from ubsmoe.methods.base import Method
from ubsmoe.models.architecture import known_model_type
from ubsmoe.models.families import dense_refusal, is_dense

_REGISTRY: dict[str, type[Method]] = {}  # name -> method class


def register_method(name: str):
    """Class decorator registering a :class:`Method` under a lower-case ``name``.

    Raises:
        ValueError: the name is not lower-case or is registered already.
    """

    def wrap(cls: type[Method]) -> type[Method]:
        """Register ``cls`` and set its ``name``."""
        if name != name.lower() or not name:
            raise ValueError(f"method name {name!r} must be non-empty lower-case")
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        register_method_section(name, cls.config_class)
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    """The method class registered under ``name``.

    Raises:
        ConfigError: unknown name; the message lists the available ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"method: got {name!r}, expected one of {', '.join(available_methods())}"
        ) from None


def check_method_against_run(run: RunConfig) -> None:
    """Cross-check the method against the rest of the run.

    ``train.top_k`` must be one of the method's :attr:`Method.train_top_k_modes`
    (an SMoE method cannot train at the native top-k), and an SMoE method
    (:attr:`Method.needs_moe`) is refused on a dense backbone whose type is known
    offline (preset, shipped or local config) unless ``model.lora_experts > 0``
    gives it LoRA experts; ``model.lora_experts > 0`` is refused on a sparse-MoE
    model and for a method that merges LoRA into the base weights (FLoRA, FLoRIST:
    the experts share those weights). A robust ``fl.aggregation`` is
    refused for a method that stacks or factorizes the clients' factors. A method
    config may also define ``check_run(run)`` (e.g. one LoRA rank per budget level).
    With ``privacy.mode`` on, the mode must be one of the method's
    :attr:`Method.privacy_modes` and a method that :attr:`Method.uses_counts` needs
    ``privacy.counts_noise_multiplier > 0``.

    Raises:
        ConfigError: one line naming the field and what is allowed.
    """
    method_cls = get_method_class(run.method)
    model_type = known_model_type(run.model)
    if run.model.lora_experts:  # LoRA experts: dense backbones only, base weights never merged
        if model_type is not None and not is_dense(model_type):
            raise ConfigError(_bad("model.lora_experts", run.model.lora_experts,
                                   f"0 for the sparse-MoE model {run.model.name} ({model_type}); "
                                   "LoRA experts are for dense backbones"))
        if method_cls.base_merges is not Method.base_merges:
            raise ConfigError(_bad("model.lora_experts", run.model.lora_experts,
                                   f"0 for method {run.method} (it merges LoRA into the base "
                                   "weights, which the LoRA experts share)"))
    elif method_cls.needs_moe and is_dense(model_type or ""):
        raise ConfigError(dense_refusal(run.method, run.model.name))
    modes = method_cls.train_top_k_modes
    if run.train.top_k not in modes:
        raise ConfigError(_bad("train.top_k", run.train.top_k,
                               f"one of {', '.join(modes)} for method '{run.method}'"))
    if run.fl.aggregation != "mean":  # raises for a method that aggregates all at once
        method_cls().set_robust(run.fl.aggregation, run.fl.trim_fraction)
    _check_privacy(run, method_cls)
    check = getattr(run.method_config, "check_run", None)
    if check is not None:
        check(run)


def _check_privacy(run: RunConfig, method_cls: type[Method]) -> None:
    """Refuse a ``privacy.mode`` the method does not support, and withheld counts it needs.

    Raises:
        ConfigError: one line naming the field, what is allowed and why.
    """
    privacy = run.privacy
    if not privacy.enabled:
        return
    if privacy.mode not in method_cls.privacy_modes:
        allowed = " or ".join(repr(m) for m in (*method_cls.privacy_modes, "off"))
        raise ConfigError(_bad("privacy.mode", privacy.mode,
                               f"{allowed} for method {run.method} ({method_cls.privacy_refusal})"))
    if method_cls.uses_counts and privacy.counts_noise_multiplier == 0:
        raise ConfigError(_bad("privacy.counts_noise_multiplier", privacy.counts_noise_multiplier,
                               f"a number > 0 for method {run.method} (its server step uses the "
                               "clients' expert counts, which DP withholds at 0)"))


register_run_check(check_method_against_run)
