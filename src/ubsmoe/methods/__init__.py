"""Federated fine-tuning methods: one module each, registered by name.

Importing this package registers every built-in method.
"""

from ubsmoe.methods import (  # noqa: F401  (registration)
    a3smoe,
    a3smoe_flexlora,
    fedit,
    flexlora,
    flora,
    florist,
    hetlora,
    naive_smoe,
    smoe_llb,
    ubsmoe,
)
from ubsmoe.methods.aggregation import ClientUpdate
from ubsmoe.methods.base import Method
from ubsmoe.methods.registry import available_methods, get_method_class, register_method

__all__ = ["ClientUpdate", "Method", "available_methods", "get_method_class", "register_method"]
