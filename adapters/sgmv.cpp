// Per-token LoRA for small CPU batches (decode steps): y[t] += B[s] · (scale · A[s] · x[t]), s = the token's slot.
//
// Each token does only its own adapter's arithmetic, in one call per layer whatever the mix of adapters: the
// torch paths either multiply every token by every slot's columns (masked) or pay per-op costs per adapter
// group. Rounding follows vLLM's ops: the shrink's product is rounded to bf16, then scaled and rounded, the
// expand's product is rounded to bf16 before it is added to y. Built by adapters/sgmv.py with -march=native.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
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
      int64_t lo = O, hi = 0;
      for (int64_t r = 0; r < R; ++r) {
        h[r] = 0.f;
        if (cs[2 * r] >= cs[2 * r + 1]) continue;
        const uint16_t* ar = ap + (s * R + r) * I;
        float d = 0.f;
#pragma omp simd reduction(+ : d)
        for (int64_t i = 0; i < I; ++i) d += xf[i] * from_bf16(ar[i]);
        h[r] = round_bf16(round_bf16(d) * sc);
        lo = std::min<int64_t>(lo, cs[2 * r]);
        hi = std::max<int64_t>(hi, cs[2 * r + 1]);
      }
      if (lo >= hi) continue;
      std::fill(acc.begin() + lo, acc.begin() + hi, 0.f);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t c0 = cs[2 * r], c1 = cs[2 * r + 1];
        if (c0 >= c1) continue;
        const float hr = h[r];
        const uint16_t* br = bp + (s * R + r) * O;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) acc[c] += hr * from_bf16(br[c]);
      }
      uint16_t* yt = yp + t * O;
      for (int64_t c = lo; c < hi; ++c) yt[c] = to_bf16(from_bf16(yt[c]) + round_bf16(acc[c]));
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sgmv_bf16", &sgmv_bf16, "y[t] += B[s] (scale A[s] x[t]) per token, bf16 (adapters/sgmv.cpp)");
}
