"""schemathesis against the gateway's own OpenAPI document: generated requests to every operation, zero 5xx
responses and zero responses that violate the documented schema.

The fuzzed gateway is a real `flock serve` on the session's real vLLM, with its own Redis database (so the
fuzzer's expert registrations and removals stay out of the other tests' pool) and max_tokens capped at 4 so the
generated completions stay cheap on this CPU.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import REPO, start_gateway, stop_gateway

pytestmark = pytest.mark.integration
MIN_REQUESTS = 500


@pytest.fixture(scope="module")
def fuzz_gateway(work, vllm_url, redis_server, expert_root):
    env = {"FLOCK_BACKEND_URLS": vllm_url, "FLOCK_REDIS_URL": redis_server.fresh_url(),
           "FLOCK_EXPERT_ROOTS": str(expert_root), "FLOCK_MAX_TOKENS_LIMIT": "4", "FLOCK_MAX_PROMPT_CHARS": "2000"}
    gw = start_gateway(work, "fuzz", env)
    with gw.client() as c:  # something to route to and to delete
        for name in ("cooking", "arith"):
            assert c.post("/v1/experts", json={"path": str(expert_root / name)}).status_code == 201
    yield gw
    stop_gateway(gw)


def test_schemathesis_no_5xx_and_schema_conformant(fuzz_gateway, work):
    har = work / "fuzz.har"
    cmd = [str(REPO / ".venv" / "bin" / "st"), "run", f"{fuzz_gateway.url}/openapi.json",
           "--checks", "not_a_server_error,response_schema_conformance",
           "--max-examples", "60", "--seed", "7", "--request-timeout", "120", "--continue-on-failure",
           "--phases", "examples,coverage,fuzzing", "--report", "har", "--report-har-path", str(har)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    summary = proc.stdout[-4000:]
    entries = json.loads(har.read_text())["log"]["entries"] if har.is_file() else []
    statuses = [e["response"]["status"] for e in entries]
    print(f"\nschemathesis: {len(entries)} requests; statuses "
          f"{ {s: statuses.count(s) for s in sorted(set(statuses))} }\n{summary[-1500:]}")
    assert [s for s in statuses if s >= 500] == [], summary
    assert proc.returncode == 0, summary
    assert len(entries) >= MIN_REQUESTS, summary


def test_boundary_values_through_the_real_stack(fuzz_gateway):
    """The boundary bodies of tests/boundary.py through the real gateway and vLLM (fields flock passes through
    reach vLLM's own validation): no 5xx. FLOCK_TEST_BOUNDARY_N sets how many (default 600; 5,000 for a report)."""
    import os

    import httpx

    from tests.boundary import bodies

    n = int(os.environ.get("FLOCK_TEST_BOUNDARY_N", "600"))
    statuses: dict[int, int] = {}
    failures = []
    with httpx.Client(base_url=fuzz_gateway.url, timeout=120) as client:
        for name, path, body in bodies(n, seed=29):
            try:
                r = client.post(path, content=body, headers={"content-type": "application/json"})
            except httpx.TimeoutException:  # named, so a hang says which body caused it
                failures.append((name, body[:200], "no answer within 120 s", ""))
                continue
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code >= 500 or (r.status_code >= 400 and "error" not in r.json()):
                failures.append((name, body[:200], r.status_code, r.text[:200]))
    print(f"\nboundary values, real stack: {n} requests, statuses {dict(sorted(statuses.items()))}")
    assert not failures, failures[:5]
    assert statuses.get(200, 0) >= n // 10
