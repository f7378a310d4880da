"""Routing-decision cache in Redis. Redis being down never fails a request: the cache is bypassed,
the bypass is counted, and Redis is tried again after a short back-off."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, RedisError
from redis.retry import Retry

from router.decision import RoutingDecision

log = logging.getLogger(__name__)
ROUTER_VERSION = "1"  # bump when routing logic changes what a cached decision would be
_WS = re.compile(r"\s+")


def normalise_query(text: str) -> str:
    return _WS.sub(" ", text).strip().lower()


def cache_key(pool_version: str, mode: str, params: dict, query: str) -> str:
    digest = hashlib.sha256(normalise_query(query).encode()).hexdigest()[:32]
    p = json.dumps(params, sort_keys=True, separators=(",", ":"))
    return f"flock:route:v{ROUTER_VERSION}:{pool_version}:{mode}:{p}:{digest}"


class RoutingCache:
    def __init__(self, url: str, ttl_s: int, *, retry_after_s: float = 1.0):
        self.ttl_s = ttl_s
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
        """(decision or None, 'hit' | 'miss' | 'bypass')."""
        if not self.available:
            return None, "bypass"
        try:
            raw = await self._redis.get(key)
        except (RedisError, OSError) as exc:
            self._failed("get", exc)
            return None, "bypass"
        if not raw:
            return None, "miss"
        return RoutingDecision.model_validate_json(raw), "hit"

    async def set(self, key: str, decision: RoutingDecision) -> None:
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
