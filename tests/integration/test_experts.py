"""Registering experts: a bad adapter gets a 4xx that says why, and the pool is unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from adapters.card import ExpertCard
from tests.conftest import BASE, TEST_EXPERTS, start_gateway, stop_gateway
from training.synthetic import write_random_lora

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bad_adapters(expert_root: Path, shape) -> dict[str, Path]:
    def good(name: str, seed: int, **kw) -> Path:
        return write_random_lora(expert_root / name, shape=shape, base_name=BASE, seed=seed,
                                 card=ExpertCard(name=name.replace("bad_", "x"), description=f"Does {name}."), **kw)

    out = {}
    out["wrong_base"] = good("bad_base", 50)
    cfg = json.loads((out["wrong_base"] / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3-8B"
    (out["wrong_base"] / "adapter_config.json").write_text(json.dumps(cfg))
    out["rank_too_high"] = good("bad_rank", 51, rank=128)
    out["corrupt_weights"] = good("bad_corrupt", 52)
    (out["corrupt_weights"] / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)
    out["not_lora"] = good("bad_ia3", 53)
    cfg = json.loads((out["not_lora"] / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (out["not_lora"] / "adapter_config.json").write_text(json.dumps(cfg))
    out["no_config"] = good("bad_noconfig", 54)
    (out["no_config"] / "adapter_config.json").unlink()
    out["wrong_shape"] = good("bad_shape", 55)
    shutil.copy(good("bad_donor", 56, rank=8) / "adapter_model.safetensors",
                out["wrong_shape"] / "adapter_model.safetensors")
    out["escape_symlink"] = expert_root / "bad_link"
    if not out["escape_symlink"].exists():
        out["escape_symlink"].symlink_to("/etc")
    return out


@pytest.mark.parametrize("case,status,needle", [
    ("wrong_base", 422, "not the base model"),
    ("rank_too_high", 422, "exceeds"),
    ("corrupt_weights", 422, "unreadable"),
    ("not_lora", 422, "LORA"),
    ("no_config", 422, "adapter_config.json is missing"),
    ("wrong_shape", 422, "shape"),
    ("escape_symlink", 403, "outside"),
])
def test_bad_adapter_rejected_pool_unchanged(gateway, bad_adapters, case, status, needle):
    with gateway.client() as c:
        before = c.get("/v1/experts").json()
        r = c.post("/v1/experts", json={"path": str(bad_adapters[case])})
        after = c.get("/v1/experts").json()
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert after == before


@pytest.mark.parametrize("path", ["/etc", "/proc/self", "{root}/../../..", "{root}/cooking/../../.."])
def test_paths_outside_roots_rejected(gateway, expert_root, path):
    with gateway.client() as c:
        before = c.get("/v1/experts").json()
        r = c.post("/v1/experts", json={"path": path.format(root=expert_root)})
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed"
        assert c.get("/v1/experts").json() == before


def test_bad_card_and_duplicates(gateway, expert_root):
    with gateway.client() as c:
        r = c.post("/v1/experts", json={"path": str(expert_root / "cooking"), "name": "Bad Name!"})
        assert r.status_code == 422 and "name" in r.json()["error"]["message"]
        r = c.post("/v1/experts", json={"path": str(expert_root / "cooking")})
        assert r.status_code == 409 and r.json()["error"]["code"] == "expert_exists"
        r = c.post("/v1/experts", json={"path": str(expert_root / "cooking"), "name": "auto"})
        assert r.status_code == 422
        assert c.delete("/v1/experts/nobody").status_code == 404


def test_register_use_and_remove(gateway, expert_root, shape):
    path = write_random_lora(expert_root / "astro", shape=shape, base_name=BASE, seed=60,
                             card=ExpertCard(name="astro", description="Explains astronomy: planets, stars, galaxies."))
    with gateway.client() as c:
        assert c.post("/v1/experts", json={"path": str(path)}).status_code == 201
        r = c.post("/v1/chat/completions", json={"model": "astro", "max_tokens": 3,
                                                 "messages": [{"role": "user", "content": "Tell me about Mars"}]})
        assert r.status_code == 200 and r.json()["model"] == "astro"
        assert c.delete("/v1/experts/astro").json()["deleted"] is True
        r = c.post("/v1/chat/completions", json={"model": "astro", "max_tokens": 3,
                                                 "messages": [{"role": "user", "content": "Tell me about Mars"}]})
        assert r.status_code == 404


def test_pool_survives_restart(work, gateway, vllm_url, redis_server, expert_root):
    """A second gateway on the same state directory (as after a restart) serves the same pool, read from its
    pool.json: its Redis database is an empty one, so there is no shared registry to adopt the pool from."""
    with gateway.client() as c:
        before = c.get("/v1/experts").json()
    assert {e["name"] for e in before["data"]} >= set(TEST_EXPERTS)
    env = {"FLOCK_BACKEND_URLS": vllm_url, "FLOCK_REDIS_URL": redis_server.fresh_url(),
           "FLOCK_EXPERT_ROOTS": str(expert_root), "FLOCK_STATE_DIR": str(gateway.state_dir)}
    again = start_gateway(work, "restart", env)
    try:
        with again.client() as c:
            assert c.get("/v1/experts").json() == before
            r = c.post("/v1/chat/completions", json={"model": "cooking", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "Boil an egg"}]})
            assert r.status_code == 200 and r.json()["model"] == "cooking", r.text
    finally:
        stop_gateway(again)


def test_pool_change_during_traffic_loses_no_request(gateway, expert_root, shape):
    """Registering, replacing and removing an expert while routed, merge, expert and base requests are in
    flight: every one of those requests succeeds (the pool version changes under them)."""
    import asyncio

    import httpx

    path = write_random_lora(expert_root / "tides", shape=shape, base_name=BASE, seed=61,
                             card=ExpertCard(name="tides", description="Explains ocean tides and the moon's pull."))
    bodies = [{"model": "auto"}, {"model": "auto", "routing": {"mode": "merge"}}, {"model": "cooking"},
              {"model": BASE}]
    questions = ["How long should I boil an egg?", "What is 12 times 7?", "Why are there two tides a day?"]

    async def main() -> tuple[list[int], int]:
        statuses: list[int] = []
        done = asyncio.Event()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=120) as client:
            async def traffic(i: int) -> None:
                n = i
                while not done.is_set():
                    body = {**bodies[n % len(bodies)], "max_tokens": 4,
                            "messages": [{"role": "user", "content": questions[n % len(questions)]}]}
                    statuses.append((await client.post("/v1/chat/completions", json=body)).status_code)
                    n += 1

            async def answered(more: int) -> None:
                # Wait for responses rather than for time, so that requests overlap every change however fast
                # or slow this machine is today.
                want = len(statuses) + more
                async with asyncio.timeout(300):
                    while len(statuses) < want:
                        await asyncio.sleep(0.05)

            async def changes() -> int:
                made = 0
                await answered(2)
                for _ in range(2):
                    for replace in (False, True):
                        r = await client.post("/v1/experts", json={"path": str(path), "replace": replace})
                        assert r.status_code == 201, r.text
                        made += 1
                        await answered(2)
                    assert (await client.delete("/v1/experts/tides")).status_code == 200
                    made += 1
                    await answered(2)
                done.set()
                return made

            workers = [asyncio.create_task(traffic(i)) for i in range(6)]
            made = await changes()
            await asyncio.gather(*workers)
        return statuses, made

    statuses, made = asyncio.run(main())
    assert made == 6 and len(statuses) >= 14
    assert set(statuses) == {200}, statuses
