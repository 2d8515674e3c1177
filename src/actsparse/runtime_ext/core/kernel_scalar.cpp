// Reference kernel: plain loops for every format; also the fallback on CPUs without AVX2.
#include <cmath>
#include <cstring>

#include "kernel_ops.hpp"

namespace actsparse {
namespace detail {
namespace {

// Raw (not dequantised) value of column j of a stored row.
float raw(WeightFormat f, const uint8_t* row, int64_t j) {
  return with_format(f, [&](auto F) { return FormatTraits<decltype(F)::value>::raw(row, j); });
}

void rows(WeightFormat f, float* acc, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx,
          const float* z, int64_t R, bool /*prefetch_l2: no prefetches here*/) {
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* row = base + int64_t(idx[r]) * rb;
    for (int64_t j = 0; j < n; ++j) acc[j] += z[r] * raw(f, row, j);
  }
}

void u4_apply(float* y, const float* acc, int64_t n, const PackedWeight& w, int64_t s, float zsum) {
  for (int64_t j = 0; j < n; ++j) y[j] += scale_at(w, s + j) * (acc[j] - zero_point_at(w, s + j) * zsum);
}

constexpr int MR = 4, NR = 16;

void pack(const PackedWeight& w, int64_t k0, int64_t kc, int64_t n0, int64_t nc, float* out) {
  const int64_t np = (nc + NR - 1) / NR;
  for (int64_t kk = 0; kk < kc; ++kk) {
    const int64_t k = k0 + kk;
    for (int64_t j = 0; j < np * NR; ++j) {
      const int64_t n = n0 + j;
      float v = 0.f;
      if (j < nc) {
        int64_t col;
        const uint8_t* row = tile_row(w, k, n, col);
        v = raw(w.format, row, col);
        if (w.format == WeightFormat::U8) v = (v - w.zero_point[n]) * w.scale[n];
        if (w.format == WeightFormat::U4) {
          const int64_t s = (k / w.group_size) * w.N + n;
          v = (v - zero_point_at(w, s)) * scale_at(w, s);
        }
      }
      out[((j / NR) * kc + kk) * NR + j % NR] = v;
    }
  }
}

void gemm(const float* zpan, const float* wpan, int64_t kc, float* c, int64_t ldc, int64_t mr, int64_t nr) {
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) {
      float s = 0.f;
      for (int64_t k = 0; k < kc; ++k) s += zpan[k * MR + i] * wpan[k * NR + j];
      c[i * ldc + j] += s;
    }
}

}  // namespace

const Ops* ops_scalar() {
  static const Ops ops{MR, NR, rows, u4_apply, pack, gemm};
  return &ops;
}

}  // namespace detail
}  // namespace actsparse
