"""Load ahead of need (service/preload.py): registered experts are loaded onto their owner backend before any
request asks, again when a backend comes back, up to the configured number, and not at all under the scorer.
Against two fake vLLMs on real sockets, through the app's own lifespan and registration API."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx

from adapters.card import ExpertCard
from adapters.validate import ModelShape
from service.app import create_app
from service.backend import Adapter
from service.settings import Settings
from tests.unit.fake_vllm import FakeVLLM, serve_fake_vllm
from training.synthetic import write_random_lora

BASE = "SmolLM2-135M-Instruct"
ADMIN = "sk-admin-preload"
TOPICS = {"apples": "Growing apple trees in an orchard.", "boats": "Sailing small boats on a lake.",
          "chess": "Chess openings and endgames.", "drums": "Playing the drums in a band."}


@asynccontextmanager
async def gateway(tmp_path: Path, **settings_update) -> AsyncIterator[tuple]:
    """(app, client, {url: fake}) with the experts of TOPICS written (not registered) under tmp_path/experts."""
    settings = Settings()
    shape = ModelShape.from_model_dir(settings.resolved_base_model_dir)
    root = tmp_path / "experts"
    for seed, (name, description) in enumerate(TOPICS.items()):
        write_random_lora(root / name, shape=shape, base_name=BASE, seed=seed, rank=2, targets=("q_proj",),
                          card=ExpertCard(name=name, description=description, examples=[description]))
    async with AsyncExitStack() as stack:
        fakes: list[FakeVLLM] = [await stack.enter_async_context(serve_fake_vllm()) for _ in range(2)]
        settings = settings.model_copy(update={
            "backend_urls": [f.url for f in fakes], "redis_url": None, "state_dir": tmp_path / "state",
            "library_dir": tmp_path / "no-library", "expert_roots": [root], "admin_keys": [ADMIN],
            **settings_update})
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://flock") as client:
                for name in TOPICS:
                    r = await client.post("/v1/experts", json={"path": str(root / name)},
                                          headers={"authorization": f"Bearer {ADMIN}"})
                    assert r.status_code == 201, r.text
                yield app, client, {f.url: f for f in fakes}


async def settled(fakes: dict[str, FakeVLLM], expected: int, timeout_s: float = 10.0) -> dict[str, list[str]]:
    """What each backend has loaded, once `expected` loads are in (or the timeout passed)."""
    for _ in range(int(timeout_s / 0.05)):
        if sum(len(f.loaded) for f in fakes.values()) >= expected:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)  # nothing more is on its way
    return {url: list(f.loaded) for url, f in fakes.items()}


def owner(app, name: str) -> str:
    gw = app.state.gateway
    return gw.backends.candidates(Adapter(name=name, path=gw.pool.get(name).path))[0].url


async def test_registered_experts_are_loaded_onto_their_owner_before_any_request(tmp_path):
    async with gateway(tmp_path) as (app, client, fakes):
        loaded = await settled(fakes, len(TOPICS))
        assert sorted(n for names in loaded.values() for n in names) == sorted(TOPICS)  # each once
        for name in TOPICS:
            assert name in loaded[owner(app, name)]
        assert all(not f.requests for f in fakes.values())  # no request asked for them
        r = await client.post("/v1/chat/completions", json={"model": "chess", "max_tokens": 2,
                                                           "messages": [{"role": "user", "content": "e4?"}]},
                              headers={"authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200, r.text
        assert fakes[owner(app, "chess")].requests[-1]["model"] == "chess"
        assert await settled(fakes, len(TOPICS)) == loaded  # served without another load

        # A backend that comes back has lost its runtime adapters: its experts are loaded onto it again.
        gw = app.state.gateway
        url = owner(app, "chess")
        backend = next(b for b in gw.backends.backends if b.url == url)
        backend.mark_down()
        assert await gw.backends.check(backend)
        mine = sorted(name for name in TOPICS if owner(app, name) == url)
        again = await settled(fakes, len(TOPICS) + len(mine))
        assert sorted(again[url][len(loaded[url]):]) == mine


async def test_only_the_first_experts_up_to_the_limit(tmp_path):
    async with gateway(tmp_path, preload_experts=2) as (app, _, fakes):
        loaded = await settled(fakes, 2)
        assert sorted(n for names in loaded.values() for n in names) == sorted(TOPICS)[:2]  # pool order: by name


async def test_off_when_zero_or_under_the_scorer(tmp_path):
    for update in ({"preload_experts": 0}, {"placement": "scorer"}):
        async with gateway(tmp_path / next(iter(update)), **update) as (_, _, fakes):
            assert await settled(fakes, 1, timeout_s=0.5) == {url: [] for url in fakes}, update
