"""The merge composite served by vLLM against a reference computed with PEFT on the same adapters
(PEFT's add_weighted_adapter with combination_type='cat': the same stacked-rank linear merge)."""

from __future__ import annotations

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration
PROMPTS = ["Write SQL that lists the cooks in the employees table.",
           "SQL query: count employees who bake bread.",
           "How do I cook rice? Answer with an SQL query.",
           "Select the salaries of all chefs."]


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


def reference(model, tok, prompt: str, experts: list[dict], name: str) -> tuple[int, float]:
    """First greedy token and its logprob with PEFT's cat-merge of the given weighted experts."""
    if name not in model.peft_config:
        model.add_weighted_adapter([e["name"] for e in experts], [e["weight"] for e in experts],
                                   adapter_name=name, combination_type="cat")
    model.set_adapter(name)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    top = int(logprobs.argmax())
    return top, float(logprobs[top])


def test_composite_matches_peft_reference(gateway, peft_model):
    model, tok = peft_model
    agree, closer = 0, 0
    for i, prompt in enumerate(PROMPTS):
        r = httpx.post(f"{gateway.url}/v1/chat/completions", timeout=120, json={
            "model": "auto", "routing": {"mode": "merge", "top_k": 2}, "max_tokens": 1, "temperature": 0,
            "logprobs": True, "top_logprobs": 1, "messages": [{"role": "user", "content": prompt}]})
        assert r.status_code == 200, r.text
        body = r.json()
        experts = body["routing"]["experts"]
        # Served by a merge composite, named readably: "merge:" and its experts.
        assert len(experts) == 2 and body["model"] == "merge:" + "+".join(sorted(e["name"] for e in experts)), body
        served = body["choices"][0]["logprobs"]["content"][0]
        served_id = tok.convert_tokens_to_ids(served["token"]) if served["token"] in tok.get_vocab() else \
            tok.encode(served["token"], add_special_tokens=False)[0]
        ref_id, ref_lp = reference(model, tok, prompt, experts, f"m{i}")
        # Negative control: the top expert alone (what a wrong, unweighted merge would serve).
        solo_id, solo_lp = reference(model, tok, prompt, [{"name": experts[0]["name"], "weight": 1.0}],
                                     f"solo{i}")
        agree += served_id == ref_id
        closer += abs(served["logprob"] - ref_lp) < abs(served["logprob"] - solo_lp)
        # bf16 engine vs fp32 PEFT on strong random LoRAs: differences up to 0.32 nats were measured on a flat
        # first-token distribution (p ~ 5%); the closer-than-solo check below is what tells a wrong merge apart.
        assert abs(served["logprob"] - ref_lp) < 0.4, (prompt, served, ref_lp)
    assert agree >= len(PROMPTS) - 1
    assert closer >= len(PROMPTS) - 1
