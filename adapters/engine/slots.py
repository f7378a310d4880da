"""Per-slot data of vLLM's stacked LoRA buffers: the rank each slot really uses, and the gated composites'
headers, prepared when vLLM sets an adapter into a slot.

vLLM writes a slot's weights in one place only: `LoRAModelManager.activate_adapter`, which calls each LoRA
layer's `set_lora` (or `reset_lora` where the adapter has no weights). adapters/engine/plugin.py wraps it and
then calls `set_module_slot` for every LoRA module (through the punica wrapper's `slot_set` where the wrapper has
one), which updates that slot's entry here. The data lives on the buffer itself (the `flock_slots` attribute of
vLLM's stacked tensor, a `BufferSlots`), so the ops, which are handed only the buffer, read it without any
lookup; nothing is keyed on a data pointer or a version counter.

A buffer the ops meet before any adapter was set into it (vLLM creates them zeroed; unit tests make their own)
is read whole once, then kept up to date by the set-time calls only: anything that writes a slot must call
`set_module_slot` (or `set_slot`) afterwards, as the plugin does after vLLM's writes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from adapters.engine.gated_format import UnknownFormat, decode_header, is_header

log = logging.getLogger(__name__)
ATTR = "flock_slots"  # the attribute of a stacked buffer that holds its BufferSlots
Side = Literal["a", "b"]  # A buffers (slots, 1, rank, in): ranks and gate headers; B (slots, 1, out, rank): ranks


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


def read_gate(a: torch.Tensor, rank: int | None = None) -> SlotGate | None:
    """The gated-composite header of one slot's A rows (rank, in), or None for a plain (or empty) adapter.
    `rank`: the slot's used rank where the caller has read it already. UnknownFormat for a header this engine
    cannot apply (another format version, a bad kind, ranks that do not match its position). Reads the weights
    back (a device sync): called when an adapter is set into a slot, never per step."""
    if rank is None:
        rank = _rank_of(a, "a")
    if rank == 0:
        return None
    last = rank - 1
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


@dataclass
class BufferSlots:
    """What the engine needs of one stacked buffer, slot by slot."""

    side: Side
    ranks: list[int]  # the rank each slot uses (0: empty): vLLM pads every adapter to --max-lora-rank with zeros
    gates: dict[int, SlotGate] = field(default_factory=dict)  # A only: slots holding a gated composite
    refused: set[int] = field(default_factory=set)  # A only: gated slots of an unknown format (LoRA removed)

    def used_rank(self, slots: Iterable[int] | None = None) -> int:
        """Highest rank used by `slots` (default: any slot); 0 when none of them has weights in this buffer.
        Multiplying the padding is most of the work when adapters are smaller than the maximum (a resident gated
        composite of rank ~50 must not make a rank-4 expert's batch pay rank 50)."""
        chosen = range(len(self.ranks)) if slots is None else slots
        return max([0, *(self.ranks[s] for s in chosen if s >= 0)])


def _view(weights: torch.Tensor) -> torch.Tensor:
    """(slots, rank, in) for A, (slots, out, rank) for B: vLLM's 4-d buffers without their singleton dim."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _rank_of(slot_weights: torch.Tensor, side: Side) -> int:
    rank_dim = 0 if side == "a" else 1  # within one slot: A (rank, in), B (out, rank)
    other = 1 - rank_dim
    nonzero = (slot_weights.abs().amax(dim=other) > 0).nonzero()
    return int(nonzero.max()) + 1 if nonzero.numel() else 0


def _read_slot(data: BufferSlots, view: torch.Tensor, index: int) -> None:
    """Fill `data`'s entry for slot `index` from the buffer (a device sync: set time only). A gated header this
    engine cannot apply removes the slot's LoRA, loudly: served ungated, a composite would add every candidate's
    delta and the gate rows too; its requests get the base layer instead."""
    data.gates.pop(index, None)
    data.refused.discard(index)
    rank = _rank_of(view[index], data.side)
    if data.side == "a" and rank:
        try:
            gate = read_gate(view[index], rank)
        except UnknownFormat as exc:
            log.error("slot %d holds a gated composite this engine cannot apply (%s): its LoRA is removed",
                      index, exc)
            view[index].zero_()
            data.refused.add(index)
            gate, rank = None, 0
        if gate is not None:
            data.gates[index] = gate
    data.ranks[index] = rank


def buffer_slots(weights: torch.Tensor, side: Side) -> BufferSlots:
    """The per-slot data of a stacked buffer: as prepared when its slots were last set, or read whole now for a
    buffer seen for the first time."""
    found: BufferSlots | None = getattr(weights, ATTR, None)
    if found is None:
        view = _view(weights)
        found = BufferSlots(side=side, ranks=[0] * view.shape[0])
        for slot in range(view.shape[0]):
            _read_slot(found, view, slot)
        setattr(weights, ATTR, found)
    return found


def set_slot(weights: torch.Tensor, side: Side, index: int) -> BufferSlots:
    """Slot `index` of `weights` was just written (an adapter set into it, or the slot reset): read it again."""
    found: BufferSlots | None = getattr(weights, ATTR, None)
    if found is None:
        return buffer_slots(weights, side)  # reads every slot, this one included
    _read_slot(found, _view(weights), index)
    return found


def stacked_buffers(module: Any) -> list[tuple[torch.Tensor, Side]]:
    """A vLLM LoRA layer's 4-d stacked buffers (each slice's, for merged layers), with their side. Others (an
    embedding's (slots, vocab, rank) A, read by lookup and not by the ops) are not the ops' business."""
    found: list[tuple[torch.Tensor, Side]] = []
    for attr, side in (("lora_a_stacked", "a"), ("lora_b_stacked", "b")):
        stacked = getattr(module, attr, None)
        for t in stacked if isinstance(stacked, (tuple, list)) else (stacked,):
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                found.append((t, side))  # type: ignore[arg-type]
    return found


def clear_slot(weights: torch.Tensor, side: Side, index: int) -> BufferSlots:
    """Slot `index` of `weights` was just reset (zeroed) by vLLM: known empty, nothing to read back."""
    found: BufferSlots | None = getattr(weights, ATTR, None)
    if found is None:
        return buffer_slots(weights, side)
    found.gates.pop(index, None)
    found.refused.discard(index)
    found.ranks[index] = 0
    return found


def set_module_slot(module: Any, index: int, *, cleared: bool = False) -> None:
    """vLLM's `set_lora` / `reset_lora` just wrote slot `index` of this LoRA layer: update its buffers' data.
    `cleared`: it was `reset_lora` (every buffer of the slot zeroed), so nothing is read back.

    A plain adapter's B slices are not read back: vLLM writes each slice's A rows and B columns with the one rank
    of that slice, so B's used rank is A's (reading B too was a third of a slot change's cost). A gated slot's B is
    read: its gate rows and header have no B columns, and the slice-by-slice expand must not reach them."""
    buffers = stacked_buffers(module)
    if cleared:
        for weights, side in buffers:
            clear_slot(weights, side, index)
        return
    a_side = [w for w, side in buffers if side == "a"]
    b_side = [w for w, side in buffers if side == "b"]
    a_data = [set_slot(w, "a", index) for w in a_side]
    if len(a_side) != len(b_side):
        for w in b_side:
            set_slot(w, "b", index)
        return
    for a, w in zip(a_data, b_side):
        found: BufferSlots | None = getattr(w, ATTR, None)
        if found is None or index in a.gates or index in a.refused:
            set_slot(w, "b", index)
        else:
            found.ranks[index] = a.ranks[index]
