"""App wiring: the lifespan builds every long-lived object once; routers are mounted; errors are shaped."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapters.composite import CompositeStore
from adapters.pool import ExpertPool
from adapters.validate import ModelShape
from router.cache import RoutingCache
from router.conversation import ConversationConfig
from router.embed import Embedder, MicroBatcher
from router.methods import GateConfig, MergeConfig, MethodConfig
from router.router import Router
from service import models
from service.api import completions, console, experts, health, tokenize
from service.api import models as models_api
from service.auth import Authenticator, RateLimiter
from service.backend import BackendPool
from service.errors import error_body, install_error_handlers
from service.gateway import Gateway
from service.metrics import Metrics
from service.pool_sync import SharedPool
from service.request_id import RequestIdMiddleware
from service.settings import Settings, get_settings

log = logging.getLogger("flock")


class BodySizeLimit:
    """413 for bodies over the limit, checked on Content-Length and on the bytes actually received."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_bytes: int = 0):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = upload_bytes  # an expert archive upload (POST /v1/experts, multipart)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        max_bytes = self.max_bytes
        if (scope["method"] == "POST" and scope["path"] == "/v1/experts"
                and headers.get(b"content-type", b"").lower().startswith(b"multipart/form-data")):
            max_bytes = max(max_bytes, self.upload_bytes)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            return await self._reject(send, max_bytes)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > max_bytes:
                raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(send, max_bytes)

    async def _reject(self, send: Send, max_bytes: int) -> None:
        body = json.dumps(error_body(413, f"request body exceeds {max_bytes} bytes",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def build_pool(settings: Settings) -> ExpertPool:
    """The expert pool from its state file (seeded from the library on the first start)."""
    shape = ModelShape.from_model_dir(settings.resolved_base_model_dir)
    pool = ExpertPool(state_file=settings.pool_file, roots=settings.resolved_expert_roots,
                      base_name=settings.base_model_name, shape=shape, max_rank=settings.vllm_max_lora_rank,
                      tenants_dir=settings.tenants_dir)
    pool.load(seed_dir=settings.library_dir)
    return pool


def method_configs(settings: Settings) -> dict[str, MethodConfig]:
    """Each routing method's typed config, from the settings table."""
    rank = settings.vllm_max_lora_rank
    gated = GateConfig(top_k=settings.gate_top_k, max_rank=rank)
    return {"global": MethodConfig(max_rank=rank),
            "merge": MergeConfig(top_k=settings.merge_top_k, temperature=settings.merge_temperature,
                                 weight_step=settings.merge_weight_step, max_rank=rank),
            "phatgoose": gated, "arrow": gated,
            "glider": GateConfig(top_k=settings.gate_top_k, max_rank=rank, alpha=settings.glider_alpha,
                                 solo_margin=settings.glider_solo_margin)}


def build_gateway(settings: Settings, metrics: Metrics) -> Gateway:
    pool = build_pool(settings)
    embedder = MicroBatcher(Embedder(settings.embed_model_dir or models.embed_model_dir(), int8=settings.embed_int8))
    cache = None
    if settings.redis_url:
        cache = RoutingCache(settings.redis_url, settings.cache_ttl_s)
    router = Router(pool, embedder, cache, default_mode=settings.default_mode,
                    fixed_threshold=settings.abstain_threshold, expert_vector=settings.expert_vector,
                    method_configs=method_configs(settings),
                    conversation=ConversationConfig(mechanism=settings.conversation_routing),
                    vector_dir=settings.state_dir / "card-vectors")
    backends = BackendPool(settings.backend_urls, metrics, connect_timeout_s=settings.backend_connect_timeout_s,
                           read_timeout_s=settings.backend_timeout_s, placement=settings.placement,
                           max_loras=settings.vllm_max_loras, batch=settings.vllm_max_num_seqs)
    composites = CompositeStore(settings.composites_dir)
    return Gateway(settings, pool, router, backends, composites, metrics)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gateway = build_gateway(settings, metrics)
        unloaded = await gateway.backends.unload_from(settings.composites_dir)  # before their files go
        if unloaded:
            log.info("unloaded %d composites of this gateway's last run from the backends", len(unloaded))
        gateway.composites.clear()
        await gateway.router.rebuild_index()
        await gateway.backends.check_all()
        gateway.backends.start()
        gateway.preloader.start()
        gateway.router.embedder.start()
        health = asyncio.get_running_loop().create_task(gateway.watch_quarantined())
        if settings.redis_url:
            gateway.shared = SharedPool(settings.redis_url, gateway.pool, gateway.pool_changed,
                                        interval_s=settings.pool_sync_s)
            await gateway.shared.sync_once()
            gateway.shared.start()
        app.state.gateway = gateway
        app.state.auth = Authenticator(settings.api_keys, settings.admin_keys, settings.api_keys_file,
                                       settings.admin_keys_file, settings.tenant_keys, settings.tenant_keys_file)
        limiter_redis = aioredis.from_url(settings.redis_url, socket_timeout=0.25, socket_connect_timeout=0.25) \
            if settings.redis_url else None
        app.state.rate_limiter = RateLimiter(limiter_redis, settings.rate_limit_rps, settings.rate_limit_burst)
        if app.state.auth.open:
            log.warning("no API keys configured (FLOCK_API_KEYS, FLOCK_ADMIN_KEYS, FLOCK_TENANT_KEYS): the gateway "
                        "is OPEN to anyone who can reach %s:%s", settings.host, settings.port)
        # Everything built so far (the embedding model, torch, the pool) lives as long as the process: frozen, a
        # full garbage collection no longer walks it, which otherwise stalls a request for tens of milliseconds.
        gc.freeze()
        log.info("gateway ready: %d experts (pool %s, abstain threshold %.3f), backends %s, redis %s",
                 len(gateway.pool), gateway.pool.version, gateway.router.index.threshold,
                 settings.backend_urls, "on" if gateway.router.cache else "off")
        yield
        health.cancel()
        await gateway.preloader.close()
        await gateway.router.drain()
        if gateway.shared is not None:
            await gateway.shared.close()
        if limiter_redis is not None:
            await limiter_redis.aclose()
        await gateway.backends.close()
        await gateway.responses.close()
        await gateway.router.embedder.stop()
        if gateway.router.cache:
            await gateway.router.cache.close()

    app = FastAPI(title="flock", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible gateway routing each request across a pool of LoRA experts.")
    install_error_handlers(app, on_error=lambda kind: metrics.errors.labels(kind).inc())
    for module in (completions, models_api, tokenize, experts, health, console):
        app.include_router(module.router)
    app.mount("/ui/", console.static_files(), name="console")
    # An upload may carry an archive of upload_max_mb and its card fields.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes,
                       upload_bytes=(settings.upload_max_mb << 20) + settings.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)  # outermost: every answer, a 413 included, carries the id
    app.state.metrics = metrics
    return app
