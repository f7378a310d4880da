"""Small random LoRA adapters in PEFT's on-disk format, for tests and benchmarks (no training needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.card import CARD_FILE, ExpertCard
from adapters.validate import CONFIG_FILE, WEIGHTS_FILE, ModelShape


def write_random_lora(
    out_dir: Path,
    *,
    shape: ModelShape,
    base_name: str,
    seed: int,
    rank: int = 4,
    alpha: int = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    strength: float = 0.5,
    card: ExpertCard | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a PEFT LoRA whose delta is large enough (`strength`) to change greedy outputs visibly."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for module in targets:
            fan_in, fan_out = shape.linears[module]
            part = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) / fan_in**0.5).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * strength).to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "target_modules": list(targets),
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    if card is not None:
        (out_dir / CARD_FILE).write_text(card.model_dump_json(indent=2))
    return out_dir
