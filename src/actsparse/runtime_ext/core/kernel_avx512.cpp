// AVX-512 (F/BW/VL/DQ) + FMA + F16C kernel; same templates as AVX2, 16 lanes.
#include <immintrin.h>

#include "kernel_ops.hpp"

namespace actsparse {
namespace detail {
namespace {

struct Avx512 {
  using V = __m512;
  static constexpr int W = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V bf16(const uint16_t* p) {  // bf16 is the high half of an f32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
  }
  static V u8(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void u4eo(const uint8_t* p, V& e, V& o) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    e = _mm512_cvtepi32_ps(_mm512_and_si512(d, _mm512_set1_epi32(0xf)));
    o = _mm512_cvtepi32_ps(_mm512_srli_epi32(d, 4));
  }
  static void interleave(V e, V o, V& lo, V& hi) {
    const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ih = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    lo = _mm512_permutex2var_ps(e, il, o);
    hi = _mm512_permutex2var_ps(e, ih, o);
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

const Ops* ops_avx512() {
  using G = Gemm<Avx512, 6, 4>;  // 24 accumulators + 4 weight vectors + broadcast of the 32 zmm registers
  static const Ops ops{6, G::NR, rows<Avx512>, u4_apply<Avx512>, G::pack, G::gemm};
  return &ops;
}

}  // namespace detail
}  // namespace actsparse
