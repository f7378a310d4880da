"""Where a request is routed: cache lookup → embed → global scores → method → cache store.

The Router owns the expert index (rebuilt when the pool changes) and the routing methods. It knows nothing
about HTTP or vLLM; the gateway turns its decision into an adapter on a backend.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from adapters.pool import ExpertPool
from router.cache import RoutingCache, cache_key
from router.calibration import OUT_OF_DOMAIN_PROMPTS
from router.decision import RoutingDecision, RoutingParams
from router.embed import MicroBatcher
from router.index import ExpertIndex, calibrate_threshold, expert_vectors, in_domain_best
from router.methods import MethodConfig, RoutingMethod, method_class, method_names

StageObserver = Callable[[str, float], None]


@dataclass
class RouteResult:
    decision: RoutingDecision
    stages: dict[str, float]  # seconds per stage: cache, embed, score (cache and embed overlap on a local miss)
    cache: str  # hit, miss, bypass (Redis down) or off (no cache configured)


def _gate_kinds(experts) -> dict[str, frozenset[str]]:
    from adapters.gates import KINDS, has_gates

    return {e.name: frozenset(k for k in KINDS if has_gates(e.path, k)) for e in experts}


class Router:
    def __init__(
        self,
        pool: ExpertPool,
        embedder: MicroBatcher,
        cache: RoutingCache | None,
        *,
        default_mode: str = "global",
        method_configs: Mapping[str, MethodConfig] | None = None,
        fixed_threshold: float | None = None,
        expert_vector: str = "centroid",
    ):
        self.pool = pool
        self.embedder = embedder
        self.cache = cache
        self.default_mode = default_mode
        self.fixed_threshold = fixed_threshold
        self.expert_vector = expert_vector
        configs = method_configs or {}
        self.methods: dict[str, RoutingMethod] = {n: method_class(n)(configs.get(n)) for n in method_names()}
        self.index = ExpertIndex(names=[], vectors=np.zeros((0, embedder.embedder.dim), dtype=np.float32))
        self._rebuild_lock = asyncio.Lock()
        self._pending: set[asyncio.Task] = set()  # background cache writes, kept referenced until done

    # --- index ----------------------------------------------------------------------------------------
    async def rebuild_index(self) -> ExpertIndex:
        """Embed every expert (description or example centroid) and re-calibrate the abstain threshold on the
        cards' examples against general prompts."""
        async with self._rebuild_lock:
            experts = self.pool.servable()  # quarantined experts are left out
            version = self.pool.version
            descriptions = await self.embedder.embed_many([e.card.description for e in experts])
            examples = [x for e in experts for x in e.card.examples]
            in_vecs = await self.embedder.embed_many(examples)
            bounds = np.cumsum([0] + [len(e.card.examples) for e in experts])
            per_expert = [in_vecs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            vectors = expert_vectors(self.expert_vector, descriptions, per_expert)
            threshold = self.fixed_threshold
            if threshold is None:
                ood_vecs = await self.embedder.embed_many(list(OUT_OF_DOMAIN_PROMPTS))
                ood_best = (ood_vecs @ vectors.T).max(axis=1) if len(experts) else np.zeros(0)
                in_best = in_domain_best(self.expert_vector, descriptions, per_expert, vectors)
                threshold = calibrate_threshold(in_best, ood_best)
            self.index = ExpertIndex(
                names=[e.name for e in experts],
                vectors=vectors,
                threshold=float(threshold),
                # The vector kind changes decisions, so cached ones must not outlive a change of it.
                pool_version=self._index_version(version),
                ranks={e.name: e.rank for e in experts},
                gates=await asyncio.to_thread(_gate_kinds, experts),
            )
            return self.index

    def _index_version(self, pool_version: str) -> str:
        # The vector kind and the quarantined set change decisions too: cached ones must not outlive either.
        return f"{pool_version}.{self.pool.health_version}.{self.expert_vector}"

    async def ensure_current(self, attempts: int = 3) -> None:
        """Wait until the index reflects the pool as it is now: a change may be mid-rebuild (wait for it) or
        not yet rebuilt (rebuild now). Bounded, for a pool that keeps changing."""
        for _ in range(attempts):
            if self.index is not None and self.index.pool_version == self._index_version(self.pool.version):
                return
            if self._rebuild_lock.locked():
                async with self._rebuild_lock:
                    pass
            else:
                await self.rebuild_index()

    # --- routing --------------------------------------------------------------------------------------
    def method(self, mode: str | None) -> RoutingMethod:
        name = mode or self.default_mode
        if name not in self.methods:
            raise KeyError(f"unknown routing mode {name!r}; known: {', '.join(sorted(self.methods))}")
        return self.methods[name]

    async def route(self, query: str, params: RoutingParams | None = None) -> RouteResult:
        params = params or RoutingParams()
        method = self.method(params.mode)
        index = self.index
        stages: dict[str, float] = {}
        key = cache_key(index.pool_version, method.name, method.cache_params(params), query)

        cache_status = "off"
        if self.cache is None:
            vector = await self._embed(query, stages)
        else:
            t0 = time.perf_counter()
            hit = self.cache.get_local(key)
            if hit is not None:
                stages["cache"] = time.perf_counter() - t0
                return RouteResult(hit.model_copy(update={"cached": True}), stages, "hit")
            # Not decided here: ask Redis (another replica, or this one before a restart, may have decided) while
            # the query is embedded, so a miss does not wait a round trip before its embedding starts. A Redis
            # hit drops the embedding (cancelled if it has not started).
            embedding = asyncio.ensure_future(self._embed(query, stages))
            try:
                hit, cache_status = await self.cache.get_remote(key)
                stages["cache"] = time.perf_counter() - t0
                if hit is not None:
                    return RouteResult(hit.model_copy(update={"cached": True}), stages, cache_status)
                vector = await embedding
            finally:
                if not embedding.done():
                    embedding.cancel()
                elif not embedding.cancelled():
                    embedding.exception()  # retrieved: an embedding that failed after a Redis hit is not an error
        t0 = time.perf_counter()
        decision = self.decide(vector, method, params, index)
        stages["score"] = time.perf_counter() - t0

        if self.cache is not None and cache_status != "bypass":
            # Stored in the background: the request does not wait for the write.
            task = asyncio.get_running_loop().create_task(self.cache.set(key, decision))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        return RouteResult(decision, stages, cache_status)

    async def _embed(self, query: str, stages: dict[str, float]) -> np.ndarray:
        t0 = time.perf_counter()
        vector = await self.embedder.embed(query)
        stages["embed"] = time.perf_counter() - t0
        return vector

    async def drain(self) -> None:
        """Wait for background cache writes (tests, benchmarks and shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    @staticmethod
    def decide(vector: np.ndarray, method: RoutingMethod, params: RoutingParams, index: ExpertIndex) -> RoutingDecision:
        """The pure part: a query vector and a method give a decision (no I/O; used by `flock bench`)."""
        scores = index.scores(vector)
        experts = method.choose(scores, index, params)
        return RoutingDecision(mode=method.name, experts=experts, gate=method.gate(params) if experts else None)
