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

// Ops::live, 16 channels per step: the mask and a compress of the kept lanes to the front, stored as a whole
// vector (the register form: compress straight to memory is microcoded, and slow on some CPUs).
int64_t live(const void* x, bool bf16, int64_t n, int64_t k0, float mode, float tau, bool mask, int32_t* idx, float* z,
             int* nonfinite) {
  const __m512 m = _mm512_set1_ps(mode), t = _mm512_set1_ps(tau), big = _mm512_set1_ps(3.40282347e38f);
  const __m512i step = _mm512_set1_epi32(16);
  __m512i k = _mm512_add_epi32(_mm512_set1_epi32(int32_t(k0)), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __mmask16 bad = 0;
  int64_t L = 0;
  for (int64_t c = 0; c < n; c += 16, k = _mm512_add_epi32(k, step)) {
    const __mmask16 in = n - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - c)) - 1);
    const __m512 xv = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                                 _mm256_maskz_loadu_epi16(in, static_cast<const uint16_t*>(x) + c)), 16))
                           : _mm512_maskz_loadu_ps(in, static_cast<const float*>(x) + c);
    const __m512 v = _mm512_sub_ps(xv, m), a = _mm512_abs_ps(v);
    const __mmask16 keep = mask ? _mm512_mask_cmp_ps_mask(in, a, t, _CMP_NLE_UQ) : in;  // NaN compares "not <="
    bad |= _mm512_mask_cmp_ps_mask(keep, a, big, _CMP_NLE_UQ);
    _mm512_storeu_si512(idx + L, _mm512_maskz_compress_epi32(keep, k));
    _mm512_storeu_ps(z + L, _mm512_maskz_compress_ps(keep, v));
    L += __builtin_popcount(keep);
  }
  *nonfinite |= bad != 0;
  return L;
}

// Ops::finish, 16 columns per step: separate multiplies and adds (no FMA), so y matches the driver's loop bit
// for bit; bf16 by the same rounding as float_to_bf16 (the BF16 instructions would flush subnormals to zero).
void finish(const float* acc, int64_t n, const float* scale, const float* zp, float zsum, const float* bias, bool bf16,
            void* y) {
  const __m512 zs = _mm512_set1_ps(zsum);
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff), inf = _mm512_set1_epi32(0x7f800000),
                abs = _mm512_set1_epi32(0x7fffffff), quiet = _mm512_set1_epi32(0x40);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 in = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    __m512 v = _mm512_maskz_loadu_ps(in, acc + j);
    if (scale)
      v = _mm512_mul_ps(_mm512_maskz_loadu_ps(in, scale + j),
                        _mm512_sub_ps(v, _mm512_mul_ps(_mm512_maskz_loadu_ps(in, zp + j), zs)));
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(in, bias + j));
    if (!bf16) {
      _mm512_mask_storeu_ps(static_cast<float*>(y) + j, in, v);
      continue;
    }
    const __m512i u = _mm512_castps_si512(v), hi = _mm512_srli_epi32(u, 16);
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, half), _mm512_and_si512(hi, one)), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, abs), inf);
    const __m512i b = _mm512_mask_or_epi32(rounded, nan, hi, quiet);
    _mm256_mask_storeu_epi16(static_cast<uint16_t*>(y) + j, in, _mm512_cvtepi32_epi16(b));
  }
}

}  // namespace
}  // namespace detail
}  // namespace actsparse

#include "simd_kernels.inc"

namespace actsparse {
namespace detail {

const Ops* ops_avx512() {
  using G = Gemm<Avx512, 6, 4>;  // 24 accumulators + 4 weight vectors + broadcast of the 32 zmm registers
  static const Ops ops = [] {
    Ops o{6, G::NR, rows<Avx512>, u4_apply<Avx512>, G::pack, G::gemm};
    o.live = live;
    o.finish = finish;
    o.rows_multi = rows_multi<Avx512>;
    return o;
  }();
  return &ops;
}

}  // namespace detail
}  // namespace actsparse
