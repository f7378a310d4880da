"""The expert pool shared by gateway replicas through Redis.

Every replica keeps its own validated `ExpertPool` (and its pool.json); Redis holds the registry they agree on:
a hash of expert entries and a revision counter bumped with every change. A change made on one replica is
written to the hash and the counter in one transaction; every replica polls the counter (one GET per
`interval_s`) and, when it moved, adopts the hash. Per-expert fields mean two replicas registering different
experts at once lose neither. Redis down: the local pool keeps serving; a registry found empty (a fresh or
restarted Redis) is re-seeded from the local pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from adapters.pool import Expert, ExpertPool

log = logging.getLogger(__name__)
EXPERTS_KEY = "flock:pool:v1:experts"  # hash: expert name -> entry JSON (Expert.to_json)
REVISION_KEY = "flock:pool:v1:rev"  # incremented with every change of the hash

OnChange = Callable[[set[str]], Awaitable[None]]  # called with the names removed or changed


class SharedPool:
    def __init__(self, redis_url: str, pool: ExpertPool, on_change: OnChange, *, interval_s: float = 2.0):
        self.pool = pool
        self.on_change = on_change
        self.interval_s = interval_s
        self._redis = aioredis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        self._revision: int | None = None  # the registry revision the local pool reflects
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # --- publishing local changes ---------------------------------------------------------------------
    # The local change and its publication run under the lock that `sync_once` takes: a poll adopting the
    # registry between the two would drop the not-yet-published expert from the local pool for good (the
    # publication then looks like the next revision, so nothing re-adopts it).
    async def add(self, add: Callable[[], Expert]) -> Expert:
        """Run `add` (a blocking `ExpertPool.add`) and publish the expert it returns."""
        async with self._lock:
            expert = await asyncio.to_thread(add)
            await self._publish(lambda p: p.hset(EXPERTS_KEY, expert.name, json.dumps(expert.to_json())))
        return expert

    async def remove(self, remove: Callable[[], Expert]) -> Expert:
        """Run `remove` (a blocking `ExpertPool.remove`) and publish the removal."""
        async with self._lock:
            expert = await asyncio.to_thread(remove)
            await self._publish(lambda p: p.hdel(EXPERTS_KEY, expert.name))
        return expert

    async def _publish(self, change) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                change(pipe)
                pipe.incr(REVISION_KEY)
                *_, revision = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("pool change not shared with other gateway replicas (Redis: %s)", exc)
            return
        # Someone else's change in between: leave our revision stale so the next poll adopts theirs too.
        if self._revision is not None and revision == self._revision + 1:
            self._revision = revision

    # --- following other replicas ---------------------------------------------------------------------
    async def sync_once(self) -> bool:
        """Adopt the registry if it moved (seed it if empty); True when the local pool changed."""
        async with self._lock:
            try:
                raw = await self._redis.get(REVISION_KEY)
                if raw is None or not await self._redis.exists(EXPERTS_KEY):
                    await self._seed()
                    return False
                revision = int(raw)
                if revision == self._revision:
                    return False
                entries = [v.decode() if isinstance(v, bytes) else v
                           for v in (await self._redis.hgetall(EXPERTS_KEY)).values()]
            except (RedisError, OSError) as exc:
                log.debug("pool registry unreachable: %s", exc)
                return False
            before = self.pool.version
            changed = await asyncio.to_thread(self.pool.adopt, entries)
            self._revision = revision
        if self.pool.version != before:
            log.info("pool changed on another replica: now %d experts (version %s)", len(self.pool),
                     self.pool.version)
            await self.on_change(changed)
            return True
        return False

    async def _seed(self) -> None:
        entries = {name: json.dumps(entry) for name, entry in self.pool.entries().items()}
        async with self._redis.pipeline(transaction=True) as pipe:
            if entries:
                pipe.hset(EXPERTS_KEY, mapping=entries)  # type: ignore[arg-type]  # redis-py types Mapping invariantly
            pipe.incr(REVISION_KEY)
            *_, revision = await pipe.execute()
        self._revision = revision
        log.info("pool registry in Redis seeded with %d experts", len(entries))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sync_once()
            except Exception:  # keep following; one bad entry or callback must not stop the loop
                log.exception("pool sync failed")

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self._redis.aclose()
