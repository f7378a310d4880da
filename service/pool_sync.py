"""The expert pool shared by gateway replicas through Redis.

Every replica keeps its own validated `ExpertPool` (and its pool.json); Redis holds the registry they agree on:
a hash of expert entries and a revision counter bumped with every change. A change made on one replica is
written to the hash and the counter in one transaction; every replica polls the counter (one GET per
`interval_s`) and, when it moved, adopts the hash. Per-expert fields mean two replicas registering different
experts at once lose neither.

Redis failing must lose no expert, and bring back no removed one:
- Redis down: the local pool keeps serving; changes made meanwhile wait in a queue and are published, in order,
  once Redis answers again (before anything is adopted, which would otherwise undo them).
- The registry carries an epoch, a random id set by whoever seeds it. A registry with no epoch (a fresh, flushed
  or restarted Redis) is seeded from the local pool. A replica that followed one epoch and finds another (Redis
  restarted and another replica seeded it first) merges its own experts in, never overwriting an entry there,
  before adopting: what each replica held before the reset survives, whichever seeds first. A replica that has
  followed no epoch yet (just started) adopts the registry as it is.
- Removals leave a tombstone (a day): a merge after a reset skips names removed since, so an expert removed
  on one replica is not brought back by another's stale copy.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from adapters.pool import Expert, ExpertPool

log = logging.getLogger(__name__)
EXPERTS_KEY = "flock:pool:v1:experts"  # hash: expert name -> entry JSON (Expert.to_json)
REVISION_KEY = "flock:pool:v1:rev"  # incremented with every change of the hash
EPOCH_KEY = "flock:pool:v1:epoch"  # random id of this registry's life, set by whoever seeds it
REMOVED_KEY = "flock:pool:v1:removed"  # sorted set: removed expert name -> when (unix s)
TOMBSTONE_S = 86_400  # how long a removal keeps a merge after a reset from bringing the expert back

OnChange = Callable[[set[str]], Awaitable[None]]  # called with the names removed or changed
Change = tuple[str, str, str]  # ("add" or "remove", name, the expert's entry JSON)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SharedPool:
    def __init__(self, redis_url: str, pool: ExpertPool, on_change: OnChange, *, interval_s: float = 2.0):
        self.pool = pool
        self.on_change = on_change
        self.interval_s = interval_s
        self._redis = aioredis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1)
        self._revision: int | None = None  # the registry revision the local pool reflects
        self._epoch: bytes | str | None = None  # the registry epoch it followed last
        self._unpublished: list[Change] = []  # local changes Redis did not take (down), oldest first
        self._removed: dict[str, tuple[str, float]] = {}  # removed here: name -> (its entry JSON, when)
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
            self._removed.pop(expert.name, None)
            await self._publish([("add", expert.name, json.dumps(expert.to_json()))])
        return expert

    async def remove(self, remove: Callable[[], Expert]) -> Expert:
        """Run `remove` (a blocking `ExpertPool.remove`) and publish the removal."""
        async with self._lock:
            expert = await asyncio.to_thread(remove)
            entry = json.dumps(expert.to_json())
            self._removed[expert.name] = (entry, time.time())
            await self._publish([("remove", expert.name, entry)])
        return expert

    async def _publish(self, changes: list[Change]) -> None:
        """Write `changes` (after any still waiting) in one transaction; kept for later if Redis is down."""
        pending = self._unpublished + changes
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                now = time.time()
                for op, name, entry in pending:
                    if op == "add":
                        pipe.hset(EXPERTS_KEY, name, entry)
                        pipe.zrem(REMOVED_KEY, name)
                    else:
                        pipe.hdel(EXPERTS_KEY, name)
                        pipe.zadd(REMOVED_KEY, {name: now})
                pipe.zremrangebyscore(REMOVED_KEY, 0, now - TOMBSTONE_S)
                pipe.incr(REVISION_KEY)
                *_, revision = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._unpublished = pending
            log.warning("pool change not shared with other gateway replicas yet (Redis: %s); %d change(s) "
                        "wait to be published", exc, len(pending))
            return
        if self._unpublished:
            log.info("published %d pool change(s) made while Redis was unreachable", len(self._unpublished))
        self._unpublished = []
        # Someone else's change in between: leave our revision stale so the next poll adopts theirs too.
        if self._revision is not None and revision == self._revision + 1:
            self._revision = revision

    # --- following other replicas ---------------------------------------------------------------------
    async def sync_once(self) -> bool:
        """Publish what waits, merge into a reset registry, adopt it if it moved; True when the local pool
        changed."""
        async with self._lock:
            try:
                if self._unpublished:
                    await self._publish([])
                    if self._unpublished:
                        return False  # still unreachable
                epoch = await self._redis.get(EPOCH_KEY)
                if epoch is None or (self._epoch is not None and epoch != self._epoch):
                    self._epoch = await self._merge_local(create_epoch=epoch is None)
                    self._revision = None  # adopt the merged registry below
                self._epoch = self._epoch or epoch
                revision = int(await self._redis.get(REVISION_KEY) or 0)
                if revision == self._revision:
                    return False
                entries = [_text(v) for v in (await self._redis.hgetall(EXPERTS_KEY)).values()]
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

    async def _merge_local(self, *, create_epoch: bool) -> bytes | str:
        """Add the local experts to the registry: entries there win, and names removed since are skipped (the
        registry's tombstones, and this replica's own removals, whose stale copies another replica may have
        seeded it with are taken out again). Returns the registry's epoch, set here if `create_epoch` and
        nobody set it first."""
        if create_epoch:
            await self._redis.set(EPOCH_KEY, uuid.uuid4().hex, nx=True)
        now = time.time()
        self._removed = {n: (e, t) for n, (e, t) in self._removed.items() if t > now - TOMBSTONE_S}
        ours = list(self._removed)
        tombstones = {_text(n) for n in await self._redis.zrange(REMOVED_KEY, 0, -1)}
        there = await self._redis.hmget(EXPERTS_KEY, ours) if ours else []
        entries = {name: json.dumps(entry) for name, entry in self.pool.entries().items()
                   if name not in tombstones and name not in self._removed}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(EPOCH_KEY)
            for name, value in zip(ours, there, strict=True):
                entry, when = self._removed[name]
                pipe.zadd(REMOVED_KEY, {name: when})
                if value is not None and _text(value) == entry:
                    pipe.hdel(EXPERTS_KEY, name)
            for name, entry in entries.items():
                pipe.hsetnx(EXPERTS_KEY, name, entry)
            pipe.incr(REVISION_KEY)
            epoch, *_ = await pipe.execute()
        log.info("pool registry in Redis %s with this replica's %d experts and %d recent removals",
                 "seeded" if create_epoch else "reset by another replica, merged", len(entries), len(ours))
        return epoch

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
