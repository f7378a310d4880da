"""The per-token gate of gated composites on vLLM's GPU LoRA path, as one Triton kernel per LoRA slice:
shrink → gate → expand for the tokens of gated slots (adapters/engine/punica_gated.py launches it).

Each program is one token of a gated slot (others return at once). On one slice of a layer it
1. shrinks: the candidates' block rows h = A_blocks·x and the gate projections g = gate_rows·x, float32
   accumulation of the stored (bf16) rows, as vLLM's shrink does; mean and variance of x for PHATGOOSE's LN(x);
2. gates, with the math of adapters/engine/gating.py written out for one token (`gate_weights`: local logits
   LN(x)·row = (x·row − mean(x)·Σrow)·rstd(x) for PHATGOOSE / GLIDER, |x·row| for Arrow; s = local + α·global;
   top-k of s; softmax over the kept; a candidate absent on this slice has bias −inf and never gets weight);
3. weights each block column by its candidate's weight and the LoRA scale, rounds to the weights' dtype (as
   vLLM's expand reads its float32 buffer) and expands into the token's output columns: y += B_blocks·h.

Per-slot data is read from small tables written when an adapter is set into a slot (punica_gated.GatedLayer):
meta (kind, top_k, candidates, first gate row), each rank row's candidate (−1: not a block row), the
candidates' α·global bias and the sums of their gate rows. A and B are vLLM's stacked buffers, read in place.

A token's program does only its own slot's arithmetic, a matrix-vector product as punica's bgmv does: fine for
decode batches; a prefill's many tokens of one composite re-read its weights per token (a grouped GEMM would
not); not measured on a GPU (none here). Verified in Triton's interpreter (TRITON_INTERPRET=1) only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adapters.engine.gating import LN_EPS, PHATGOOSE

META_FIELDS = 4  # kind (0: no gated composite in this slot on this slice), top_k, candidates, first gate row


@triton.jit
def _gated_lora_kernel(
    y_ptr, x_ptr, slot_ptr, a_ptr, b_ptr, meta_ptr, column_ptr, bias_ptr, rowsum_ptr,
    d, n_out, y_offset, scale, eps,
    stride_xt, stride_yt, stride_as, stride_ar, stride_bs, stride_bo,
    table_width,
    PHATGOOSE_KIND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    kind = tl.load(meta_ptr + slot * 4)
    if kind == 0:
        return
    top_k = tl.load(meta_ptr + slot * 4 + 1)
    n = tl.load(meta_ptr + slot * 4 + 2)
    gate_start = tl.load(meta_ptr + slot * 4 + 3)

    r = tl.arange(0, BLOCK_R)  # block rows 0 .. gate_start-1 and, separately, candidates 0 .. n-1
    block_row = r < gate_start
    candidate = r < n
    a_slot = a_ptr + slot.to(tl.int64) * stride_as
    x_row = x_ptr + t.to(tl.int64) * stride_xt

    # 1. shrink: block rows and gate rows against x; the sum of x for its mean
    h = tl.zeros([BLOCK_R], dtype=tl.float32)
    g = tl.zeros([BLOCK_R], dtype=tl.float32)
    x_sum = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_d = cols < d
        xv = tl.load(x_row + cols, mask=in_d, other=0.0).to(tl.float32)
        x_sum += xv
        a_blk = tl.load(a_slot + r[:, None] * stride_ar + cols[None, :],
                        mask=block_row[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        h += tl.sum(a_blk * xv[None, :], axis=1)
        a_gate = tl.load(a_slot + (gate_start + r)[:, None] * stride_ar + cols[None, :],
                         mask=candidate[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        g += tl.sum(a_gate * xv[None, :], axis=1)
    mean = tl.sum(x_sum, axis=0) / d
    x_sq = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):  # variance in a second pass, as LayerNorm does (no E[x²]−mean² cancellation)
        cols = d0 + tl.arange(0, BLOCK_D)
        in_d = cols < d
        xv = tl.load(x_row + cols, mask=in_d, other=0.0).to(tl.float32)
        dev = tl.where(in_d, xv - mean, 0.0)
        x_sq += dev * dev
    rstd = 1.0 / tl.sqrt(tl.sum(x_sq, axis=0) / d + eps)

    # 2. gate: s = local + α·global over the candidates, top-k, softmax over the kept
    table = slot.to(tl.int64) * table_width
    rowsum = tl.load(rowsum_ptr + table + r, mask=candidate, other=0.0)
    bias = tl.load(bias_ptr + table + r, mask=candidate, other=float("-inf"))
    if kind == PHATGOOSE_KIND:
        local = (g - mean * rowsum) * rstd
    else:
        local = tl.abs(g)
    s = tl.where(candidate, local + bias, float("-inf"))
    kept = r < 0
    work = s
    for _ in range(0, top_k):
        best = tl.max(work, axis=0)
        pick = tl.min(tl.where(work == best, r, BLOCK_R), axis=0)  # the first of ties
        kept = kept | (r == pick)
        work = tl.where(r == pick, float("-inf"), work)
    finite = kept & (s > float("-inf"))
    top = tl.max(tl.where(finite, s, float("-inf")), axis=0)
    e = tl.where(finite, tl.exp(tl.where(finite, s - top, 0.0)), 0.0)
    total = tl.sum(e, axis=0)
    w = e / tl.where(total > 0, total, 1.0)  # every candidate absent: all weights 0

    # 3. each block column weighted by its candidate's weight; expand into this slice's output columns
    column = tl.load(column_ptr + table + r, mask=block_row, other=-1)
    w_col = tl.sum(tl.where(column[:, None] == r[None, :], w[None, :], 0.0), axis=1)
    hw = (h * w_col * scale).to(b_ptr.dtype.element_ty).to(tl.float32)
    b_slot = b_ptr + slot.to(tl.int64) * stride_bs
    y_row = y_ptr + t.to(tl.int64) * stride_yt + y_offset
    for o0 in range(0, n_out, BLOCK_O):
        outs = o0 + tl.arange(0, BLOCK_O)
        in_o = outs < n_out
        b_blk = tl.load(b_slot + outs[:, None] * stride_bo + r[None, :],
                        mask=in_o[:, None] & block_row[None, :], other=0.0).to(tl.float32)
        delta = tl.sum(b_blk * hw[None, :], axis=1)
        yv = tl.load(y_row + outs, mask=in_o, other=0.0).to(tl.float32)
        tl.store(y_row + outs, (yv + delta).to(y_ptr.dtype.element_ty), mask=in_o)


def gated_lora_slice(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     meta: torch.Tensor, columns: torch.Tensor, bias: torch.Tensor, rowsum: torch.Tensor,
                     y_offset: int, scale: float = 1.0, eps: float = LN_EPS) -> None:
    """y[t, y_offset : y_offset + out] += the gated LoRA delta of token t, for every token whose `token_slots`
    entry is a slot (≥ 0) holding a gated composite on this slice; other tokens are left as they are.

    x: (tokens, d); y: (tokens, ≥ y_offset + out); token_slots: (tokens,) int32/int64, −1 for tokens not on a
    gated slot. a: vLLM's stacked A of one slice, (slots, 1, max_rank, d); b: its stacked B, (slots, 1, out,
    max_rank). meta: (slots, 4) int32; columns: (slots, max_rank) int32; bias, rowsum: (slots, max_rank)
    float32 (GatedLayer's tables of this slice)."""
    tokens, d = x.shape
    if tokens == 0:
        return
    a3, b3 = a.squeeze(1), b.squeeze(1)  # (slots, max_rank, d), (slots, out, max_rank)
    assert a3.stride(2) == 1 and b3.stride(2) == 1 and x.stride(1) == 1 and y.stride(1) == 1
    max_rank = a3.shape[1]
    block_r = max(16, triton.next_power_of_2(max_rank))
    _gated_lora_kernel[(tokens,)](
        y, x, token_slots, a3, b3, meta, columns, bias, rowsum,
        d, b3.shape[1], y_offset, float(scale), float(eps),
        x.stride(0), y.stride(0), a3.stride(0), a3.stride(1), b3.stride(0), b3.stride(1),
        columns.shape[1],
        PHATGOOSE_KIND=PHATGOOSE, BLOCK_R=block_r, BLOCK_D=64, BLOCK_O=64,
    )
