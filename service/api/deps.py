"""FastAPI dependencies: the objects the app's lifespan created."""

from __future__ import annotations

from fastapi import Request

from service.gateway import Gateway


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway
