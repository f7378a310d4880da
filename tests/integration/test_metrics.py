"""The gateway's /metrics as a running gateway emits it (real vLLM and Redis): after traffic, time to first token,
errors by type, the pool size and adapter loads are there with the values the traffic implies; and every flock_*
metric and label that deploy/'s alerts and dashboard query is in the live exposition (tests/deploy checks them
against the metric definitions only)."""

from __future__ import annotations

import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.test_manifests import GRAFANA_VARS, alert_rules, dashboard_panels

pytestmark = pytest.mark.integration


def scrape(gw) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)]."""
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items()))


def test_metrics_after_traffic(gateway, vllm_url, chat):
    before = scrape(gateway)
    with gateway.client() as c:
        with c.stream("POST", "/v1/chat/completions", json=chat(f"Bake a cake ({uuid.uuid4().hex[:6]})",
                                                                 stream=True)) as r:
            assert r.status_code == 200 and r.read().rstrip().endswith(b"data: [DONE]")
        assert c.post("/v1/chat/completions", json=chat("hi", model="no-such-expert")).status_code == 404
        assert c.post("/v1/chat/completions", json={"model": "auto"}).status_code == 400
        assert c.post("/v1/chat/completions", json=chat("hi", routing={"mode": "nope"})).status_code == 400
        assert c.post("/v1/chat/completions", json=chat("Compute 345 plus 289.", model="arith")).status_code == 200
        experts = len(c.get("/v1/experts").json()["data"])
    after = scrape(gateway)

    chat_endpoint = {"endpoint": "/v1/chat/completions"}
    ttft = "flock_time_to_first_token_seconds"
    assert value(after, f"{ttft}_count", **chat_endpoint) == value(before, f"{ttft}_count", **chat_endpoint) + 1
    assert value(after, f"{ttft}_sum", **chat_endpoint) > value(before, f"{ttft}_sum", **chat_endpoint)
    for kind in ("model_not_found", "invalid_request", "invalid_routing_mode"):
        assert value(after, "flock_errors_total", type=kind) == \
            value(before, "flock_errors_total", type=kind) + 1, kind
    assert value(after, "flock_pool_experts") == experts >= 3
    # The session's experts were loaded into the session vLLM, each once (arith at the latest just now).
    assert value(after, "flock_adapter_loads_total", backend=vllm_url, kind="expert") >= 1
    assert value(after, "flock_backend_up", backend=vllm_url) == 1
    assert value(after, "flock_requests_total", endpoint="/v1/chat/completions", outcome="ok") >= \
        value(before, "flock_requests_total", endpoint="/v1/chat/completions", outcome="ok") + 2


def vector_selectors(expr: str) -> list:
    import promql_parser

    found = []

    def visit(node) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def test_deploy_queries_name_live_metrics(gateway, chat):
    """Every flock_* series the alert rules and the dashboard select exists in the live exposition, with the
    labels they match on. Labelled series appear once used: a routed request, a stream and an error first."""
    with gateway.client() as c:
        assert c.post("/v1/chat/completions", json=chat(f"Bake bread ({uuid.uuid4().hex[:6]})")).status_code == 200
        with c.stream("POST", "/v1/chat/completions", json=chat("Boil an egg", stream=True)) as r:
            assert r.status_code == 200 and r.read()
        assert c.post("/v1/chat/completions", json=chat("hi", model="no-such-expert")).status_code == 404
    live: dict[str, set[str]] = {}
    for name, samples in scrape(gateway).items():
        for labels, _ in samples:
            live.setdefault(name, set()).update(labels)
    exprs = [(r["alert"], r["expr"]) for r in alert_rules()]
    exprs += [(f"panel {p['title']!r}", t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]
    problems, checked = [], 0
    for where, expr in exprs:
        for var, val in GRAFANA_VARS.items():
            expr = expr.replace(var, val)
        for sel in vector_selectors(expr):
            if not (sel.name or "").startswith("flock_"):
                continue
            checked += 1
            if sel.name not in live:
                problems.append(f"{where}: {sel.name} is not in the gateway's /metrics")
                continue
            for m in sel.matchers.matchers:
                if m.name not in live[sel.name] | {"__name__", "job", "instance"}:
                    problems.append(f"{where}: {sel.name} has no label {m.name!r} in /metrics")
    assert checked >= 10 and not problems, "\n".join(problems)
