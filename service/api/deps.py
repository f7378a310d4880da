"""FastAPI dependencies: the objects the app's lifespan created, and access control."""

from __future__ import annotations

from fastapi import Request

from service.auth import Principal
from service.gateway import Gateway


async def get_gateway(request: Request) -> Gateway:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop on every request.
    return request.app.state.gateway


async def _access(request: Request, admin: bool) -> Principal:
    principal = request.app.state.auth.authenticate(request, admin=admin)
    await request.app.state.rate_limiter.check(principal.key_id)
    return principal


async def require_key(request: Request) -> Principal:
    """Any valid key (inference or admin), within its rate limit."""
    return await _access(request, admin=False)


async def require_admin(request: Request) -> Principal:
    """An admin key: changes to the expert pool."""
    return await _access(request, admin=True)
