"""Whole-layer LoRA for vLLM's CPU punica wrapper (patched in by adapters/engine/plugin.py).

vLLM applies a LoRA layer slice by slice (q, k, v; gate, up), each as a shrink and an expand op, about 14 torch
ops per layer and 400 per decode step of a 30-layer model: on a CPU those fixed costs, not the arithmetic of
rank-4 matrices, were most of what LoRA cost, and a batch mixing adapters paid several times more than one
adapter. Here a layer is one shrink matmul and one expand matmul for all its slices:

- each slot's A blocks of every slice are concatenated into one (in, Σr) matrix and its B blocks laid out
  block-diagonally into one (Σr, Σout) matrix, trimmed to the rank the adapter really uses (vLLM pads every
  adapter to --max-lora-rank with zeros). Prepared when vLLM sets an adapter into a slot (LayerSlots.set_slot,
  called from the punica wrapper's slot_set), never looked up again per step;
- the expand's product is rounded to the activation dtype before it is added, as vLLM's ops do (not one
  fused addmm): the outputs stay those of the slice-by-slice path, which the agreement tests measured;
- a batch on one adapter multiplies by that slot's matrices; a batch mixing adapters multiplies by every
  slot's columns at once and masks each token's row to its own slot's columns before the expand: a little
  more arithmetic, the same few ops whatever the mix (its all-slot matrices pre-packed in oneDNN's layout).
  A large batch (a prefill) whose adapters have about as many tokens each is instead gathered into one group
  per adapter for a batched shrink and expand, doing only each token's own adapter's arithmetic (at decode
  sizes the two cost the same, and uneven groups waste the batched path's padding);
- a small bf16 batch (a decode step) goes to the per-token kernel of adapters/engine/sgmv.cpp instead, where the
  kernel could be built: each token does only its own adapter's arithmetic, in one call per layer whatever the
  mix. Above KERNEL_MAX_TOKENS, oneDNN's GEMMs win;
- tokens without an adapter (slot -1) get no delta; a batch with none skips LoRA entirely.

A slot holding a gated composite (adapters/gated_composite.py) is gated per token between its shrink and its
expand, all slices at once: the gate logits of every slice are one float32 matmul, top-k and softmax run on a
(tokens, slices, candidates) tensor: gating.gate_weights, as plugin.apply_gate applies it slice by slice. In bf16
batches up to GATED_KERNEL_MAX_TOKENS the kernel's gated_bf16 does it instead, token by token, and computes only
the candidates each token keeps. The measurements behind each threshold are in docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass, field

import torch

from adapters.engine.gating import LN_EPS, gate_weights
from adapters.engine.sgmv import kernel as _kernel
from adapters.engine.slots import SlotGate, buffer_slots


@dataclass
class GatedSlot:
    """A gated composite's slot on one layer: candidates' blocks of every slice, and their gates."""

    kind: int  # 1 phatgoose / glider (LN(x)·row), 2 arrow (|x·row|)
    top_k: int
    # Row-major per block row and per gate row, as the kernel reads them; the torch path multiplies by their
    # transposed views (no second copy: a glider composite's float32 blocks are some 30 MB over 30 layers).
    a: torch.Tensor  # (Σ blocks, in) float32: the shrink runs in float32, as the gate weighting does
    b: torch.Tensor  # (Σ blocks, Σout) block-diagonal, activation dtype
    rows: torch.Tensor  # (slices·n, in) float32 gate rows
    bias: torch.Tensor  # (slices, n candidates) α·global, -inf for a candidate absent on a slice
    columns: torch.Tensor  # (Σ blocks,) long: each block column's (slice, candidate) in slices·n
    outputs: torch.Tensor  # (Σ blocks, 2) int32: the output columns [c0, c1) of each block row of b

    @classmethod
    def build(cls, gates: list[SlotGate], a3: list[torch.Tensor], b3: list[torch.Tensor], slot: int,
              outs: tuple[int, ...], dtype: torch.dtype) -> GatedSlot:
        first = gates[0]
        blocks = torch.zeros(sum(g.gate_start for g in gates), sum(outs), dtype=dtype)
        outputs = torch.zeros(blocks.shape[0], 2, dtype=torch.int32)
        row = col = 0
        for b, g, out in zip(b3, gates, outs):
            blocks[row:row + g.gate_start, col:col + out] = b[slot, :, :g.gate_start].T
            outputs[row:row + g.gate_start] = torch.tensor([col, col + out], dtype=torch.int32)
            row, col = row + g.gate_start, col + out
        return cls(kind=first.kind, top_k=first.top_k,
                   a=torch.cat([a[slot, :g.gate_start] for a, g in zip(a3, gates)]).float().contiguous(),
                   b=blocks, rows=torch.cat([g.rows for g in gates]).contiguous(),
                   bias=torch.stack([g.bias for g in gates]),
                   columns=torch.cat([g.column_expert + i * first.n for i, g in enumerate(gates)]),
                   outputs=outputs)

    @functools.cached_property
    def kernel_args(self) -> tuple:
        """What adapters/engine/sgmv.cpp's gated_bf16 takes after (y, x, idx, slot)."""
        return (self.kind, self.top_k, self.bias.shape[1], self.rows, self.bias.reshape(-1).contiguous(), self.a,
                self.b, self.outputs, self.columns.to(torch.int32), LN_EPS)

    def shrink(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """(tokens, Σ blocks): x·A with each candidate's block weighted by the token's gate, per slice."""
        u = x.float()
        h = u @ self.a.T
        h *= gate_weights(u, self.rows.T, self.bias, self.kind, self.top_k)[:, self.columns]
        if scale != 1.0:
            h *= scale
        return h.to(self.b.dtype)


@dataclass
class LayerWeights:
    """One LoRA layer's adapters, rearranged for a single shrink and a single expand. Made again whenever a slot
    is set, so it holds only the per-slot matrices; what joins every slot is made on first use by the path that
    needs it (a slot change under Zipf traffic must not pay for all the slots: docs/performance.md)."""

    a: dict[int, torch.Tensor]  # slot -> (in, Σr): every slice's A, transposed and concatenated
    b: dict[int, torch.Tensor]  # slot -> (Σr, Σout): every slice's B, block-diagonal
    gated: dict[int, GatedSlot]  # slots holding a gated composite
    unsupported: frozenset[int]  # gated slots whose slices disagree (left to the slice-by-slice path)
    ranks: dict[int, tuple[int, ...]]  # slot -> the rank it uses on each slice
    outs: tuple[int, ...]  # each slice's output width
    width: int  # input features
    dtype: torch.dtype
    kernel_rows: KernelRows | None = None  # the layer's kernel rows, kept up to date slot by slot (None: made here)
    stacks: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @functools.cached_property
    def a_all(self) -> torch.Tensor:
        """(in, C): the columns of every slot in `a`, in slot order."""
        if not self.a:
            return torch.zeros(self.width, 0, dtype=self.dtype)
        return torch.cat([self.a[s] for s in sorted(self.a)], dim=1)

    @functools.cached_property
    def b_all(self) -> torch.Tensor:
        """(C, Σout)."""
        if not self.b:
            return torch.zeros(0, sum(self.outs), dtype=self.dtype)
        return torch.cat([self.b[s] for s in sorted(self.b)])

    @functools.cached_property
    def layout(self) -> tuple:
        """((slot, columns), ...): layers with the same layout share a step's mask."""
        return tuple((s, self.a[s].shape[1]) for s in sorted(self.a))

    @functools.cached_property
    def column_slot(self) -> torch.Tensor:
        """(C,): the slot each column of a_all belongs to."""
        return torch.repeat_interleave(torch.tensor([s for s, _ in self.layout], dtype=torch.long),
                                       torch.tensor([c for _, c in self.layout], dtype=torch.long))

    @functools.cached_property
    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For adapters/engine/sgmv.cpp: (slots, R, in) shrink rows, (slots, R, Σout) expand rows and each rank row's
        output columns [c0, c1) (int32; c0 == c1 for padding). Gated and weightless slots are all padding."""
        if self.kernel_rows is not None:
            return self.kernel_rows.get(self)
        return kernel_rows_of(self, max(self.a, default=-1) + 1)

    @functools.cached_property
    def packed_all(self) -> tuple:
        """a_all, b_all in oneDNN's pre-packed form (bf16), or None. Packed when a mixed batch first needs them:
        a layer only ever used by one adapter at a time never pays for it."""
        return _pack(self.a_all), _pack(self.b_all)

    def stacked(self, slots: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, in, R) and (slots, R, Σout) for a batch's adapters, zero-padded to the largest rank among them
        (a slot with nothing on this layer, or a gated one, is all zeros). Kept for the few latest adapter sets:
        a batch's set changes only when requests on another adapter join or leave it."""
        found = self.stacks.get(slots)
        if found is None:
            rank = max([self.a[s].shape[1] for s in slots if s in self.a], default=0)
            a3 = torch.zeros(len(slots), self.width, rank, dtype=self.dtype)
            b3 = torch.zeros(len(slots), rank, sum(self.outs), dtype=self.dtype)
            for i, s in enumerate(slots):
                if s in self.a:
                    r = self.a[s].shape[1]
                    a3[i, :, :r] = self.a[s]
                    b3[i, :r] = self.b[s]
            if len(self.stacks) >= 4:
                self.stacks.pop(next(iter(self.stacks)))
            found = self.stacks[slots] = (a3, b3)
        return found


def kernel_rows_of(weights: LayerWeights, slots: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's (a, b, cols) for `slots` slots, R the widest rank among `weights`' plain slots."""
    rank = max((w.shape[1] for w in weights.a.values()), default=0)
    a = torch.zeros(slots, rank, weights.width, dtype=weights.dtype)
    b = torch.zeros(slots, rank, sum(weights.outs), dtype=weights.dtype)
    cols = torch.zeros(slots, rank, 2, dtype=torch.int32)
    for slot in weights.a:
        _write_kernel_slot((a, b, cols), weights, slot)
    return a, b, cols


def _write_kernel_slot(rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], weights: LayerWeights, slot: int
                       ) -> None:
    a, b, cols = rows
    w = weights.a[slot]
    a[slot, :w.shape[1]] = w.T
    b[slot, :w.shape[1]] = weights.b[slot]
    bounds, row = [0, *itertools.accumulate(weights.outs)], 0
    for i, used in enumerate(weights.ranks[slot]):
        cols[slot, row:row + used, 0], cols[slot, row:row + used, 1] = bounds[i], bounds[i + 1]
        row += used


class KernelRows:
    """One layer's kernel rows (LayerWeights.kernel_weights), kept across slot changes: a change rewrites that
    slot's rows in place instead of laying out every slot again (the whole layout cost some 20 ms per change
    over a 30-layer model at 16 slots, a change Zipf traffic over many experts makes several times a second).
    Laid out whole on first use and whenever the widest rank changes (the kernel reads R rows per token)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def get(self, weights: LayerWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.rows is None:
            self.rows = kernel_rows_of(weights, self.slots)
        return self.rows

    def slot_changed(self, weights: LayerWeights, slot: int) -> None:
        """`weights` (the layer's new weights) differ from the last ones in `slot` only."""
        if self.rows is None:
            return  # not laid out yet: made whole on first use
        rank = max((w.shape[1] for w in weights.a.values()), default=0)
        if rank != self.rows[0].shape[1]:
            self.rows = None
            return
        # In place: rows laid out in a model step are inference tensors, so this runs under inference mode, as
        # every slot change does (plugin.install_slot_hook).
        for t in self.rows:
            t[slot].zero_()
        if slot in weights.a:
            _write_kernel_slot(self.rows, weights, slot)


def _mm(x: torch.Tensor, w: torch.Tensor, packed) -> torch.Tensor:
    """x @ w, through oneDNN's pre-packed weight where there is one: the same result without laying the weight
    out again on every call. Used for the masked path's all-slot matrices; for one adapter's thin matrices it is
    slower than x @ w (docs/performance.md)."""
    if packed is None:
        return x @ w
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _pack(w: torch.Tensor):
    """oneDNN's blocked layout of the weight of `x @ w`, for bf16 (the engine's dtype) where oneDNN is built in."""
    if w.dtype != torch.bfloat16 or w.numel() == 0 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), 16)
    except (RuntimeError, AttributeError):
        return None


