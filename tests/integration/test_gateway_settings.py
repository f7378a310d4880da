"""A gateway configured through its environment, with no Redis reachable (real gateway, real vLLM):

- keys read from FLOCK_API_KEYS_FILE and FLOCK_ADMIN_KEYS_FILE (none in the environment);
- Redis unreachable: routing answers with `x-flock-cache: bypass`, rate limits fall back to this replica's own
  buckets, still one per key;
- FLOCK_DEFAULT_MODE, FLOCK_MAX_MESSAGES and FLOCK_MAX_PROMPT_CHARS.
"""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import TEST_EXPERTS, free_port, start_gateway, stop_gateway

pytestmark = pytest.mark.integration
ADMIN = "sk-file-admin-0c41"
# One key per test: every key has its own rate-limit bucket (BURST requests, then one per 100 s).
KEYS = {name: f"sk-file-{name}-{i:04d}" for i, name in enumerate(["keys", "limits", "mode", "rate-a", "rate-b"])}
MAX_MESSAGES, MAX_PROMPT_CHARS, BURST = 3, 300, 6


@pytest.fixture(scope="module")
def configured(work, vllm_url, expert_root):
    keys_dir = work / "keys"
    keys_dir.mkdir(exist_ok=True)
    (keys_dir / "api").write_text("# inference keys\n" + "\n".join(KEYS.values()) + "\n\n")
    (keys_dir / "admin").write_text(f"{ADMIN}\n")
    env = {"FLOCK_BACKEND_URLS": vllm_url, "FLOCK_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nobody there
           "FLOCK_EXPERT_ROOTS": str(expert_root), "FLOCK_API_KEYS_FILE": str(keys_dir / "api"),
           "FLOCK_ADMIN_KEYS_FILE": str(keys_dir / "admin"), "FLOCK_DEFAULT_MODE": "merge",
           "FLOCK_MAX_MESSAGES": str(MAX_MESSAGES), "FLOCK_MAX_PROMPT_CHARS": str(MAX_PROMPT_CHARS),
           "FLOCK_RATE_LIMIT_RPS": "0.01", "FLOCK_RATE_LIMIT_BURST": str(BURST)}
    for key in ("FLOCK_API_KEYS", "FLOCK_ADMIN_KEYS"):
        env[key] = ""
    gw = start_gateway(work, "configured", env)
    try:
        for name in TEST_EXPERTS:
            r = httpx.post(f"{gw.url}/v1/experts", json={"path": str(expert_root / name)}, timeout=120,
                           headers={"authorization": f"Bearer {ADMIN}"})
            assert r.status_code == 201, r.text
        yield gw
    finally:
        stop_gateway(gw)


def post(gw, path: str, key: str | None, body: dict) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{gw.url}{path}", json=body, headers=headers, timeout=120)


def chat(text: str, messages: int = 1, **kw) -> dict:
    return {"model": "auto", "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": text}] * messages, **kw}


def test_keys_from_files(configured):
    assert post(configured, "/v1/route", None, {"prompt": "bake bread"}).status_code == 401
    assert post(configured, "/v1/route", "sk-not-in-the-file", {"prompt": "bake bread"}).status_code == 401
    assert post(configured, "/v1/route", KEYS["keys"], {"prompt": "bake bread"}).status_code == 200
    as_user = post(configured, "/v1/experts", KEYS["keys"], {"path": "/etc"})
    assert as_user.status_code == 403 and as_user.json()["error"]["code"] == "insufficient_permissions"
    as_admin = post(configured, "/v1/experts", ADMIN, {"path": "/etc"})
    assert as_admin.status_code == 403 and as_admin.json()["error"]["code"] == "path_not_allowed"  # past auth
    log = configured.log.read_text()
    assert "OPEN" not in log and ADMIN not in log and KEYS["keys"] not in log


def test_request_limits(configured):
    key = KEYS["limits"]
    ok = post(configured, "/v1/chat/completions", key, chat("Boil an egg", messages=MAX_MESSAGES))
    assert ok.status_code == 200, ok.text
    many = post(configured, "/v1/chat/completions", key, chat("Boil an egg", messages=MAX_MESSAGES + 1))
    assert many.status_code == 400 and many.json()["error"]["code"] == "too_many_messages", many.text
    long = post(configured, "/v1/chat/completions", key, chat("x" * (MAX_PROMPT_CHARS + 1)))
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded", long.text
    long = post(configured, "/v1/completions", key, {"model": "auto", "prompt": "x" * (MAX_PROMPT_CHARS + 1)})
    assert long.status_code == 400 and long.json()["error"]["param"] == "prompt", long.text


def test_default_mode_and_cache_bypass(configured):
    key = KEYS["mode"]
    r = post(configured, "/v1/chat/completions", key, chat("How do I make a tomato sauce for pasta?"))
    assert r.status_code == 200, r.text
    assert r.json()["routing"]["mode"] == "merge" and r.headers["x-flock-mode"] == "merge"
    assert r.headers["x-flock-cache"] == "bypass"  # Redis unreachable: decided without the cache, not failed
    explicit = post(configured, "/v1/route", key, {"prompt": "How do I make a tomato sauce?",
                                                   "routing": {"mode": "global"}})
    assert explicit.json()["routing"]["mode"] == "global"


def test_rate_limits_per_key_without_redis(configured):
    """Redis unreachable: each key still gets its own bucket (this replica's), and one key's exhaustion does not
    touch another's."""
    a, b = KEYS["rate-a"], KEYS["rate-b"]
    statuses = [post(configured, "/v1/route", a, {"prompt": f"q{i}"}).status_code for i in range(BURST + 1)]
    assert statuses == [200] * BURST + [429], statuses
    limited = post(configured, "/v1/route", a, {"prompt": "again"})
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
    assert [post(configured, "/v1/route", b, {"prompt": f"q{i}"}).status_code for i in range(BURST)] == [200] * BURST
