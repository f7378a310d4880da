"""Routing methods, registered by name. Importing this package registers every built-in method."""

from router.methods import gated, global_, merge  # noqa: F401  (registration side effect)
from router.methods.base import MethodConfig, RoutingMethod, create_method, method_class, method_names, register
from router.methods.gated import GateConfig
from router.methods.merge import MergeConfig

__all__ = ["GateConfig", "MergeConfig", "MethodConfig", "RoutingMethod", "create_method", "method_class",
           "method_names", "register"]