@dataclass
class Groups:
    """A mixed batch's tokens gathered by adapter: row i·width + j is the j-th token of the i-th adapter."""

    width: int  # tokens of the largest group
    rows: torch.Tensor  # (slots·width,) token row of each group position; padding repeats row 0
    padding: torch.Tensor | None  # (slots·width, 1) 1 for a token, 0 for padding; None when groups are even


GROUPED_MIN_TOKENS = 64  # below this the masked path costs the same (per-op costs dominate)
# Largest batch the per-token kernel takes, one adapter / several: where it stops beating the torch paths
# (docs/performance.md, "per-token kernel").
KERNEL_MAX_TOKENS = {True: 32, False: 96}
# A gated composite's tokens go to the kernel's gated_bf16 up to this batch size: it computes only the candidates a
# token keeps (top-k of n) where the torch path computes all n and some ten ops per layer; larger batches were not
# measured (docs/performance.md).
GATED_KERNEL_MAX_TOKENS = 256


@dataclass
class StepPlan:
    """What one batch's token -> slot mapping needs, shared by every layer of the step. Per batch, not per slot:
    the punica wrapper makes one in update_metadata, vLLM's per-step seam (called whenever the batch's mapping or
    the slot layout changes, and only then are the indices rewritten), so no step looks it up by its tensor."""

    indices: torch.Tensor
    slots: frozenset[int]  # distinct adapter slots in the batch (no -1)
    uniform: bool  # every token on the same slot
    masks: dict[tuple, torch.Tensor] = field(default_factory=dict)  # (layout, dtype, scale) -> (tokens, C) mask
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # slot -> its tokens' row numbers
    groups: dict[tuple, Groups | None] = field(default_factory=dict)  # (slots, dtype) -> groups, None: masked

    @classmethod
    def of(cls, indices: torch.Tensor) -> StepPlan:
        """The plan of a batch whose token i uses slot indices[i] (-1: no adapter)."""
        values = set(indices.tolist())
        return cls(indices=indices, slots=frozenset(v for v in values if v >= 0), uniform=len(values) == 1)

    @functools.cached_property
    def slots_long(self) -> torch.Tensor:
        """The token -> slot mapping as the kernel reads it (int64, contiguous)."""
        return self.indices.to(torch.long).contiguous()

    def rows_of(self, slot: int) -> torch.Tensor:
        found = self.rows.get(slot)
        if found is None:
            found = self.rows[slot] = (self.indices == slot).nonzero().squeeze(1)
        return found

    def groups_of(self, slots: tuple[int, ...], dtype: torch.dtype) -> Groups | None:
        """Groups for the batched path, or None where the masked path is as fast: few tokens, or groups so
        uneven that padding them to the largest would cost more than the masked path's extra columns."""
        key = (slots, dtype)
        if key not in self.groups:
            members = [self.rows_of(s) for s in slots]
            tokens, width = sum(len(m) for m in members), max(len(m) for m in members)
            if tokens < GROUPED_MIN_TOKENS or len(slots) * width > 1.25 * tokens:
                self.groups[key] = None
            else:
                rows = torch.zeros(len(slots), width, dtype=torch.long)
                padding = torch.zeros(len(slots), width, 1, dtype=dtype)
                for i, m in enumerate(members):
                    rows[i, :len(m)] = m
                    padding[i, :len(m)] = 1
                even = len(slots) * width == tokens
                self.groups[key] = Groups(width, rows.view(-1), None if even else padding.view(-1, 1))
        return self.groups[key]


