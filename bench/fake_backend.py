"""A stand-in for vLLM that answers instantly, so `flock bench` can time the gateway's own work (proxying,
validation, routing, cache) without generation noise or CPU shared with a model. Benchmark use only."""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from adapters.engine.capabilities import capabilities

app = FastAPI()
_ANSWER = json.dumps({
    "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": "fake",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
}).encode()


@app.get("/health")
async def health() -> dict:
    return {}


@app.get("/flock/capabilities")
async def caps() -> Response:
    # As flock's plugin on a CPU vLLM answers: the gateway then sends the per-token modes here too, which is
    # what `flock bench --composites` needs (their composites are built by the gateway; nothing is generated).
    return JSONResponse(capabilities("cpu"))


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    await request.body()
    return Response(_ANSWER, media_type="application/json")


@app.post("/v1/load_lora_adapter")
async def load(request: Request) -> Response:
    return Response(b"ok")
