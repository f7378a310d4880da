"""Backend health bookkeeping and placement (httpx MockTransport stands in for vLLM)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from service.backend import EJECT_AFTER_TIMEOUTS, Adapter, BackendPool
from service.metrics import Metrics


def pool_with(handler, urls=("http://a", "http://b")) -> BackendPool:
    pool = BackendPool(list(urls), Metrics(), connect_timeout_s=1, read_timeout_s=5)
    pool.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return pool


def run(coro):
    return asyncio.run(coro)


def test_refused_connections_eject_after_two_checks():
    def handler(request):
        raise httpx.ConnectError("refused", request=request)

    pool = pool_with(handler, ["http://a"])
    b = pool.backends[0]
    b.healthy = True
    run(pool.check(b))
    assert b.healthy
    run(pool.check(b))
    assert not b.healthy


def test_slow_health_answers_do_not_eject_quickly():
    def handler(request):
        raise httpx.ReadTimeout("busy", request=request)

    pool = pool_with(handler, ["http://a"])
    b = pool.backends[0]
    b.healthy = True
    for _ in range(EJECT_AFTER_TIMEOUTS - 1):
        run(pool.check(b))
    assert b.healthy
    run(pool.check(b))
    assert not b.healthy


def test_recovery_clears_loaded_adapters():
    pool = pool_with(lambda request: httpx.Response(200), ["http://a"])
    b = pool.backends[0]
    b.loaded["x"] = Path("/x")
    run(pool.check(b))
    assert b.healthy and b.loaded == {}  # it may be a restarted vLLM that lost its runtime adapters


def test_rendezvous_placement_is_stable_and_spills_over():
    pool = pool_with(lambda request: httpx.Response(200), [f"http://r{i}" for i in range(4)])
    for b in pool.backends:
        b.healthy = True
    owners = {name: pool.candidates(Adapter(name, Path("/x")))[0].url for name in ("a", "b", "c", "d", "e", "f")}
    assert owners == {name: pool.candidates(Adapter(name, Path("/x")))[0].url for name in owners}
    assert len(set(owners.values())) > 1  # adapters spread over replicas
    owner = next(b for b in pool.backends if b.url == owners["a"])
    owner.inflight = pool.spill_inflight
    assert pool.candidates(Adapter("a", Path("/x")))[0] is not owner
    pool.backends[1].healthy = False
    assert pool.backends[1] not in pool.candidates(None)


def test_no_healthy_backend_still_tries_then_503():
    def handler(request):
        raise httpx.ConnectError("refused", request=request)

    pool = pool_with(handler, ["http://a"])
    from service.errors import APIError

    with pytest.raises(APIError) as err:
        run(pool.send("/v1/completions", {"model": "m"}, None, stream=False))
    assert err.value.status == 503 and err.value.headers["Retry-After"]
