"""The in-process decision cache in front of Redis: bounded, expiring, and used before Redis is asked."""

from __future__ import annotations

import time

from router.cache import LocalCache, RoutingCache
from router.decision import ExpertChoice, RoutingDecision
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
