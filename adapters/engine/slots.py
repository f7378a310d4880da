"""Per-slot data of vLLM's stacked LoRA buffers: the rank each slot really uses, and the gated composites' headers.

Computed once per version of a stacked buffer (loading an adapter writes it in place, which bumps its version)
and shared by the plugin's ops and the whole-layer path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from adapters.engine.gated_format import UnknownFormat, decode_header, is_header

log = logging.getLogger(__name__)

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


def read_gate(a: torch.Tensor) -> SlotGate | None:
    """The gated-composite header of one slot's A rows (rank, in), or None for a plain (or empty) adapter.
    UnknownFormat for a header this engine cannot apply (another format version, a bad kind, ranks that do not
    match its position). Reads the weights back (a device sync): called when an adapter is set into a slot,
    never per step."""
    rows = (a.abs().amax(dim=1) > 0).nonzero()
    if not rows.numel():
        return None
    last = int(rows.max())
    if not is_header(a[last]):
        return None
    header = decode_header(a[last])
    n = len(header.ranks)
    if header.gate_start + n != last:
        raise UnknownFormat("the header's ranks do not match its position")
    return SlotGate(
        kind=header.kind, n=n, top_k=header.top_k, alpha=header.alpha, gate_start=header.gate_start,
        column_expert=torch.repeat_interleave(torch.arange(n), torch.tensor(header.ranks)),
        rows=a[header.gate_start:last].float(), bias=header.bias())


def slot_gate(a: torch.Tensor, slot: int) -> SlotGate | None:
    """The gated composite in one slot of `a` (slots, rank, in), or None. A header this engine cannot apply:
    served ungated, a composite would add every candidate's delta and the gate rows too, so the slot's LoRA is
    removed here instead (its requests get the base layer) and the log says so."""
    try:
        return read_gate(a[slot])
    except UnknownFormat as exc:
        log.error("slot %d holds a gated composite this engine cannot apply (%s): its LoRA is removed", slot, exc)
        a[slot].zero_()
        return None


def slot_rank(a: torch.Tensor, slot: int) -> int:
    """Rank one slot of `a` (slots, rank, in) uses: its last nonzero row + 1 (0 when empty). Not cached: for
    the one slot an adapter was just written into."""
    nonzero = (a[slot].abs().amax(dim=1) > 0).nonzero()
    return int(nonzero.max()) + 1 if nonzero.numel() else 0


def slot_gates(a: torch.Tensor) -> dict[int, SlotGate]:
    """{slot: SlotGate} for the slots of `a` (slots, rank, in) that hold a gated composite; cached per version."""
    key = (a.data_ptr(), a._version, tuple(a.shape))
    found = _gate_cache.get(key)
    if found is not None:
        return found
    found = {}
    for slot in range(a.shape[0]):
        gate = slot_gate(a, slot)
        if gate is not None:
            found[slot] = gate
    if len(_gate_cache) > 4096:
        _gate_cache.clear()
    _gate_cache[key] = found
    return found


def clear_caches() -> None:
    """Forget cached ranks and gate headers (tests that free and re-allocate buffers: a new tensor can reuse a
    freed one's address and version count)."""
    _rank_cache.clear()
    _gate_cache.clear()
