"""One interface for every routing method, registered by name (as PEFT registers its tuners).

A method turns the global scores of one query into the experts that answer it and their weights. Adding a
method is a new module in this package that subclasses RoutingMethod and decorates it with @register.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from router.decision import ExpertChoice, GateParams, RoutingParams
from router.index import ExpertIndex

_METHODS: dict[str, type[RoutingMethod]] = {}


class RoutingMethod(ABC):
    name: ClassVar[str]

    def __init__(self, **defaults: object):
        self.defaults = defaults

    @abstractmethod
    def choose(self, scores: np.ndarray, index: ExpertIndex, params: RoutingParams) -> list[ExpertChoice]:
        """Experts for this query (empty: the base model answers); weights sum to 1."""

    def cache_params(self, params: RoutingParams) -> dict:
        """The parameters the decision depends on: part of the routing-cache key."""
        return {}

    def gate(self, params: RoutingParams) -> GateParams | None:
        """Per-token modes: how the engine mixes the chosen experts. None: fixed weights."""
        return None


def register(cls: type[RoutingMethod]) -> type[RoutingMethod]:
    _METHODS[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_METHODS)


def create_method(name: str, **defaults: object) -> RoutingMethod:
    try:
        return _METHODS[name](**defaults)
    except KeyError:
        raise KeyError(f"unknown routing mode {name!r}; known: {', '.join(method_names())}") from None
