"""A small stand-in for vLLM's OpenAI server, for in-process gateway tests: answers at once, records what it
was sent, and misbehaves on request (the prompt names the failure). Served on a real loopback socket, in the
test's event loop, so the gateway's HTTP client is the real one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from safetensors.torch import load_file

from adapters.engine.capabilities import capabilities
from service.processes import free_port

USAGE = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
FINGERPRINT = "vllm-fake-0123abcd"


@dataclass
class FakeVLLM:
    url: str = ""
    requests: list[dict] = field(default_factory=list)  # bodies of generation requests, in order
    request_ids: list[str | None] = field(default_factory=list)  # their X-Request-Id headers
    loaded: list[str] = field(default_factory=list)  # adapter names, in load order
    unloaded: list[str] = field(default_factory=list)
    # GET /flock/capabilities answers this (flock's plugin on a CPU vLLM); None: 404, as a stock vLLM does.
    capabilities: dict | None = field(default_factory=lambda: capabilities("cpu"))
    # Awaited with the adapter's name before a load reads its files: lets a test change the pool mid-load.
    before_load: Callable[[str], Awaitable[None]] | None = None

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict:
            return {}

        @app.get("/flock/capabilities")
        async def caps() -> Response:
            if self.capabilities is None:
                return JSONResponse({"detail": "Not Found"}, status_code=404)
            return JSONResponse(self.capabilities)

        @app.post("/v1/load_lora_adapter")
        async def load(request: Request) -> Response:
            body = await request.json()
            if self.before_load is not None:
                await self.before_load(body["lora_name"])
            try:  # as vLLM does, read the weights: an unreadable file is refused
                load_file(str(Path(body["lora_path"]) / "adapter_model.safetensors"))
            except Exception as exc:
                return JSONResponse({"error": {"message": f"Loading lora {body['lora_name']} failed: {exc}",
                                               "code": 400}}, status_code=400)
            self.loaded.append(body["lora_name"])
            return Response(b"ok")

        @app.post("/v1/unload_lora_adapter")
        async def unload(request: Request) -> Response:
            self.unloaded.append((await request.json())["lora_name"])
            return Response(b"ok")

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            self.request_ids.append(request.headers.get("x-request-id"))
            return await self.answer(await request.json(), chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            self.request_ids.append(request.headers.get("x-request-id"))
            return await self.answer(await request.json(), chat=False)

        @app.post("/v1/responses")
        async def responses(request: Request) -> Response:
            self.request_ids.append(request.headers.get("x-request-id"))
            body = await request.json()
            self.requests.append(body)
            response = {"id": f"resp_{len(self.requests)}", "object": "response", "model": body["model"],
                        "status": "completed", "output": [{"type": "message", "role": "assistant",
                                    "content": [{"type": "output_text", "text": "Hello there"}]}],
                        "usage": {"input_tokens": 8, "output_tokens": 2, "total_tokens": 10}}
            if not body.get("stream"):
                return JSONResponse(response)

            def event(kind: str, data: dict) -> bytes:
                return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

            async def events() -> AsyncIterator[bytes]:
                yield event("response.created", {"response": {**response, "status": "in_progress", "output": []}})
                for word in ("Hello", " there"):
                    yield event("response.output_text.delta", {"delta": word})
                yield event("response.completed", {"response": response})

            return StreamingResponse(events(), media_type="text/event-stream")

        @app.post("/tokenize")
        async def tokenize(request: Request) -> Response:
            body = await request.json()
            self.requests.append(body)
            return JSONResponse({"count": 2, "max_model_len": 2048, "tokens": [11, 12]})

        return app

    async def answer(self, body: dict, *, chat: bool) -> Response:
        self.requests.append(body)
        text = json.dumps(body.get("messages") or body.get("prompt"))
        if "FAIL500" in text:
            return JSONResponse({"error": {"message": "engine exploded", "code": 500}}, status_code=500)
        if "TOOLONG" in text:
            return JSONResponse({"error": {"message": "This model's maximum context length is 2048 tokens",
                                           "code": 400}}, status_code=400)
        words = ["Hello", " there"]
        if not body.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                       "finish_reason": "stop"} if chat else
                      {"index": 0, "text": "".join(words), "finish_reason": "stop"})
            return JSONResponse({"id": "x", "object": "chat.completion" if chat else "text_completion",
                                 "created": 0, "model": body["model"], "choices": [choice], "usage": USAGE,
                                 "system_fingerprint": FINGERPRINT})
        break_midway = "BREAK" in text

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[bytes]:
            for i, word in enumerate(words):
                choice = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
                chunk: dict = {"id": "x", "model": body["model"], "choices": [choice]}
                if i == len(words) - 1:  # as vLLM: the fingerprint on the finishing chunk unless usage follows
                    choice["finish_reason"] = "stop"
                    if not include_usage:
                        chunk["system_fingerprint"] = FINGERPRINT
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                await asyncio.sleep(0)
                if break_midway and i == 0:
                    raise ConnectionResetError("killed")  # uvicorn drops the connection mid-stream
            if include_usage:
                yield b"data: " + json.dumps({"id": "x", "choices": [], "usage": USAGE,
                                              "system_fingerprint": FINGERPRINT}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


@asynccontextmanager
async def serve_fake_vllm() -> AsyncIterator[FakeVLLM]:
    fake = FakeVLLM()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake.app(), host="127.0.0.1", port=port, log_level="critical",
                                           lifespan="off"))
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    fake.url = f"http://127.0.0.1:{port}"
    try:
        yield fake
    finally:
        server.should_exit = True
        await task
