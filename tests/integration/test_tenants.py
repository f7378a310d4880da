"""Tenants with real processes: two gateway replicas (`flock serve`) on one real redis-server and the session's
real vLLM. A tenant's private expert whose card examples match a query best is chosen for its owner and never
for anyone else, in the global, merge and glider modes, on a fresh decision and a cached one, through either
replica; an upload goes round (upload, route to it, remove it) across the replicas, audited."""

from __future__ import annotations

import io
import tarfile
import time

import pytest

from adapters.card import ExpertCard
from tests.conftest import BASE, TEST_EXPERTS, start_gateway, stop_gateway, write_test_gates
from training.synthetic import write_random_lora

pytestmark = pytest.mark.integration
ADMIN, PLAIN, KEY_A, KEY_B = "t-admin", "t-plain", "t-acme", "t-beta"
SECRET = "How do I file the merger papers for Project Falcon with the regulator?"
PRIVATE = ("beta-legal", "Corporate law for Beta Corp: mergers, acquisitions and regulatory filings.",
           [SECRET, "Which forms does a merger filing with the regulator need?", "Draft a merger notice for us."])
MODES = ("global", "merge", "glider")


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def wait_for(predicate, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"condition not met within {timeout_s} s")


@pytest.fixture(scope="module")
def replicas(work, vllm_url, redis_server, expert_root, shape):
    """Two gateways with tenant keys on one Redis (their own database, apart from the session gateway's pool),
    sharing the tenants' expert directory; the shared test experts and beta's private one registered."""
    tenants = work / "tenant-experts"
    name, description, examples = PRIVATE
    legal = write_random_lora(tenants / "beta" / "legal", shape=shape, base_name=BASE, seed=40, strength=0.3,
                              card=ExpertCard(name=name, description=description, examples=examples))
    write_test_gates(legal, 40)  # a candidate of the per-token modes too
    env = {"FLOCK_BACKEND_URLS": vllm_url, "FLOCK_REDIS_URL": redis_server.fresh_url(),
           "FLOCK_EXPERT_ROOTS": str(expert_root), "FLOCK_TENANT_EXPERTS_DIR": str(tenants),
           "FLOCK_POOL_SYNC_S": "0.5", "FLOCK_MERGE_TEMPERATURE": "0.2",
           "FLOCK_API_KEYS": PLAIN, "FLOCK_ADMIN_KEYS": ADMIN, "FLOCK_TENANT_KEYS": f"acme:{KEY_A},beta:{KEY_B}"}
    one = start_gateway(work, "tenants-1", env)
    two = start_gateway(work, "tenants-2", env)
    try:
        with one.client(headers=auth(ADMIN)) as c:
            for expert in TEST_EXPERTS:
                assert c.post("/v1/experts", json={"path": str(expert_root / expert)}).status_code == 201
        with one.client(headers=auth(KEY_B)) as c:
            r = c.post("/v1/experts", json={"path": str(legal)})
            assert r.status_code == 201 and r.json()["tenant"] == "beta", r.text
        wait_for(lambda: names(two, ADMIN) == set(TEST_EXPERTS) | {"beta-legal"})
        yield one, two
    finally:
        stop_gateway(one)
        stop_gateway(two)


def names(gw, key: str, path: str = "/v1/experts") -> set[str]:
    with gw.client(headers=auth(key)) as c:
        return {d.get("name") or d["id"] for d in c.get(path).json()["data"]}


def chat(gw, key: str, mode: str, content: str = SECRET, model: str = "auto") -> dict:
    body = {"model": model, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}
    if model == "auto":
        body["routing"] = {"mode": mode}
    with gw.client(headers=auth(key)) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, (mode, r.status_code, r.text)
    return {"experts": [e["name"] for e in r.json()["routing"]["experts"]], "cache": r.headers["x-flock-cache"],
            "model": r.json()["model"]}


def test_each_key_lists_what_it_may_see_on_both_replicas(replicas):
    shared = set(TEST_EXPERTS)
    for gw in replicas:
        for key, extra in ((KEY_A, set()), (PLAIN, set()), (KEY_B, {"beta-legal"}), (ADMIN, {"beta-legal"})):
            assert names(gw, key) == shared | extra, (gw.url, key)
            assert names(gw, key, "/v1/models") == shared | extra | {"auto", BASE}, (gw.url, key)


