"""Our direct transformers encoder gives sentence-transformers' embeddings; micro-batching groups queries."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.models import embed_model_dir


@pytest.fixture(scope="module")
def embedder():
    from router.embed import Embedder

    return Embedder(embed_model_dir())


def test_matches_sentence_transformers(embedder):
    from sentence_transformers import SentenceTransformer

    texts = ["How do I bake bread?", "SELECT name FROM employees", "a much longer sentence " * 10]
    st = SentenceTransformer(str(embed_model_dir()), device="cpu").encode(texts, normalize_embeddings=True)
    ours = embedder.encode(texts)
    assert ours.shape == (3, 384)
    assert np.allclose(ours, st, atol=1e-4)


def test_micro_batcher_groups_concurrent_queries(embedder):
    from router.embed import MicroBatcher

    async def run():
        batcher = MicroBatcher(embedder)
        texts = [f"query number {i}" for i in range(16)]
        vectors = await asyncio.gather(*(batcher.embed(t) for t in texts))
        size = batcher.last_batch_size
        await batcher.stop()
        return vectors, size

    vectors, size = asyncio.run(run())
    assert len(vectors) == 16 and size > 1
    assert np.allclose(np.stack(vectors), embedder.encode([f"query number {i}" for i in range(16)]), atol=1e-5)


def test_int8_embeddings_stay_close_to_float32(embedder):
    """The int8 encoder (the service's default) points where the float32 one does; routing quality itself is
    measured by `flock eval --routing-only`."""
    from router.embed import Embedder

    texts = ["How do I bake bread?", "SELECT name FROM employees", "Convert 5 miles to km", "a longer sentence " * 8]
    int8 = Embedder(embed_model_dir(), int8=True).encode(texts)
    cosine = (int8 * embedder.encode(texts)).sum(axis=1)
    assert np.allclose(np.linalg.norm(int8, axis=1), 1.0, atol=1e-5)
    assert (cosine > 0.97).all(), cosine
    # Nearest neighbours among the texts are unchanged.
    full = embedder.encode(texts)
    assert ((int8 @ int8.T).argsort(axis=1) == (full @ full.T).argsort(axis=1)).all()
