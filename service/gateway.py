"""One request's path through the gateway (Gateway.generate):

1. check limits (service/limits.py);
2. decide: route a model "auto" request (router/router.py), or take the named expert or the base model;
3. resolve the decision to an adapter: an expert, a merge or a gated composite (service/resolve.py);
4. forward to a backend that holds or loads it, under a lease (service/backend.py);
5. answer with `routing` added, relaying a stream event by event (service/relay.py);
6. record metrics on the way.

Handlers in service/api/ call these functions and nothing else.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Literal

from fastapi.responses import Response, StreamingResponse

from adapters.card import ExpertCard
from adapters.composite import CompositeStore
from adapters.composite_cache import CompositeCache, dir_bytes
from adapters.gated_composite import GatedCompositeStore
from adapters.pool import Expert, ExpertPool
from adapters.tenants import EVERYTHING, Scope
from router.decision import ExpertChoice, RoutingDecision, RoutingParams
from router.methods.gated import GatedRouting
from router.router import Router
from service.auth import Principal
from service.backend import Adapter, BackendPool
from service.errors import APIError
from service.limits import BuildLimiter, Generation, check_limits
from service.metrics import Metrics
from service.preload import Preloader
from service.protocol import ResponsesRequest, dumps, loads
from service.query import query_text
from service.relay import StreamObserver, relay
from service.resolve import Resolver, expert_left
from service.response_store import ResponseStore
from service.settings import Settings
from service.upload import discard_upload

if TYPE_CHECKING:
    from service.pool_sync import SharedPool

log = logging.getLogger(__name__)
audit_log = logging.getLogger("flock.audit")
AUTO = "auto"
Remember = Callable[[dict], Awaitable[None]]
# Errors that can mean an expert's files broke: its adapter failed to load, or a composite over it to build.
BROKEN_EXPERT_CODES = ("adapter_load_failed", "composite_build_failed")


class Gateway:
    def __init__(self, settings: Settings, pool: ExpertPool, router: Router, backends: BackendPool,
                 composites: CompositeStore, metrics: Metrics):
        self.settings = settings
        self.pool = pool
        self.router = router
        self.backends = backends
        self.composites = composites
        cache = CompositeCache(composite_budget(settings, pool))
        self.resolver = Resolver(pool, composites, GatedCompositeStore(settings.composites_dir / "gated"), cache,
                                 self._composites_evicted, BuildLimiter(settings.composite_builds_per_min))
        metrics.composites = lambda: (cache.bytes, cache.built, cache.evicted)
        self.metrics = metrics
        self.shared: SharedPool | None = None  # the registry shared with other replicas (Redis), if any
        self.responses = ResponseStore(settings.redis_url, settings.responses_ttl_s)  # previous_response_id
        self.preloader = Preloader(pool, backends, settings.preload_experts)  # load ahead of need
        backends.on_up = self.preloader.wake

    async def _composites_evicted(self, names: list[str]) -> None:
        for name in names:
            await self.backends.unload_everywhere(name)

    async def pool_changed(self, removed: Iterable[str] = ()) -> None:
        """Re-embed the experts and re-calibrate; drop removed or replaced adapters from every backend.
        The pool version changed too, so cached decisions and composites of the old pool are no longer used."""
        await self.router.rebuild_index()
        for name in removed:
            await self.backends.unload_everywhere(name)
        self.metrics.pool_size.set(len(self.pool))
        self.preloader.wake()

    async def add_expert(self, path: str, card: ExpertCard, *, replace: bool, tenant: str | None = None,
                         who: Principal | None = None, action: str | None = None) -> Expert:
        """Register an expert owned by `tenant` (None: shared) here and, with replicas, in the shared registry,
        on behalf of `who` (None: the operator, who may change anything)."""
        scope = who.scope if who is not None else EVERYTHING
        old = self.pool.visible(card.name, scope)
        add = functools.partial(self.pool.add, path, card, replace=replace, tenant=tenant, scope=scope)
        expert = await (self.shared.add(add) if self.shared is not None else asyncio.to_thread(add))
        self.audit(action or ("replace" if old is not None else "register"), expert, who)
        await self.pool_changed(removed=[expert.name] if replace else [])
        if old is not None and old.path != expert.path:
            discard_upload(old.path, self.settings.tenants_dir)
        return expert

    async def remove_expert(self, name: str, who: Principal | None = None) -> Expert:
        """Remove an expert `who` may manage; one it may not see is answered as one that does not exist."""
        remove = functools.partial(self.pool.remove, name, who.scope if who is not None else EVERYTHING)
        expert = await (self.shared.remove(remove) if self.shared is not None else asyncio.to_thread(remove))
        self.audit("remove", expert, who)
        await self.pool_changed(removed=[expert.name])
        discard_upload(expert.path, self.settings.tenants_dir)
        return expert

    def audit(self, action: str, expert: Expert, who: Principal | None) -> None:
        """One line and one count for every change of any pool: who (the key's id, never the key), what, when."""
        tenant = expert.tenant or "shared"
        audit_log.info("pool change: action=%s expert=%s tenant=%s key=%s at=%s", action, expert.name, tenant,
                       who.key_id if who is not None else "operator",
                       time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self.metrics.pool_changes.labels(action, tenant).inc()

    def expert_label(self, name: str) -> str:
        """An expert's name in metrics: a private expert's is not shown to whoever reads /metrics."""
        expert = self.pool.get(name)
        return "private" if expert is not None and expert.tenant is not None else name

    # --- deciding -------------------------------------------------------------------------------------
    async def decide(self, model: str, params: RoutingParams | None, query: str,
                     scope: Scope = EVERYTHING) -> tuple[RoutingDecision, str]:
        """(decision, cache status). `model` is 'auto', an expert's name or the base model's name; `scope` what
        the caller may see: a routed decision is made among those experts, and a name outside it is 'not
        found', exactly as a name that does not exist."""
        if model == AUTO:
            for attempt in range(1, 4):
                try:
                    result = await self.router.route(query, params, scope)
                except KeyError as exc:
                    raise APIError(400, str(exc.args[0]), param="routing.mode",
                                   code="invalid_routing_mode") from None
                self.metrics.observe_stages(result.stages)
                if result.cache != "off":
                    self.metrics.cache.labels(result.cache).inc()
                left = next((c.name for c in result.decision.experts if self.pool.get(c.name) is None), None)
                if left is None:
                    break
                # Removed a moment ago, its index not rebuilt yet: route again on the current pool.
                if attempt == 3:
                    raise expert_left(left)
                await self.router.ensure_current()
            for choice in result.decision.experts:  # by construction; checked, as a leak would be a breach
                if self.pool.visible(choice.name, scope) is None:
                    log.error("routing chose %s outside the caller's scope %r; refused", choice.name, scope.key)
                    raise expert_left(choice.name)
            return result.decision, result.cache
        if params is not None and params.mode is not None:
            raise APIError(400, "routing applies only to model 'auto'", param="routing", code="invalid_value")
        if model == self.settings.base_model_name:
            return RoutingDecision(mode="base"), "none"
        if self.pool.visible(model, scope) is not None:
            quarantined = self.pool.quarantined.get(model)
            if quarantined is not None:
                raise APIError(503, f"expert {model!r} is unavailable: {quarantined.reason}", param="model",
                               code="expert_unavailable")
            return RoutingDecision(mode="direct", experts=[ExpertChoice(name=model, weight=1.0)]), "none"
        raise APIError(404, f"The model {model!r} does not exist; GET /v1/models lists the models", param="model",
                       code="model_not_found")

    def check_gated_servable(self, mode: str) -> None:
        """A per-token mode needs a backend that applies the gate: none at all is the client's 400 (this
        deployment does not serve the mode), none up right now a 503. Never a silent fallback."""
        status = self.backends.gated_status()
        if status == "unsupported":
            raise APIError(400, f"routing mode {mode!r} mixes experts per token, which needs a vLLM backend running "
                           "flock's plugin on a platform where it applies the gate (CPU, or CUDA with "
                           "--enforce-eager); no backend of this "
                           "deployment does (GET /ready lists the modes served). Use 'global' or 'merge'.",
                           param="routing.mode", code="routing_mode_unavailable")
        if status == "down":
            raise APIError(503, f"no backend that serves routing mode {mode!r} is up; retry shortly",
                           param="routing.mode", code="routing_mode_unavailable", headers={"Retry-After": "1"})

    def modes_served(self) -> list[str]:
        """Routing modes this deployment serves now (per-token modes only where a backend applies the gate)."""
        gated = self.backends.gated_status() == "ok"
        return [name for name, method in self.router.methods.items()
                if gated or not isinstance(method, GatedRouting)] + ["base", "direct"]

    # --- generating -----------------------------------------------------------------------------------
    async def generate(self, endpoint: str, body: Generation, who: Principal | None = None) -> Response:
        """One request: limits, decide, resolve to an adapter, forward, answer with `routing` added. `who`: the
        caller (None: the operator, who sees every expert)."""
        start = time.perf_counter()
        key_id = who.key_id if who is not None else "anonymous"
        scope = who.scope if who is not None else EVERYTHING
        remember = None
        if isinstance(body, ResponsesRequest):  # a continued conversation is routed and limited as a whole
            body = await self.responses.expand(body, key_id)
            remember = functools.partial(self.responses.remember, body, key_id)
        check_limits(self.settings, body)
        query = query_text(body)
        decision, cache_status = await self.decide(body.model, body.routing, query, scope)

        async def reroute() -> RoutingDecision:
            nonlocal cache_status
            await self.router.ensure_current()
            new, cache_status = await self.decide(body.model, body.routing, query, scope)
            return new

        if isinstance(self.router.methods.get(decision.mode), GatedRouting):  # even when it chose no expert
            self.check_gated_servable(decision.mode)
        for attempt in range(1, 4):
            try:
                decision, adapter = await self.resolver.resolve_or_reroute(
                    decision, reroute if body.model == AUTO else None, key_id)
                release = functools.partial(self.resolver.release, adapter)
                try:
                    response = await self._forward(endpoint, body, decision, adapter,
                                                   routing_headers(decision, cache_status), start, remember,
                                                   who.tenant if who is not None else None)
                except BaseException:
                    release()
                    raise
                return released_when_sent(response, release)
            except APIError as exc:
                step = await self._recovery(exc, decision, routed=body.model == AUTO, attempt=attempt)
                if step == "reroute":
                    decision = await reroute()
                    continue
                if step == "retry":
                    continue
                self.metrics.requests.labels(endpoint, decision.mode, "error").inc()
                step.headers = {**routing_headers(decision, cache_status), **step.headers}
                raise step from None
        raise AssertionError("unreachable")

    async def _recovery(self, exc: APIError, decision: RoutingDecision, *, routed: bool, attempt: int
                        ) -> Literal["reroute", "retry"] | APIError:
        """What to do after `exc` served `decision`: route again, try the same decision once more, or answer
        with an error. Only a failed adapter load or composite build, or a pool change, is recovered from, three
        attempts at most:
        - an expert removed while its adapter was loading (its files may be gone already): a routed request is
          routed again; one that named it learns it left (503 pool_changed);
        - an expert whose files broke since it was registered: quarantined; a routed request goes to the
          next-best expert or the base model, one that named it gets the error;
        - files that read well by now (a repair raced the load): the same decision once more;
        - an expert that left the pool again after the resolver's own re-route (the router's index was still
          being rebuilt after a change on another replica): a routed request is routed again."""
        if exc.code == "pool_changed":
            return "reroute" if routed and attempt < 3 else exc
        if exc.code not in BROKEN_EXPERT_CODES:
            return exc
        left = next((c.name for c in decision.experts if self.pool.get(c.name) is None), None)
        if routed and attempt < 3:
            if left is not None or await self.quarantine_broken(decision):
                return "reroute"
            if attempt == 1:
                return "retry"
        return expert_left(left) if left is not None else exc

    async def _forward(self, endpoint: str, body: Generation, decision: RoutingDecision, adapter: Adapter | None,
                       headers: dict[str, str], start: float, remember: Remember | None = None,
                       tenant: str | None = None) -> Response:
        """Send the request, with the adapter in `model`, to a backend; answer with `routing` added.
        `remember`: given the Responses answer, keeps the conversation (service/response_store.py)."""
        tenant_label = tenant or "none"
        for choice in decision.experts or [ExpertChoice(name="base", weight=1.0)]:  # the decision served
            self.metrics.selections.labels(self.expert_label(choice.name), decision.mode, tenant_label).inc()
        payload = body.model_dump(exclude_none=True, exclude={"routing"})
        payload["model"] = adapter.name if adapter else self.settings.base_model_name
        label = (self.expert_label(token_label(adapter)), tenant_label)
        if body.stream:
            return await self._stream(endpoint, body, payload, adapter, decision, label, headers, remember)
        return await self._complete(endpoint, payload, adapter, decision, label, headers, start, remember)

    async def quarantine_broken(self, decision: RoutingDecision) -> bool:
        """Check the files of the decision's experts; quarantine the broken ones and take them out of routing.
        True if any of them is (now) quarantined."""
        names = [c.name for c in decision.experts]
        broken = [n for n in names if await asyncio.to_thread(self.pool.quarantine_if_broken, n)]
        if broken:
            self.metrics.quarantined.set(len(self.pool.quarantined))
            await self.router.rebuild_index()
        return bool(broken)

    async def watch_quarantined(self, interval_s: float = 5.0) -> None:
        """Check quarantined experts again whenever their files change (a few stat calls every interval)."""
        while True:
            await asyncio.sleep(interval_s)
            if self.pool.quarantined:
                await self.recheck_quarantined()

    async def recheck_quarantined(self, force: bool = False) -> list[str]:
        """Quarantined experts whose files changed (all with `force`) are checked again; healthy ones return."""
        released = await asyncio.to_thread(self.pool.recheck, force)
        self.metrics.quarantined.set(len(self.pool.quarantined))
        if released:
            await self.router.rebuild_index()
        return released

    async def _complete(self, endpoint: str, payload: dict, adapter: Adapter | None, decision: RoutingDecision,
                        label: tuple[str, str], headers: dict[str, str], start: float,
                        remember: Remember | None) -> Response:
        resp = await self.backends.send(endpoint, payload, adapter, stream=False)
        t0 = resp.lease.start
        self.metrics.backend_latency.labels(endpoint, resp.lease.backend.url).observe(time.perf_counter() - t0)
        if resp.status_code != 200:
            raise backend_error(resp.status_code, resp.content)
        data = loads(resp.content)
        self._count_tokens(label, data.get("usage") or {})
        if remember is not None:
            await remember(data)
        if adapter is not None and adapter.kind != "expert":
            data["model"] = composite_model_name(decision)
        data["routing"] = decision.model_dump()
        self.metrics.requests.labels(endpoint, decision.mode, "ok").inc()
        headers["x-flock-gateway-ms"] = f"{(t0 - start) * 1000:.2f}"  # routing etc., before forwarding
        headers["x-flock-backend-ms"] = f"{(time.perf_counter() - t0) * 1000:.2f}"
        return Response(dumps(data), media_type="application/json", headers=headers)

    async def _stream(self, endpoint: str, body: Generation, payload: dict,
                      adapter: Adapter | None, decision: RoutingDecision, label: tuple[str, str],
                      headers: dict[str, str], remember: Remember | None) -> Response:
        wants_usage = True  # a Responses stream reports usage in its last event, which is passed on
        if not isinstance(body, ResponsesRequest):  # chat and completions: ask vLLM for usage, drop it if unasked
            wants_usage = bool((body.stream_options or {}).get("include_usage"))
            payload["stream_options"] = {**(body.stream_options or {}), "include_usage": True}
        resp = await self.backends.send(endpoint, payload, adapter, stream=True)
        if resp.status_code != 200:
            try:
                content = await resp.read()
            finally:
                await resp.aclose()
            raise backend_error(resp.status_code, content)
        self.metrics.requests.labels(endpoint, decision.mode, "ok").inc()
        backend = resp.lease.backend.url
        observe = StreamObserver(
            on_first_token=self.metrics.ttft.labels(endpoint).observe,
            on_usage=lambda usage: self._count_tokens(label, usage),
            on_broken=lambda kind: self.metrics.errors.labels("backend_stream_broken").inc(),
            on_end=self.metrics.backend_latency.labels(endpoint, backend).observe, on_response=remember)
        model = composite_model_name(decision) if adapter is not None and adapter.kind != "expert" else None
        return StreamingResponse(relay(resp, decision.model_dump(), wants_usage, observe, model=model),
                                 media_type="text/event-stream", headers=headers)

    def _count_tokens(self, label: tuple[str, str], usage: dict) -> None:
        # chat and completions say prompt/completion tokens; the Responses API input/output tokens
        expert, tenant = label
        self.metrics.tokens.labels(expert, "prompt", tenant).inc(
            usage.get("prompt_tokens", usage.get("input_tokens", 0)))
        self.metrics.tokens.labels(expert, "completion", tenant).inc(
            usage.get("completion_tokens", usage.get("output_tokens", 0)))


def released_when_sent(response: Response, release: Callable[[], None]) -> Response:
    """`response`, with `release` called once it is sent: at once for a whole answer, when a stream ends (to
    the end, broken or abandoned by its client) for a streamed one."""
    if not isinstance(response, StreamingResponse):
        release()
        return response
    chunks = response.body_iterator

    async def relayed() -> AsyncIterator:
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            release()

    response.body_iterator = relayed()
    return response


def routing_headers(decision: RoutingDecision, cache_status: str) -> dict[str, str]:
    return {"x-flock-experts": ",".join(f"{c.name}={c.weight:g}" for c in decision.experts) or "none",
            "x-flock-cache": cache_status, "x-flock-mode": decision.mode}


def composite_budget(settings: Settings, pool: ExpertPool) -> int:
    """Bytes the composites may take on disk: FLOCK_COMPOSITES_MAX_MB, or by default four times the pool's
    adapters, at least 256 MB (a gated composite of the default library is some 30 MB)."""
    if settings.composites_max_mb > 0:
        return settings.composites_max_mb << 20
    library = sum(dir_bytes(e.path) for e in pool.experts())
    return max(4 * library, 256 << 20)


def composite_model_name(decision: RoutingDecision) -> str:
    """`model` in an answer served by a composite: the mode and its experts ('merge:arith+cooking'), stable and
    readable where the adapter's own name (flock-merge-<hash>) is an internal detail."""
    return f"{decision.mode}:{'+'.join(sorted(c.name for c in decision.experts))}"


def token_label(adapter: Adapter | None) -> str:
    """The `expert` label of token metrics: the expert's name, or the kind of composite, or base."""
    if adapter is None:
        return "base"
    return adapter.name if adapter.kind == "expert" else adapter.kind


def backend_error(status: int, content: bytes) -> APIError:
    """Re-shape a vLLM error into flock's OpenAI error (vLLM's `code` is an int; ours a string)."""
    try:
        error = json.loads(content).get("error", {})
        message = str(error.get("message") or content[:500].decode(errors="replace"))
        param = error.get("param")
    except (ValueError, AttributeError):
        message, param = content[:500].decode(errors="replace"), None
    code = None
    if "maximum context length" in message:
        code, status = "context_length_exceeded", 400
    if status >= 500:
        return APIError(502, f"model backend failed: {message}", code="backend_error", type_="server_error")
    return APIError(status, message, code=code, param=param)
