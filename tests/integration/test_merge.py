"""The merge composite served by vLLM against a reference computed with PEFT on the same adapters
(PEFT's add_weighted_adapter with combination_type='cat': the same stacked-rank linear merge).

Compared on the first token's distribution: the log-probabilities vLLM gives its top 5 tokens against the
reference's log-probabilities of those tokens. Negative controls: the same experts merged with the wrong weights
(swapped, and unnormalised: each at 1.0) and the top expert alone must be clearly further from what is served.
"""

from __future__ import annotations

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration
PROMPTS = ["Write SQL that lists the cooks in the employees table.",
           "SQL query: count employees who bake bread.",
           "How do I cook rice? Answer with an SQL query.",
           "Select the salaries of all chefs."]
# The engine (FLOCK_VLLM_DTYPE=auto) vs fp32 PEFT on strong random LoRAs: the largest |Δ logprob| over the top 5
# tokens (measured 0.08-0.16 on these prompts on an AVX2 CPU; 0.32 in bf16 on a CPU with AVX-512 BF16, whose
# native bf16 matmuls round differently). The margin below is what tells a wrong merge apart.
TOL = 0.5
# A wrong merge is at least this many times further from what is served than the right one (measured: swapped
# weights 0.37-3.6 nats, closest at weights 0.55/0.45; unnormalised 4.7-8.8; the top expert alone 1.5-3.5).
MARGIN = 2.0


@pytest.fixture(scope="module")
def peft_model(base_model_dir, expert_root):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(expert_root / "sqlgen"), adapter_name="sqlgen")
    model.load_adapter(str(expert_root / "cooking"), adapter_name="cooking")
    model.load_adapter(str(expert_root / "arith"), adapter_name="arith")
    return model.eval(), tok


def reference(model, tok, prompt: str, experts: list[dict], name: str) -> torch.Tensor:
    """First-token log-probabilities with PEFT's cat-merge of the given weighted experts."""
    if name not in model.peft_config:
        model.add_weighted_adapter([e["name"] for e in experts], [e["weight"] for e in experts],
                                   adapter_name=name, combination_type="cat")
    model.set_adapter(name)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)


def distance(served: dict[int, float], logprobs: torch.Tensor) -> float:
    """Largest |Δ logprob| over the tokens vLLM returned."""
    return max(abs(lp - float(logprobs[t])) for t, lp in served.items())


def test_composite_matches_peft_reference(gateway, peft_model):
    model, tok = peft_model
    for i, prompt in enumerate(PROMPTS):
        r = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=120, json={
            "model": "auto", "routing": {"mode": "merge", "top_k": 2}, "max_tokens": 1, "temperature": 0,
            "logprobs": True, "top_logprobs": 5, "return_tokens_as_token_ids": True,
            "messages": [{"role": "user", "content": prompt}]})
        assert r.status_code == 200, r.text
        body = r.json()
        experts = body["routing"]["experts"]
        # Served by a merge composite, named readably: "merge:" and its experts.
        assert len(experts) == 2 and body["model"] == "merge:" + "+".join(sorted(e["name"] for e in experts)), body
        weights = [e["weight"] for e in experts]
        assert abs(sum(weights) - 1) < 1e-3, weights
        top = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        served = {int(t["token"].split(":")[1]): t["logprob"] for t in top}

        right = reference(model, tok, prompt, experts, f"m{i}")
        swapped = [{"name": e["name"], "weight": w} for e, w in zip(experts, reversed(weights))]
        wrong = {"unnormalised": reference(model, tok, prompt, [{**e, "weight": 1.0} for e in experts], f"sum{i}"),
                 "top expert alone": reference(model, tok, prompt, [{"name": experts[0]["name"], "weight": 1.0}],
                                               f"solo{i}")}
        if weights[0] != weights[1]:  # (equal weights swapped are the right merge)
            wrong["swapped weights"] = reference(model, tok, prompt, swapped, f"swapped{i}")
        d_right = distance(served, right)
        d_wrong = {k: distance(served, v) for k, v in wrong.items()}
        print(f"\n{prompt!r} {weights}: |Δ logprob| {d_right:.3f}; wrong merges: "
              + ", ".join(f"{k} {d:.3f}" for k, d in d_wrong.items()))
        assert int(right.argmax()) == max(served, key=served.get), (prompt, served, int(right.argmax()))
        assert d_right <= TOL, (prompt, d_right)
        for k, d in d_wrong.items():
            assert d >= MARGIN * d_right, f"{prompt!r}: the {k} merge is as close as the right one ({d:.3f})"
