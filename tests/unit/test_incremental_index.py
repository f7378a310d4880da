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


async def same_as_full_rebuild(pool: FakePool, incremental: Router, queries: int = 200) -> None:
    """The incrementally kept index routes like one built from scratch: the same experts and vectors, the same
    threshold (to float rounding: scores are summed in another order) and the same decision for every query."""
    fresh, _ = router(pool)
    a, b = incremental.index, await fresh.rebuild_index()
    assert a.names == b.names and np.allclose(a.vectors, b.vectors) and np.isclose(a.threshold, b.threshold, atol=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(queries):
        q = rng.normal(size=DIM).astype(np.float32)
        q /= np.linalg.norm(q)
        sa, sb = a.scores(q), b.scores(q)
        assert a.top(sa, 2) == b.top(sb, 2) and (sa.max() >= a.threshold) == (sb.max() >= b.threshold)


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
    assert len(r._cards_by_key) == 9  # the replaced card's and the removed expert's vectors are not kept


async def test_removing_the_best_other_expert_matches_a_full_rebuild():
    """Examples whose best other expert leaves are scored again against the rest (the kept best would be stale);
    the others keep theirs."""
    pool = FakePool()
    pool.set(*(expert(f"e{i}") for i in range(12)))
    r, emb = router(pool)
    await r.rebuild_index()
    for gone in (3, 4, 7):
        # the removed expert is some other expert's best for at least one example: the rescoring path runs
        assert any(f"e{gone}" in by.tolist() for n, (_, _, by) in r._best_other.items() if n != f"e{gone}")
        pool.set(*(e for e in pool.servable() if e.name != f"e{gone}"))
        await r.rebuild_index()
        await same_as_full_rebuild(pool, r)
    pool.set(*pool.servable(), expert("e3", tag="back"), expert("z", tag="late"))  # additions after removals
    await r.rebuild_index()
    await same_as_full_rebuild(pool, r)


async def test_a_restart_reads_card_vectors_from_disk(tmp_path):
    pool = FakePool()
    pool.set(*(expert(f"e{i}") for i in range(20)))
    first = Router(pool, CountingEmbedder(), None, vector_dir=tmp_path)  # type: ignore[arg-type]
    await first.rebuild_index()
    emb = CountingEmbedder()
    again = Router(pool, emb, None, vector_dir=tmp_path)  # type: ignore[arg-type]
    await again.rebuild_index()
    cards = [t for e in pool.servable() for t in (e.card.description, *e.card.examples)]
    assert not set(emb.embedded) & set(cards)  # only the calibration prompts, embedded once per process
    assert again.index.names == first.index.names and np.array_equal(again.index.vectors, first.index.vectors)
    assert again.index.threshold == first.index.threshold
    pool.set(*(expert(f"e{i}") for i in range(1, 20)))  # a card that left: its file goes at the next start
    third = Router(pool, CountingEmbedder(), None, vector_dir=tmp_path)  # type: ignore[arg-type]
    await third.rebuild_index()
    assert len(list(tmp_path.glob("*/*.npy"))) == 19


async def test_a_registration_into_a_large_pool_embeds_one_card():
    pool = FakePool()
    pool.set(*(expert(f"e{i}", n=32) for i in range(1000)))
    r, emb = router(pool)
    await r.rebuild_index()
    emb.embedded.clear()
    pool.set(*pool.servable(), expert("new", n=32))
    await r.rebuild_index()
    assert len(emb.embedded) == 33 and "new" in r.index.names
    await same_as_full_rebuild(pool, r, queries=50)


def test_threshold_scan_matches_the_quadratic_reference():
    """The O(n log n) scan picks exactly the threshold of the plain scan over every midpoint (ties included)."""
    from router.index import DEFAULT_THRESHOLD, calibrate_threshold

    def reference(ins: np.ndarray, outs: np.ndarray) -> float:
        values = np.sort(np.concatenate([ins, outs]))
        best, best_key = DEFAULT_THRESHOLD, (-1.0, -1.0)
        for t in (values[:-1] + values[1:]) / 2:
            key = (float((ins >= t).mean() + (outs < t).mean()), float(min(np.abs(values - t))))
            if key > best_key:
                best, best_key = float(t), key
        return best

    rng = np.random.default_rng(1)
    for case in range(200):
        ins = rng.normal(0.5, 0.2, rng.integers(1, 60)).astype(np.float32)
        outs = rng.normal(0.3, 0.2, rng.integers(1, 40)).astype(np.float32)
        if case % 3 == 0:  # many equal values: ties in both accuracy and margin
            ins, outs = np.round(ins, 1), np.round(outs, 1)
        assert calibrate_threshold(ins, outs) == reference(ins, outs), case
