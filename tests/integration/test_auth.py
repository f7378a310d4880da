"""API keys (401/403), keys kept out of logs, and per-key rate limits shared by gateway replicas via Redis."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import free_port, start_gateway, stop_gateway

pytestmark = pytest.mark.integration
INFER, ADMIN, LIMITED = "sk-infer-7f3a9c1d", "sk-admin-52be0e77", "sk-admin-only-for-the-rate-test"


@pytest.fixture(scope="module")
def keyed(work, redis_server, expert_root):
    """Two gateway replicas with keys and a 1 req/s (burst 3) limit, sharing one Redis; no model needed."""
    env = {"FLOCK_BACKEND_URLS": f"http://127.0.0.1:{free_port()}", "FLOCK_REDIS_URL": redis_server.url,
           "FLOCK_EXPERT_ROOTS": str(expert_root), "FLOCK_API_KEYS": INFER, "FLOCK_ADMIN_KEYS": f"{ADMIN},{LIMITED}",
           "FLOCK_RATE_LIMIT_RPS": "1", "FLOCK_RATE_LIMIT_BURST": "3"}
    a = start_gateway(work, "keyed-a", env, ready_path="/health")
    b = start_gateway(work, "keyed-b", env, ready_path="/health")
    yield a, b
    stop_gateway(a)
    stop_gateway(b)


def route(url: str, key: str | None, text: str = "bake bread") -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/route", json={"prompt": text}, headers=headers, timeout=30)


def test_keys(keyed):
    a, _ = keyed
    missing = route(a.url, None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert route(a.url, "sk-wrong").status_code == 401
    assert route(a.url, INFER, "roast a chicken").status_code == 200
    admin_only = httpx.post(f"{a.url}/v1/experts", json={"path": "/etc"}, headers={"authorization": f"Bearer {INFER}"})
    assert admin_only.status_code == 403 and admin_only.json()["error"]["code"] == "insufficient_permissions"
    as_admin = httpx.post(f"{a.url}/v1/experts", json={"path": "/etc"}, headers={"authorization": f"Bearer {ADMIN}"})
    assert as_admin.status_code == 403 and as_admin.json()["error"]["code"] == "path_not_allowed"  # past auth
    assert httpx.get(f"{a.url}/health").status_code == 200  # probes stay open
    log = a.log.read_text()
    assert INFER not in log and ADMIN not in log and "sk-wrong" not in log
    assert "OPEN" not in log


def test_rate_limit_shared_across_replicas(keyed):
    a, b = keyed
    statuses = [route(a.url, LIMITED, f"q{i}").status_code for i in range(4)]  # burst 3, then empty
    assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
    other = route(b.url, LIMITED, "q5")  # the other replica sees the same bucket
    assert other.status_code == 429 and int(other.headers["retry-after"]) >= 1
    assert other.json()["error"]["code"] == "rate_limit_exceeded"
    # Buckets are per key: another key on either replica is untouched by this one's exhaustion.
    assert route(a.url, ADMIN, "q6").status_code == 200 and route(b.url, ADMIN, "q7").status_code == 200


def test_open_gateway_says_so(gateway):
    assert "OPEN" in gateway.log.read_text()
