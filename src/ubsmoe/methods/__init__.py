"""Federated fine-tuning methods: one module each, registered by name.

Importing this package registers every built-in method.
"""

from ubsmoe.methods import a3smoe, fedit, smoe, smoe_llb, ubsmoe  # noqa: F401  (registration)
from ubsmoe.methods.base import (
    ClientUpdate,
    Method,
    available_methods,
    get_method_class,
    register_method,
)

__all__ = ["ClientUpdate", "Method", "available_methods", "get_method_class", "register_method"]
