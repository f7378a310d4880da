"""Per-token gate math for routing among LoRA experts: Arrow, PHATGOOSE and GLIDER's combination (ROUTING.md).

Plain torch functions, no model code. Shapes use T for tokens (any leading dims flattened or broadcast), E for
experts, d for the input width of the LoRA-wrapped linear, r for a LoRA rank.

The one combination rule used by every method (GLIDER, src/peft/tuners/molora/layers.py):

    s = local + α·global ;  p = softmax(s) ;  K = top-k(p) ;  p̃ = p_K / Σ p_K   (zeros outside K)

Implemented (`select`, and `combine` its dense form) as top-k on s, then softmax over the kept s. This is the
same function: softmax is monotone, so top-k(p) = top-k(s), and p_K / Σ p_K = exp(s_K) / Σ exp(s_K). Computed this
way the selection does not degrade when α is large (in float32, p of every non-top-1 expert underflows to 0 once
α·Δglobal exceeds ~100, and top-k among zeros would pick arbitrary experts). GLIDER's code adds 1e-6 to the
renormalising sum; we do not, so weights sum to 1 exactly (up to rounding).

Arrow in mttl / PEFT (top-k on |u·p_e|/T, then softmax over the kept logits) is therefore exactly
`combine(arrow_logits(u, P, T), None, 0, k)`; with global scores, Arrow's logits enter the same s = local + α·global
(our choice: the papers do not combine Arrow with a global router; the units of the two terms differ, since
Arrow logits scale with ‖u‖ while PHATGOOSE logits are bounded by sqrt(d)).
"""

from __future__ import annotations

import math

import torch

LN_EPS = 1e-5  # torch.nn.LayerNorm's default, which GLIDER/PHATGOOSE use (elementwise_affine=False)


