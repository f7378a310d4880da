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
