"""Task accuracy through the real service path: chat completions to the gateway, `concurrency` at a time.

Modes: `base` (model = the base model), `oracle` (model = the task's own expert; tasks without one in the
served pool, i.e. held-out and ood, use the base model) and every other name is a routing mode sent as
`model: "auto", routing: {"mode": name}` (so modes added to the router later are evaluated as they are);
`name:alpha=3,top_k=1` sends those routing parameters too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from eval.metrics import top_expert
from eval.testset import EvalExample
from training.tasks import get_task

MAX_TOKENS = 48
CONCURRENCY = 16
FIXED_MODES = ("base", "oracle")
Progress = Callable[[str], None]


def is_routed(mode: str) -> bool:
    return mode not in FIXED_MODES


def request_body(mode: str, ex: EvalExample, base_model: str, experts: set[str], max_tokens: int = MAX_TOKENS
                 ) -> dict:
    body = {"messages": [{"role": "user", "content": ex.prompt}], "temperature": 0, "max_tokens": max_tokens}
    if mode == "base":
        body["model"] = base_model
    elif mode == "oracle":
        body["model"] = ex.task if ex.task in experts else base_model
    else:
        body["model"] = "auto"
        body["routing"] = routing_params(mode)
    return body


def routing_params(mode: str) -> dict:
    """'glider' -> {"mode": "glider"}; 'glider:alpha=3,top_k=1' -> with those parameters (variants of a mode)."""
    name, _, rest = mode.partition(":")
    params: dict = {"mode": name}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        params[key.strip()] = int(value) if key.strip() == "top_k" else float(value)
    return params


async def served_experts(client: httpx.AsyncClient, gateway: str, base_model: str) -> set[str]:
    """The expert names the gateway serves (GET /v1/models minus 'auto' and the base model)."""
    r = await client.get(f"{gateway}/v1/models")
    r.raise_for_status()
    return {m["id"] for m in r.json().get("data", [])} - {"auto", base_model}


async def check_mode(client: httpx.AsyncClient, gateway: str, mode: str) -> str | None:
    """None if the gateway knows routing mode `mode`, else its error message (POST /v1/route, no generation)."""
    r = await client.post(f"{gateway}/v1/route", json={"prompt": "hello", "routing": routing_params(mode)})
    if r.status_code == 200:
        return None
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}"


async def _post(client: httpx.AsyncClient, url: str, body: dict, attempts: int = 3) -> httpx.Response:
    for attempt in range(attempts):
        try:
            r = await client.post(url, json=body)
            if r.status_code < 500 or attempt == attempts - 1:
                return r
        except httpx.TransportError:
            if attempt == attempts - 1:
                raise
        await asyncio.sleep(1 + attempt)
    raise AssertionError("unreachable")


async def run_mode(client: httpx.AsyncClient, gateway: str, mode: str, examples: list[EvalExample], *,
                   base_model: str, experts: set[str], concurrency: int = CONCURRENCY, max_tokens: int = MAX_TOKENS,
                   progress: Progress | None = None) -> list[dict]:
    """One record per example: task, kind, test_only, prediction, correct, top/experts (the response's
    `routing`), cached, gateway_ms (x-flock-gateway-ms), latency_ms (client side), error."""
    say = progress or (lambda _msg: None)
    sem = asyncio.Semaphore(concurrency)
    url = f"{gateway.rstrip('/')}/v1/chat/completions"
    remaining = {t: sum(1 for e in examples if e.task == t) for t in dict.fromkeys(e.task for e in examples)}
    done = 0

    async def one(ex: EvalExample) -> dict:
        nonlocal done
        body = request_body(mode, ex, base_model, experts, max_tokens)
        rec = {"task": ex.task, "kind": ex.kind, "test_only": ex.test_only, "phrasing_id": ex.phrasing_id,
               "model": body["model"], "prediction": None, "correct": False, "top": None, "experts": [],
               "routing_mode": None, "cached": None, "gateway_ms": None, "latency_ms": None, "error": None}
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await _post(client, url, body)
                rec["latency_ms"] = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    rec["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                else:
                    data = r.json()
                    text = data["choices"][0]["message"].get("content") or ""
                    routing = data.get("routing") or {}
                    rec.update(prediction=text, correct=get_task(ex.task).score(text, ex.answer),
                               experts=routing.get("experts") or [], routing_mode=routing.get("mode"),
                               cached=routing.get("cached"))
                    rec["top"] = top_expert(rec["experts"])
                    gw = r.headers.get("x-flock-gateway-ms")
                    rec["gateway_ms"] = float(gw) if gw else None
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                rec["error"] = f"{type(exc).__name__}: {exc}"
        done += 1
        remaining[ex.task] -= 1
        if remaining[ex.task] == 0:
            say(f"{mode}: {ex.task} done ({done}/{len(examples)})")
        elif done % 100 == 0:
            say(f"{mode}: {done}/{len(examples)}")
        return rec

    return list(await asyncio.gather(*(one(ex) for ex in examples)))


async def run_generation(gateway: str, examples: list[EvalExample], modes: list[str], *, base_model: str,
                         concurrency: int = CONCURRENCY, max_tokens: int = MAX_TOKENS,
                         transport: httpx.AsyncBaseTransport | None = None, progress: Progress | None = None
                         ) -> tuple[dict[str, list[dict]], set[str], dict[str, str]]:
    """({mode: records}, served experts, {skipped mode: why}). Modes run one after another, each `concurrency`
    requests at a time; a routing mode the gateway does not know is skipped (checked with POST /v1/route)."""
    say = progress or (lambda _msg: None)
    out: dict[str, list[dict]] = {}
    skipped: dict[str, str] = {}
    gateway = gateway.rstrip("/")
    async with httpx.AsyncClient(timeout=600, transport=transport) as client:
        experts = await served_experts(client, gateway, base_model)
        for mode in modes:
            if is_routed(mode) and (why := await check_mode(client, gateway, mode)) is not None:
                skipped[mode] = why
                say(f"mode {mode}: skipped ({why})")
                continue
            say(f"mode {mode}: {len(examples)} requests, {concurrency} at a time")
            t0 = time.perf_counter()
            out[mode] = await run_mode(client, gateway, mode, examples, base_model=base_model, experts=experts,
                                       concurrency=concurrency, max_tokens=max_tokens, progress=say)
            errors = sum(1 for r in out[mode] if r["error"])
            say(f"mode {mode}: done in {time.perf_counter() - t0:.0f} s ({errors} errors)")
    return out, experts, skipped
