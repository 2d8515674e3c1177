// AVX2 + FMA + F16C kernel (compiled with -mavx2 -mfma -mf16c only).
#include <immintrin.h>

#include "kernel_ops.hpp"

namespace actsparse {
namespace detail {
namespace {

struct Avx2 {
  using V = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V bf16(const uint16_t* p) {  // bf16 is the high half of an f32
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static V u8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  // Even/odd split avoids a byte interleave per row; the interleave is paid once per group in u4_apply.
  static void u4eo(const uint8_t* p, V& e, V& o) {
    const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    e = _mm256_cvtepi32_ps(_mm256_and_si256(d, _mm256_set1_epi32(0xf)));
    o = _mm256_cvtepi32_ps(_mm256_srli_epi32(d, 4));
  }
  static void interleave(V e, V o, V& lo, V& hi) {
    const V a = _mm256_unpacklo_ps(e, o), b = _mm256_unpackhi_ps(e, o);
    lo = _mm256_permute2f128_ps(a, b, 0x20);
    hi = _mm256_permute2f128_ps(a, b, 0x31);
  }
  static float half(uint16_t h) { return _cvtsh_ss(h); }
  static void prefetch_l1(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
};

}  // namespace
}  // namespace detail
}  // namespace actsparse

#include "simd_kernels.inc"

namespace actsparse {
namespace detail {

const Ops* ops_avx2() {
  using G = Gemm<Avx2, 6, 2>;  // 12 accumulators + 2 weight vectors + broadcast fit the 16 ymm registers
  static const Ops ops = [] {
    Ops o{6, G::NR, rows<Avx2>, u4_apply<Avx2>, G::pack, G::gemm};
    o.rows_multi = rows_multi<Avx2>;
    return o;
  }();
  return &ops;
}

}  // namespace detail
}  // namespace actsparse
