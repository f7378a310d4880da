"""Backend health bookkeeping and placement (httpx MockTransport stands in for vLLM)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from service.backend import EJECT_AFTER_TIMEOUTS, Adapter, BackendPool
from service.errors import APIError
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



def test_backend_that_drops_the_connection_fails_over_but_a_slow_one_does_not():
    # A killed vLLM resets the keep-alive connections it held: ReadError (or a closed connection), not ConnectError.
    for dropped in (httpx.ReadError, httpx.RemoteProtocolError):
        dead: list[str] = []

        def handler(request, dropped=dropped):
            if request.url.host in dead:
                raise dropped("connection lost", request=request)
            return httpx.Response(200, json={"ok": True})

        pool = pool_with(handler)
        for b in pool.backends:
            b.healthy = True
        first = pool.candidates(None)[0]
        dead.append(first.url.removeprefix("http://"))
        resp, backend, _ = run(pool.send("/v1/completions", {"model": "m"}, None, stream=False))
        assert resp.status_code == 200 and backend is not first and not first.healthy

    def slow(request):
        raise httpx.ReadTimeout("busy", request=request)

    calls: list[str] = []

    def counting(request):
        calls.append(request.url.host)
        return slow(request)

    pool = pool_with(counting)
    with pytest.raises(APIError) as err:  # not sent again: the first backend may still be generating it
        run(pool.send("/v1/completions", {"model": "m"}, None, stream=False))
    assert err.value.status == 504 and err.value.code == "backend_timeout" and len(calls) == 1


def test_stream_that_breaks_before_its_first_bytes_fails_over():
    class Broken(httpx.AsyncByteStream):
        async def __aiter__(self):
            raise httpx.ReadError("reset")
            yield b""

    class Events(httpx.AsyncByteStream):  # a body that arrives over time, as vLLM's does
        async def __aiter__(self):
            yield b"data: {}\n\n"
            yield b"data: [DONE]\n\n"

    dead: list[str] = []

    def handler(request):
        if request.url.host in dead:
            return httpx.Response(200, stream=Broken())  # headers sent, then the backend died
        return httpx.Response(200, stream=Events())

    pool = pool_with(handler)
    for b in pool.backends:
        b.healthy = True
    first = pool.candidates(None)[0]
    dead.append(first.url.removeprefix("http://"))

    async def go():
        resp, backend, _ = await pool.send("/v1/completions", {"model": "m"}, None, stream=True)
        body = b"".join([chunk async for chunk in resp.aiter_raw()])
        return body, backend

    body, backend = run(go())
    assert body == b"data: {}\n\ndata: [DONE]\n\n" and backend is not first
    assert first.inflight == 0 and backend.inflight == 1  # the caller releases the stream's count
