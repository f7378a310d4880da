"""POST /v1/chat/completions and /v1/completions (OpenAI-compatible, streaming or not)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from service.api.deps import get_gateway, require_key
from service.protocol import ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse
from service.api.responses import ERRORS

router = APIRouter(tags=["generation"], dependencies=[Depends(require_key)])


@router.post("/v1/chat/completions", response_model=None,
             responses={200: {"model": ChatCompletionResponse, "content": {"text/event-stream": {}}}, **ERRORS})
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    # get_gateway called, not Depends(get_gateway): FastAPI resolving a dependency costs ~10 µs per request.
    return await (await get_gateway(request)).generate("/v1/chat/completions", body)


@router.post("/v1/completions", response_model=None,
             responses={200: {"model": CompletionResponse, "content": {"text/event-stream": {}}}, **ERRORS})
async def completions(body: CompletionRequest, request: Request) -> Response:
    return await (await get_gateway(request)).generate("/v1/completions", body)
