"""The stacked-rank composite is exactly the weighted sum of the experts' deltas, and matches PEFT's 'cat'."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from adapters.composite import CompositeStore, lora_scale, merge_loras
from adapters.validate import ModelShape
from training.synthetic import write_random_lora

SHAPE = ModelShape.from_config({"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "num_hidden_layers": 2})


def delta(tensors: dict, module: str, scale: float) -> torch.Tensor:
    return scale * tensors[f"{module}.lora_B.weight"].float() @ tensors[f"{module}.lora_A.weight"].float()


@pytest.fixture
def two(tmp_path):
    a = write_random_lora(tmp_path / "a", shape=SHAPE, base_name="SmolLM2-135M-Instruct", seed=1, rank=4, alpha=8,
                          targets=("q_proj", "v_proj"), dtype=torch.float32)
    b = write_random_lora(tmp_path / "b", shape=SHAPE, base_name="SmolLM2-135M-Instruct", seed=2, rank=2, alpha=8,
                          targets=("q_proj", "down_proj"), dtype=torch.float32)
    return a, b


def test_composite_delta_is_weighted_sum(two):
    a, b = two
    tensors, config = merge_loras([a, b], [0.7, 0.3])
    assert config["r"] == 6 and config["lora_alpha"] == 6 and lora_scale(config) == 1.0
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    sa, sb = 8 / 4, 8 / 2
    for layer in range(2):
        q = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        want = 0.7 * delta(ta, q, sa) + 0.3 * delta(tb, q, sb)
        assert torch.allclose(delta(tensors, q, 1.0), want, atol=1e-5)
        v = f"base_model.model.model.layers.{layer}.self_attn.v_proj"  # only a has v: b's block is zero
        assert torch.allclose(delta(tensors, v, 1.0), 0.7 * delta(ta, v, sa), atol=1e-5)
        d = f"base_model.model.model.layers.{layer}.mlp.down_proj"
        assert torch.allclose(delta(tensors, d, 1.0), 0.3 * delta(tb, d, sb), atol=1e-5)


def test_composite_matches_peft_cat_on_a_tiny_llama(two, tmp_path):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=50)).eval()
    a, b = two
    store = CompositeStore(tmp_path / "composites")
    cid, comp = store.ensure("v1", [("a", 0.6, a), ("b", 0.4, b)])
    assert store.ensure("v1", [("a", 0.6, a), ("b", 0.4, b)]) == (cid, comp)  # built once, reused
    assert store.ensure("v2", [("a", 0.6, a), ("b", 0.4, b)])[0] != cid  # new pool version: new composite
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    for cfg_dir in (a, b):  # PEFT wants target module names it can find
        cfg = json.loads((cfg_dir / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA"
    peft = PeftModel.from_pretrained(model, str(a), adapter_name="a")
    peft.load_adapter(str(b), adapter_name="b")
    peft.load_adapter(str(comp), adapter_name="composite")
    peft.add_weighted_adapter(["a", "b"], [0.6, 0.4], adapter_name="ref", combination_type="cat")
    with torch.no_grad():
        peft.set_adapter("ref")
        ref = peft(input_ids=ids).logits
        peft.set_adapter("composite")
        ours = peft(input_ids=ids).logits
        peft.set_adapter("a")
        only_a = peft(input_ids=ids).logits
    assert torch.allclose(ours, ref, atol=1e-5)
    assert not torch.allclose(ours, only_a, atol=1e-3)
