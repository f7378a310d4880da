"""Conversation-aware routing through real gateways: two replicas on one Redis, the session's test experts
(cooking, arith, sqlgen). A follow-up that names no task stays with the conversation's expert on either
replica; a new task or general chat is routed on its own; the same last message after another history is
decided again, never served from the other conversation's cached decision. POST /v1/route only, so no vLLM
is needed (the backend URL points nowhere)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from service.processes import free_port
from tests.conftest import TEST_EXPERTS, start_gateway, stop_gateway

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def replicas(work, redis_server, expert_root):
    redis_server_url = redis_server.url
    env = {"FLOCK_BACKEND_URLS": f"http://127.0.0.1:{free_port()}", "FLOCK_REDIS_URL": redis_server_url,
           "FLOCK_EXPERT_ROOTS": str(expert_root), "FLOCK_POOL_SYNC_S": "0.5"}
    a = start_gateway(work, "conv-a", env, ready_path="/health")
    b = None
    try:
        b = start_gateway(work, "conv-b", env, ready_path="/health")
        with a.client() as c:
            for name in TEST_EXPERTS:
                r = c.post("/v1/experts", json={"path": str(expert_root / name)})
                assert r.status_code in (201, 409), r.text  # 409: already in the shared registry
        deadline = time.monotonic() + 20
        with b.client() as c:
            while {e["name"] for e in c.get("/v1/experts").json()["data"]} < set(TEST_EXPERTS):
                assert time.monotonic() < deadline, "replica b never saw the experts"
                time.sleep(0.2)
        yield a, b
    finally:
        stop_gateway(a)
        if b is not None:
            stop_gateway(b)


def chat(*turns: str) -> list[dict]:
    """User turns with an assistant answer between them."""
    out: list[dict] = []
    for i, t in enumerate(turns):
        if i:
            out.append({"role": "assistant", "content": "Done."})
        out.append({"role": "user", "content": t})
    return out


def route(gw, messages: list[dict]) -> dict:
    with gw.client() as c:
        r = c.post("/v1/route", json={"messages": messages})
    assert r.status_code == 200, r.text
    return r.json()["routing"]


def expert(routing: dict) -> str | None:
    return routing["experts"][0]["name"] if routing["experts"] else None


ARITH = "What is 12 times 7?"
COOKING = "How do I make a tomato sauce for pasta?"
FOLLOW_UP = "And the next one?"


def test_a_follow_up_stays_with_the_conversations_expert_on_either_replica(replicas):
    a, b = replicas
    assert expert(route(a, chat(FOLLOW_UP))) is None  # alone it names no task: the base model
    first = route(a, chat(ARITH, FOLLOW_UP))
    assert expert(first) == "arith" and not first["cached"]
    again = route(b, chat(ARITH, FOLLOW_UP))  # the other replica: decided by a, found in Redis
    assert expert(again) == "arith" and again["cached"]
    # The same last message after another history: another key, another decision (on either replica).
    other = route(b, chat(COOKING, FOLLOW_UP))
    assert expert(other) == "cooking" and not other["cached"]
    assert expert(route(a, chat(COOKING, FOLLOW_UP))) == "cooking"
    # Follow-ups of follow-ups keep it too.
    assert expert(route(b, chat(ARITH, FOLLOW_UP, "Same for the one after."))) == "arith"


def test_a_new_task_or_general_chat_is_routed_on_its_own(replicas):
    a, b = replicas
    assert expert(route(a, chat(ARITH, "Write a SQL query for the average salary of employees in sales."))) \
        == "sqlgen"
    assert expert(route(b, chat(ARITH, FOLLOW_UP, "What can I bake with apples, butter and flour?"))) == "cooking"
    assert expert(route(a, chat(ARITH, "Who was the first person to walk on the moon?"))) is None


def test_conversation_stage_is_measured(replicas):
    a, _ = replicas
    route(a, chat(ARITH, "Now the one after that?"))
    text = httpx.get(a.url + "/metrics").text
    assert re.search(r'flock_routing_stage_seconds_count\{stage="conversation"\} [1-9]', text)
