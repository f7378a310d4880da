"""Routing cache in a real Redis: hits, invalidation on pool change, and Redis dying under traffic."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid

import pytest
import redis

from router.cache import normalise_query

pytestmark = pytest.mark.integration


def route(c, text: str) -> tuple[dict, str]:
    r = c.post("/v1/chat/completions", json={"model": "auto", "max_tokens": 1, "temperature": 0,
                                             "messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200, r.text
    return r.json()["routing"], r.headers["x-flock-cache"]


def test_repeat_is_a_hit_and_normalised(gateway):
    text = f"How do I roast vegetables in the oven? ({uuid.uuid4().hex[:6]})"
    with gateway.client() as c:
        first, status1 = route(c, text)
        second, status2 = route(c, "  " + text.upper() + "  ")
    assert (status1, first["cached"]) == ("miss", False)
    assert (status2, second["cached"]) == ("hit", True)
    assert first["experts"] == second["experts"]


def test_pool_change_invalidates(gateway, shape, expert_root):
    from adapters.card import ExpertCard
    from tests.conftest import BASE
    from training.synthetic import write_random_lora

    text = f"Multiply 14 by 12 ({uuid.uuid4().hex[:6]})"
    spare = write_random_lora(expert_root / "spare_cache", shape=shape, base_name=BASE, seed=41,
                              card=ExpertCard(name="poetry", description="Writes rhyming poems about nature."))
    with gateway.client() as c:
        assert route(c, text)[1] == "miss"
        assert route(c, text)[1] == "hit"
        assert c.post("/v1/experts", json={"path": str(spare)}).status_code == 201
        try:
            assert route(c, text)[1] == "miss"  # pool version changed: old decisions are not reused
            assert route(c, text)[1] == "hit"
        finally:
            assert c.delete("/v1/experts/poetry").status_code == 200
        # The pool version is a content hash: back to the very same pool, its decisions are valid again.
        assert route(c, text)[1] == "hit"


def test_redis_killed_and_restarted_under_traffic(gateway, redis_server):
    """Zero failed requests while Redis is down; bypasses are counted; the cache works again after.

    The queries are all distinct: a repeated one is answered from the gateway's in-process copy of its decision
    without asking Redis, so only new queries show whether Redis is reached."""
    # Every request sent has one outcome: its status, or the exception it raised (a worker never dies of it).
    sent: list[str] = []
    outcomes: dict[str, int | str] = {}
    stop = threading.Event()

    def one(c, path: str, body: dict) -> None:
        key = f"{path} {body}"
        sent.append(key)
        try:
            outcomes[key] = c.post(path, json=body).status_code
        except Exception as exc:  # noqa: BLE001 - recorded, asserted on below
            outcomes[key] = f"{type(exc).__name__}: {exc}"

    def traffic(worker: int) -> None:
        with gateway.client(timeout=30) as c:
            n = 0
            while not stop.is_set():
                n += 1
                one(c, "/v1/route", {"prompt": f"How to fry an egg, variant {worker}-{n}"})
                if n % 5 == 0:
                    one(c, "/v1/chat/completions", {
                        "model": "auto", "max_tokens": 1,
                        "messages": [{"role": "user", "content": f"Bake cookies, batch {worker}-{n}"}]})

    threads = [threading.Thread(target=traffic, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        redis_server.proc.stop()  # SIGTERM: Redis goes away mid-traffic
        time.sleep(3)
        redis_server.restart()
        time.sleep(2.5)
    finally:
        stop.set()
        for t in threads:
            t.join(45)
    assert not any(t.is_alive() for t in threads), "a request hung (client timeout 30 s)"
    assert len(sent) > 50 and len(outcomes) == len(sent), (len(sent), len(outcomes))
    failed = {k: v for k, v in outcomes.items() if v != 200}
    assert not failed, f"{len(failed)}/{len(sent)} requests failed: {list(failed.items())[:10]}"
    with gateway.client() as c:
        metrics = c.get("/metrics").text
        bypass = [ln for ln in metrics.splitlines() if ln.startswith('flock_routing_cache_total{result="bypass"}')]
        assert bypass and float(bypass[0].split()[-1]) > 0
        # Redis is used again: a new decision is written to the restarted Redis (after the response, so allow it a
        # moment). Looked up in Redis itself: a repeat would be a hit from the gateway's in-process copy anyway.
        text = f"Boil rice ({uuid.uuid4().hex[:6]})"
        digest = hashlib.sha256(normalise_query(text).encode()).hexdigest()[:32]
        with redis.Redis(port=redis_server.port) as r:
            deadline = time.monotonic() + 5
            while route(c, text) and not list(r.scan_iter(match=f"flock:route:*:{digest}")):
                assert time.monotonic() < deadline, "the decision did not reach Redis within 5 s after it came back"
                time.sleep(0.2)
