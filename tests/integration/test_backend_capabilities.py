"""Capability negotiation with real vLLM servers: flock's vLLM answers GET /flock/capabilities; a stock vLLM
(flock's plugins turned off with VLLM_PLUGINS) does not, and behind `flock serve` it gets no gated composite:
the per-token modes answer a clear 400, while global routing, experts and the base model are still served."""

from __future__ import annotations

import httpx
import pytest

from service.settings import Settings
from tests.conftest import BASE, TEST_EXPERTS, start_gateway, start_vllm, stop_gateway

pytestmark = pytest.mark.integration


def test_flock_vllm_reports_its_capabilities(vllm_url):
    caps = httpx.get(f"{vllm_url}/flock/capabilities", timeout=10).json()
    assert caps["plugin"] == "flock" and caps["gated"] is True and caps["platform"] == "cpu"
    assert caps["base_isolation"] is True


@pytest.fixture(scope="module")
def stock_vllm(work, base_model_dir):
    # VLLM_PLUGINS="": an allowlist naming no plugin, so neither of flock's is loaded.
    url, proc = start_vllm(work, "stock-vllm", Settings(vllm_max_num_seqs=4, vllm_kvcache_gib=1), {"VLLM_PLUGINS": ""})
    yield url
    proc.stop()


@pytest.fixture(scope="module")
def stock_gateway(work, stock_vllm, redis_server, expert_root):
    env = {"FLOCK_BACKEND_URLS": stock_vllm, "FLOCK_REDIS_URL": redis_server.fresh_url(),
           "FLOCK_EXPERT_ROOTS": str(expert_root)}
    gw = start_gateway(work, "stock", env)
    with gw.client() as c:
        for name in TEST_EXPERTS:
            assert c.post("/v1/experts", json={"path": str(expert_root / name)}).status_code == 201
    yield gw
    stop_gateway(gw)


def test_stock_vllm_has_no_capabilities_route(stock_vllm):
    assert httpx.get(f"{stock_vllm}/flock/capabilities", timeout=10).status_code == 404


def test_stock_backend_serves_no_per_token_mode(stock_gateway, chat):
    with stock_gateway.client() as c:
        for mode in ("glider", "arrow", "phatgoose"):
            r = c.post("/v1/chat/completions", json=chat("What is 12 times 7?", routing={"mode": mode}))
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "routing_mode_unavailable" and "plugin" in r.json()["error"]["message"]
        ready = c.get("/ready").json()
        assert "glider" not in ready["modes"] and {"global", "merge", "base"} <= set(ready["modes"])
        caps = next(iter(ready["capabilities"].values()))
        assert caps["plugin"] is False and caps["gated"] is False


def test_stock_backend_still_serves_global_routing_experts_and_base(stock_gateway, chat):
    with stock_gateway.client() as c:
        r = c.post("/v1/chat/completions", json=chat("What is 12 times 7?"))
        assert r.status_code == 200 and r.json()["routing"]["experts"][0]["name"] == "arith"
        r = c.post("/v1/chat/completions", json=chat("Hello", model="cooking"))
        assert r.status_code == 200 and r.json()["model"] == "cooking"
        r = c.post("/v1/chat/completions", json=chat("What is the capital of France?", model=BASE))
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    log = stock_gateway.log.read_text()
    assert "has no flock plugin" in log  # said at start-up
