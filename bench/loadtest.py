"""`flock loadtest`: a bounded load test of a running gateway on loopback.

N concurrent clients for S seconds, each sending, in turn, a routed request (`model: auto`), a request to an
expert by name and a streamed routed request, with prompts drawn from the task suite (held-in, held-out and
general prompts). Reports throughput, p50/p99 latency per kind and every error; exits non-zero on any error.

    flock loadtest --gateway http://127.0.0.1:8000 --clients 32 --seconds 60
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter, defaultdict

import httpx
import numpy as np

from training.tasks import TASKS


def prompts(n_per_task: int = 20, seed: int = 5) -> list[str]:
    return [e.prompt for t in TASKS.values() for e in t.generate("test", n_per_task, seed)]


async def run(gateway: str, clients: int, seconds: float, max_tokens: int, api_key: str | None) -> dict:
    gateway = gateway.rstrip("/")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    pool = prompts()
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: Counter = Counter()
    tokens = 0
    async with httpx.AsyncClient(timeout=300, headers=headers,
                                 limits=httpx.Limits(max_connections=clients * 2)) as client:
        r = await client.get(f"{gateway}/v1/models")
        r.raise_for_status()
        # Experts are the models with a parent other than 'auto' (the base model has none).
        experts = [m["id"] for m in r.json()["data"] if m["id"] != "auto" and m.get("parent")] or ["auto"]
        deadline = time.monotonic() + seconds

        async def client_loop(i: int) -> None:
            nonlocal tokens
            rng = random.Random(i)
            kinds = ("routed", "expert", "stream")
            n = 0
            while time.monotonic() < deadline:
                kind = kinds[n % 3]
                n += 1
                body = {"model": "auto" if kind != "expert" else rng.choice(experts),
                        "messages": [{"role": "user", "content": rng.choice(pool)}],
                        "max_tokens": max_tokens, "temperature": 0}
                t0 = time.perf_counter()
                try:
                    if kind == "stream":
                        body["stream"] = True
                        body["stream_options"] = {"include_usage": True}
                        async with client.stream("POST", f"{gateway}/v1/chat/completions", json=body) as resp:
                            if resp.status_code != 200:
                                errors[f"{kind} HTTP {resp.status_code}"] += 1
                                await resp.aread()
                                continue
                            done = False
                            async for line in resp.aiter_lines():
                                if line == "data: [DONE]":
                                    done = True
                                elif line.startswith("data: "):
                                    usage = json.loads(line[6:]).get("usage")
                                    if usage:
                                        tokens += usage["completion_tokens"]
                            if not done:
                                errors[f"{kind} stream ended without [DONE]"] += 1
                                continue
                    else:
                        resp = await client.post(f"{gateway}/v1/chat/completions", json=body)
                        if resp.status_code != 200:
                            errors[f"{kind} HTTP {resp.status_code}"] += 1
                            continue
                        tokens += resp.json()["usage"]["completion_tokens"]
                except httpx.HTTPError as exc:
                    errors[f"{kind} {type(exc).__name__}"] += 1
                    continue
                latencies[kind].append((time.perf_counter() - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    done = sum(len(v) for v in latencies.values())
    every = [x for v in latencies.values() for x in v]
    return {
        "clients": clients, "seconds": round(wall, 1), "max_tokens": max_tokens,
        "requests_ok": done, "errors": sum(errors.values()), "error_kinds": dict(errors),
        "requests_per_s": round(done / wall, 2), "output_tokens_per_s": round(tokens / wall, 1),
        "latency_ms_p50": round(float(np.percentile(every, 50)), 1) if every else None,
        "latency_ms_p99": round(float(np.percentile(every, 99)), 1) if every else None,
        "by_kind": {k: {"n": len(v), "p50_ms": round(float(np.percentile(v, 50)), 1),
                        "p99_ms": round(float(np.percentile(v, 99)), 1)} for k, v in latencies.items() if v},
    }
