"""Two gateway replicas on one Redis share the expert pool: a change on either is seen by the other within seconds,
and the other serves the new expert (real gateways, real Redis, real vLLM)."""

from __future__ import annotations

import time

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


def test_concurrent_registrations_lose_nothing(gateway, replica, expert_root, shape):
    paths = {}
    for seed, name in enumerate(("ocean_a", "ocean_b"), 80):
        paths[name] = write_random_lora(expert_root / name, shape=shape, base_name=BASE, seed=seed,
                                        card=ExpertCard(name=name, description=f"Answers questions about {name}."))
    with gateway.client() as a, replica.client() as b:
        assert a.post("/v1/experts", json={"path": str(paths["ocean_a"])}).status_code == 201
        assert b.post("/v1/experts", json={"path": str(paths["ocean_b"])}).status_code == 201
    wait_for(lambda: {"ocean_a", "ocean_b"} <= names(gateway) and {"ocean_a", "ocean_b"} <= names(replica))
    with gateway.client() as c:
        for name in paths:
            assert c.delete(f"/v1/experts/{name}").status_code == 200
    wait_for(lambda: not ({"ocean_a", "ocean_b"} & names(replica)))
