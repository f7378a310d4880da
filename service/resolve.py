"""A routing decision becomes the adapter that serves it: an expert, a merge composite or a gated composite.

Composites are built (or found built) in the state directory; vLLM loads them like any LoRA directory.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from adapters.composite import CompositeStore
from adapters.composite_cache import CompositeCache
from adapters.gated_composite import GatedCompositeStore, GateSpec
from adapters.pool import ExpertPool, files_fingerprint
from router.decision import RoutingDecision
from service.backend import Adapter
from service.errors import APIError
from service.limits import BuildLimiter

log = logging.getLogger(__name__)


def expert_left(name: str) -> APIError:
    """A decision names an expert that has left the pool since it was made (or cached)."""
    return APIError(503, f"expert {name!r} left the pool; retry", code="pool_changed", headers={"Retry-After": "0"})


def parts_version(parts: list[tuple[str, float, Path]]) -> str:
    """What a composite of `parts` is built from: each part's name and files (size, mtime). Not the pool's
    version: registering or removing another expert must not make every composite be built again."""
    key = json.dumps([[name, str(path), files_fingerprint(path)] for name, _, path in parts])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class Resolver:
    def __init__(self, pool: ExpertPool, composites: CompositeStore, gated: GatedCompositeStore,
                 cache: CompositeCache, evicted: Callable[[list[str]], Awaitable[None]], limiter: BuildLimiter):
        self.pool = pool
        self.composites = composites
        self.gated = gated
        self.cache = cache  # both kinds of composite, on one disk budget
        self.evicted = evicted  # told which composites left the disk (to unload them from the backends)
        self.limiter = limiter

    async def _ensure(self, ensure: Callable[[], tuple[str, Path]]) -> tuple[str, Path]:
        def run() -> tuple[str, Path, list[str]]:
            cid, path = ensure()
            return cid, path, self.cache.use(cid, path, built=cid not in self.cache)

        try:
            cid, path, evicted = await asyncio.to_thread(run)
        except APIError:
            raise
        except Exception as exc:  # an unreadable or invalid expert file, typically
            log.warning("composite build failed: %s", exc)
            raise APIError(502, f"a composite of the chosen experts could not be built: {exc}",
                           code="composite_build_failed", type_="server_error") from None
        if evicted:
            await self.evicted(evicted)
        return cid, path

    async def resolve(self, decision: RoutingDecision, key_id: str = "anonymous") -> Adapter | None:
        """The adapter for `decision`; None: the base model. Raises a 503 pool_changed when an expert left the
        pool, or a 429 when `key_id` has had its share of new composites this minute."""
        take = functools.partial(self.limiter.take, key_id)
        experts = decision.experts
        if not experts:
            return None
        resolved = []
        for choice in experts:
            expert = self.pool.get(choice.name)
            if expert is None:
                raise expert_left(choice.name)
            resolved.append((choice.name, choice.weight, expert.path))
        if len(resolved) == 1:
            return Adapter(name=resolved[0][0], path=resolved[0][2])
        if decision.gate is not None:  # per-token modes: candidates + global scores + gate signals, one adapter
            g = decision.gate
            parts = [(c.name, c.score or 0.0, path) for c, (_, _, path) in zip(experts, resolved, strict=True)]
            spec = GateSpec(kind=g.local, alpha=g.alpha, top_k=g.top_k)
            cid, path = await self._ensure(lambda: self.gated.ensure(parts_version(resolved), parts, spec, take))
            return Adapter(name=cid, path=path, kind="gated")
        cid, path = await self._ensure(lambda: self.composites.ensure(parts_version(resolved), resolved, take))
        return Adapter(name=cid, path=path, kind="merge")

    def release(self, adapter: Adapter | None) -> None:
        """The request served by `adapter` is done: a composite it pinned (in `resolve`) may be evicted again."""
        if adapter is not None and adapter.kind != "expert":
            self.cache.release(adapter.name)

    async def resolve_or_reroute(self, decision: RoutingDecision,
                                 reroute: Callable[[], Awaitable[RoutingDecision]] | None, key_id: str = "anonymous"
                                 ) -> tuple[RoutingDecision, Adapter | None]:
        """As `resolve`; a routed decision whose expert left the pool is routed again on the pool as it is now,
        once (`reroute`; None for a request that named its expert, which then gets the 503)."""
        try:
            return decision, await self.resolve(decision, key_id)
        except APIError as exc:
            if exc.code != "pool_changed" or reroute is None:
                raise
        decision = await reroute()
        return decision, await self.resolve(decision, key_id)
