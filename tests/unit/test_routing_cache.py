"""The in-process decision cache in front of Redis: bounded, expiring, and used before Redis is asked; on a local
miss, Redis is asked while the query is embedded."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from router.cache import LocalCache, RoutingCache
from router.decision import ExpertChoice, RoutingDecision
from router.index import ExpertIndex
from router.router import Router
from service.processes import free_port

DECISION = RoutingDecision(mode="global", experts=[ExpertChoice(name="cooking", weight=1.0)])


def test_local_cache_is_a_bounded_lru():
    cache = LocalCache(max_entries=2)
    cache.put("a", DECISION, 60)
    cache.put("b", DECISION, 60)
    assert cache.get("a") is DECISION  # a is now the most recently used
    cache.put("c", DECISION, 60)
    assert len(cache) == 2 and cache.get("b") is None and cache.get("a") is DECISION


def test_local_cache_entries_expire():
    cache = LocalCache(max_entries=10)
    cache.put("a", DECISION, 0.05)
    cache.put("never", DECISION, 0)  # no lifetime left: not kept
    assert cache.get("a") is DECISION and cache.get("never") is None
    time.sleep(0.06)
    assert cache.get("a") is None and len(cache) == 0


async def test_a_local_hit_needs_no_redis():
    cache = RoutingCache(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60)  # nothing listens there
    try:
        assert await cache.get("k") == (None, "bypass")  # not known here, Redis down: bypassed, as before
        await cache.set("k", DECISION)
        assert await cache.get("k") == (DECISION, "hit")
    finally:
        await cache.close()


class _Redis(RoutingCache):
    """Redis answers after `delay_s` with `answer`; every step is logged."""

    def __init__(self, answer: RoutingDecision | None, delay_s: float, log: list[str]):
        super().__init__(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60)
        self.answer, self.delay_s, self.log = answer, delay_s, log

    async def get_remote(self, key: str):
        self.log.append("redis asked")
        await asyncio.sleep(self.delay_s)
        self.log.append("redis answered")
        return (self.answer, "hit") if self.answer is not None else (None, "miss")


class _Embedder:
    """Embeds in `delay_s`; logs start, end and cancellation."""

    def __init__(self, delay_s: float, log: list[str]):
        self.embedder = type("E", (), {"dim": 4})()
        self.delay_s, self.log = delay_s, log

    async def embed(self, text: str) -> np.ndarray:
        self.log.append("embed started")
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.log.append("embed cancelled")
            raise
        self.log.append("embed done")
        return np.array([1.0, 0.0, 0.0, 0.0], dtype=np.float32)


def _router(cache: RoutingCache, embedder: _Embedder) -> Router:
    router = Router(pool=None, embedder=embedder, cache=cache)  # type: ignore[arg-type]
    router.index = ExpertIndex(names=["cooking"], vectors=np.eye(4, dtype=np.float32)[:1], threshold=0.5)
    return router


async def test_a_local_miss_embeds_while_redis_is_asked():
    log: list[str] = []
    cache = _Redis(None, 0.05, log)
    router = _router(cache, _Embedder(0.05, log))
    try:
        result = await router.route("banana bread")
        await router.drain()
    finally:
        await cache.close()
    assert result.cache == "miss" and result.decision.experts[0].name == "cooking"
    # The embedding started before Redis answered: the two overlapped instead of running one after the other.
    assert log.index("embed started") < log.index("redis answered"), log
    assert cache.get_local(next(iter(cache.local._entries))) is not None  # stored for next time


async def test_a_redis_hit_drops_the_embedding():
    log: list[str] = []
    cache = _Redis(DECISION, 0.01, log)
    router = _router(cache, _Embedder(5.0, log))
    try:
        t0 = time.perf_counter()
        result = await router.route("banana bread")
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0)  # let the cancellation land
    finally:
        await cache.close()
    assert result.cache == "hit" and result.decision.cached and result.decision.experts[0].name == "cooking"
    assert elapsed < 2.0 and "embed cancelled" in log and "embed done" not in log, log
