"""A pool change embeds only the cards that are new or changed, and gives the same index as a full rebuild:
additions, removals, replacements."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from adapters.card import ExpertCard
from router.router import Router

DIM = 16


class CountingEmbedder:
    """Deterministic unit vectors from a text's hash; counts the texts it was asked to embed."""

    def __init__(self) -> None:
        self.embedded: list[str] = []
        self.embedder = self

    dim = DIM

    async def embed_many(self, texts: list[str]) -> np.ndarray:
        self.embedded += texts
        out = np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)).normal(size=DIM)
                        for t in texts]) if texts else np.zeros((0, DIM))
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32) if len(out) else out

    async def embed(self, text: str) -> np.ndarray:
        return (await self.embed_many([text]))[0]


@dataclass(frozen=True)
class FakeExpert:
    card: ExpertCard
    path: Path = Path("/nonexistent")
    rank: int = 4
    tenant: str | None = None  # shared

    @property
    def name(self) -> str:
        return self.card.name


@dataclass
class FakePool:
    experts_: dict[str, FakeExpert] = field(default_factory=dict)
    version: str = "v0"
    health_version: str = "h"

    def servable(self) -> list[FakeExpert]:
        return sorted(self.experts_.values(), key=lambda e: e.name)

    def set(self, *experts: FakeExpert) -> None:
        self.experts_ = {e.name: e for e in experts}
        self.version = hashlib.sha256(repr(sorted(self.experts_)).encode() + str(experts).encode()).hexdigest()[:8]


def expert(name: str, n: int = 8, tag: str = "") -> FakeExpert:
    return FakeExpert(ExpertCard(name=name, description=f"{name} tasks {tag}",
                                 examples=[f"{name} example {i} {tag}" for i in range(n)]))


def router(pool: FakePool) -> tuple[Router, CountingEmbedder]:
    embedder = CountingEmbedder()
    return Router(pool, embedder, None), embedder  # type: ignore[arg-type]


async def same_as_full_rebuild(pool: FakePool, incremental: Router) -> None:
    fresh, _ = router(pool)
    a, b = incremental.index, await fresh.rebuild_index()
    assert a.names == b.names and np.allclose(a.vectors, b.vectors) and a.threshold == b.threshold


async def test_a_registration_embeds_only_the_new_expert():
    pool = FakePool()
    pool.set(*(expert(f"e{i}") for i in range(50)))
    r, emb = router(pool)
    await r.rebuild_index()
    first = len(emb.embedded)
    pool.set(*(expert(f"e{i}") for i in range(50)), expert("new"))
    emb.embedded.clear()
    await r.rebuild_index()
    assert sorted(emb.embedded) == sorted(["new tasks ", *(f"new example {i} " for i in range(8))])
    assert first > 50 * 9  # the first build embedded every card (and the calibration prompts)
    await same_as_full_rebuild(pool, r)


async def test_removal_and_replacement_match_a_full_rebuild():
    pool = FakePool()
    pool.set(*(expert(f"e{i}") for i in range(10)))
    r, emb = router(pool)
    await r.rebuild_index()
    pool.set(*(expert(f"e{i}") for i in range(10) if i != 3))  # removed
    emb.embedded.clear()
    await r.rebuild_index()
    assert emb.embedded == [] and "e3" not in r.index.names
    await same_as_full_rebuild(pool, r)
    pool.set(*(expert(f"e{i}", tag="v2" if i == 5 else "") for i in range(10) if i != 3))  # e5 replaced
    await r.rebuild_index()
    assert len(emb.embedded) == 9 and all("v2" in t for t in emb.embedded)
    await same_as_full_rebuild(pool, r)
    assert all("v2" not in t or "e5" in t for t in r._card_vectors) and "e3 tasks " not in r._card_vectors