@dataclass
class PlainSlot:
    """A plain adapter's matrices on one layer."""

    a: torch.Tensor  # (in, Σr): every slice's A, transposed and concatenated
    b: torch.Tensor  # (Σr, Σout): every slice's B, block-diagonal
    ranks: tuple[int, ...]  # the rank it uses on each slice


class LayerSlots:
    """One LoRA linear layer's adapters, slot by slot, prepared when vLLM sets an adapter into a slot.

    The punica wrapper (adapters/engine/punica_cpu.py) holds one per layer. `set_slot` reads one slot back from
    vLLM's stacked buffers (after slots.set_module_slot updated their ranks and gate headers) and rebuilds the
    layer's all-slot matrices, in the buffers' dtype: vLLM's LoRA dtype, which is the activations' dtype too. A
    step in another dtype (unit tests do that) gets converted copies, made on its first use after a set."""

    def __init__(self, a_stacked: tuple[torch.Tensor, ...], b_stacked: tuple[torch.Tensor, ...]):
        self.a_stacked, self.b_stacked = a_stacked, b_stacked  # held: the wrapper finds a layer by this tuple
        self.a3 = [t.squeeze(1) if t.dim() == 4 else t for t in a_stacked]  # (slots, rank, in)
        self.b3 = [t.squeeze(1) if t.dim() == 4 else t for t in b_stacked]  # (slots, out, rank)
        self.outs = tuple(b.shape[1] for b in self.b3)
        self.dtype = self.a3[0].dtype
        self.plain: dict[int, PlainSlot] = {}
        self.gated: dict[int, GatedSlot] = {}
        self.unsupported: set[int] = set()  # gated slots whose slices disagree (left to the slice-by-slice path)
        self.kernel_rows = KernelRows(self.a3[0].shape[0])
        for slot in range(self.a3[0].shape[0]):
            self._read(slot)
        self._rebuild()

    def set_slot(self, index: int) -> None:
        """Slot `index` was just written (an adapter set into it, or reset): read it again."""
        self._read(index)
        self._rebuild()
        self.kernel_rows.slot_changed(self.weights, index)

    def holds_nothing(self, index: int) -> bool:
        """Slot `index` has no weights on this layer."""
        return index not in self.plain and index not in self.gated and index not in self.unsupported

    def for_dtype(self, dtype: torch.dtype) -> LayerWeights:
        """The layer's matrices for activations of `dtype`."""
        if dtype == self.dtype:
            return self.weights
        found = self._converted.get(dtype)
        if found is None:
            plain = {s: PlainSlot(p.a.to(dtype), p.b.to(dtype), p.ranks) for s, p in self.plain.items()}
            gated = {s: dataclasses.replace(g, b=g.b.to(dtype)) for s, g in self.gated.items()}
            found = self._converted[dtype] = self._weights(plain, gated, dtype)
        return found

    def _read(self, slot: int) -> None:
        self.plain.pop(slot, None)
        self.gated.pop(slot, None)
        self.unsupported.discard(slot)
        a_data = [buffer_slots(a, "a") for a in self.a_stacked]
        gates = [d.gates.get(slot) for d in a_data]
        if any(g is not None for g in gates):
            found = [g for g in gates if g is not None]
            if len(found) != len(gates) or len({(g.kind, g.n, g.top_k) for g in found}) != 1:
                self.unsupported.add(slot)
            else:
                self.gated[slot] = GatedSlot.build(found, self.a3, self.b3, slot, self.outs, self.dtype)
            return
        used = [d.ranks[slot] for d in a_data]
        if not any(used):
            return
        blocks = torch.zeros(sum(used), sum(self.outs), dtype=self.dtype)
        row = col = 0
        for b, r, out in zip(self.b3, used, self.outs):
            blocks[row:row + r, col:col + out] = b[slot, :, :r].T
            row, col = row + r, col + out
        self.plain[slot] = PlainSlot(a=torch.cat([a[slot, :r] for a, r in zip(self.a3, used)]).T.contiguous(),
                                     b=blocks, ranks=tuple(used))

    def _rebuild(self) -> None:
        self.weights = self._weights(self.plain, self.gated, self.dtype, self.kernel_rows)
        self._converted: dict[torch.dtype, LayerWeights] = {}

    def _weights(self, plain: dict[int, PlainSlot], gated: dict[int, GatedSlot], dtype: torch.dtype,
                 kernel_rows: KernelRows | None = None) -> LayerWeights:
        slots = sorted(plain)
        return LayerWeights(a={s: plain[s].a for s in slots}, b={s: plain[s].b for s in slots}, gated=dict(gated),
                            unsupported=frozenset(self.unsupported), ranks={s: plain[s].ranks for s in slots},
                            outs=self.outs, width=self.a3[0].shape[2], dtype=dtype, kernel_rows=kernel_rows)


