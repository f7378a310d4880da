"""No backend: a fast 503 with Retry-After, never a hang; /ready says not ready."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import free_port, start_gateway, stop_gateway

pytestmark = pytest.mark.integration


def test_unreachable_backend_is_fast_503(work, redis_server, expert_root):
    dead = f"http://127.0.0.1:{free_port()}"
    gw = start_gateway(work, "dead", {"FLOCK_BACKEND_URLS": dead, "FLOCK_REDIS_URL": redis_server.url,
                                       "FLOCK_EXPERT_ROOTS": str(expert_root)}, ready_path="/health")
    try:
        assert httpx.get(gw.url + "/ready").status_code == 503
        start = time.monotonic()
        r = httpx.post(gw.url + "/v1/chat/completions", timeout=30, json={
            "model": "auto", "messages": [{"role": "user", "content": "hello"}]})
        elapsed = time.monotonic() - start
        assert r.status_code == 503 and r.headers["retry-after"]
        assert r.json()["error"]["code"] == "backend_unavailable"
        assert elapsed < 2.0
    finally:
        stop_gateway(gw)
