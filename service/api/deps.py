"""FastAPI dependencies: the objects the app's lifespan created, and access control."""

from __future__ import annotations

from fastapi import Request

from service.auth import Principal
from service.errors import APIError
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
    """An admin key: checks of any expert."""
    return await _access(request, admin=True)


async def require_manager(request: Request) -> Principal:
    """An admin key or a tenant key: changes to the expert pool (which ones, the pool decides by the key's scope)."""
    principal = await _access(request, admin=False)
    if not principal.admin and principal.tenant is None:
        raise APIError(403, "changing the expert pool needs an admin key or a tenant key",
                       code="insufficient_permissions")
    return principal
