"""One interface for every routing method, registered by name (as PEFT registers its tuners).

A method turns the global scores of one query into the experts that answer it and their weights. Adding a
method is a new module in this package that subclasses RoutingMethod, names its typed config (a frozen
dataclass deriving from MethodConfig) and decorates the class with @register.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from router.decision import ExpertChoice, GateParams, RoutingParams
from router.index import ExpertIndex

_METHODS: dict[str, type[RoutingMethod]] = {}


@dataclass(frozen=True)
class MethodConfig:
    """What every method is told: the backend's largest LoRA rank (a composite must fit in it)."""

    max_rank: int = 1 << 30


class RoutingMethod(ABC):
    name: ClassVar[str]
    config_type: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig | None = None):
        config = config if config is not None else self.config_type()
        if not isinstance(config, self.config_type):
            raise TypeError(f"{self.name} takes a {self.config_type.__name__}, not {type(config).__name__}")
        self.config = config

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


def method_class(name: str) -> type[RoutingMethod]:
    try:
        return _METHODS[name]
    except KeyError:
        raise KeyError(f"unknown routing mode {name!r}; known: {', '.join(method_names())}") from None


def create_method(name: str, **config: object) -> RoutingMethod:
    """The method `name` with its config built from `config` (a field it does not have is a TypeError)."""
    cls = method_class(name)
    return cls(cls.config_type(**config))  # type: ignore[arg-type]
