"""POST /tokenize and /detokenize, passed through to a backend: every adapter shares the base model's tokenizer, so
`model` may be 'auto', an expert or the base model, and the base model answers."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import Response

from service.api.deps import get_gateway, require_key
from service.api.openapi import ERRORS
from service.gateway import backend_error

router = APIRouter(tags=["tokenizer"], dependencies=[Depends(require_key)])


@router.post("/tokenize", responses=ERRORS)
async def tokenize(request: Request, body: dict[str, Any] = Body(...)) -> Response:
    return await _pass_through(request, "/tokenize", body)


@router.post("/detokenize", responses=ERRORS)
async def detokenize(request: Request, body: dict[str, Any] = Body(...)) -> Response:
    return await _pass_through(request, "/detokenize", body)


async def _pass_through(request: Request, path: str, body: dict[str, Any]) -> Response:
    gateway = await get_gateway(request)
    resp = await gateway.backends.send(path, {**body, "model": gateway.settings.base_model_name}, None, stream=False)
    if resp.status_code != 200:
        raise backend_error(resp.status_code, resp.content)
    return Response(resp.content, media_type="application/json")
