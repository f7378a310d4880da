"""Adapter validation and path confinement (no model, no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.errors import ForbiddenPath, InvalidExpert
from adapters.validate import ModelShape, base_model_matches, resolve_inside, validate_adapter
from training.synthetic import write_random_lora

SHAPE = ModelShape.from_config({"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "num_hidden_layers": 2})


def make(tmp_path: Path, name="a", **kw) -> Path:
    return write_random_lora(tmp_path / name, shape=SHAPE, base_name="SmolLM2-135M-Instruct", seed=1, **kw)


def check(path: Path, max_rank: int = 16) -> dict:
    return validate_adapter(path, base_name="SmolLM2-135M-Instruct", shape=SHAPE, max_rank=max_rank)


def test_valid_adapter_passes(tmp_path):
    assert check(make(tmp_path))["r"] == 4


def test_shape_from_config():
    assert SHAPE.linears["k_proj"] == (16, 8) and SHAPE.linears["down_proj"] == (32, 16)


@pytest.mark.parametrize("declared,ok", [("SmolLM2-135M-Instruct", True),
                                         ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
                                         ("/models/SmolLM2-135M-Instruct/", True), ("SmolLM2-360M", False),
                                         (None, False)])
def test_base_model_name_matching(declared, ok):
    assert base_model_matches(declared, "SmolLM2-135M-Instruct") is ok


def test_rank_limit(tmp_path):
    with pytest.raises(InvalidExpert, match="exceeds"):
        check(make(tmp_path, rank=8), max_rank=4)


def test_nan_weights_rejected(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    path = make(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(InvalidExpert, match="NaN"):
        check(path)
    assert torch  # imported for the dtype of the tensors above


def test_unknown_module_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    path = make(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = tensors[next(iter(tensors))].clone()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(InvalidExpert, match="names no linear layer"):
        check(path)


def test_dora_rejected(tmp_path):
    path = make(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidExpert, match="DoRA"):
        check(path)


def test_resolve_inside_follows_symlinks(tmp_path):
    root = (tmp_path / "root").resolve()
    root.mkdir()
    (root / "ok").mkdir()
    (root / "escape").symlink_to("/etc")
    assert resolve_inside(root / "ok", [root]) == root / "ok"
    for bad in (root / "escape", root / ".." / "..", "/proc/self", "/etc/passwd"):
        with pytest.raises(ForbiddenPath):
            resolve_inside(bad, [root])
