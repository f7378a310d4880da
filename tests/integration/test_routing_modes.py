"""Routing through the session gateway, as a client sees it: the per-token modes (glider, arrow, phatgoose) on
both routing endpoints, the x-flock-mode and x-flock-cache headers, and merge composites built once and reused.

The session's test experts carry Arrow prototypes and random PHATGOOSE gate vectors (tests/conftest.py), so the
per-token modes take them as candidates and the gateway builds and serves a gated composite."""

from __future__ import annotations

import re
import uuid

import pytest

from adapters.composite import COMPOSITE_PREFIX
from adapters.gated_composite import GATED_PREFIX
from service.settings import Settings
from tests.conftest import BASE

pytestmark = pytest.mark.integration
LOCAL_GATE = {"glider": "phatgoose", "arrow": "arrow", "phatgoose": "phatgoose"}


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


@pytest.mark.parametrize("mode", ["glider", "arrow", "phatgoose"])
def test_per_token_modes(gateway, mode):
    question = f"How long should I boil an egg? ({uuid.uuid4().hex[:6]})"
    # glider serves a query its router is sure of by one expert (FLOCK_GLIDER_SOLO_MARGIN); no margin reaches 2
    routing = {"mode": mode} | ({"solo_margin": 2.0} if mode == "glider" else {})
    with gateway.client() as c:
        r = c.post("/v1/route", json={"prompt": question, "routing": routing})
        assert r.status_code == 200, r.text
        decision = r.json()["routing"]
        assert decision["mode"] == mode
        assert decision["gate"]["local"] == LOCAL_GATE[mode] and decision["gate"]["top_k"] >= 1
        assert (decision["gate"]["alpha"] > 0) == (mode == "glider")
        names = [e["name"] for e in decision["experts"]]
        assert names[0] == "cooking" and len(names) >= 2, decision  # candidates, best global score first
        r = c.post("/v1/chat/completions", json={
            "model": "auto", "routing": routing, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "user", "content": question}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["routing"]["mode"] == mode and body["routing"]["gate"] == decision["gate"]
        assert [e["name"] for e in body["routing"]["experts"]] == names
        # One gated composite served it: its readable name, and its directory in the state's gated composites.
        assert body["model"] == f"{mode}:" + "+".join(sorted(names)), body["model"]
        assert any(p.name.startswith(GATED_PREFIX) for p in (gateway.state_dir / "composites" / "gated").iterdir())
        assert body["choices"][0]["message"]["content"]
        assert r.headers["x-flock-mode"] == mode


def test_glider_solo_margin_serves_a_sure_query_by_its_expert_alone(gateway):
    question = f"How long should I boil an egg? ({uuid.uuid4().hex[:6]})"
    with gateway.client() as c:
        def route(margin: float | None) -> dict:
            routing = {"mode": "glider"} | ({} if margin is None else {"solo_margin": margin})
            r = c.post("/v1/route", json={"prompt": question, "routing": routing})
            assert r.status_code == 200, r.text
            return r.json()["routing"]

        sure, mixed = route(0.0), route(2.0)  # every margin is >= 0; none reaches 2
        assert [e["name"] for e in sure["experts"]] == ["cooking"] and sure["gate"] is None, sure
        assert len(mixed["experts"]) >= 2 and mixed["gate"]["local"] == "phatgoose", mixed
        # The default (FLOCK_GLIDER_SOLO_MARGIN): alone exactly when the top score leads by that much.
        margin = Settings().glider_solo_margin
        assert margin == 0.05
        lead = mixed["experts"][0]["score"] - mixed["experts"][1]["score"]
        default = route(None)
        assert (default["gate"] is None) == (lead >= margin), (lead, default)
        r = c.post("/v1/chat/completions", json={
            "model": "auto", "routing": {"mode": "glider", "solo_margin": 0.0}, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": question}]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "cooking" and r.headers["x-flock-experts"] == "cooking=1"
        bad = c.post("/v1/route", json={"prompt": question, "routing": {"mode": "glider", "solo_margin": -1}})
        assert bad.status_code == 400 and bad.json()["error"]["param"], bad.text


def test_mode_header_and_cache_status(gateway, chat):
    text = f"What can I bake with apples and flour? ({uuid.uuid4().hex[:6]})"
    with gateway.client() as c:
        routed = c.post("/v1/chat/completions", json=chat(text))
        assert routed.status_code == 200, routed.text
        assert (routed.headers["x-flock-mode"], routed.headers["x-flock-cache"]) == ("global", "miss")
        merged = c.post("/v1/chat/completions", json=chat(text, routing={"mode": "merge"}))
        assert merged.headers["x-flock-mode"] == "merge" and merged.headers["x-flock-cache"] == "miss"
        assert c.post("/v1/chat/completions", json=chat(text)).headers["x-flock-cache"] == "hit"
        # Named models are not routed: no cache lookup at all.
        direct = c.post("/v1/chat/completions", json=chat(text, model="cooking"))
        assert (direct.headers["x-flock-mode"], direct.headers["x-flock-cache"]) == ("direct", "none")
        assert direct.headers["x-flock-experts"] == "cooking=1"
        base = c.post("/v1/completions", json={"model": BASE, "prompt": text, "max_tokens": 4})
        assert (base.headers["x-flock-mode"], base.headers["x-flock-cache"]) == ("base", "none")
        assert base.headers["x-flock-experts"] == "none"


def test_merge_composite_reused_not_rebuilt(gateway, chat):
    """A merge decision served twice is served by the same composite, built and loaded into vLLM once: the second
    request writes no composite and loads no adapter."""
    with gateway.client() as c:
        def merge(text: str):
            r = c.post("/v1/chat/completions", json=chat(text, routing={"mode": "merge", "top_k": 2}, max_tokens=2))
            assert r.status_code == 200, r.text
            return r.json()
        text = f"How do I make a tomato sauce for pasta? ({uuid.uuid4().hex[:6]})"
        first = merge(text)
        composites = gateway.state_dir / "composites"
        built = {p.name: p.stat().st_mtime_ns for p in composites.iterdir()}
        loads = metric(c.get("/metrics").text, "flock_adapter_loads_total", kind="merge")
        second = merge(text)
        assert second["routing"]["experts"] == first["routing"]["experts"] and len(first["routing"]["experts"]) == 2
        names = sorted(e["name"] for e in first["routing"]["experts"])
        assert second["model"] == first["model"] == "merge:" + "+".join(names)
        assert any(name.startswith(COMPOSITE_PREFIX) for name in built)
        assert {p.name: p.stat().st_mtime_ns for p in composites.iterdir()} == built
        assert metric(c.get("/metrics").text, "flock_adapter_loads_total", kind="merge") == loads
