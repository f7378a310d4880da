"""The short soak (`flock soak` for 2.5 minutes): two real `flock serve` replicas sharing a real redis-server, on
the session's vLLM, under mixed traffic (every mode, streamed and not, clients hanging up, experts registered and
removed) while Redis is killed and restarted empty, one replica is SIGKILLed and restarted, and an expert's
weights are truncated and repaired. Every request is accounted for: an error outside its fault's documented
window fails the test. The vLLM fault is in the full soak only (and in tests/integration/test_failover.py)."""

from __future__ import annotations

import pytest

from bench import soak
from service.settings import Settings
from tests.conftest import REPO

pytestmark = pytest.mark.integration


def test_short_soak_with_faults(work, vllm_url):
    report = soak.run(Settings(), REPO / "library", work / "soak", 150, backend=vllm_url, clients=4,
                      faults=("redis", "replica", "expert"), sample_every_s=5)
    print("\nsoak:", {k: v for k, v in report.to_json().items() if k != "resources"})
    assert sorted(f["kind"] for f in report.faults) == ["expert", "redis", "replica"], report.faults
    assert report.unexplained == 0, report.unexplained_examples
    assert report.pool_intact
    ok = report.outcomes.get("ok", 0)
    assert ok >= 50 and ok >= 0.5 * report.requests, report.outcomes
    assert report.outcomes.get("disconnected", 0) >= 1  # clients did hang up mid-stream
    kinds = report.ok_by_kind
    assert all(kinds.get(k, 0) >= 1 for k in ("auto:global", "auto:merge", "auto:glider", "expert", "base",
                                                 "responses", "register", "remove")), kinds
