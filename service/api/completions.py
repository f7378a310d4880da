"""POST /v1/chat/completions, /v1/completions and /v1/responses (OpenAI-compatible, streaming or not)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service.api.deps import get_gateway, require_key
from service.api.openapi import ERRORS
from service.auth import Principal
from service.metrics import Metrics
from service.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ResponsesRequest,
)

router = APIRouter(tags=["generation"], dependencies=[Depends(require_key)])


@router.post("/v1/chat/completions", response_model=None,
             responses={200: {"model": ChatCompletionResponse, "content": {"text/event-stream": {}}}, **ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           principal: Principal = Depends(require_key)) -> Response:
    # get_gateway called, not Depends(get_gateway): FastAPI resolving a dependency costs ~10 µs per request.
    # (require_key is the router's dependency too: FastAPI resolves it once per request.)
    gateway = await get_gateway(request)
    work = gateway.generate("/v1/chat/completions", body, principal)
    return await unless_client_leaves(request, work, gateway.metrics)


@router.post("/v1/completions", response_model=None,
             responses={200: {"model": CompletionResponse, "content": {"text/event-stream": {}}}, **ERRORS})
async def completions(body: CompletionRequest, request: Request,
                      principal: Principal = Depends(require_key)) -> Response:
    gateway = await get_gateway(request)
    work = gateway.generate("/v1/completions", body, principal)
    return await unless_client_leaves(request, work, gateway.metrics)


@router.post("/v1/responses", response_model=None, responses={200: {"content": {"text/event-stream": {}}}, **ERRORS})
async def responses(body: ResponsesRequest, request: Request, principal: Principal = Depends(require_key)) -> Response:
    """OpenAI's Responses API, routed like a chat (`routing` in the answer, or in a stream's first event)."""
    gateway = await get_gateway(request)
    return await unless_client_leaves(request, gateway.generate("/v1/responses", body, principal),
                                      gateway.metrics)


async def unless_client_leaves(request: Request, work: Awaitable[Response], metrics: Metrics) -> Response:
    """`work`, cancelled if the client hangs up first: the cancelled request to vLLM closes its connection, which
    makes vLLM abort the generation. Starlette cancels nothing for a plain response; a stream that has started is
    stopped by the gateway's relay instead (its closed generator closes the upstream stream)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    metrics.errors.labels("client_disconnected").inc()
    return Response(status_code=499)  # nobody reads it: nginx's "client closed request"


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (the server sends it if the connection
    # drops while the response is being prepared).
    while (await request.receive())["type"] != "http.disconnect":
        pass
