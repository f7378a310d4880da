"""The gateway in process: the real app (FastAPI, router with the real embedding model, backend pool) over
httpx's ASGI transport, against a fake vLLM on a loopback socket. No Redis, no vLLM: limits, error mapping,
the SSE relay, auth, /v1/route and the experts API, in seconds."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from adapters.card import ExpertCard
from adapters.engine.capabilities import capabilities
from adapters.gates import compute_arrow_gates
from adapters.validate import ModelShape
from service.app import create_app
from service.resolve import expert_left
from service.settings import Settings
from tests.unit.fake_vllm import FakeVLLM, serve_fake_vllm
from training.synthetic import write_random_lora

pytestmark = pytest.mark.asyncio(loop_scope="module")
BASE = "SmolLM2-135M-Instruct"
ADMIN, USER = "admin-key", "user-key"
EXPERTS = {
    "cooking": ("Cooking and baking: recipes, bread dough, pancakes, boiling eggs, sauces, pasta.",
                ["How long should I boil an egg?", "How do I make a tomato sauce for pasta?"]),
    "arith": ("Arithmetic: adds, subtracts and multiplies integers.", ["What is 12 times 7?", "Compute 345 plus 289."]),
}


@dataclass
class Stack:
    app: FastAPI
    client: httpx.AsyncClient
    fake: FakeVLLM
    root: Path

    def auth(self, key: str = USER) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    async def chat(self, content: str | list, key: str = USER, **kw) -> httpx.Response:
        body = {"model": "auto", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}
        return await self.client.post("/v1/chat/completions", json=body, headers=self.auth(key))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory) -> AsyncIterator[Stack]:
    settings = Settings()
    shape = ModelShape.from_model_dir(settings.resolved_base_model_dir)
    root = tmp_path_factory.mktemp("experts")
    for seed, (name, (description, examples)) in enumerate(EXPERTS.items()):
        write_random_lora(root / name, shape=shape, base_name=BASE, seed=seed, rank=2, targets=("q_proj",),
                          card=ExpertCard(name=name, description=description, examples=examples))
        compute_arrow_gates(root / name)  # so the per-token mode arrow has candidates
    write_random_lora(root / "spare", shape=shape, base_name=BASE, seed=9, rank=2, targets=("q_proj",),
                      card=ExpertCard(name="spare", description="Translates English words to German."))
    async with serve_fake_vllm() as fake:
        settings = settings.model_copy(update={
            "backend_urls": [fake.url], "redis_url": None, "state_dir": tmp_path_factory.mktemp("state"),
            "library_dir": root / "no-library", "expert_roots": [root], "api_keys": [USER], "admin_keys": [ADMIN],
            "max_messages": 4, "max_prompt_chars": 200, "max_tokens_limit": 64,
            # These tests meet each adapter's load on a request's path (a broken file, a removal mid-load); loading
            # ahead of need has its own tests (test_preload.py).
            "preload_experts": 0})
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://flock") as client:
                s = Stack(app, client, fake, root)
                for name in EXPERTS:
                    r = await client.post("/v1/experts", json={"path": str(root / name)}, headers=s.auth(ADMIN))
                    assert r.status_code == 201, r.text
                yield s


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


async def test_routed_request_reaches_the_backend_with_the_experts_adapter(stack: Stack):
    r = await stack.chat("How long do I boil an egg for a soft yolk?")
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["experts"][0]["name"] == "cooking"
    assert r.headers["x-flock-mode"] == "global" and r.headers["x-flock-experts"] == "cooking=1"
    sent = stack.fake.requests[-1]
    assert sent["model"] == "cooking" and "routing" not in sent and "cooking" in stack.fake.loaded


async def test_base_model_and_unknown_model(stack: Stack):
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}
    r = await stack.client.post("/v1/chat/completions", json=body, headers=stack.auth())
    assert r.status_code == 200 and stack.fake.requests[-1]["model"] == BASE
    r = await stack.client.post("/v1/chat/completions", json={**body, "model": "nope"}, headers=stack.auth())
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = await stack.client.post("/v1/chat/completions", json={**body, "routing": {"mode": "merge"}},
                                headers=stack.auth())
    assert r.status_code == 400 and error_of(r)["param"] == "routing"


async def test_auth(stack: Stack):
    r = await stack.client.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user",
                                                                                            "content": "hi"}]})
    assert r.status_code == 401 and error_of(r)["type"] == "authentication_error"
    r = await stack.chat("hi", key="wrong")
    assert r.status_code == 401
    r = await stack.client.post("/v1/experts", json={"path": str(stack.root / "spare")}, headers=stack.auth(USER))
    assert r.status_code == 403 and error_of(r)["type"] == "permission_error"


@pytest.mark.parametrize("kw, code, param", [
    ({"max_tokens": 65}, "max_tokens_too_large", "max_tokens"),
    ({"n": 9}, "invalid_value", "n"),
    ({"messages": [{"role": "user", "content": "x"}] * 5}, "too_many_messages", "messages"),
    ({"messages": [{"role": "user", "content": "x" * 201}]}, "context_length_exceeded", "messages"),
    # Text parts count toward the limit as plain strings do.
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 150},
                                                {"type": "text", "text": "z" * 60}]}]},
     "context_length_exceeded", "messages"),
    ({"routing": {"mode": "nope"}}, "invalid_routing_mode", "routing.mode"),
])
async def test_limits_are_400s_before_any_backend_call(stack: Stack, kw, code, param):
    before = len(stack.fake.requests)
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **kw}
    r = await stack.client.post("/v1/chat/completions", json=body, headers=stack.auth())
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == code and error_of(r)["param"] == param
    assert len(stack.fake.requests) == before


async def test_backend_errors_are_mapped(stack: Stack):
    r = await stack.chat("FAIL500 please")
    assert r.status_code == 502 and error_of(r)["code"] == "backend_error" and error_of(r)["type"] == "server_error"
    r = await stack.chat("TOOLONG please")
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    r = await stack.client.post("/v1/chat/completions", content=b"{not json", headers=stack.auth())
    assert 400 <= r.status_code < 500 and "error" in r.json()


async def test_stream_carries_routing_first_and_drops_unrequested_usage(stack: Stack):
    r = await stack.chat("What is 12 times 7?", stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    first = json.loads(events[0].removeprefix("data: "))
    assert first["routing"]["experts"][0]["name"] == "arith"
    assert events[-1] == "data: [DONE]" and all("usage" not in e for e in events)
    assert "".join(json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]) == "Hello there"
    # Asked for, the usage chunk is passed through.
    r = await stack.chat("What is 12 times 7?", stream=True, stream_options={"include_usage": True})
    assert any(json.loads(e[6:]).get("usage") for e in r.text.split("\n\n") if e.startswith("data: {"))


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
async def test_stream_keeps_the_system_fingerprint_where_vllm_puts_it(stack: Stack, endpoint):
    """vLLM stamps the fingerprint on the finishing chunk, or on the usage chunk when usage is asked for: the
    client sees it where it would from vLLM direct, though the gateway always asks vLLM for usage."""
    body = {"model": "auto", "max_tokens": 4, "stream": True}
    body |= {"messages": [{"role": "user", "content": "What is 12 times 7?"}]} if "chat" in endpoint \
        else {"prompt": "What is 12 times 7?"}
    for usage in (False, True):
        r = await stack.client.post(endpoint, headers=stack.auth(),
                                    json={**body, "stream_options": {"include_usage": usage}})
        chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
        finishing = [c for c in chunks if any(ch.get("finish_reason") for ch in c["choices"])]
        stamped = finishing if not usage else [c for c in chunks if c.get("usage")]
        assert len(stamped) == 1 and stamped[0]["system_fingerprint"] == "vllm-fake-0123abcd", chunks
        assert r.text.endswith("data: [DONE]\n\n") and chunks[-1] is stamped[0]


async def test_stream_broken_midway_ends_with_an_error_event(stack: Stack):
    r = await stack.chat("BREAK the stream", stream=True)
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    assert json.loads(events[0][6:])["choices"][0]["delta"]["content"] == "Hello"
    last = json.loads(events[-1][6:])
    assert last["error"]["code"] == "backend_stream_broken" and "[DONE]" not in r.text
    backend = stack.app.state.gateway.backends.backends[0]
    assert backend.inflight == 0  # the stream's lease was released


async def test_route_endpoint(stack: Stack):
    r = await stack.client.post("/v1/route", json={"prompt": "Compute 17 plus 25."}, headers=stack.auth())
    assert r.status_code == 200 and r.json()["routing"]["experts"][0]["name"] == "arith"
    r = await stack.client.post("/v1/route", json={}, headers=stack.auth())
    assert r.status_code == 400 and error_of(r)["code"] == "invalid_request"


async def test_route_explains_every_experts_score_and_the_threshold(stack: Stack):
    body = {"prompt": "How long do I boil an egg?", "explain": True}
    r = await stack.client.post("/v1/route", json=body, headers=stack.auth())
    data = r.json()
    assert r.status_code == 200 and set(data["scores"]) == set(EXPERTS)
    assert max(data["scores"], key=data["scores"].get) == "cooking" == data["routing"]["experts"][0]["name"]
    assert data["scores"]["cooking"] == pytest.approx(data["routing"]["experts"][0]["score"], abs=1e-3)
    assert data["threshold"] == pytest.approx(stack.app.state.gateway.router.index.threshold, abs=1e-4)
    plain = (await stack.client.post("/v1/route", json={"prompt": "hi"}, headers=stack.auth())).json()
    assert plain["scores"] is None and plain["threshold"] is None
    # A conversation: the follow-up's scores are the conversation's (it stays with arith).
    messages = [{"role": "user", "content": "What is 12 times 7?"}, {"role": "assistant", "content": "84"},
                {"role": "user", "content": "And the next one?"}]
    r = await stack.client.post("/v1/route", json={"messages": messages, "explain": True}, headers=stack.auth())
    assert max(r.json()["scores"], key=r.json()["scores"].get) == "arith" == r.json()["routing"]["experts"][0]["name"]


async def test_console_is_served_as_static_files(stack: Stack):
    r = await stack.client.get("/ui")
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    r = await stack.client.get("/ui/")
    assert r.status_code == 200 and "routing console" in r.text and 'src="console.js"' in r.text
    for name in ("console.js", "console.css"):
        assert (await stack.client.get(f"/ui/{name}")).status_code == 200
    r = await stack.client.get("/ready")
    assert r.json()["default_mode"] == "global"


async def test_experts_crud(stack: Stack):
    admin = stack.auth(ADMIN)
    r = await stack.client.post("/v1/experts", json={"path": str(stack.root / "spare")}, headers=admin)
    assert r.status_code == 201, r.text
    names = {e["name"] for e in (await stack.client.get("/v1/experts", headers=admin)).json()["data"]}
    assert names == {"cooking", "arith", "spare"}
    r = await stack.client.post("/v1/experts", json={"path": str(stack.root / "spare")}, headers=admin)
    assert r.status_code == 409 and error_of(r)["type"] == "conflict_error"
    r = await stack.client.post("/v1/experts", json={"path": "/etc"}, headers=admin)
    assert 400 <= r.status_code < 500 and "error" in r.json()
    r = await stack.client.delete("/v1/experts/spare", headers=admin)
    assert r.status_code == 200
    r = await stack.client.delete("/v1/experts/spare", headers=admin)
    assert r.status_code == 404 and error_of(r)["type"] == "not_found_error"
    models = {m["id"] for m in (await stack.client.get("/v1/models", headers=stack.auth())).json()["data"]}
    assert {"auto", BASE, "cooking", "arith"} <= models and "spare" not in models


async def test_concurrent_registrations_all_land(stack: Stack):
    """Many registrations at once through the API: every one answers 201 and is in the list, the routing index
    and the state file; then removed at once, none is left behind."""
    import asyncio

    admin = stack.auth(ADMIN)
    gateway = stack.app.state.gateway
    names = [f"burst{i:02d}" for i in range(24)]

    async def register(name: str) -> int:
        body = {"path": str(stack.root / "spare"), "name": name, "description": f"Answers {name} questions.",
                "examples": [f"A question for {name}?", f"Another one for {name}."]}
        return (await stack.client.post("/v1/experts", json=body, headers=admin)).status_code

    assert await asyncio.gather(*(register(n) for n in names)) == [201] * len(names)
    listed = {e["name"] for e in (await stack.client.get("/v1/experts", headers=admin)).json()["data"]}
    assert set(names) <= listed
    await gateway.router.ensure_current()
    assert set(names) <= set(gateway.router.index.names)
    saved = {e["name"] for e in json.loads(gateway.settings.pool_file.read_text())["experts"]}
    assert set(names) <= saved
    codes = await asyncio.gather(*(stack.client.delete(f"/v1/experts/{n}", headers=admin) for n in names))
    assert [r.status_code for r in codes] == [200] * len(names)
    await gateway.router.ensure_current()
    assert not set(names) & set(gateway.router.index.names)
    assert not set(names) & {e["name"] for e in json.loads(gateway.settings.pool_file.read_text())["experts"]}


async def test_gated_modes_only_where_a_backend_applies_the_gate(stack: Stack):
    gateway = stack.app.state.gateway
    r = await stack.chat("What is 12 times 7?", routing={"mode": "arrow"})
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["gate"]["local"] == "arrow"
    assert stack.fake.requests[-1]["model"].startswith("flock-gated-")
    assert r.json()["model"] == "arrow:arith+cooking"  # a composite's readable name, not flock-gated-<hash>
    ready = (await stack.client.get("/ready")).json()
    assert "arrow" in ready["modes"] and ready["capabilities"][stack.fake.url]["gated"] is True

    # The same backend without flock's plugin (a stock vLLM: 404 on /flock/capabilities): a clear 400, no fallback.
    stack.fake.capabilities = None
    gateway.backends.backends[0].caps = None
    await gateway.backends.check_all()
    try:
        before = len(stack.fake.requests)
        for mode in ("arrow", "phatgoose", "glider"):
            r = await stack.chat("What is 12 times 7?", routing={"mode": mode})
            assert r.status_code == 400 and error_of(r)["code"] == "routing_mode_unavailable", r.text
        assert len(stack.fake.requests) == before
        r = await stack.chat("What is 12 times 7?")  # global routing, experts and the base model still served
        assert r.status_code == 200 and r.json()["routing"]["experts"][0]["name"] == "arith"
        ready = (await stack.client.get("/ready")).json()
        assert "glider" not in ready["modes"] and "global" in ready["modes"]
        assert ready["capabilities"][stack.fake.url]["plugin"] is False
    finally:
        stack.fake.capabilities = capabilities("cpu")
        gateway.backends.backends[0].caps = None
        await gateway.backends.check_all()


async def test_gated_modes_wait_while_the_capable_backend_is_down(stack: Stack):
    backend = stack.app.state.gateway.backends.backends[0]
    backend.healthy = False
    try:
        r = await stack.chat("What is 12 times 7?", routing={"mode": "glider"})
        assert r.status_code == 503 and error_of(r)["code"] == "routing_mode_unavailable"
        assert r.headers["retry-after"] == "1"
    finally:
        backend.healthy = True


async def test_model_by_id(stack: Stack):
    r = await stack.client.get("/v1/models/arith", headers=stack.auth())
    assert r.status_code == 200 and r.json()["id"] == "arith" and r.json()["parent"] == BASE
    r = await stack.client.get("/v1/models/nope", headers=stack.auth())
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"


async def test_tokenize_passes_through_with_the_base_model(stack: Stack):
    r = await stack.client.post("/tokenize", json={"model": "auto", "prompt": "hi there"}, headers=stack.auth())
    assert r.status_code == 200 and r.json()["tokens"] == [11, 12]
    assert stack.fake.requests[-1] == {"model": BASE, "prompt": "hi there"}
    assert (await stack.client.post("/tokenize", json={"prompt": "x"})).status_code == 401


async def test_request_id_is_kept_returned_and_sent_to_the_backend(stack: Stack):
    r = await stack.client.post(
        "/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
        headers={**stack.auth(), "X-Request-Id": "client-id-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "client-id-42"
    assert stack.fake.request_ids[-1] == "client-id-42"
    r = await stack.client.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user",
                                                                                            "content": "hi"}]},
                                headers={**stack.auth(), "X-Request-Id": "bad id with spaces"})
    generated = r.headers["x-request-id"]
    assert generated.startswith("flock-") and stack.fake.request_ids[-1] == generated
    r = await stack.client.get("/v1/models/nope", headers=stack.auth())
    assert r.headers["x-request-id"].startswith("flock-")  # errors carry one too


async def test_unknown_path_names_the_nearest_endpoint_and_405_is_a_client_error(stack: Stack):
    r = await stack.client.post("/v1/chat/completion", json={}, headers=stack.auth())
    assert r.status_code == 404 and error_of(r)["code"] == "unknown_path"
    assert "did you mean POST /v1/chat/completions" in error_of(r)["message"]
    r = await stack.client.get("/v1/chat/completions", headers=stack.auth())
    assert r.status_code == 405 and error_of(r)["type"] == "invalid_request_error"


@pytest.mark.parametrize("extra", [
    {"routing": {"mode": "glider", "alpha": 1e300}}, {"routing": {"mode": "glider", "alpha": -1}},
    {"routing": {"top_k": 0}}, {"routing": {"top_k": 10**30}}, {"temperature": 1e308}, {"top_p": 0},
    {"presence_penalty": 3}, {"frequency_penalty": -2.5}, {"top_logprobs": 21}, {"max_tokens": 0},
    {"max_tokens": 10**40}, {"n": 0}, {"seed": 2**70}, {"messages": []}, {"routing": {"mode": ["x"]}},
])
async def test_out_of_range_numbers_are_400s(stack: Stack, extra):
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **extra}
    r = await stack.client.post("/v1/chat/completions", json=body, headers=stack.auth())
    assert r.status_code == 400, r.text
    assert error_of(r)["type"] == "invalid_request_error"


async def test_composites_stay_within_their_disk_budget_and_leave_the_backends(stack: Stack):
    gateway = stack.app.state.gateway
    cache = gateway.resolver.cache
    limit = cache.limit_bytes
    cache.limit_bytes = 1  # room for one composite at a time
    gateway.composites.clear()  # the two composites below are new
    cache._entries.clear()
    cache.bytes = 0
    try:
        built, evicted = cache.built, cache.evicted
        r = await stack.chat("What is 12 times 7?", routing={"mode": "arrow", "top_k": 2})
        first = stack.fake.requests[-1]["model"]
        r = await stack.chat("What is 12 times 7?", routing={"mode": "arrow", "top_k": 1})
        assert r.status_code == 200
        second = stack.fake.requests[-1]["model"]
        assert first != second and cache.built == built + 2 and cache.evicted == evicted + 1
        assert first not in cache and second in cache and len(cache) == 1
        assert first in stack.fake.unloaded  # unloaded from the backend too
        assert not (gateway.settings.composites_dir / "gated" / first).exists()
        text = (await stack.client.get("/metrics")).text
        assert f"flock_composites_evicted_total {float(cache.evicted)}" in text
        assert f"flock_composites_bytes {float(cache.bytes)}" in text
        # Asked for again, the evicted composite is built again and served.
        r = await stack.chat("What is 12 times 7?", routing={"mode": "arrow", "top_k": 2})
        assert r.status_code == 200 and stack.fake.requests[-1]["model"] == first
        # A streamed request pins its composite until its stream has been sent, then releases it (httpx's ASGI
        # transport runs the app to the end before answering, so only the release can be seen here).
        async with stack.client.stream("POST", "/v1/chat/completions", headers=stack.auth(), json={
                "model": "auto", "stream": True, "max_tokens": 4, "routing": {"mode": "arrow", "top_k": 1},
                "messages": [{"role": "user", "content": "What is 12 times 7?"}]}) as streamed:
            assert streamed.status_code == 200
            async for _ in streamed.aiter_bytes():
                pass
        assert {cid: e.pins for cid, e in cache._entries.items()} == {second: 0}
    finally:
        cache.limit_bytes = limit


async def test_new_composites_per_key_are_capped(stack: Stack):
    gateway = stack.app.state.gateway
    limiter, cache = gateway.resolver.limiter, gateway.resolver.cache
    per_minute = limiter.per_minute
    gateway.composites.clear()  # a clean slate: every composite below is new
    cache._entries.clear()
    cache.bytes = 0
    limiter.per_minute = 1
    limiter._builds.clear()  # builds counted by earlier tests
    try:
        r = await stack.chat("Compute 345 plus 289.", routing={"mode": "arrow", "top_k": 2})
        assert r.status_code == 200, r.text
        r = await stack.chat("Compute 345 plus 289.", routing={"mode": "arrow", "top_k": 1})
        assert r.status_code == 429 and error_of(r)["code"] == "composite_rate_limited"
        assert int(r.headers["retry-after"]) >= 1
        r = await stack.chat("Compute 345 plus 289.", routing={"mode": "arrow", "top_k": 2})
        assert r.status_code == 200  # one already built is reused, whatever the key's count
        r = await stack.chat("Compute 345 plus 289.", key=ADMIN, routing={"mode": "arrow", "top_k": 1})
        assert r.status_code == 200  # the cap is per key
    finally:
        limiter.per_minute = per_minute


async def test_a_broken_expert_is_quarantined_and_routed_around(stack: Stack):
    """An expert whose weights file is truncated after registration: every auto-routed request still succeeds
    (next-best expert or base), a request naming it gets 503 expert_unavailable, and repaired files bring it
    back."""
    settings = Settings()
    shape = ModelShape.from_model_dir(settings.resolved_base_model_dir)
    geo = stack.root / "geo"
    write_random_lora(geo, shape=shape, base_name=BASE, seed=21, rank=2, targets=("q_proj",),
                      card=ExpertCard(name="geo", description="Geography: capitals of countries, rivers, mountains.",
                                      examples=["What is the capital of Peru?", "Which river flows through Cairo?"]))
    compute_arrow_gates(geo)
    admin = stack.auth(ADMIN)
    assert (await stack.client.post("/v1/experts", json={"path": str(geo)}, headers=admin)).status_code == 201
    weights = geo / "adapter_model.safetensors"
    good = weights.read_bytes()
    try:
        # Each mode meets the broken files on its own path: the expert's load (global), a merge composite's
        # build, a gated composite's build.
        for mode in ("global", "merge", "arrow"):
            r = await stack.client.post("/v1/route", json={"prompt": "What is the capital of Peru?",
                                                           "routing": {"mode": mode, "top_k": 2}}, headers=admin)
            assert "geo" in [e["name"] for e in r.json()["routing"]["experts"]], (mode, r.text)
            weights.write_bytes(good[: len(good) // 2])  # truncated after registration
            r = await stack.chat("What is the capital of Peru?", routing={"mode": mode, "top_k": 2})
            assert r.status_code == 200, (mode, r.text)
            assert "geo" not in [e["name"] for e in r.json()["routing"]["experts"]], mode
            assert "geo" in stack.app.state.gateway.pool.quarantined, mode
            if mode != "arrow":  # repaired: an admin check brings it back at once
                weights.write_bytes(good)
                r = await stack.client.post("/v1/experts/geo/check", headers=admin)
                assert r.status_code == 200 and r.json()["status"] == "ok", r.text
        listed = {e["name"]: e for e in (await stack.client.get("/v1/experts", headers=admin)).json()["data"]}
        assert listed["geo"]["status"] == "quarantined" and "unreadable" in listed["geo"]["problem"]
        assert listed["arith"]["status"] == "ok"
        assert "geo" in (await stack.client.get("/ready")).json()["quarantined"]
        assert "flock_experts_quarantined 1.0" in (await stack.client.get("/metrics")).text
        r = await stack.client.post("/v1/chat/completions", headers=stack.auth(), json={
            "model": "geo", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and error_of(r)["code"] == "expert_unavailable"

        weights.write_bytes(good)  # repaired; an admin check brings it back at once
        r = await stack.client.post("/v1/experts/geo/check", headers=admin)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        r = await stack.chat("What is the capital of Peru?")
        assert r.status_code == 200 and r.json()["routing"]["experts"][0]["name"] == "geo"
    finally:
        weights.write_bytes(good)
        await stack.client.delete("/v1/experts/geo", headers=admin)


async def test_an_expert_removed_while_its_adapter_loads_is_routed_around(stack: Stack):
    """The expert is removed (files and all) after the decision, while the backend is loading its adapter: the
    routed request is routed again on the pool as it is now, and a request that named it gets 503 pool_changed,
    not a 502 adapter_load_failed (found by the soak's registration churn)."""
    shape = ModelShape.from_model_dir(Settings().resolved_base_model_dir)
    admin = stack.auth(ADMIN)
    for auto in (True, False):
        geo = stack.root / "geo-churn"
        write_random_lora(geo, shape=shape, base_name=BASE, seed=22, rank=2, targets=("q_proj",),
                          card=ExpertCard(name="geo-churn", description="Geography: capitals, rivers, mountains.",
                                          examples=["What is the capital of Peru?", "Which river flows by Cairo?"]))
        assert (await stack.client.post("/v1/experts", json={"path": str(geo)}, headers=admin)).status_code == 201

        async def remove(name: str, geo: Path = geo) -> None:
            if name == "geo-churn":
                assert (await stack.client.delete("/v1/experts/geo-churn", headers=admin)).status_code == 200
                shutil.rmtree(geo)

        stack.fake.before_load = remove
        try:
            if auto:
                r = await stack.chat("What is the capital of Peru?", routing={"mode": "global"})
                assert r.status_code == 200, r.text
                assert "geo-churn" not in [e["name"] for e in r.json()["routing"]["experts"]]
            else:
                r = await stack.client.post("/v1/chat/completions", headers=stack.auth(), json={
                    "model": "geo-churn", "messages": [{"role": "user", "content": "hi"}]})
                assert r.status_code == 503 and error_of(r)["code"] == "pool_changed", r.text
        finally:
            stack.fake.before_load = None
        assert "geo-churn" not in stack.app.state.gateway.pool.quarantined


async def test_a_request_routed_before_the_index_catches_up_with_a_removal_is_routed_again(stack: Stack):
    """An expert removed (here, or on another replica) a moment before the index is rebuilt can still be chosen
    by a request arriving in between (the 20-minute soak's auto-routed 503 pool_changed): routed again on the
    pool as it is now."""
    shape = ModelShape.from_model_dir(Settings().resolved_base_model_dir)
    geo = stack.root / "geo-gone"
    write_random_lora(geo, shape=shape, base_name=BASE, seed=23, rank=2, targets=("q_proj",),
                      card=ExpertCard(name="geo-gone", description="Geography: capitals, rivers, mountains.",
                                      examples=["What is the capital of Peru?", "Which river flows by Cairo?"]))
    admin = stack.auth(ADMIN)
    assert (await stack.client.post("/v1/experts", json={"path": str(geo)}, headers=admin)).status_code == 201
    gateway = stack.app.state.gateway
    decided = await gateway.router.route("What is the capital of Peru?")
    assert [e.name for e in decided.decision.experts] == ["geo-gone"]  # what the stale index will choose
    gateway.pool.remove("geo-gone")  # the pool changed; its index is rebuilt only after this request
    try:
        r = await stack.chat("What is the capital of Peru?", routing={"mode": "global"})
        assert r.status_code == 200, r.text
        assert "geo-gone" not in [e["name"] for e in r.json()["routing"]["experts"]]
    finally:
        await gateway.pool_changed(removed=["geo-gone"])


async def test_a_repair_that_races_the_adapter_load_is_retried(stack: Stack):
    """The backend reads an expert's files mid-repair (truncated), and by the time the gateway looks they read
    well: the routed request tries the same decision once more and succeeds; nothing is quarantined."""
    weights = stack.root / "arith" / "adapter_model.safetensors"
    good = weights.read_bytes()
    gateway = stack.app.state.gateway
    for backend in gateway.backends.backends:  # so that the next request loads arith again
        backend.loaded.pop("arith", None)
    raced: list[str] = []

    async def truncate_then_repair(name: str) -> None:
        if name == "arith" and not raced:
            raced.append(name)
            weights.write_bytes(good[: len(good) // 2])  # what this load reads...
            asyncio.get_running_loop().call_soon(weights.write_bytes, good)  # ...repaired just after

    stack.fake.before_load = truncate_then_repair
    try:
        r = await stack.chat("What is 12 times 7?", routing={"mode": "global"})
    finally:
        stack.fake.before_load = None
        weights.write_bytes(good)
    assert raced and r.status_code == 200, r.text
    assert r.json()["routing"]["experts"][0]["name"] == "arith"
    assert stack.fake.loaded[-1] == "arith" and not gateway.pool.quarantined


async def test_a_routed_request_is_routed_again_while_the_pool_keeps_changing(stack: Stack, monkeypatch):
    """The resolver routes again once when an expert left the pool; a second departure (another replica's change
    arriving while the index is rebuilt, seen in the soak as an auto-routed 503 pool_changed) is routed again
    by the gateway, up to its attempts. A request naming an expert that left still gets the 503."""
    resolver = stack.app.state.gateway.resolver
    resolve, left = resolver.resolve, []

    async def departing(decision, key_id="anonymous"):
        if len(left) < 2 and decision.experts:
            left.append(decision.experts[0].name)
            raise expert_left(decision.experts[0].name)
        return await resolve(decision, key_id)

    monkeypatch.setattr(resolver, "resolve", departing)
    r = await stack.chat("What is 12 times 7?", routing={"mode": "global"})
    assert r.status_code == 200 and len(left) == 2, r.text
    left.clear()
    r = await stack.client.post("/v1/chat/completions", headers=stack.auth(), json={
        "model": "arith", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and error_of(r)["code"] == "pool_changed"


async def test_responses_api_is_routed_like_chat(stack: Stack):
    r = await stack.client.post("/v1/responses", headers=stack.auth(), json={
        "model": "auto", "input": "What is 12 times 7?", "instructions": "Be brief.", "max_output_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["experts"][0]["name"] == "arith" and r.json()["output"][0]["type"] == "message"
    sent = stack.fake.requests[-1]
    assert sent["model"] == "arith" and sent["instructions"] == "Be brief." and "routing" not in sent
    # Input items: the last user message routes.
    items = [{"role": "user", "content": "How long do I boil an egg?"}, {"role": "assistant", "content": "9 min"},
             {"role": "user", "content": [{"type": "input_text", "text": "Compute 345 plus 289."}]}]
    r = await stack.client.post("/v1/responses", headers=stack.auth(), json={"model": "auto", "input": items})
    assert r.status_code == 200 and r.json()["routing"]["experts"][0]["name"] == "arith"
    r = await stack.client.post("/v1/responses", headers=stack.auth(), json={"model": BASE, "input": "hi"})
    assert r.status_code == 200 and stack.fake.requests[-1]["model"] == BASE


async def test_responses_stream_carries_routing_in_its_first_event(stack: Stack):
    r = await stack.client.post("/v1/responses", headers=stack.auth(), json={
        "model": "auto", "input": "What is 12 times 7?", "stream": True})
    assert r.status_code == 200
    events = [e for e in r.text.split("\n\n") if e]
    kinds = [e.split("\n")[0] for e in events]
    assert kinds == ["event: response.created", "event: response.output_text.delta",
                     "event: response.output_text.delta", "event: response.completed"]
    first = json.loads(events[0].split("data: ", 1)[1])
    assert first["routing"]["experts"][0]["name"] == "arith" and first["type"] == "response.created"
    deltas = [json.loads(e.split("data: ", 1)[1])["delta"] for e in events[1:3]]
    assert "".join(deltas) == "Hello there"


@pytest.mark.parametrize("stream", [False, True])
async def test_previous_response_id_continues_the_conversation_on_the_gateway(stack: Stack, stream):
    """The gateway keeps the conversation: vLLM gets it whole in `input`, and routing follows it (a follow-up
    that alone names no task stays with the conversation's expert)."""
    async def respond(key: str = USER, **body) -> httpx.Response:
        r = await stack.client.post("/v1/responses", headers=stack.auth(key),
                                    json={"model": "auto", "stream": stream, **body})
        return r

    def answer(r: httpx.Response) -> dict:
        assert r.status_code == 200, r.text
        if not stream:
            return r.json()
        events = [json.loads(e.split("data: ", 1)[1]) for e in r.text.split("\n\n") if "data: " in e]
        return {**events[-1]["response"], "routing": events[0]["routing"]}

    first = answer(await respond(input="What is 12 times 7?", instructions="Be brief."))
    assert first["routing"]["experts"][0]["name"] == "arith"
    alone = answer(await respond(input="And the next one?"))
    assert alone["routing"]["experts"] == []  # alone, the follow-up names no task
    follow = answer(await respond(input="And the next one?", previous_response_id=first["id"]))
    assert follow["routing"]["experts"][0]["name"] == "arith"
    sent = stack.fake.requests[-1]
    assert "previous_response_id" not in sent and "instructions" not in sent  # instructions are not carried over
    assert sent["input"] == [{"role": "user", "content": "What is 12 times 7?"},
                             {"role": "assistant", "content": "Hello there"},
                             {"role": "user", "content": "And the next one?"}]
    # The conversation counts toward the limits as a whole (4 messages here).
    r = await respond(input=[{"role": "user", "content": "Thanks"}], previous_response_id=follow["id"])
    assert r.status_code == 400 and error_of(r)["code"] == "too_many_messages"
    # Unknown, another key's, or not stored: a 400 naming the parameter.
    for key, rid in ((USER, "resp_nope"), (ADMIN, first["id"])):
        r = await respond(key, input="hi", previous_response_id=rid)
        assert r.status_code == 400 and error_of(r)["code"] == "previous_response_not_found", r.text
    unstored = answer(await respond(input="What is 12 times 7?", store=False))
    r = await respond(input="hi", previous_response_id=unstored["id"])
    assert r.status_code == 400 and error_of(r)["param"] == "previous_response_id"


async def test_a_continued_conversation_is_limited_as_a_whole(stack: Stack):
    r = await stack.client.post("/v1/responses", headers=stack.auth(), json={"model": "auto", "input": "x" * 150})
    r = await stack.client.post("/v1/responses", headers=stack.auth(), json={
        "model": "auto", "input": "y" * 100, "previous_response_id": r.json()["id"]})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "max_output_tokens": 65}, "max_tokens"),
    ({"input": "x" * 201}, "input"),
    ({"input": [{"role": "user", "content": "x"}] * 5}, "input"),
    ({"input": "hi", "temperature": 3}, "temperature"),
])
async def test_responses_limits(stack: Stack, body, param):
    r = await stack.client.post("/v1/responses", headers=stack.auth(), json={"model": "auto", **body})
    assert r.status_code == 400 and error_of(r)["param"] == param, r.text


async def test_boundary_values_never_get_a_5xx(stack: Stack):
    """5,000 bodies with boundary values in every numeric and structured field (tests/boundary.py), through the
    whole gateway to the fake vLLM: every answer is below 500, and every error is in the OpenAI shape."""
    from tests.boundary import bodies

    statuses: dict[int, int] = {}
    for name, path, body in bodies(5000, seed=17):
        headers = {**stack.auth(ADMIN), "content-type": "application/json"}
        r = await stack.client.post(path, content=body, headers=headers)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (name, body[:300], r.status_code, r.text[:300])
        if r.status_code >= 400:
            error_of(r)
    print(f"\nboundary fuzz: 5000 requests, statuses {dict(sorted(statuses.items()))}")
    assert statuses.get(200, 0) >= 500 and sum(v for k, v in statuses.items() if 400 <= k < 500) >= 2000