def standardize(x: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """LayerNorm without affine over the last dim: (x - mean) / sqrt(var + eps), biased variance.

    A constant vector (e.g. an untrained all-zero gate) maps to zeros.
    """
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def arrow_prototype(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Top right-singular vector of ΔW = B @ A, from the rank-r factors (ΔW is never formed).

    A: [..., r, d_in], B: [..., d_out, r] (leading batch dims allowed, e.g. [E, r, d_in]). Returns [..., d_in],
    float32, unit norm. With A^T = Q_a R_a and B = Q_b R_b (reduced QR), B A = Q_b (R_b R_a^T) Q_a^T, so the top
    right-singular vector of B A is Q_a v_1, v_1 the top right-singular vector of the r×r core R_b R_a^T.
    The sign is arbitrary (Arrow uses |u·p|); we fix it so the entry of largest magnitude is positive, which makes
    stored prototypes reproducible. A zero LoRA (ΔW = 0) has no direction: its prototype is the zero vector, so
    its Arrow logit is 0 for every token.
    """
    a = A.to(torch.float64)
    b = B.to(torch.float64)
    q_a, r_a = torch.linalg.qr(a.transpose(-1, -2))  # [..., d_in, r], [..., r, r]
    q_b, r_b = torch.linalg.qr(b)  # [..., d_out, r], [..., r, r]
    core = r_b @ r_a.transpose(-1, -2)  # [..., r, r]
    _, sv, vh = torch.linalg.svd(core)  # core = U diag(sv) Vh
    proto = (q_a @ vh[..., 0, :].unsqueeze(-1)).squeeze(-1)  # [..., d_in]
    idx = proto.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(proto, -1, idx))
    proto = proto * torch.where(sign == 0, torch.ones_like(sign), sign)
    scale = a.abs().amax(dim=(-1, -2)) * b.abs().amax(dim=(-1, -2))  # ‖BA‖ is negligible relative to this
    zero = sv[..., 0] <= 1e-12 * torch.clamp(scale, min=torch.finfo(torch.float64).tiny) * a.shape[-2]
    proto = torch.where(zero.unsqueeze(-1), torch.zeros_like(proto), proto)
    return proto.to(torch.float32)


PHATGOOSE, ARROW = 1, 2  # the gate kinds as the engine codes them (gated_format.GATE_CODES)


def gate_rows(signals: torch.Tensor, kind: int, temperature: float = 1.0) -> torch.Tensor:
    """Gate signals [E, d] (PHATGOOSE vectors v_e or Arrow prototypes p_e) prepared as rows [E, d] that make the
    local logit one product with the token: LN(v)/√d (PHATGOOSE) or p/T (Arrow). Gated composites store these."""
    if kind == PHATGOOSE:
        return standardize(signals) / math.sqrt(signals.shape[-1])
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    return signals / temperature


def local_logits(u: torch.Tensor, rows: torch.Tensor, kind: int) -> torch.Tensor:
    """Local logits [..., E] of tokens u [..., d] against prepared gate rows [d, E] (`gate_rows`, transposed):
    LN(u)·LN(v)/√d for PHATGOOSE, |u·p|/T for Arrow."""
    if kind == PHATGOOSE:
        return torch.nn.functional.layer_norm(u, (u.shape[-1],), eps=LN_EPS) @ rows
    return (u @ rows).abs()


# The reference's forms of the same logits, from the raw gate signals (local_logits with gate_rows, up to
# float rounding): the PyTorch reference (training/reference.py) and the tests use these.
def arrow_logits(u: torch.Tensor, P: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Arrow's local logits |u · p_e| / T. u: [..., d], P: [E, d] (prototypes) -> [..., E]. u is not normalised
    (as in mttl and PEFT), so routing sharpness depends on ‖u‖."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    return (u.to(P.dtype) @ P.T).abs() / temperature


def phatgoose_logits(u: torch.Tensor, V: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """PHATGOOSE's local logits LN(u) · LN(v_e) / sqrt(d). u: [..., d], V: [E, d] (trained gates) -> [..., E]."""
    d = u.shape[-1]
    return (standardize(u.to(V.dtype), eps) @ standardize(V, eps).T) / math.sqrt(d)


def gate_weights(u: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor, kind: int, top_k: int) -> torch.Tensor:
    """The engine's form of the gate: (tokens, slices·n) float32 weights of each candidate of each slice.
    u: (tokens, d) float32 layer input; rows: (d, slices·n) prepared gate rows; bias: (slices, n) α·global,
    -inf for a candidate absent on a slice. In float32: bf16 rounding of near-tied logits flips the top-k."""
    local = local_logits(u, rows, kind).view(u.shape[0], *bias.shape) + bias
    return combine(local, top_k=top_k).view(u.shape[0], -1)


def select(
    local: torch.Tensor,
    global_scores: torch.Tensor | None = None,
    alpha: float = 0.0,
    top_k: int = 2,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse form of `combine`: (indices [..., k] long, weights [..., k] float32) of each token's top-k
    experts, best first, weights p̃ summing to 1. Arguments as in `combine`. A kept expert's weight may round to
    exactly 0 (e.g. the global top-2 when α·Δglobal is in the thousands); it is still selected."""
    if top_k < 1:
        raise ValueError("top_k must be >= 1")
    s = local.to(torch.float32)
    if global_scores is not None and alpha != 0:
        s = s + alpha * global_scores.to(torch.float32)
    if mask is not None:
        s = s.masked_fill(~mask.to(torch.bool), float("-inf"))
    kept, idx = torch.topk(s, min(top_k, s.shape[-1]), dim=-1)  # top-k of s == top-k of softmax(s)
    w = torch.nan_to_num(torch.softmax(kept, dim=-1), nan=0.0)  # == p_K / Σ p_K; NaN: every expert masked
    return idx, w


def combine(
    local: torch.Tensor,
    global_scores: torch.Tensor | None = None,
    alpha: float = 0.0,
    top_k: int = 2,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """GLIDER's combination: s = local + α·global, p = softmax(s), keep top-k, renormalise.

    local: [..., E] per-token local logits. global_scores: None, [E] (one request) or anything broadcastable to
    `local` (e.g. [B, 1, E] for a batch of requests), the same for every token of a request. mask: optional bool,
    broadcastable to [..., E]; False marks experts that cannot be chosen here (s = -inf; e.g. an expert with no
    LoRA on this module). Returns weights [..., E], float32: p̃ on the top-k, exactly 0 elsewhere, each row summing
    to 1 (a row whose experts are all masked gets all zeros). top_k is clipped to E.
    """
    idx, w = select(local, global_scores, alpha, top_k, mask)
    shape = (*idx.shape[:-1], local.shape[-1])  # leading dims of local broadcast with global's
    return torch.zeros(shape, dtype=torch.float32, device=local.device).scatter(-1, idx, w)
