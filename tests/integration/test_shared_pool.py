"""Two gateway replicas on one Redis share the expert pool: a change on either is seen by the other within seconds,
and the other serves the new expert (real gateways, real Redis, real vLLM)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapters.card import ExpertCard
from tests.conftest import BASE, start_gateway, stop_gateway
from training.synthetic import write_random_lora

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def replica(work, gateway, vllm_url, redis_server, expert_root):
    """A second gateway: its own (empty) state directory and no library; it follows the registry in Redis."""
    env = {"FLOCK_BACKEND_URLS": vllm_url, "FLOCK_REDIS_URL": redis_server.url,
           "FLOCK_EXPERT_ROOTS": str(expert_root), "FLOCK_POOL_SYNC_S": "0.5"}
    gw = start_gateway(work, "replica", env)
    yield gw
    stop_gateway(gw)


def names(gw) -> set[str]:
    with gw.client() as c:
        return {e["name"] for e in c.get("/v1/experts").json()["data"]}


def wait_for(predicate, timeout_s: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout_s} s")


def test_replica_starts_with_the_shared_pool(gateway, replica):
    assert names(replica) == names(gateway) and names(gateway)


def test_change_on_one_replica_reaches_the_other(gateway, replica, expert_root, shape):
    path = write_random_lora(expert_root / "geology", shape=shape, base_name=BASE, seed=70,
                             card=ExpertCard(name="geology", description="Explains rocks, minerals and volcanoes."))
    with gateway.client() as c:
        assert c.post("/v1/experts", json={"path": str(path)}).status_code == 201
    # The main gateway polls every 2 s (default); the replica every 0.5 s.
    seen_after = wait_for(lambda: "geology" in names(replica))
    assert seen_after < 5
    with replica.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "geology", "max_tokens": 3,
                                                 "messages": [{"role": "user", "content": "What is basalt?"}]})
        assert r.status_code == 200 and r.json()["model"] == "geology"
        assert c.delete("/v1/experts/geology").status_code == 200
    wait_for(lambda: "geology" not in names(gateway))
    with gateway.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "geology", "max_tokens": 3,
                                                 "messages": [{"role": "user", "content": "What is basalt?"}]})
        assert r.status_code == 404


def test_concurrent_registrations_lose_nothing(gateway, replica, redis_server, expert_root, shape):
    """Both replicas register different experts at the same moment (threads released by one barrier), then remove
    them the same way: every change is kept, on both replicas and in the shared registry."""
    import redis

    from service.pool_sync import EXPERTS_KEY

    paths = {}
    for seed, name in enumerate(("ocean_a", "ocean_b", "ocean_c", "ocean_d"), 80):
        paths[name] = write_random_lora(expert_root / name, shape=shape, base_name=BASE, seed=seed,
                                        card=ExpertCard(name=name, description=f"Answers questions about {name}."))
    jobs = [(gw, name) for gw, name in zip((gateway, replica) * 2, paths)]
    barrier = threading.Barrier(len(jobs))

    def at_once(call) -> list[int]:
        def run(job) -> int:
            gw, name = job
            with gw.client() as c:
                barrier.wait(10)
                return call(c, name).status_code
        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(run, jobs))

    added = at_once(lambda c, name: c.post("/v1/experts", json={"path": str(paths[name])}))
    assert added == [201] * len(jobs), added
    wait_for(lambda: set(paths) <= names(gateway) and set(paths) <= names(replica))
    with redis.Redis(port=redis_server.port) as r:
        assert set(paths) <= {k.decode() for k in r.hkeys(EXPERTS_KEY)}
    removed = at_once(lambda c, name: c.delete(f"/v1/experts/{name}"))
    assert removed == [200] * len(jobs), removed
    wait_for(lambda: not (set(paths) & names(replica)) and not (set(paths) & names(gateway)))
    with redis.Redis(port=redis_server.port) as r:
        assert not set(paths) & {k.decode() for k in r.hkeys(EXPERTS_KEY)}


def test_routing_cache_shared_between_replicas(gateway, replica, redis_server, expert_root, shape):
    """A decision made on one replica is a cache hit on the other (through Redis, the other has never seen the
    query); after a pool change on the first, the other no longer reuses it."""
    import hashlib
    import uuid

    import httpx
    import redis

    from router.cache import normalise_query

    def ask(gw, text: str) -> tuple[str, dict]:
        with gw.client() as c:
            r = c.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 1, "temperature": 0,
                                                     "messages": [{"role": "user", "content": text}]})
        assert r.status_code == 200, r.text
        return r.headers["x-flock-cache"], r.json()["routing"]

    def stored_versions(text: str) -> set[str]:
        """The pool versions under which a decision for `text` is in Redis."""
        digest = hashlib.sha256(normalise_query(text).encode()).hexdigest()[:32]
        with redis.Redis(port=redis_server.port) as r:
            return {k.decode().split(":")[3].split(".")[0] for k in r.scan_iter(match=f"flock:route:*:{digest}")}

    def routes_on_current_pool(gw) -> bool:
        """A replica re-indexes its pool a moment after a change (it lists the new pool at once): meanwhile it
        decides, and caches, under the previous pool's version."""
        version = httpx.get(f"{gw.url}/ready", timeout=10).json()["pool"]["version"]
        probe = f"Probe {uuid.uuid4().hex}"
        ask(gw, probe)
        wait_for(lambda: stored_versions(probe), 5)  # written after the response
        return stored_versions(probe) == {version}

    wait_for(lambda: routes_on_current_pool(gateway) and routes_on_current_pool(replica), 30)
    text = f"Subtract 17 from 90 ({uuid.uuid4().hex[:6]})"
    status, decided = ask(gateway, text)
    assert status == "miss"
    wait_for(lambda: stored_versions(text), 5)  # before asking the other replica
    status, seen = ask(replica, text)
    assert status == "hit" and seen["cached"] is True
    assert seen["experts"] == decided["experts"]

    path = write_random_lora(expert_root / "volcano", shape=shape, base_name=BASE, seed=90,
                             card=ExpertCard(name="volcano", description="Explains volcanoes and eruptions."))
    with gateway.client() as c:
        assert c.post("/v1/experts", json={"path": str(path)}).status_code == 201
    try:
        wait_for(lambda: "volcano" in names(replica))
        # Once the replica has re-indexed its new pool, the old pool's decision is not reused.
        wait_for(lambda: ask(replica, text)[0] == "miss", 15)
    finally:
        with gateway.client() as c:
            assert c.delete("/v1/experts/volcano").status_code == 200
        wait_for(lambda: "volcano" not in names(replica))
