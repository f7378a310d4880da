// Per-token LoRA for small CPU batches (decode steps): y[t] += B[s] · (scale · A[s] · x[t]), s = the token's slot;
// and the same for a gated composite's slot, with each token's own gate over the composite's candidates.
//
// Each token does only its own adapter's arithmetic, in one call per layer whatever the mix of adapters: the
// torch paths either multiply every token by every slot's columns (masked) or pay per-op costs per adapter
// group. Rounding follows vLLM's ops: the shrink's product is rounded to bf16, then scaled and rounded, the
// expand's product is rounded to bf16 before it is added to y. Built by adapters/engine/sgmv.py with -march=native.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float from_bf16(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float round_bf16(float f) { return from_bf16(to_bf16(f)); }

// One token's expand: yt[c] += bf16(Σ_r h[r]·b[r][c]) over each row's output columns [cols[2r], cols[2r+1]),
// the sum rounded to bf16 before it is added, as vLLM's expand. Rows with h[r] == 0 or no columns cost nothing.
// acc: float scratch as wide as y.
inline void expand_add(const float* h, int64_t rows, const uint16_t* b, const int32_t* cols, int64_t O,
                       float* acc, uint16_t* yt) {
  int64_t lo = O, hi = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (h[r] == 0.f || cols[2 * r] >= cols[2 * r + 1]) continue;
    lo = std::min<int64_t>(lo, cols[2 * r]);
    hi = std::max<int64_t>(hi, cols[2 * r + 1]);
  }
  if (lo >= hi) return;
  std::fill(acc + lo, acc + hi, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t c0 = cols[2 * r], c1 = cols[2 * r + 1];
    const float hr = h[r];
    if (hr == 0.f || c0 >= c1) continue;
    const uint16_t* br = b + r * O;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) acc[c] += hr * from_bf16(br[c]);
  }
  for (int64_t c = lo; c < hi; ++c) yt[c] = to_bf16(from_bf16(yt[c]) + round_bf16(acc[c]));
}

}  // namespace

// y (T, O) bf16, x (T, I) bf16, idx (T,) int64 slot or -1, a (S, R, I) bf16, b (S, R, O) bf16 (block-diagonal
// over the layer's slices), cols (S, R, 2) int32: the output columns [c0, c1) of each rank row (c0 == c1: an
// unused, zero-padded row).
void sgmv_bf16(torch::Tensor y, torch::Tensor x, torch::Tensor idx, torch::Tensor a, torch::Tensor b,
               torch::Tensor cols, double scale) {
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && idx.is_contiguous() && a.is_contiguous() &&
              b.is_contiguous() && cols.is_contiguous(), "sgmv: tensors must be contiguous");
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 &&
              a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16, "sgmv: bf16 only");
  TORCH_CHECK(idx.scalar_type() == at::kLong && cols.scalar_type() == at::kInt, "sgmv: idx int64, cols int32");
  const int64_t T = x.size(0), I = x.size(1), S = a.size(0), R = a.size(1), O = b.size(2);
  TORCH_CHECK(y.size(0) == T && y.size(1) == O && a.size(2) == I && b.size(0) == S && b.size(1) == R &&
              idx.size(0) == T && cols.size(0) == S && cols.size(1) == R, "sgmv: shapes disagree");
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* ap = reinterpret_cast<const uint16_t*>(a.data_ptr());
  const auto* bp = reinterpret_cast<const uint16_t*>(b.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int32_t* cp = cols.data_ptr<int32_t>();
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, T, 8, [&](int64_t t0, int64_t t1) {
    std::vector<float> xf(I), acc(O), h(R);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = ip[t];
      if (s < 0 || s >= S) continue;
      const uint16_t* xt = xp + t * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) xf[i] = from_bf16(xt[i]);
      const int32_t* cs = cp + s * R * 2;
      for (int64_t r = 0; r < R; ++r) {
        h[r] = 0.f;
        if (cs[2 * r] >= cs[2 * r + 1]) continue;
        const uint16_t* ar = ap + (s * R + r) * I;
        float d = 0.f;
#pragma omp simd reduction(+ : d)
        for (int64_t i = 0; i < I; ++i) d += xf[i] * from_bf16(ar[i]);
        h[r] = round_bf16(round_bf16(d) * sc);
      }
      expand_add(h.data(), R, bp + s * R * O, cs, O, acc.data(), yp + t * O);
    }
  });
}

