"""One request's path through the gateway: check limits → decide (route, direct expert or base) → pick the
adapter (an expert, or a composite built for a merge) → forward to a backend → relay the answer with
`routing` added, recording metrics on the way. Handlers in service/api/ call these functions and nothing else.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING

from fastapi.responses import Response, StreamingResponse

from adapters.card import ExpertCard
from adapters.composite import CompositeStore
from adapters.gated_composite import GatedCompositeStore, GateSpec
from adapters.pool import Expert, ExpertPool
from router.decision import ExpertChoice, RoutingDecision, RoutingParams
from router.router import Router
from service.backend import Adapter, Backend, BackendPool, BackendResponse, BackendStreamError
from service.errors import APIError
from service.metrics import Metrics
from service.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, dumps, loads
from service.query import query_text
from service.settings import Settings

if TYPE_CHECKING:
    from service.pool_sync import SharedPool

log = logging.getLogger(__name__)
AUTO = "auto"


class Gateway:
    def __init__(self, settings: Settings, pool: ExpertPool, router: Router, backends: BackendPool,
                 composites: CompositeStore, metrics: Metrics):
        self.settings = settings
        self.pool = pool
        self.router = router
        self.backends = backends
        self.composites = composites
        self.gated = GatedCompositeStore(settings.composites_dir / "gated")
        self.metrics = metrics
        self.shared: SharedPool | None = None  # the registry shared with other replicas (Redis), if any

    async def pool_changed(self, removed: Iterable[str] = ()) -> None:
        """Re-embed the experts and re-calibrate; drop removed or replaced adapters from every backend.
        The pool version changed too, so cached decisions and composites of the old pool are no longer used."""
        await self.router.rebuild_index()
        for name in removed:
            await self.backends.unload_everywhere(name)
        self.metrics.pool_size.set(len(self.pool))

    async def add_expert(self, path: str, card: ExpertCard, *, replace: bool) -> Expert:
        """Register an expert here and, with replicas, in the shared registry."""
        add = functools.partial(self.pool.add, path, card, replace=replace)
        expert = await (self.shared.add(add) if self.shared is not None else asyncio.to_thread(add))
        await self.pool_changed(removed=[expert.name] if replace else [])
        return expert

    async def remove_expert(self, name: str) -> Expert:
        remove = functools.partial(self.pool.remove, name)
        expert = await (self.shared.remove(remove) if self.shared is not None else asyncio.to_thread(remove))
        await self.pool_changed(removed=[expert.name])
        return expert

    # --- limits ---------------------------------------------------------------------------------------
    def check_limits(self, body: SamplingFields, text_chars: int) -> None:
        s = self.settings
        max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None)
        if max_tokens is not None and max_tokens > s.max_tokens_limit:
            raise APIError(400, f"max_tokens must be at most {s.max_tokens_limit}", param="max_tokens",
                           code="max_tokens_too_large")
        if body.n is not None and body.n > s.max_n:
            raise APIError(400, f"n must be at most {s.max_n}", param="n", code="invalid_value")
        if isinstance(body, ChatCompletionRequest) and len(body.messages) > s.max_messages:
            raise APIError(400, f"at most {s.max_messages} messages are accepted", param="messages",
                           code="too_many_messages")
        if text_chars > s.max_prompt_chars:
            raise APIError(400, f"prompt is {text_chars} characters; the limit is {s.max_prompt_chars}",
                           param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                           code="context_length_exceeded")

    # --- deciding -------------------------------------------------------------------------------------
    async def decide(self, model: str, params: RoutingParams | None, query: str) -> tuple[RoutingDecision, str]:
        """(decision, cache status). `model` is 'auto', an expert's name or the base model's name."""
        if model == AUTO:
            try:
                result = await self.router.route(query, params)
            except KeyError as exc:
                raise APIError(400, str(exc.args[0]), param="routing.mode", code="invalid_routing_mode") from None
            self.metrics.observe_stages(result.stages)
            if result.cache != "off":
                self.metrics.cache.labels(result.cache).inc()
            return result.decision, result.cache
        if params is not None and params.mode is not None:
            raise APIError(400, "routing applies only to model 'auto'", param="routing", code="invalid_value")
        if model == self.settings.base_model_name:
            return RoutingDecision(mode="base"), "none"
        if self.pool.get(model) is not None:
            return RoutingDecision(mode="direct", experts=[ExpertChoice(name=model, weight=1.0)]), "none"
        raise APIError(404, f"The model {model!r} does not exist; GET /v1/models lists the models", param="model",
                       code="model_not_found")

    async def adapter_for(self, decision: RoutingDecision) -> Adapter | None:
        experts = decision.experts
        if not experts:
            return None
        resolved = []
        for choice in experts:
            expert = self.pool.get(choice.name)
            if expert is None:  # removed since the decision was cached or made
                raise APIError(503, f"expert {choice.name!r} left the pool; retry", code="pool_changed",
                               headers={"Retry-After": "0"})
            resolved.append((choice.name, choice.weight, expert.path))
        if len(resolved) == 1:
            return Adapter(name=resolved[0][0], path=resolved[0][2])
        if decision.gate is not None:  # per-token modes: candidates + global scores + gate signals, one adapter
            g = decision.gate
            parts = [(c.name, c.score or 0.0, p) for c, (_, _, p) in zip(experts, resolved)]
            spec = GateSpec(kind=g.local, alpha=g.alpha, top_k=g.top_k)
            cid, path = await asyncio.to_thread(self.gated.ensure, self.pool.version, parts, spec)
            return Adapter(name=cid, path=path, kind="composite")
        cid, path = await asyncio.to_thread(self.composites.ensure, self.pool.version, resolved)
        return Adapter(name=cid, path=path, kind="composite")

    # --- generating -----------------------------------------------------------------------------------
    async def generate(self, endpoint: str, body: ChatCompletionRequest | CompletionRequest) -> Response:
        start = time.perf_counter()
        query = query_text(body)
        self.check_limits(body, len(query) if isinstance(body, CompletionRequest) else
                          sum(len(m.content) if isinstance(m.content, str) else 0 for m in body.messages))
        decision, cache_status = await self.decide(body.model, body.routing, query)
        try:
            adapter = await self.adapter_for(decision)
        except APIError as exc:
            if exc.code != "pool_changed" or body.model != AUTO:
                raise
            # Routed to an expert removed since: route again on the pool as it is now, once.
            await self.router.ensure_current()
            decision, cache_status = await self.decide(body.model, body.routing, query)
            adapter = await self.adapter_for(decision)
        for choice in decision.experts or [ExpertChoice(name="base", weight=1.0)]:  # the decision served
            self.metrics.selections.labels(choice.name, decision.mode).inc()
        payload = body.model_dump(exclude_none=True, exclude={"routing"})
        payload["model"] = adapter.name if adapter else self.settings.base_model_name
        headers = {"x-flock-experts": ",".join(f"{c.name}={c.weight:g}" for c in decision.experts) or "none",
                   "x-flock-cache": cache_status, "x-flock-mode": decision.mode}
        expert_label = adapter.name if adapter and adapter.kind == "expert" else ("merge" if adapter else "base")
        try:
            if body.stream:
                wants_usage = bool((body.stream_options or {}).get("include_usage"))
                payload["stream_options"] = {**(body.stream_options or {}), "include_usage": True}
                resp, backend, t0 = await self.backends.send(endpoint, payload, adapter, stream=True)
                if resp.status_code != 200:
                    try:
                        content = await resp.read()
                    finally:
                        await resp.aclose()
                        backend.inflight -= 1
                    raise backend_error(resp.status_code, content)
                self.metrics.requests.labels(endpoint, decision.mode, "ok").inc()
                relay = self._relay(resp, backend, t0, endpoint, decision, expert_label, wants_usage)
                return StreamingResponse(relay, media_type="text/event-stream", headers=headers)
            resp, backend, t0 = await self.backends.send(endpoint, payload, adapter, stream=False)
            self.metrics.backend_latency.labels(endpoint, backend.url).observe(time.perf_counter() - t0)
            if resp.status_code != 200:
                raise backend_error(resp.status_code, resp.content)
            data = loads(resp.content)
            usage = data.get("usage") or {}
            self.metrics.tokens.labels(expert_label, "prompt").inc(usage.get("prompt_tokens", 0))
            self.metrics.tokens.labels(expert_label, "completion").inc(usage.get("completion_tokens", 0))
            data["routing"] = decision.model_dump()
            self.metrics.requests.labels(endpoint, decision.mode, "ok").inc()
            headers["x-flock-gateway-ms"] = f"{(t0 - start) * 1000:.2f}"  # routing etc., before forwarding
            headers["x-flock-backend-ms"] = f"{(time.perf_counter() - t0) * 1000:.2f}"
            return Response(dumps(data), media_type="application/json", headers=headers)
        except APIError as exc:
            self.metrics.requests.labels(endpoint, decision.mode, "error").inc()
            exc.headers = {**headers, **exc.headers}
            raise

    async def _relay(self, resp: BackendResponse, backend: Backend, t0: float, endpoint: str,
                     decision: RoutingDecision, expert_label: str, wants_usage: bool) -> AsyncIterator[bytes]:
        """Pass vLLM's SSE events through as they arrive: `routing` goes into the first event, the usage event
        (always requested, to count tokens) is dropped unless the client asked for it. A backend that fails
        mid-stream (killed, restarted) ends the stream with an OpenAI-style error event and no [DONE]."""
        buffer, first, got_token = b"", True, False
        try:
            async for chunk in resp.iter_raw():
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if first and event.startswith(b"data: {"):
                        data = loads(event[6:])
                        data["routing"] = decision.model_dump()
                        event = b"data: " + dumps(data)
                        first = False
                    if not got_token and (b'"text":"' in event or
                                          (b'"content":"' in event and b'"content":""' not in event)):
                        got_token = True
                        self.metrics.ttft.labels(endpoint).observe(time.perf_counter() - t0)
                    if b'"choices":[]' in event and b'"usage":{' in event:
                        usage = loads(event[6:]).get("usage") or {}
                        self.metrics.tokens.labels(expert_label, "prompt").inc(usage.get("prompt_tokens", 0))
                        self.metrics.tokens.labels(expert_label, "completion").inc(usage.get("completion_tokens", 0))
                        if not wants_usage:
                            continue
                    yield event + b"\n\n"
            if buffer:
                yield buffer
        except BackendStreamError as exc:
            # The tokens already sent cannot be taken back, so no retry; an error event rather than an exception
            # (which would make the server cut the client's connection mid-event). A partial event is dropped.
            log.warning("backend %s failed mid-stream (%s)", backend.url, exc.kind)
            self.metrics.errors.labels("backend_stream_broken").inc()
            error = {"message": f"model backend failed mid-stream ({exc.kind}); retry the request",
                     "type": "server_error", "param": None, "code": "backend_stream_broken"}
            yield b"data: " + dumps({"error": error}) + b"\n\n"
        finally:
            # Runs on normal end and on client disconnect: closing the upstream response aborts the vLLM request.
            await resp.aclose()
            backend.inflight -= 1
            self.metrics.backend_latency.labels(endpoint, backend.url).observe(time.perf_counter() - t0)


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
