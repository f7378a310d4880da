"""Wire details the OpenAI client hides: headers, raw SSE, error shapes, /v1/route, /health, /ready, /metrics."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_headers_and_routing_field(gateway, chat):
    with gateway.client() as c:
        r = c.post("/v1/chat/completions", json=chat("Subtract 45 from 300, please."))
    assert r.status_code == 200
    assert r.headers["x-flock-experts"] == "arith=1"
    assert r.headers["x-flock-cache"] in {"hit", "miss"}
    assert r.json()["routing"]["experts"][0]["name"] == "arith"


def test_raw_sse_ends_with_done(gateway, chat):
    with gateway.client() as c, c.stream("POST", "/v1/chat/completions",
                                         json=chat("Bake a cake", stream=True)) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


@pytest.mark.parametrize("body,status,param", [
    (b"{not json", 400, None),
    (b'{"model": "auto"}', 400, "messages"),
    (b'{"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}', 400, "messages.0.role"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "max_tokens": 999999}', 400, "max_tokens"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": 100}', 400, "n"),
    (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "routing": {"top_k": 0}}', 400,
     "routing.top_k"),
])
def test_bad_input_gets_openai_error(gateway, body, status, param):
    with gateway.client() as c:
        r = c.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert "Traceback" not in r.text


def test_body_size_limit_413(gateway):
    with gateway.client() as c:
        r = c.post("/v1/chat/completions", content=b"x" * 1_100_000, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_route_endpoint_same_schema(gateway):
    with gateway.client() as c:
        r = c.post("/v1/route", json={"messages": [{"role": "user", "content": "Write SQL for the employees table"}],
                                      "routing": {"mode": "merge", "top_k": 2}})
    routing = r.json()["routing"]
    assert r.status_code == 200 and routing["mode"] == "merge"
    assert routing["experts"][0]["name"] == "sqlgen"
    assert abs(sum(e["weight"] for e in routing["experts"]) - 1) < 1e-6


def test_health_ready_metrics(gateway, chat):
    with gateway.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        ready = c.get("/ready").json()
        assert ready["ready"] and ready["redis"] is True and ready["pool"]["experts"] >= 3
        c.post("/v1/chat/completions", json=chat("How long do I boil pasta?"))
        text = c.get("/metrics").text
    for name in ("flock_requests_total", "flock_routing_stage_seconds_bucket", "flock_routing_cache_total",
                 "flock_expert_selections_total", "flock_backend_request_seconds_bucket", "flock_tokens_total"):
        assert name in text, name
    assert 'flock_expert_selections_total{expert="cooking",mode="global",tenant="none"}' in text


def test_vllm_metrics_stay_scrapable(vllm_url):
    import httpx

    assert "vllm:num_requests_running" in httpx.get(f"{vllm_url}/metrics").text