// A gated composite's slot (adapters/engine/lora_linear.py GatedSlot): the tokens on `slot` mix the composite's
// candidates per slice with their own gate, as gating.gate_weights does, in float32:
//   logits[g] = LN(u)·rows[g] (kind 1: PHATGOOSE, GLIDER) or |u·rows[g]| (kind 2: Arrow), plus bias[g]
//   (α·global score, -inf for a candidate absent on that slice), g = slice·n + candidate;
//   per slice the top-k logits are softmaxed, the others weigh 0;
//   h[c] = (u·a[c]) · w[column[c]] · scale, rounded to bf16; y[t] += bf16(Σ_c h[c] b[c]) over each row's columns.
// Candidates a token does not keep cost nothing here (the torch path multiplies them by 0).
// x (T, I) bf16, idx (T,) int64, rows (G, I) f32, bias (G,) f32, a (C, I) f32, b (C, O) bf16,
// cols (C, 2) int32 the output columns [c0, c1) of each block row, column (C,) int32 each row's g.
void gated_bf16(torch::Tensor y, torch::Tensor x, torch::Tensor idx, int64_t slot, int64_t kind, int64_t top_k,
                int64_t n, torch::Tensor rows, torch::Tensor bias, torch::Tensor a, torch::Tensor b,
                torch::Tensor cols, torch::Tensor column, double scale, double eps) {
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && idx.is_contiguous() && rows.is_contiguous() &&
              bias.is_contiguous() && a.is_contiguous() && b.is_contiguous() && cols.is_contiguous() &&
              column.is_contiguous(), "gated: tensors must be contiguous");
  TORCH_CHECK(y.scalar_type() == at::kBFloat16 && x.scalar_type() == at::kBFloat16 &&
              b.scalar_type() == at::kBFloat16, "gated: x, y, b bf16");
  TORCH_CHECK(rows.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat,
              "gated: rows, bias, a float32");
  TORCH_CHECK(idx.scalar_type() == at::kLong && cols.scalar_type() == at::kInt && column.scalar_type() == at::kInt,
              "gated: idx int64, cols and column int32");
  const int64_t T = x.size(0), I = x.size(1), G = rows.size(0), C = a.size(0), O = b.size(1);
  TORCH_CHECK(n > 0 && G % n == 0 && bias.size(0) == G && rows.size(1) == I && a.size(1) == I && b.size(0) == C &&
              cols.size(0) == C && column.size(0) == C && y.size(0) == T && y.size(1) == O && idx.size(0) == T,
              "gated: shapes disagree");
  const int64_t k = std::min(top_k, n);
  TORCH_CHECK(k >= 1 && k <= 64, "gated: top_k must be 1..64");
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* bp = reinterpret_cast<const uint16_t*>(b.data_ptr());
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* rp = rows.data_ptr<float>();
  const float* biasp = bias.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const int32_t* cp = cols.data_ptr<int32_t>();
  const int32_t* colp = column.data_ptr<int32_t>();
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, T, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> u(I), v(I), logit(G), w(G), acc(O), h(C);
    std::vector<char> taken(n);
    for (int64_t t = t0; t < t1; ++t) {
      if (ip[t] != slot) continue;
      const uint16_t* xt = xp + t * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) u[i] = from_bf16(xt[i]);
      const float* in = u.data();
      if (kind == 1) {  // layer norm without affine, biased variance (torch.nn.functional.layer_norm)
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < I; ++i) sum += u[i];
        const float mean = sum / static_cast<float>(I);
        float sq = 0.f;
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < I; ++i) sq += (u[i] - mean) * (u[i] - mean);
        const float rstd = 1.f / std::sqrt(sq / static_cast<float>(I) + static_cast<float>(eps));
#pragma omp simd
        for (int64_t i = 0; i < I; ++i) v[i] = (u[i] - mean) * rstd;
        in = v.data();
      }
      for (int64_t g = 0; g < G; ++g) {
        const float* r = rp + g * I;
        float d = 0.f;
#pragma omp simd reduction(+ : d)
        for (int64_t i = 0; i < I; ++i) d += in[i] * r[i];
        logit[g] = (kind == 1 ? d : std::fabs(d)) + biasp[g];
      }
      for (int64_t s0 = 0; s0 < G; s0 += n) {  // per slice: top-k, softmax over the kept
        std::fill(taken.begin(), taken.end(), 0);
        std::fill(w.begin() + s0, w.begin() + s0 + n, 0.f);
        int64_t kept[64];
        for (int64_t j = 0; j < k; ++j) {
          int64_t best = -1;
          for (int64_t e = 0; e < n; ++e)
            if (!taken[e] && (best < 0 || logit[s0 + e] > logit[s0 + best])) best = e;
          taken[best] = 1;
          kept[j] = best;
        }
        const float top = logit[s0 + kept[0]];
        if (!std::isfinite(top)) continue;  // all kept absent: torch's softmax gives NaN, turned to 0
        float z = 0.f;
        for (int64_t j = 0; j < k; ++j) z += std::exp(logit[s0 + kept[j]] - top);
        for (int64_t j = 0; j < k; ++j) w[s0 + kept[j]] = std::exp(logit[s0 + kept[j]] - top) / z;
      }
      for (int64_t c = 0; c < C; ++c) {
        h[c] = 0.f;
        const float wc = w[colp[c]];
        if (wc == 0.f || cp[2 * c] >= cp[2 * c + 1]) continue;
        const float* ar = ap + c * I;
        float d = 0.f;
#pragma omp simd reduction(+ : d)
        for (int64_t i = 0; i < I; ++i) d += u[i] * ar[i];
        h[c] = round_bf16(d * wc * sc);
      }
      expand_add(h.data(), C, bp, cp, O, acc.data(), yp + t * O);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgmv_bf16", &sgmv_bf16, "y[t] += B[s] (scale A[s] x[t]) per token, bf16 (adapters/engine/sgmv.cpp)");
  m.def("gated_bf16", &gated_bf16, "a gated composite's tokens, gated per token and slice, bf16 (adapters/engine/sgmv.cpp)");
}
