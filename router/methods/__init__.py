"""Routing methods, registered by name. Importing this package registers every built-in method."""

from router.methods import gated, global_, merge  # noqa: F401  (registration side effect)
from router.methods.base import RoutingMethod, create_method, method_names, register

__all__ = ["RoutingMethod", "create_method", "method_names", "register"]
