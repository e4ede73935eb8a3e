"""The error types every layer raises for bad input (foundation layer, imports nothing of ubsmoe).

Both are :class:`ValueError` subclasses whose message names the field (or the node
and key) and the allowed values, one problem per line.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DeclarationError", "bad_value"]


class ConfigError(ValueError):
    """Invalid configuration. The message lists every problem, one per line."""


class DeclarationError(ValueError):
    """A node's declaration is invalid or unusable by the run; the message is one line."""


def bad_value(name: str, value: object, allowed: str) -> str:
    """The one-line message for a bad field: ``"<name>: got <value!r>, expected <allowed>"``."""
    return f"{name}: got {value!r}, expected {allowed}"


def raise_if_any(errors: list[str]) -> None:
    """Raise one :class:`ConfigError` listing every message in ``errors`` (one per line), if any.

    Raises:
        ConfigError: ``errors`` is not empty.
    """
    if errors:
        raise ConfigError("\n".join(errors))
