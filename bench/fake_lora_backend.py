"""A stand-in for a multi-LoRA vLLM for the placement bench: it models what placement changes (adapter slots,
the CPU LoRA cache, queueing for a slot) with sleeps instead of a model, so two backends fit on a small machine.
Benchmark use only; the figures it yields are the placement policy's, under this model, not vLLM's.

The model (FAKE_* environment variables): `FAKE_MAX_LORAS` adapter slots (LRU); a request whose adapter holds
no slot takes the least recently used idle one (a slot swap: counted), or waits until one is idle; an adapter not
in the CPU cache of `FAKE_MAX_CPU_LORAS` (LRU) is read from disk first, `FAKE_LOAD_MS` with the batch blocked
(counted); `FAKE_MAX_SEQS` requests run at once, each `FAKE_STEP_MS`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import OrderedDict

from fastapi import FastAPI, Request
from fastapi.responses import Response

MAX_LORAS = int(os.environ.get("FAKE_MAX_LORAS", "8"))
MAX_CPU_LORAS = int(os.environ.get("FAKE_MAX_CPU_LORAS", "16"))
LOAD_MS = float(os.environ.get("FAKE_LOAD_MS", "40"))
STEP_MS = float(os.environ.get("FAKE_STEP_MS", "60"))
MAX_SEQS = int(os.environ.get("FAKE_MAX_SEQS", "16"))

app = FastAPI()
_cpu: OrderedDict[str, None] = OrderedDict()
_running: dict[str, int] = {}  # adapter -> running requests
_slots: OrderedDict[str, None] = OrderedDict()  # adapters in the MAX_LORAS slots, least recently used first
_slot_free = asyncio.Condition()
_seqs = asyncio.Semaphore(MAX_SEQS)
_load_lock = asyncio.Lock()
stats = {"requests": 0, "cpu_loads": 0, "slot_swaps": 0}
_ANSWER = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                      "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                   "finish_reason": "stop"}],
                      "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}}).encode()


async def _to_cpu(name: str) -> None:
    if name in _cpu:
        _cpu.move_to_end(name)
        return
    async with _load_lock:  # one load at a time, the batch waits (vLLM loads inside the engine step)
        stats["cpu_loads"] += 1
        await asyncio.sleep(LOAD_MS / 1000)
        _cpu[name] = None
        while len(_cpu) > MAX_CPU_LORAS:
            _cpu.popitem(last=False)


def _take_slot(name: str) -> bool:
    """True once `name` holds a slot: it did, or a slot was free, or an idle adapter's slot was taken."""
    if name in _slots:
        _slots.move_to_end(name)
        return True
    if len(_slots) >= MAX_LORAS:
        idle = next((a for a in _slots if not _running.get(a)), None)
        if idle is None:
            return False  # every slot runs requests: wait
        del _slots[idle]
    _slots[name] = None
    stats["slot_swaps"] += 1
    return True


@app.get("/health")
async def health() -> dict:
    return {}


@app.get("/stats")
async def get_stats() -> dict:
    return stats


@app.post("/v1/load_lora_adapter")
async def load(request: Request) -> Response:
    await _to_cpu((await request.json())["lora_name"])
    return Response(b"ok")


@app.post("/v1/chat/completions")
async def chat(request: Request) -> Response:
    name = (await request.json())["model"]
    stats["requests"] += 1
    async with _seqs:
        if name.startswith("x"):
            await _to_cpu(name)
            async with _slot_free:
                await _slot_free.wait_for(lambda: _take_slot(name))
                _running[name] = _running.get(name, 0) + 1
        try:
            await asyncio.sleep(STEP_MS / 1000)
        finally:
            if name.startswith("x"):
                async with _slot_free:
                    _running[name] -= 1
                    if not _running[name]:
                        del _running[name]
                    _slot_free.notify_all()
    return Response(_ANSWER, media_type="application/json")
