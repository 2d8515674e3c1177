// avx512 with a bf16 prefill for BF16 weights: AVX512-BF16 dot products (vdpbf16ps) on pairs along K.
#include <immintrin.h>

#include "kernel_ops.hpp"

namespace actsparse {
namespace detail {
namespace {

// The avx512 GEMM's tile (Gemm<Avx512, 6, 4>): prefill builds the activation panels for gemm_mr rows.
// (No std templates in this file: nothing compiled with -mavx512bf16 may be merged into generic code.)
constexpr int MR = 6, NV = 4, NR = NV * 16;

void pack_pairs(const PackedWeight& w, int64_t k0, int64_t kc, int64_t n0, int64_t nc, uint32_t* out) {
  const int64_t kc2 = (kc + 1) / 2, np = (nc + NR - 1) / NR;
  for (int64_t q = 0; q < kc2; ++q) {
    const bool odd = 2 * q + 1 < kc;
    auto dst = [&](int64_t j) { return out + ((j / NR) * kc2 + q) * NR + j % NR; };
    int64_t j = 0;
    for (; j + 16 <= nc; j += 16) {  // 16 divides kTileCols: a step never straddles a stored tile
      int64_t col;
      const auto* lo = reinterpret_cast<const uint16_t*>(tile_row(w, k0 + 2 * q, n0 + j, col)) + col;
      __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)));
      if (odd) {
        const auto* hi = reinterpret_cast<const uint16_t*>(tile_row(w, k0 + 2 * q + 1, n0 + j, col)) + col;
        v = _mm512_or_si512(v, _mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi))), 16));
      }
      _mm512_storeu_si512(dst(j), v);
    }
    for (; j < np * NR; ++j) {
      uint32_t v = 0;
      if (j < nc) {
        int64_t col;
        v = reinterpret_cast<const uint16_t*>(tile_row(w, k0 + 2 * q, n0 + j, col))[col];
        if (odd) v |= uint32_t(reinterpret_cast<const uint16_t*>(tile_row(w, k0 + 2 * q + 1, n0 + j, col))[col]) << 16;
      }
      *dst(j) = v;
    }
  }
}

void gemm_pairs(const uint32_t* zpan, const uint32_t* wpan, int64_t kc2, float* c, int64_t ldc, int64_t mr,
                int64_t nr) {
  __m512 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_setzero_ps();
  for (int64_t q = 0; q < kc2; ++q) {
    __m512bh wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = (__m512bh)_mm512_loadu_si512(wpan + q * NR + v * 16);
    for (int i = 0; i < MR; ++i) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(int(zpan[q * MR + i]));
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], b, wv[v]);
    }
  }
  for (int i = 0; i < MR && i < mr; ++i) {
    float* ci = c + i * ldc;
    if (nr == NR) {
      for (int v = 0; v < NV; ++v) _mm512_storeu_ps(ci + v * 16, _mm512_add_ps(_mm512_loadu_ps(ci + v * 16), acc[i][v]));
    } else {
      alignas(64) float t[NR];
      for (int v = 0; v < NV; ++v) _mm512_store_ps(t + v * 16, acc[i][v]);
      for (int64_t j = 0; j < nr; ++j) ci[j] += t[j];
    }
  }
}

}  // namespace

const Ops* ops_avx512bf16() {
  static const Ops ops = [] {
    Ops o = *ops_avx512();
    o.pair_pack = pack_pairs;
    o.pair_gemm = gemm_pairs;
    return o;
  }();
  return &ops;
}

}  // namespace detail
}  // namespace actsparse
