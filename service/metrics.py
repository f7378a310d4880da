"""Prometheus metrics of the gateway (names flock_*). One registry per app, created by its lifespan."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _MemoLabels:
    """labels() memoised: prometheus_client's validates and locks on every call, a few µs each, several per
    request. The children are the ones prometheus_client made (and keeps), so what is exported is unchanged."""

    def labels(self, *values: Any, **kw: Any) -> Any:
        if kw:
            return super().labels(*values, **kw)  # type: ignore[misc]
        memo = self.__dict__.setdefault("_flock_children", {})
        child = memo.get(values)
        if child is None:
            child = memo[values] = super().labels(*values)  # type: ignore[misc]
        return child


class Counter(_MemoLabels, prometheus_client.Counter):
    pass


class Gauge(_MemoLabels, prometheus_client.Gauge):
    pass


class Histogram(_MemoLabels, prometheus_client.Histogram):
    pass


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("flock_requests_total", "Requests by endpoint, routing mode and outcome.",
                                ["endpoint", "mode", "outcome"], registry=r)
        self.routing_stage = Histogram("flock_routing_stage_seconds", "Routing latency by stage.",
                                       ["stage"], buckets=_LATENCY, registry=r)
        self.cache = Counter("flock_routing_cache_total", "Routing cache lookups by result (hit, miss, bypass).",
                             ["result"], registry=r)
        # expert: the name of a shared expert, "private" for a tenant's (tenants read no other tenant's names here);
        # tenant: the caller's tenant ("none": a key of no tenant, or an admin key).
        self.selections = Counter("flock_expert_selections_total", "Times an expert was chosen (base: none), by "
                                  "the caller's tenant.", ["expert", "mode", "tenant"], registry=r)
        self.backend_latency = Histogram("flock_backend_request_seconds", "Backend request latency (to last byte).",
                                         ["endpoint", "backend"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram("flock_time_to_first_token_seconds", "Gateway-observed time to first streamed token.",
                              ["endpoint"], buckets=_LATENCY, registry=r)
        self.tokens = Counter("flock_tokens_total", "Tokens by expert, kind (prompt, completion) and the caller's "
                              "tenant.", ["expert", "kind", "tenant"], registry=r)
        self.errors = Counter("flock_errors_total", "Errors by type.", ["type"], registry=r)
        self.backend_up = Gauge("flock_backend_up", "1 if the backend passes health checks.", ["backend"], registry=r)
        self.quarantined = Gauge("flock_experts_quarantined", "Experts left out because their files are broken.",
                                 registry=r)
        self.pool_size = Gauge("flock_pool_experts", "Experts registered in the pool.", registry=r)
        self.pool_changes = Counter("flock_pool_changes_total", "Changes of the expert pool made on this replica, by "
                                    "action (register, upload, replace, remove) and owning tenant (shared: none).",
                                    ["action", "tenant"], registry=r)
        # flock_composites_*: read from the composite cache when scraped, so the request path pays nothing.
        self.composites: Callable[[], tuple[int, int, int]] | None = None  # (bytes, built, evicted)
        r.register(_CompositesCollector(self))
        self.adapter_loads = Counter("flock_adapter_loads_total", "Adapters loaded into a backend.",
                                     ["backend", "kind"], registry=r)
        self.adapter_load_time = Histogram("flock_adapter_load_seconds",
                                           "Time to load an adapter into a backend (a CPU LoRA cache miss).",
                                           ["backend", "kind"], buckets=_LATENCY, registry=r)

    def observe_stages(self, stages: dict[str, float]) -> None:
        for stage, seconds in stages.items():
            self.routing_stage.labels(stage).observe(seconds)


class _CompositesCollector(Collector):
    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        size, built, evicted = self.metrics.composites() if self.metrics.composites else (0, 0, 0)
        yield GaugeMetricFamily("flock_composites_bytes", "Bytes of merge and gated composites on disk.", size)
        yield CounterMetricFamily("flock_composites_built", "Composites built.", built)
        yield CounterMetricFamily("flock_composites_evicted",
                                  "Composites evicted from disk (and unloaded from every backend).", evicted)