def test_private_expert_is_chosen_for_its_owner_and_never_for_others(replicas):
    one, two = replicas
    for mode in MODES:
        # The owner first, on replica one: the decision is cached in Redis under beta's visible set.
        owner = chat(one, KEY_B, mode)
        assert owner["experts"] and owner["experts"][0] == "beta-legal", (mode, owner)
        again = chat(two, KEY_B, mode)  # the other replica reads beta's decision from Redis
        assert again["experts"][0] == "beta-legal" and again["cache"] == "hit", (mode, again)
        for gw in (one, two):
            for key in (KEY_A, PLAIN):
                for attempt in range(2):  # fresh, then from the cache (this replica's, or the other's in Redis)
                    seen = chat(gw, key, mode)
                    assert "beta-legal" not in seen["experts"] and "beta-legal" not in seen["model"], \
                        (mode, gw.url, key, attempt, seen)
                    assert attempt == 0 or seen["cache"] == "hit", (mode, key, seen)
        # The admin key sees every expert: routed there too, which shows the query does match it best.
        assert chat(two, ADMIN, mode)["experts"][0] == "beta-legal"
    # Someone else first this time, on replica two; then the owner on replica one still gets its expert.
    variant = SECRET.replace("Falcon", "Falcon, urgently")
    for mode in MODES:
        assert "beta-legal" not in chat(two, KEY_A, mode, variant)["experts"]
        assert chat(one, KEY_B, mode, variant)["experts"][0] == "beta-legal"


def test_naming_or_removing_another_tenants_expert_is_not_found(replicas):
    for gw in replicas:
        with gw.client(headers=auth(KEY_A)) as c:
            body = {"model": "beta-legal", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
            hidden, missing = c.post("/v1/chat/completions", json=body), \
                c.post("/v1/chat/completions", json={**body, "model": "beta-nothing"})
            assert hidden.status_code == missing.status_code == 404
            assert hidden.json()["error"]["code"] == missing.json()["error"]["code"] == "model_not_found"
            assert hidden.json()["error"]["message"].replace("beta-legal", "X") == \
                missing.json()["error"]["message"].replace("beta-nothing", "X")
            assert c.delete("/v1/experts/beta-legal").status_code == 404
        assert chat(gw, KEY_B, "global", model="beta-legal")["model"] == "beta-legal"
        with gw.client() as c:
            assert "beta-legal" not in c.get("/metrics").text


def test_upload_round_trip_across_replicas(replicas, shape, work):
    one, two = replicas
    src = write_random_lora(work / "upload-src" / "stars", shape=shape, base_name=BASE, seed=41, strength=0.3,
                            card=ExpertCard(name="acme-stars", description="Astronomy: planets, stars, telescopes.",
                                            examples=["How far away is Mars?", "What is a red giant star?"]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="stars")
    with one.client(headers=auth(KEY_A)) as c:
        r = c.post("/v1/experts", files={"file": ("stars.tar.gz", buf.getvalue())})
    assert r.status_code == 201 and r.json()["tenant"] == "acme", r.text
    wait_for(lambda: "acme-stars" in names(two, KEY_A))
    assert "acme-stars" not in names(two, KEY_B) and "acme-stars" not in names(two, PLAIN)
    question = "How far away is Mars from the Earth?"
    routed = chat(two, KEY_A, "global", question)
    assert routed["experts"] == ["acme-stars"] and routed["model"] == "acme-stars", routed  # served by vLLM
    assert "acme-stars" not in chat(two, KEY_B, "global", question)["experts"]
    with two.client(headers=auth(KEY_B)) as c:
        assert c.delete("/v1/experts/acme-stars").status_code == 404
    with two.client(headers=auth(KEY_A)) as c:
        assert c.delete("/v1/experts/acme-stars").status_code == 200
    wait_for(lambda: "acme-stars" not in names(one, ADMIN))
    assert not [p for p in (work / "tenant-experts" / "acme").iterdir() if p.name.startswith("acme-stars")]
    audit = [line for gw in replicas for line in gw.log.read_text().splitlines() if "pool change:" in line]
    assert any("action=upload expert=acme-stars tenant=acme key=" in line for line in audit), audit
    assert any("action=remove expert=acme-stars tenant=acme key=" in line for line in audit), audit
    assert not any(KEY_A in line for line in audit)
    with one.client() as c:
        assert 'flock_pool_changes_total{action="upload",tenant="acme"} 1.0' in c.get("/metrics").text
