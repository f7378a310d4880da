"""Routing-decision cache: a small in-process LRU in front of Redis. Redis being down never fails a request: the
cache is bypassed, the bypass is counted, and Redis is tried again after a short back-off.

The local copy saves a cache hit its Redis round trip. It cannot go stale: a key names the pool version (and the
router version), so a decision is never reused for another pool; entries expire with their Redis TTL."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import OrderedDict

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError
from redis.retry import Retry

from router.decision import RoutingDecision

log = logging.getLogger(__name__)
ROUTER_VERSION = "2"  # bump when routing logic changes what a cached decision would be
_WS = re.compile(r"\s+")


def normalise_query(text: str) -> str:
    return _WS.sub(" ", text).strip().lower()


def cache_key(pool_version: str, mode: str, params: dict, query: str | tuple[str, ...]) -> str:
    """The key of one decision. `query` is the text routed or, for a chat, every user turn the decision read
    (oldest first): the same last message after another history is another key."""
    turns = (query,) if isinstance(query, str) else query
    digest = hashlib.sha256("\x1e".join(normalise_query(t) for t in turns).encode()).hexdigest()[:32]
    p = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return f"flock:route:v{ROUTER_VERSION}:{pool_version}:{mode}:{p}:{digest}"


class LocalCache:
    """Bounded LRU of decisions with per-entry expiry (monotonic seconds)."""

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, RoutingDecision]] = OrderedDict()

    def get(self, key: str) -> RoutingDecision | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: str, decision: RoutingDecision, ttl_s: float) -> None:
        if ttl_s <= 0 or self.max_entries <= 0:
            return
        self._entries[key] = (time.monotonic() + ttl_s, decision)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class RoutingCache:
    def __init__(self, url: str, ttl_s: int, *, retry_after_s: float = 1.0, local_entries: int = 10_000):
        self.ttl_s = ttl_s
        self.local = LocalCache(local_entries)
        # One immediate retry on a broken connection: after a Redis restart every pooled connection is stale,
        # and each would otherwise cost a bypass and a back-off.
        self._redis = aioredis.from_url(url, socket_timeout=0.25, socket_connect_timeout=0.25,
                                        retry=Retry(NoBackoff(), 1), retry_on_error=[ConnectionError])
        self._retry_after_s = retry_after_s
        self._down_until = 0.0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, op: str, exc: Exception) -> None:
        if self.available:
            log.warning("redis unavailable (%s); serving without the routing cache: %s", op, exc)
        self._down_until = time.monotonic() + self._retry_after_s

    async def get(self, key: str) -> tuple[RoutingDecision | None, str]:
        """(decision or None, 'hit' | 'miss' | 'bypass'). The caller must not modify the decision."""
        decision = self.get_local(key)
        if decision is not None:
            return decision, "hit"
        return await self.get_remote(key)

    def get_local(self, key: str) -> RoutingDecision | None:
        return self.local.get(key)

    async def get_remote(self, key: str) -> tuple[RoutingDecision | None, str]:
        """Redis alone (a decision another replica made, or this one before a restart); kept locally once found."""
        if not self.available:
            return None, "bypass"
        try:
            # The remaining TTL too, so the local copy expires when Redis's does (one round trip: a pipeline).
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                raw, ttl_ms = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed("get", exc)
            return None, "bypass"
        if not raw:
            return None, "miss"
        decision = RoutingDecision.model_validate_json(raw)
        self.local.put(key, decision, self.ttl_s if ttl_ms == -1 else ttl_ms / 1000)  # -1: Redis has no expiry
        return decision, "hit"

    async def set(self, key: str, decision: RoutingDecision) -> None:
        self.local.put(key, decision, self.ttl_s)
        if not self.available:
            return
        try:
            await self._redis.set(key, decision.model_dump_json(exclude={"cached"}), ex=self.ttl_s)
        except (RedisError, OSError) as exc:
            self._failed("set", exc)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()