def apply(y: torch.Tensor, x: torch.Tensor, plan: StepPlan, weights: LayerWeights, scale: float) -> bool:
    """y += LoRA(x) for every token, all slices at once: `plan` this step's token -> slot mapping, `weights` the
    layer's (LayerSlots.for_dtype(y.dtype)). False when this path does not apply (the caller then takes vLLM's
    slice-by-slice path): shapes it does not expect, or a gated composite it cannot read."""
    x2 = x.reshape(-1, x.shape[-1])
    if plan.indices.shape[0] != x2.shape[0] or y.dim() != 2 or y.shape[0] != x2.shape[0]:
        return False
    if not plan.slots:
        return True  # no adapter in the batch
    if plan.slots & weights.unsupported or sum(weights.outs) != y.shape[1]:
        return False
    gated = [slot for slot in plan.slots if slot in weights.gated]
    gated_kernel = _kernel() if _takes_kernel(x2, y, GATED_KERNEL_MAX_TOKENS) else None
    for slot in gated:
        g = weights.gated[slot]
        if gated_kernel is not None:
            kind, top_k, n, rows, bias, a, b, outputs, columns, eps = g.kernel_args
            gated_kernel.gated_bf16(y, x2, plan.slots_long, slot, kind, top_k, n, rows, bias, a, b, outputs,
                                    columns, scale, eps)
            continue
        if plan.uniform:
            y += g.shrink(x2, scale) @ g.b
            return True
        rows = plan.rows_of(slot)
        y.index_add_(0, rows, g.shrink(x2.index_select(0, rows), scale) @ g.b)
    if len(gated) == len(plan.slots):
        return True
    if _takes_kernel(x2, y, KERNEL_MAX_TOKENS[plan.uniform]):
        a, b, cols = weights.kernel_weights
        if a.shape[1]:  # else none of the batch's adapters has weights on this layer
            kernel = _kernel()
            assert kernel is not None  # _takes_kernel checked it
            kernel.sgmv_bf16(y, x2, plan.slots_long, a, b, cols, scale)  # gated slots' rows are padding
        return True
    if plan.uniform:
        (slot,) = plan.slots
        a = weights.a.get(slot)
        if a is None:  # an adapter with no weights on this layer
            return True
        h = x2.to(a.dtype) @ a
        if scale != 1.0:
            h.mul_(scale)
        y += h @ weights.b[slot]
        return True
    slots = tuple(sorted(plan.slots - set(gated)))
    groups = plan.groups_of(slots, y.dtype)
    if groups is not None:
        a3, b3 = weights.stacked(slots)
        if a3.shape[2] == 0:  # none of these adapters has weights on this layer
            return True
        h = torch.bmm(x2.index_select(0, groups.rows).view(len(slots), groups.width, -1).to(a3.dtype), a3)
        if scale != 1.0:
            h.mul_(scale)
        out = torch.bmm(h, b3).view(-1, y.shape[1])
        if groups.padding is not None:
            out.mul_(groups.padding)  # padding rows repeat token 0: they must add nothing to it
        y.index_add_(0, groups.rows, out)
        return True
    key = (weights.layout, y.dtype, scale)
    mask = plan.masks.get(key)
    if mask is None:
        mask = (plan.indices.unsqueeze(1) == weights.column_slot.unsqueeze(0)).to(y.dtype)
        if scale != 1.0:
            mask.mul_(scale)
        plan.masks[key] = mask
    h = _mm(x2.to(weights.a_all.dtype), weights.a_all, weights.packed_all[0])
    h.mul_(mask)
    y += _mm(h, weights.b_all, weights.packed_all[1])
    return True


def _takes_kernel(x: torch.Tensor, y: torch.Tensor, max_tokens: int) -> bool:
    return (x.shape[0] <= max_tokens and x.dtype == y.dtype == torch.bfloat16
            and x.is_contiguous() and y.is_contiguous() and _kernel() is not None)

