"""GET /health (alive), /ready (backends and pool ready) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import get_gateway
from service.gateway import Gateway

router = APIRouter(tags=["operations"])


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(gateway: Gateway = Depends(get_gateway)) -> JSONResponse:
    backends = {b.url: b.healthy for b in gateway.backends.backends}
    cache = gateway.router.cache
    body = {
        "ready": gateway.backends.any_healthy,
        "backends": backends,
        "pool": {"experts": len(gateway.pool), "version": gateway.pool.version,
                 "abstain_threshold": round(gateway.router.index.threshold, 4)},
        "redis": None if cache is None else await cache.ping(),
        "modes": gateway.modes_served(),
        "default_mode": gateway.router.default_mode,
        "quarantined": quarantined(gateway),
        "capabilities": {b.url: b.caps.describe() if b.caps else None for b in gateway.backends.backends},
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics")
async def metrics(gateway: Gateway = Depends(get_gateway)) -> Response:
    gateway.metrics.pool_size.set(len(gateway.pool))
    return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def quarantined(gateway: Gateway) -> dict[str, str]:
    """Quarantined experts and why. /ready is unauthenticated: shared experts by name, tenants' only counted
    (their names and file paths are theirs)."""
    shown = {name: q.reason for name, q in gateway.pool.quarantined.items() if gateway.expert_label(name) == name}
    hidden = len(gateway.pool.quarantined) - len(shown)
    if hidden:
        shown["private"] = f"{hidden} private expert(s) of tenants"
    return shown
