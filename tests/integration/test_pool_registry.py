"""The shared pool registry across a Redis restart, with a real redis-server of this test's own (restarted
empty, as a killed Redis without persistence comes back) and two replicas' pools in process: no expert is lost
whichever replica writes first, and none that was removed comes back."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.card import ExpertCard
from adapters.pool import ExpertPool
from adapters.validate import ModelShape
from service.pool_sync import SharedPool
from service.processes import ManagedProcess, free_port, redis_command, wait_redis
from training.synthetic import write_random_lora

pytestmark = pytest.mark.integration
BASE = "SmolLM2-135M-Instruct"
SHAPE = ModelShape.from_config({"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "num_hidden_layers": 2})


@pytest.fixture
def redis_proc(tmp_path: Path) -> Iterator[tuple[str, ManagedProcess]]:
    port = free_port()
    proc = ManagedProcess("redis-registry", redis_command(port, tmp_path), log_file=tmp_path / "redis.log")
    proc.start()
    wait_redis(port)
    yield f"redis://127.0.0.1:{port}/0", proc
    proc.stop()


def expert(root: Path, name: str, seed: int) -> Path:
    return write_random_lora(root / name, shape=SHAPE, base_name=BASE, seed=seed,
                             card=ExpertCard(name=name, description=f"{name} questions"))


async def replicas(tmp_path: Path, url: str, *, start: bool = True) -> tuple[SharedPool, SharedPool]:
    """Two replicas' shared pools on one expert root; `start`: each synced once, as `flock serve` starts."""
    async def nothing(_: set[str]) -> None:
        return None

    out = []
    for i in (1, 2):
        pool = ExpertPool(state_file=tmp_path / f"state{i}" / "pool.json", roots=[tmp_path.resolve()],
                          base_name=BASE, shape=SHAPE, max_rank=16)
        pool.load()
        out.append(SharedPool(url, pool, nothing, interval_s=60))
        if start:
            await out[-1].sync_once()
    return out[0], out[1]


async def sync_rounds(a: SharedPool, b: SharedPool, first: int) -> None:
    """Three polls each, `first` polling first: the first poll after a restart may only find a dropped
    connection (the client reconnects on the next); then one to seed or merge, one to adopt the other's."""
    for r in ((a, b) if first == 0 else (b, a)) * 3:
        await r.sync_once()


def names(shared: SharedPool) -> set[str]:
    return {e.name for e in shared.pool.experts()}


async def restart_empty(proc: ManagedProcess, url: str) -> None:
    proc.stop()
    proc.start()
    wait_redis(int(url.rsplit(":", 1)[1].split("/")[0]))


@pytest.mark.parametrize("first", [0, 1])
async def test_a_registration_into_a_restarted_redis_loses_no_expert(tmp_path, redis_proc, first):
    """Redis restarts empty; a replica registers an expert before either has noticed (the soak found that this
    one-entry registry was then adopted by both, dropping every other expert)."""
    url, proc = redis_proc
    a, b = await replicas(tmp_path, url)
    for i, name in enumerate(("cooking", "law", "math")):
        await a.add(lambda p=expert(tmp_path, name, i): a.pool.add(p))
    await b.sync_once()
    assert names(a) == names(b) == {"cooking", "law", "math"}

    await restart_empty(proc, url)
    await b.add(lambda: b.pool.add(expert(tmp_path, "churn", 9)))
    await sync_rounds(a, b, first)
    assert names(a) == names(b) == {"cooking", "law", "math", "churn"}
    for r in (a, b):
        await r.close()


@pytest.mark.parametrize("first", [0, 1])
async def test_a_removal_while_redis_is_down_stays_removed(tmp_path, redis_proc, first):
    """A removes an expert while Redis is down; Redis comes back empty and B, which still holds the expert,
    may seed the new registry first: the removal is published once Redis answers, and B's stale copy does
    not bring the expert back."""
    url, proc = redis_proc
    a, b = await replicas(tmp_path, url)
    for i, name in enumerate(("cooking", "law")):
        await a.add(lambda p=expert(tmp_path, name, i): a.pool.add(p))
    await b.sync_once()
    assert names(b) == {"cooking", "law"}

    proc.stop()
    await a.remove(lambda: a.pool.remove("law"))  # not published: Redis is down
    assert names(a) == {"cooking"}
    await a.sync_once()  # still down: nothing adopted, nothing lost
    assert names(a) == {"cooking"}
    proc.start()
    wait_redis(int(url.rsplit(":", 1)[1].split("/")[0]))
    await sync_rounds(a, b, first)
    assert names(a) == names(b) == {"cooking"}
    for r in (a, b):
        await r.close()


@pytest.mark.parametrize("first", [0, 1])
async def test_a_removal_just_before_a_reset_is_not_undone_by_a_stale_copy(tmp_path, redis_proc, first):
    """A removes an expert and publishes it; Redis restarts empty before B adopted the removal (the soak's
    case: the tombstone went with Redis). B's stale copy must not come back, whichever seeds first."""
    url, proc = redis_proc
    a, b = await replicas(tmp_path, url)
    for i, name in enumerate(("cooking", "law")):
        await a.add(lambda p=expert(tmp_path, name, i): a.pool.add(p))
    await b.sync_once()
    await a.remove(lambda: a.pool.remove("law"))  # published, but B has not polled yet
    await restart_empty(proc, url)
    await sync_rounds(a, b, first)
    assert names(a) == names(b) == {"cooking"}
    for r in (a, b):
        await r.close()


async def test_a_replica_that_just_started_adopts_the_registry(tmp_path, redis_proc):
    """A replica that follows no epoch yet takes the registry as it is: its stale pool.json adds nothing."""
    url, _ = redis_proc
    a, b = await replicas(tmp_path, url, start=False)
    await a.sync_once()
    await a.add(lambda: a.pool.add(expert(tmp_path, "cooking", 0)))
    b.pool.add(expert(tmp_path, "stale", 5))  # in B's pool.json only, as if registered long ago
    await b.sync_once()
    assert names(b) == {"cooking"}
    await a.sync_once()
    assert names(a) == {"cooking"}
    for r in (a, b):
        await r.close()
