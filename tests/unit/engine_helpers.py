"""The whole-layer LoRA path driven as adapters/engine/punica_cpu.py drives it, for the engine's unit tests."""

from __future__ import annotations

import torch

from adapters.engine import lora_linear


def whole_layer(y: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, a_stacked, b_stacked, scale: float) -> bool:
    """lora_linear.apply for one step, on a layer whose slots were all just written (read whole, as when the
    wrapper first meets a layer): a buffer written again afterwards needs slots.set_slot, as vLLM's writes get."""
    layer = lora_linear.LayerSlots(tuple(a_stacked), tuple(b_stacked))
    return lora_linear.apply(y, x, lora_linear.StepPlan.of(indices), layer.for_dtype(y.dtype), scale)
