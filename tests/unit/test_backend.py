"""Backend health bookkeeping, placement and forwarding, against small loopback servers standing in for vLLM
(a real socket each: refused, reset, closed and slow connections are the real thing, not mocks)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from service.backend import EJECT_AFTER_TIMEOUTS, Adapter, BackendPool, BackendStreamError
from service.errors import APIError
from service.metrics import Metrics
from service.processes import free_port

# (request head, request body, writer) -> None: writes whatever the test needs, or nothing and closes.
Respond = Callable[[bytes, bytes, asyncio.StreamWriter], Awaitable[None]]


def answer(status: int, body: bytes, content_type: str = "application/json") -> bytes:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@asynccontextmanager
async def server(respond: Respond) -> AsyncIterator[tuple[str, list[bytes]]]:
    """An HTTP/1.1 server at the socket level: (url, request heads seen); keep-alive until respond closes."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = await reader.readexactly(length)
                seen.append(head)
                await respond(head, body, writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}", seen
    finally:
        srv.close()


async def ok(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(answer(200, b'{"ok":true}'))


async def drop(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
    writer.close()  # a killed backend: the request is read, no answer ever comes


async def slow(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(5)


def refused_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


@asynccontextmanager
async def pool_of(*urls: str, read_timeout_s: float = 5, **kw) -> AsyncIterator[BackendPool]:
    pool = BackendPool(list(urls), Metrics(), connect_timeout_s=1, read_timeout_s=read_timeout_s, **kw)
    for b in pool.backends:
        b.healthy = True
    try:
        yield pool
    finally:
        await pool.close()


async def test_refused_connections_eject_after_two_checks():
    async with pool_of(refused_url()) as pool:
        b = pool.backends[0]
        await pool.check(b)
        assert b.healthy
        await pool.check(b)
        assert not b.healthy


async def test_slow_health_answers_do_not_eject_quickly():
    async with server(slow) as (url, _), pool_of(url, health_timeout_s=0.05) as pool:
        b = pool.backends[0]
        for _ in range(EJECT_AFTER_TIMEOUTS - 1):
            await pool.check(b)
        assert b.healthy
        await pool.check(b)
        assert not b.healthy


async def test_answered_requests_outweigh_slow_health_answers():
    """A busy backend answers /health late but serves real requests: each answered request clears the late
    health answers counted so far, so it is not ejected while it works (the soak saw a busy vLLM marked down)."""
    async def health_slow_requests_ok(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        if head.startswith(b"GET /health"):
            await asyncio.sleep(5)
        else:
            writer.write(answer(200, b'{"ok":true}'))

    async with server(health_slow_requests_ok) as (url, _), pool_of(url, health_timeout_s=0.05) as pool:
        b = pool.backends[0]
        for _ in range(3 * EJECT_AFTER_TIMEOUTS):
            await pool.check(b)
            assert b.healthy
            await pool.send("/v1/completions", {"prompt": "hi"}, None, stream=False)


async def test_recovery_clears_loaded_adapters():
    async with server(ok) as (url, _), pool_of(url) as pool:
        b = pool.backends[0]
        b.healthy = False
        b.loaded["x"] = Path("/x")
        await pool.check(b)
        assert b.healthy and b.loaded == {}  # it may be a restarted vLLM that lost its runtime adapters


def test_rendezvous_placement_is_stable_and_spills_over():
    pool = BackendPool([f"http://r{i}" for i in range(4)], Metrics(), connect_timeout_s=1, read_timeout_s=5)
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


async def test_no_healthy_backend_still_tries_then_503():
    async with pool_of(refused_url()) as pool:
        pool.backends[0].healthy = False
        with pytest.raises(APIError) as err:
            await pool.send("/v1/completions", {"model": "m"}, None, stream=False)
        assert err.value.status == 503 and err.value.headers["Retry-After"]


async def test_backend_that_drops_the_connection_fails_over_but_a_slow_one_does_not():
    # A killed vLLM resets or closes the keep-alive connections it held: not a refused connection.
    async with server(drop) as (dead, _), server(ok) as (alive, _):
        async with pool_of(dead, alive) as pool:
            pool.candidates = lambda adapter: list(pool.backends)  # type: ignore[method-assign]  # dead first
            resp = await pool.send("/v1/completions", {"model": "m"}, None, stream=False)
            backend = resp.lease.backend
            assert resp.status_code == 200 and resp.content == b'{"ok":true}'
            assert backend.url == alive and not pool.backends[0].healthy
            assert [b.inflight for b in pool.backends] == [0, 0]

    async with server(slow) as (url, seen), server(ok) as (other, _):
        async with pool_of(url, other, read_timeout_s=0.2) as pool:
            pool.candidates = lambda adapter: list(pool.backends)  # type: ignore[method-assign]
            with pytest.raises(APIError) as err:  # not sent again: the first backend may still be generating it
                await pool.send("/v1/completions", {"model": "m"}, None, stream=False)
            assert err.value.status == 504 and err.value.code == "backend_timeout" and len(seen) == 1
            assert pool.backends[0].healthy and pool.backends[0].inflight == 0


async def test_stream_that_breaks_before_its_first_bytes_fails_over():
    async def broken(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD)  # headers sent, then the backend died
        await writer.drain()
        writer.close()

    async def events(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD)
        for event in (b"data: {}\n\n", b"data: [DONE]\n\n"):  # a body that arrives over time, as vLLM's does
            writer.write(chunk(event))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")

    async with server(broken) as (dead, _), server(events) as (alive, _), pool_of(dead, alive) as pool:
        pool.candidates = lambda adapter: list(pool.backends)  # type: ignore[method-assign]
        resp = await pool.send("/v1/completions", {"model": "m"}, None, stream=True)
        backend = resp.lease.backend
        body = b"".join([c async for c in resp.iter_raw()])
        assert pool.backends[0].inflight == 0 and backend.inflight == 1  # the stream's lease is held until closed
        await resp.aclose()
        assert body == b"data: {}\n\ndata: [DONE]\n\n" and backend.url == alive
        assert backend.inflight == 0
        await resp.aclose()  # a lease is released once, however often the response is closed
        assert backend.inflight == 0


async def test_stream_that_breaks_midway_raises_a_stream_error():
    async def dies(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD + chunk(b"data: {}\n\n"))
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()  # reset mid-stream

    async with server(dies) as (url, _), pool_of(url) as pool:
        resp = await pool.send("/v1/completions", {"model": "m"}, None, stream=True)
        got = []
        with pytest.raises(BackendStreamError):
            async for c in resp.iter_raw():
                got.append(c)
        await resp.aclose()
        assert got == [b"data: {}\n\n"]


async def test_closing_an_unfinished_stream_drops_the_connection():
    """On a client disconnect the gateway closes the upstream stream: vLLM must see its connection go (it aborts
    the request then), not a connection kept open for reuse."""
    gone = asyncio.Event()

    async def endless(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(CHUNKED_HEAD)
        try:
            while True:
                writer.write(chunk(b"data: {}\n\n"))
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            gone.set()
            raise

    async with server(endless) as (url, _), pool_of(url) as pool:
        resp = await pool.send("/v1/completions", {"model": "m"}, None, stream=True)
        async for _ in resp.iter_raw():
            break
        await resp.aclose()
        await asyncio.wait_for(gone.wait(), 5)


async def test_adapter_lost_by_the_backend_is_loaded_again_once():
    calls: list[str] = []

    async def vllm(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        path = head.split(b" ")[1].decode()
        calls.append(path)
        if path == "/v1/completions" and calls.count(path) == 1:  # restarted between health checks
            writer.write(answer(404, b'{"error":{"message":"The model `x` does not exist."}}'))
        else:
            writer.write(answer(200, b'{"ok":true}'))

    async with server(vllm) as (url, _), pool_of(url) as pool:
        pool.backends[0].loaded["x"] = Path("/x")  # believed loaded
        resp = await pool.send("/v1/completions", {"model": "x"}, Adapter("x", Path("/x")), stream=False)
        backend = resp.lease.backend
        assert resp.status_code == 200 and backend.inflight == 0
        assert calls == ["/v1/completions", "/v1/load_lora_adapter", "/v1/completions"]


async def test_adapter_lost_again_after_its_reload_is_a_failed_load_not_a_404():
    """The soak's one unexplained error after its fixes: an auto-routed request answered 404 by vLLM mid-restart.
    The gateway chose that adapter; after one reload, a backend that still does not have it is a failed load
    (502 adapter_load_failed, which a routed request recovers from), never a 404 passed to the client."""
    async def vllm(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        if head.split(b" ")[1] == b"/v1/completions":
            writer.write(answer(404, b'{"error":{"message":"The model `x` does not exist."}}'))
        else:
            writer.write(answer(200, b'{"ok":true}'))

    async with server(vllm) as (url, _), pool_of(url) as pool:
        pool.backends[0].loaded["x"] = Path("/x")
        with pytest.raises(APIError) as err:
            await pool.send("/v1/completions", {"model": "x"}, Adapter("x", Path("/x")), stream=False)
        assert err.value.status == 502 and err.value.code == "adapter_load_failed"
        assert pool.backends[0].inflight == 0 and "x" not in pool.backends[0].loaded


def vllm_holding(name: str, path: str, calls: list[str]) -> Respond:
    """A vLLM that already holds adapter `name` loaded from `path` (as another gateway replica left it)."""
    async def vllm(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        route = head.split(b" ")[1].decode()
        calls.append(route)
        if route == "/v1/load_lora_adapter" and calls.count(route) == 1:
            writer.write(answer(400, f'{{"message":"The lora adapter \'{name}\' has already been loaded."}}'
                                .encode()))
        elif route == "/v1/models":
            writer.write(answer(200, json.dumps({"data": [{"id": "base", "root": "/base"},
                                                          {"id": name, "root": path}]}).encode()))
        else:
            writer.write(answer(200, b'{"ok":true}'))
    return vllm


async def test_an_adapter_another_replica_loaded_from_the_same_path_is_kept():
    """The soak's last unexplained errors: two replicas sharing a vLLM that had just restarted each found the
    other's load 'already loaded' and unloaded it, failing the other's request in flight (a 502 after its
    reload). The same path is the same adapter: used as it is."""
    calls: list[str] = []
    async with server(vllm_holding("x", "/x", calls)) as (url, _), pool_of(url) as pool:
        resp = await pool.send("/v1/completions", {"model": "x"}, Adapter("x", Path("/x")), stream=False)
        assert resp.status_code == 200 and pool.backends[0].loaded["x"] == Path("/x")
        assert calls == ["/v1/load_lora_adapter", "/v1/models", "/v1/completions"]


async def test_an_adapter_held_from_another_path_is_loaded_again():
    calls: list[str] = []
    async with server(vllm_holding("x", "/old/x", calls)) as (url, _), pool_of(url) as pool:
        resp = await pool.send("/v1/completions", {"model": "x"}, Adapter("x", Path("/x")), stream=False)
        assert resp.status_code == 200 and pool.backends[0].loaded["x"] == Path("/x")
        assert calls == ["/v1/load_lora_adapter", "/v1/models", "/v1/unload_lora_adapter",
                         "/v1/load_lora_adapter", "/v1/completions"]


async def test_a_restarted_gateway_unloads_its_old_composites_before_deleting_them():
    """A restarted replica empties its composites folder; a vLLM still holding one of them re-reads it from the
    deleted folder inside a model step and its engine dies (the 21:00 20-minute soak). So those are unloaded
    first; adapters from elsewhere (the library, the other replica's folder) stay."""
    calls: list[tuple[str, bytes]] = []
    listed = [{"id": "base", "root": "/models/base"}, {"id": "arith", "root": "/library/arith"},
              {"id": "flock-merge-1", "root": "/state0/composites/flock-merge-1"},
              {"id": "flock-gated-2", "root": "/state0/composites/gated/flock-gated-2"},
              {"id": "flock-merge-3", "root": "/state1/composites/flock-merge-3"}]

    async def vllm(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        route = head.split(b" ")[1].decode()
        calls.append((route, body))
        reply = json.dumps({"data": listed}).encode() if route == "/v1/models" else b'{"ok":true}'
        writer.write(answer(200, reply))

    async with server(vllm) as (url, _), pool_of(url, refused_url()) as pool:
        assert await pool.unload_from(Path("/state0/composites")) == ["flock-merge-1", "flock-gated-2"]
    unloads = [json.loads(body)["lora_name"] for route, body in calls if route == "/v1/unload_lora_adapter"]
    assert unloads == ["flock-merge-1", "flock-gated-2"]


async def test_adapter_load_refused_is_a_502():
    async def refuses(head: bytes, body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(400, b'{"message":"bad adapter"}'))

    async with server(refuses) as (url, _), pool_of(url) as pool:
        with pytest.raises(APIError) as err:
            await pool.send("/v1/completions", {"model": "x"}, Adapter("x", Path("/x")), stream=False)
        assert err.value.status == 502 and err.value.code == "adapter_load_failed"
