// avx512 with AVX512-BF16 dot products (vdpbf16ps): the prefill of BF16 weights or bf16 activations on
// pairs along K, and U4 decode on pairs of rows.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernel_ops.hpp"

namespace actsparse {
namespace detail {
namespace {

// The avx512 GEMM's tile (Gemm<Avx512, 6, 4>): prefill builds the activation panels for gemm_mr rows.
// (No std templates in this file, only internal ones: nothing compiled with -mavx512bf16 may be merged into generic code.)
constexpr int MR = 6, NV = 4, NR = NV * 16;

// The first k of 16 scales / zero points from number s of a U8/U4 weight's params, either layout
// (PackedWeight::scale16); the rest 0.
inline __m512 scale16(const PackedWeight& w, int64_t s, __mmask16 k) {
  return w.scale16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, w.scale16 + s)) : _mm512_maskz_loadu_ps(k, w.scale + s);
}
inline __m512 zero_point16(const PackedWeight& w, int64_t s, __mmask16 k) {
  return w.zp8 ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, w.zp8 + s)))
               : _mm512_maskz_loadu_ps(k, w.zero_point + s);
}

// U8 and U4 codes straight into pairs, 16 columns of two rows per step, dequantised with the scale and zero
// point of their column (U4: and group, either params layout; both rows of a pair are in one group, as k0 and
// the group size are even).
void pack_pairs_quantised(const PackedWeight& w, int64_t k0, int64_t kc, int64_t n0, int64_t nc, uint32_t* out) {
  const bool u4 = w.format == WeightFormat::U4;
  const int64_t kc2 = (kc + 1) / 2, np = (nc + NR - 1) / NR;
  const __m128i nib = _mm_set1_epi8(0x0f);
  for (int64_t j = 0; j < np * NR; j += 16) {
    uint32_t* dst = out + (j / NR) * kc2 * NR + j % NR;
    if (j >= nc) {  // padding columns of the last panel
      for (int64_t q = 0; q < kc2; ++q) _mm512_storeu_si512(dst + q * NR, _mm512_setzero_si512());
      continue;
    }
    int64_t col;
    const uint8_t* base = tile_row(w, k0, n0 + j, col) + row_bytes(w.format, col);
    const int64_t rb = tile_row_bytes(w, n0 + j);
    int64_t ps = -1;  // number of the params in zp and sc
    __m512 zp = _mm512_setzero_ps(), sc = zp;
    auto bf16 = [&](const uint8_t* p) {  // 16 codes (u4: byte i holds column 2i in its low nibble, 2i + 1 high)
      const auto* v128 = reinterpret_cast<const __m128i*>(p);
      __m128i c = u4 ? _mm_loadl_epi64(v128) : _mm_loadu_si128(v128);  // u4: 8 bytes, nothing past the row
      if (u4) c = _mm_unpacklo_epi8(_mm_and_si128(c, nib), _mm_and_si128(_mm_srli_epi16(c, 4), nib));
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c));
      return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_sub_ps(v, zp), sc)));
    };
    for (int64_t q = 0; q < kc2; ++q) {
      const int64_t s = (u4 ? (k0 + 2 * q) / w.group_size * w.N : 0) + n0 + j;
      if (s != ps) {
        ps = s;
        zp = zero_point16(w, s, 0xffff);
        sc = scale16(w, s, 0xffff);
      }
      const uint8_t* a = base + 2 * q * rb;
      _mm512_storeu_si512(dst + q * NR, _mm512_or_si512(bf16(a), 2 * q + 1 < kc ? _mm512_slli_epi32(bf16(a + rb), 16)
                                                                                 : _mm512_setzero_si512()));
    }
  }
}

// f32/f16/u8/u4: each pair of rows dequantised to f32 panels by the avx512 kernel's pack (an L1 buffer),
// then rounded to nearest even; u8 and u4 without the buffer where their 16-column steps cover nc.
constexpr int64_t kMaxPanels = 8;  // nc <= kMaxPanels * NR: the driver's N blocks are at most 256 columns

void pack_pairs_dequantised(const PackedWeight& w, int64_t k0, int64_t kc, int64_t n0, int64_t nc, uint32_t* out) {
  if (nc % 16 == 0 && (w.format == WeightFormat::U8 ||
                        (w.format == WeightFormat::U4 && k0 % 2 == 0 && w.group_size % 2 == 0)))
    return pack_pairs_quantised(w, k0, kc, n0, nc, out);
  const int64_t kc2 = (kc + 1) / 2, np = (nc + NR - 1) / NR;
  alignas(64) float buf[kMaxPanels * 2 * NR];  // [np][2][NR]
  for (int64_t q = 0; q < kc2; ++q) {
    const int64_t rows = 2 * q + 1 < kc ? 2 : 1;
    ops_avx512()->pack(w, k0 + 2 * q, rows, n0, nc, buf);
    for (int64_t p = 0; p < np; ++p)
      for (int v = 0; v < NV; ++v) {
        const float* lo = buf + p * rows * NR + 16 * v;
        const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(lo)));
        const __m512i h = rows == 2 ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(lo + NR)))
                                    : _mm512_setzero_si512();
        _mm512_storeu_si512(out + (p * kc2 + q) * NR + 16 * v, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
      }
  }
}

void pack_pairs(const PackedWeight& w, int64_t k0, int64_t kc, int64_t n0, int64_t nc, uint32_t* out) {
  if (w.format != WeightFormat::BF16) return pack_pairs_dequantised(w, k0, kc, n0, nc, out);
  const int64_t kc2 = (kc + 1) / 2, np = (nc + NR - 1) / NR;
  for (int64_t q = 0; q < kc2; ++q) {
    const bool odd = 2 * q + 1 < kc;
    auto dst = [&](int64_t j) { return out + ((j / NR) * kc2 + q) * NR + j % NR; };
    int64_t j = 0;
    for (; j + 16 <= nc; j += 16) {  // 16 divides tile_cols: a step never straddles a stored tile
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

// U4 decode as bf16 dot products, two rows per vdpbf16ps (instead of widening every code to f32 and one
// FMA per row). The interleaved bytes of two rows, zero-extended to 16-bit words, give for 16 columns
// the pairs (row a, row b): code c becomes the bf16 value 1 + c/16 (1.0 with c in the top four mantissa
// bits), and the broadcast pair (16 z_a, 16 z_b) multiplies it to z (16 + c) exactly, summed in f32.
// The driver rounds z to bf16 (Ops::u4_bf16); u4_rows takes the 16·Σz back off, so acc gets Σ z·c as
// the Ops::rows contract says. Lanes hold even columns, then odd ones, per 32 columns: the layout of the
// avx512 kernel's U4 acc, which its u4_apply reads.
inline void u4_codes(__m128i x, __m128i y, __m512bh& even, __m512bh& odd) {
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(x, y), _mm_unpacklo_epi8(x, y)));
  const __m512i one = _mm512_set1_epi16(0x3f80), top4 = _mm512_set1_epi16(0x78);
  even = (__m512bh)_mm512_ternarylogic_epi32(_mm512_slli_epi16(w, 3), top4, one, 0xea);  // (A & B) | C
  odd = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 1), top4, one, 0xea);
}

inline uint32_t z_pair(float a, float b) {  // (16 a, 16 b) as bf16: exact, a and b are bf16 values
  uint32_t ua, ub;
  a *= 16.f;
  b *= 16.f;
  std::memcpy(&ua, &a, 4);
  std::memcpy(&ub, &b, 4);
  return ua >> 16 | (ub & 0xffff0000u);
}

inline float u4_code(const uint8_t* row, int64_t c) { return float((row[c >> 1] >> ((c & 1) * 4)) & 0xf); }

// acc[0..n) += sum_j z[j] (16 + code_j) - off over the rows p[0..2P) (pairs of rows; a missing second
// row is the first again with z = 0). acc is loaded and stored once per 2P rows.
template <int P, bool L2>
inline void u4_pairs(float* acc, int64_t n, const uint8_t* const* p, const float* z, const uint8_t* const* next,
                     float off) {
  const __m512 offv = _mm512_set1_ps(off);
  __m512bh zp[P];
  for (int j = 0; j < P; ++j) zp[j] = (__m512bh)_mm512_set1_epi32(int(z_pair(z[2 * j], z[2 * j + 1])));
  const int64_t nv = n / 32 * 32;
  for (int64_t c = 0, off = 0; c < nv; c += 32, off += 16) {
    if (next && c % 128 == 0)  // one 64-byte line of each upcoming row per 128 columns
      for (int j = 0; j < 2 * P; ++j) _mm_prefetch(reinterpret_cast<const char*>(next[j] + off), L2 ? _MM_HINT_T1 : _MM_HINT_T0);
    __m512 ae = _mm512_sub_ps(_mm512_loadu_ps(acc + c), offv), ao = _mm512_sub_ps(_mm512_loadu_ps(acc + c + 16), offv);
    for (int j = 0; j < P; ++j) {
      __m512bh e, o;
      u4_codes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[2 * j] + off)),
               _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[2 * j + 1] + off)), e, o);
      ae = _mm512_dpbf16_ps(ae, zp[j], e);
      ao = _mm512_dpbf16_ps(ao, zp[j], o);
    }
    _mm512_storeu_ps(acc + c, ae);
    _mm512_storeu_ps(acc + c + 16, ao);
  }
  for (int64_t c = nv; c < n; ++c) {
    acc[c] -= off;
    for (int j = 0; j < 2 * P; ++j) acc[c] += z[j] * (16.f + u4_code(p[j], c));
  }
}

// Like the avx512 rows for U4: groups of 4 live rows, the rows some groups ahead prefetched (see rows_f).
template <bool L2>
void u4_rows(float* acc, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx, const float* z, int64_t R) {
  constexpr int G = 4;
  constexpr int64_t ahead = L2 ? 4 * G : G;  // 4 groups ahead into L2, or the next group into L1
  float off = 0.f;  // 16·Σz, taken off in the first pass over acc (then 0)
  for (int64_t r = 0; r < R; ++r) off += 16.f * z[r];
  int64_t r = 0;
  for (; r + G <= R; r += G) {
    const uint8_t* p[G];
    const uint8_t* q[G];
    for (int j = 0; j < G; ++j) p[j] = base + int64_t(idx[r + j]) * rb;
    const bool pf = r + ahead + G <= R;
    if (pf)
      for (int j = 0; j < G; ++j) q[j] = base + int64_t(idx[r + ahead + j]) * rb;
    u4_pairs<G / 2, L2>(acc, n, p, z + r, pf ? q : nullptr, off);
    off = 0.f;
  }
  for (; r < R; r += 2) {
    const uint8_t* p[2] = {base + int64_t(idx[r]) * rb, base + int64_t(idx[r + (r + 1 < R)]) * rb};
    const float zz[2] = {z[r], r + 1 < R ? z[r + 1] : 0.f};
    u4_pairs<1, L2>(acc, n, p, zz, nullptr, off);
    off = 0.f;
  }
}

// U8 and U4 decode on int8 activations (AVX512-VNNI), as OpenVINO's own int8/int4 FullyConnected computes by
// default: the driver quantises the live z in chunks of kQ8Chunk rows (one scale each, q = z / scale in
// [-127, 127]), and vpdpbusd multiplies four rows' codes (u8 bytes, or u4 nibbles split into an even- and an
// odd-column byte vector) by their four q at once, summed exactly in int32. Per chunk and 64 code bytes, the
// int32 accumulators stay in registers. U8 adds each chunk into acc (Ops::rows_q8); U4 takes a whole group
// into y (Ops::u4_group_q8).

// a[k] += the products of 64 code bytes of 4 rows with the quad qb. The rows' bytes are interleaved into 32-bit
// words by two rounds of in-lane unpacks, which leaves accumulator k, 128-bit lane L, word j holding byte
// 16L + 4k + j.
inline void dp4(__m512i a[4], __m512i r0, __m512i r1, __m512i r2, __m512i r3, __m512i qb) {
  const __m512i lo01 = _mm512_unpacklo_epi8(r0, r1), hi01 = _mm512_unpackhi_epi8(r0, r1);
  const __m512i lo23 = _mm512_unpacklo_epi8(r2, r3), hi23 = _mm512_unpackhi_epi8(r2, r3);
  a[0] = _mm512_dpbusd_epi32(a[0], _mm512_unpacklo_epi16(lo01, lo23), qb);
  a[1] = _mm512_dpbusd_epi32(a[1], _mm512_unpackhi_epi16(lo01, lo23), qb);
  a[2] = _mm512_dpbusd_epi32(a[2], _mm512_unpacklo_epi16(hi01, hi23), qb);
  a[3] = _mm512_dpbusd_epi32(a[3], _mm512_unpackhi_epi16(hi01, hi23), qb);
}

// dp4's accumulators (as f32) back in byte order: o[l] = bytes 16l .. 16l + 15, the 4 x 4 transpose of 128-bit lanes.
inline void untranspose(const __m512 f[4], __m512 o[4]) {
  const __m512 t0 = _mm512_shuffle_f32x4(f[0], f[1], 0x44), t1 = _mm512_shuffle_f32x4(f[0], f[1], 0xee);
  const __m512 t2 = _mm512_shuffle_f32x4(f[2], f[3], 0x44), t3 = _mm512_shuffle_f32x4(f[2], f[3], 0xee);
  o[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
  o[1] = _mm512_shuffle_f32x4(t0, t2, 0xdd);
  o[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
  o[3] = _mm512_shuffle_f32x4(t1, t3, 0xdd);
}

// The int32 sums of dp4 times the chunk scale s, still in dp4's lane order.
inline void scaled(const __m512i a[4], __m512 s, __m512 f[4]) {
  for (int k = 0; k < 4; ++k) f[k] = _mm512_mul_ps(s, _mm512_cvtepi32_ps(a[k]));
}

// Four q of consecutive live rows from r as one 32-bit word (bytes of rows at or past end: 0).
inline int32_t q_quad(const int8_t* q, int64_t r, int64_t end) {
  uint32_t w = 0;
  for (int j = 0; j < 4; ++j) w |= uint32_t(uint8_t(r + j < end ? q[r + j] : 0)) << (8 * j);
  return int32_t(w);
}

inline __mmask16 first16(int64_t k) { return k >= 16 ? __mmask16(0xffff) : k <= 0 ? __mmask16(0) : __mmask16((1u << k) - 1); }
// The first `bytes` of 64 (all of them from 64 on): the last, partial block of a row reads nothing past its end.
inline __mmask64 first64(int64_t bytes) { return bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1; }

// Even columns e (16) and odd ones o (16) as columns 0..15 (lo) and 16..31 (hi).
inline void interleave(__m512 e, __m512 o, __m512& lo, __m512& hi) {
  lo = _mm512_permutex2var_ps(e, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23), o);
  hi = _mm512_permutex2var_ps(e, _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31), o);
}

// U4's acc keeps each 64 code bytes' (128 columns') f32 sums in dp4's lane order, the even nibbles' then the odd
// ones' (u4_group_q8 puts them in column order once per group, not once per chunk). A last, partial block is read
// with masked loads (zeros past the row's end); U8 writes only acc[0..n), U4 the whole last 128 columns.
template <bool U4, bool L2>
void rows_q8_f(float* acc, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx, const int8_t* q,
               const float* scale, int64_t R, int64_t R_ahead = 0) {
  constexpr int C = int(kQ8Chunk), NG = C / 4;
  constexpr int64_t ahead = L2 ? 2 * C : C;  // rows ahead whose lines are prefetched: 2 chunks into L2, or the next into L1
  constexpr int64_t BC = U4 ? 128 : 64;      // columns per 64 code bytes
  const int64_t nb = (n + BC - 1) / BC * BC;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  for (int64_t c0 = 0; c0 < R; c0 += C) {
    const int64_t c1 = std::min(R, c0 + C);
    const uint8_t* p[C];
    const uint8_t* next[C];
    int32_t qw[NG];
    for (int j = 0; j < C; ++j) {
      const int64_t r = c0 + j;  // rows past the chunk: its first row again, times 0
      p[j] = base + int64_t(idx[r < c1 ? r : c0]) * rb;
      next[j] = r + ahead < R + R_ahead ? base + int64_t(idx[r + ahead]) * rb : nullptr;
    }
    for (int g = 0; g < NG; ++g) qw[g] = q_quad(q, c0 + 4 * g, c1);
    const __m512 sv = _mm512_set1_ps(scale[c0]);
    for (int64_t c = 0, off = 0; c < nb; c += BC, off += 64) {
      const __mmask64 m = first64(row_bytes(U4 ? WeightFormat::U4 : WeightFormat::U8, n - c));
      for (int j = 0; j < C; ++j)
        if (next[j]) _mm_prefetch(reinterpret_cast<const char*>(next[j] + off), L2 ? _MM_HINT_T1 : _MM_HINT_T0);
      __m512i a[4], b[4];
      for (int k = 0; k < 4; ++k) a[k] = b[k] = _mm512_setzero_si512();
      for (int g = 0; g < NG; ++g) {
        __m512i r[4];
        for (int j = 0; j < 4; ++j) r[j] = _mm512_maskz_loadu_epi8(m, p[4 * g + j] + off);
        const __m512i qb = _mm512_set1_epi32(qw[g]);
        if constexpr (U4) {
          __m512i h[4];
          for (int j = 0; j < 4; ++j) {
            h[j] = _mm512_and_si512(_mm512_srli_epi16(r[j], 4), nib);
            r[j] = _mm512_and_si512(r[j], nib);
          }
          dp4(b, h[0], h[1], h[2], h[3], qb);
        }
        dp4(a, r[0], r[1], r[2], r[3], qb);
      }
      if constexpr (U4) {  // the block's 128 floats: its even-nibble sums in dp4's lane order, then the odd ones
        float* d = acc + c;
        for (int k = 0; k < 4; ++k) {
          _mm512_storeu_ps(d + 16 * k, _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(a[k]), _mm512_loadu_ps(d + 16 * k)));
          _mm512_storeu_ps(d + 64 + 16 * k, _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(b[k]), _mm512_loadu_ps(d + 64 + 16 * k)));
        }
      } else {
        __m512 f[4], e[4];
        scaled(a, sv, f);
        untranspose(f, e);
        for (int l = 0; l < 4; ++l) {
          const __mmask16 k = first16(n - c - 16 * l);
          float* d = acc + c + 16 * l;
          _mm512_mask_storeu_ps(d, k, _mm512_add_ps(e[l], _mm512_maskz_loadu_ps(k, d)));
        }
      }
    }
  }
}

void rows_q8(float* acc, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx, const int8_t* q,
             const float* scale, int64_t R, bool prefetch_l2) {
  return prefetch_l2 ? rows_q8_f<false, true>(acc, n, base, rb, idx, q, scale, R)
                     : rows_q8_f<false, false>(acc, n, base, rb, idx, q, scale, R);
}

// y[c .. c + 128) (the columns below n) += scale * (sum - zp * zsum) for one 128-column block of a U4 group, its
// sums given as f32 in dp4's lane order, of the even (fa) and the odd (fb) nibbles.
inline void u4_apply_block(float* y, int64_t c, int64_t n, const __m512 fa[4], const __m512 fb[4], const PackedWeight& w,
                           int64_t s, __m512 zsv) {
  __m512 e[4], o[4];  // even columns 32l + 0, 2, .., 30 and the odd ones
  untranspose(fa, e);
  untranspose(fb, o);
  for (int l = 0; l < 4 && c + 32 * l < n; ++l) {
    __m512 v[2];
    interleave(e[l], o[l], v[0], v[1]);
    for (int h = 0; h < 2; ++h) {
      const int64_t col = c + 32 * l + 16 * h;
      const __mmask16 k = first16(n - col);
      const __m512 t = _mm512_fnmadd_ps(zero_point16(w, s + col, k), zsv, v[h]);
      _mm512_mask_storeu_ps(y + col, k, _mm512_fmadd_ps(scale16(w, s + col, k), t, _mm512_maskz_loadu_ps(k, y + col)));
    }
  }
}

// U4 on int8 activations, one group of at most kQ8GroupRows live rows straight into y, without an acc buffer
// or a second pass over it (sparse groups, where those passes cost as much as the rows). Per 64 code bytes
// (128 columns), each chunk's int32 sums of the even and the odd nibbles go into f32 accumulators scaled by
// the chunk's one scale, still in dp4's lane order; they are put back in column order once, and
// y += scale * (acc - zp * zsum). Longer groups go to rows_q8_f, which streams them faster.
template <bool L2>
void u4_group_q8_f(float* y, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx, const int8_t* q,
                   const float* qscale, int64_t R, const PackedWeight& w, int64_t s, float zsum, int64_t R_ahead) {
  constexpr int C = int(kQ8Chunk), NG = C / 4;
  constexpr int64_t ahead = 256;  // bytes of each row prefetched beyond the current 64
  const int64_t nb = (n + 127) / 128 * 128, nc = (R + C - 1) / C;
  const __m512i nib = _mm512_set1_epi8(0x0f);
  const uint8_t* p[kQ8GroupRows];
  int32_t qw[kQ8GroupRows / 4];
  for (int64_t r = 0; r < nc * C; ++r) p[r] = base + int64_t(idx[r < R ? r : 0]) * rb;  // past R: row 0, times 0
  for (int64_t g = 0; g < nc * NG; ++g) qw[g] = q_quad(q, 4 * g, R);
  const __m512 zsv = _mm512_set1_ps(zsum);
  for (int64_t c = 0, off = 0; c < nb; c += 128, off += 64) {
    const __mmask64 m = first64(row_bytes(WeightFormat::U4, n - c));
    if (L2)  // the next group's rows, the same 64 bytes: by the end of this pass they are on their way to L2
      for (int64_t j = R; j < R + std::min(R_ahead, kQ8GroupRows); ++j)
        _mm_prefetch(reinterpret_cast<const char*>(base + int64_t(idx[j]) * rb + off), _MM_HINT_T1);
    __m512 fa[4], fb[4];
    for (int k = 0; k < 4; ++k) fa[k] = fb[k] = _mm512_setzero_ps();
    for (int64_t ci = 0; ci < nc; ++ci) {
      __m512i a[4], b[4];
      for (int k = 0; k < 4; ++k) a[k] = b[k] = _mm512_setzero_si512();
      for (int g = 0; g < NG; ++g) {
        const uint8_t* const* pg = p + ci * C + 4 * g;
        __m512i lo[4], hi[4];
        for (int j = 0; j < 4; ++j) {
          if (L2) _mm_prefetch(reinterpret_cast<const char*>(pg[j] + off + ahead), _MM_HINT_T1);
          const __m512i v = _mm512_maskz_loadu_epi8(m, pg[j] + off);
          lo[j] = _mm512_and_si512(v, nib);
          hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        }
        const __m512i qb = _mm512_set1_epi32(qw[ci * NG + g]);
        dp4(a, lo[0], lo[1], lo[2], lo[3], qb);
        dp4(b, hi[0], hi[1], hi[2], hi[3], qb);
      }
      // the chunk's one scale applies to every lane alike, so the sums stay in dp4's lane order until the end
      const __m512 sv = _mm512_set1_ps(qscale[ci * C]);
      for (int k = 0; k < 4; ++k) {
        fa[k] = _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(a[k]), fa[k]);
        fb[k] = _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(b[k]), fb[k]);
      }
    }
    u4_apply_block(y, c, n, fa, fb, w, s, zsv);
  }
}

void u4_group_q8(float* y, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx, const int8_t* q,
                 const float* qscale, int64_t R, const PackedWeight& w, int64_t s, float zsum, bool prefetch_l2,
                 float* acc, int64_t R_ahead) {
  if (R <= kQ8GroupRows)
    return prefetch_l2 ? u4_group_q8_f<true>(y, n, base, rb, idx, q, qscale, R, w, s, zsum, R_ahead)
                       : u4_group_q8_f<false>(y, n, base, rb, idx, q, qscale, R, w, s, zsum, R_ahead);
  // A longer group goes chunk by chunk into acc (rows_q8_f), then into y once.
  const int64_t nb = (n + 127) / 128 * 128;
  std::memset(acc, 0, sizeof(float) * size_t(nb));
  if (prefetch_l2) rows_q8_f<true, true>(acc, n, base, rb, idx, q, qscale, R, R_ahead);
  else rows_q8_f<true, false>(acc, n, base, rb, idx, q, qscale, R, R_ahead);
  const __m512 zsv = _mm512_set1_ps(zsum);
  for (int64_t c = 0; c < nb; c += 128) {
    __m512 fa[4], fb[4];
    for (int k = 0; k < 4; ++k) {
      fa[k] = _mm512_loadu_ps(acc + c + 16 * k);
      fb[k] = _mm512_loadu_ps(acc + c + 64 + 16 * k);
    }
    u4_apply_block(y, c, n, fa, fb, w, s, zsv);
  }
}

// Four rows' 64 code bytes r[0..4) into the U4 sums of 128 columns, as u4_codes but without its shuffles per 16
// bytes: dp4's two rounds of in-lane unpacks put byte i of the four rows in one 32-bit lane (rows 0, 1 in its low
// word, 2, 3 in its high one), and shifts pick each nibble into a bf16 pair: rows (0, 2) and (1, 3), their z
// pairs z02 and z13. ae[k] / ao[k]: the even / odd columns, in dp4's lane order.
inline void u4_quad(const __m512i r[4], __m512bh z02, __m512bh z13, __m512 ae[4], __m512 ao[4]) {
  const __m512i one = _mm512_set1_epi16(0x3f80), top4 = _mm512_set1_epi16(0x78);
  auto code = [&](__m512i v) { return (__m512bh)_mm512_ternarylogic_epi32(v, top4, one, 0xea); };  // (A & B) | C
  const __m512i ab0 = _mm512_unpacklo_epi8(r[0], r[1]), ab1 = _mm512_unpackhi_epi8(r[0], r[1]);
  const __m512i cd0 = _mm512_unpacklo_epi8(r[2], r[3]), cd1 = _mm512_unpackhi_epi8(r[2], r[3]);
  const __m512i l[4] = {_mm512_unpacklo_epi16(ab0, cd0), _mm512_unpackhi_epi16(ab0, cd0), _mm512_unpacklo_epi16(ab1, cd1),
                        _mm512_unpackhi_epi16(ab1, cd1)};
  for (int k = 0; k < 4; ++k) {  // a word's low byte holds rows 0 / 2, its high byte rows 1 / 3
    ae[k] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(ae[k], z02, code(_mm512_slli_epi16(l[k], 3))), z13, code(_mm512_srli_epi16(l[k], 5)));
    ao[k] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(ao[k], z02, code(_mm512_srli_epi16(l[k], 1))), z13, code(_mm512_srli_epi16(l[k], 9)));
  }
}

// Ops::u4_group: one group's live rows straight into y. Per 128 columns (64 code bytes of each row), the sums of a
// chunk of rows stay in registers, four rows at a time (u4_quad); a group of several chunks adds them into acc
// (the same lane order), and its last chunk applies the group's scale and zero point into y, so no pass clears
// acc or reads it back only to apply. A chunk is up to kU4ChunkRows rows. Rows are prefetched a few lines ahead,
// across the end of the chunk's rows into the next chunk's (or group's: R_ahead). A last, partial block is read
// with masked loads, nothing past the row's end. Longer groups on long row slices go to u4_rows and u4_apply.
template <bool L2>
void u4_group_f(float* y, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx, const float* z, int64_t R,
                const PackedWeight& w, int64_t s, float zsum, float* acc, int64_t R_ahead) {
  constexpr int CH = int(kU4ChunkRows), QM = CH / 4;
  float bias16 = 0.f;  // 16·Σz: each code c multiplies as 16 + c (see u4_codes)
  for (int64_t r = 0; r < R; ++r) bias16 += 16.f * z[r];
  const __m512 offv = _mm512_set1_ps(bias16), zsv = _mm512_set1_ps(zsum);
  const int64_t nb = (n + 127) / 128 * 128, lines = nb / 128;
  // prefetch distance: a few lines, at most a row (short rows: the next chunk's same line)
  const int64_t d = 64 * std::min<int64_t>(lines, L2 ? 32 : 8);
  constexpr auto hint = L2 ? _MM_HINT_T1 : _MM_HINT_T0;
  for (int64_t c0 = 0; c0 < R; c0 += CH) {
    const int64_t c1 = std::min(R, c0 + CH), Q = (c1 - c0 + 3) / 4, nn = std::min<int64_t>(CH, R + R_ahead - c1);
    const bool first = c0 == 0, last = c1 == R;
    const uint8_t* p[CH];
    const uint8_t* next[CH];
    __m512bh zq[2 * QM];
    auto zr = [&](int64_t j) { return c0 + j < c1 ? z[c0 + j] : 0.f; };
    for (int64_t j = 0; j < 4 * Q; ++j) p[j] = base + int64_t(idx[std::min(c0 + j, c1 - 1)]) * rb;  // past c1: a row again, times 0
    for (int64_t q = 0; q < Q; ++q) {
      zq[2 * q] = (__m512bh)_mm512_set1_epi32(int(z_pair(zr(4 * q), zr(4 * q + 2))));
      zq[2 * q + 1] = (__m512bh)_mm512_set1_epi32(int(z_pair(zr(4 * q + 1), zr(4 * q + 3))));
    }
    for (int64_t j = 0; j < nn; ++j) next[j] = base + int64_t(idx[c1 + j]) * rb;
    for (int64_t c = 0, off = 0; c < nb; c += 128, off += 64) {
      const __mmask64 m = first64(row_bytes(WeightFormat::U4, n - c));
      // the line d ahead in the chunk's rows followed by the next chunk's
      if (off + d < lines * 64)
        for (int64_t j = 0; j < c1 - c0; ++j) _mm_prefetch(reinterpret_cast<const char*>(p[j] + off + d), hint);
      else
        for (int64_t j = 0; j < nn; ++j) _mm_prefetch(reinterpret_cast<const char*>(next[j] + off + d - lines * 64), hint);
      __m512 ae[4], ao[4];
      for (int k = 0; k < 4; ++k) {
        ae[k] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + c + 16 * k);
        ao[k] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(acc + c + 64 + 16 * k);
      }
      for (int64_t q = 0; q < Q; ++q) {
        __m512i r[4];
        for (int j = 0; j < 4; ++j) r[j] = _mm512_maskz_loadu_epi8(m, p[4 * q + j] + off);
        u4_quad(r, zq[2 * q], zq[2 * q + 1], ae, ao);
      }
      for (int k = 0; k < 4; ++k) {
        if (!last) {
          _mm512_storeu_ps(acc + c + 16 * k, ae[k]);
          _mm512_storeu_ps(acc + c + 64 + 16 * k, ao[k]);
        } else {
          ae[k] = _mm512_sub_ps(ae[k], offv);
          ao[k] = _mm512_sub_ps(ao[k], offv);
        }
      }
      if (last) u4_apply_block(y, c, n, ae, ao, w, s, zsv);
    }
  }
}

void u4_group(float* y, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx, const float* z, int64_t R,
              const PackedWeight& w, int64_t s, float zsum, bool prefetch_l2, float* acc, int64_t R_ahead) {
  // a dense group's long rows stream faster four at a time through acc, as rows() reads them (docs/op.md)
  if (R > kU4ChunkRows && n > kU4ShortCols) {
    std::memset(acc, 0, sizeof(float) * size_t(n));
    if (prefetch_l2) u4_rows<true>(acc, n, base, rb, idx, z, R);
    else u4_rows<false>(acc, n, base, rb, idx, z, R);
    return ops_avx512()->u4_apply(y, acc, n, w, s, zsum);
  }
  return prefetch_l2 ? u4_group_f<true>(y, n, base, rb, idx, z, R, w, s, zsum, acc, R_ahead)
                     : u4_group_f<false>(y, n, base, rb, idx, z, R, w, s, zsum, acc, R_ahead);
}

// Prefill on int8 activations (VNNI). Weight codes go into words of four consecutive rows' bytes per column
// ([kc4][NR] words per NR-column panel, kc rounded up to whole kQ8KGroup; u4 nibbles widened to bytes; rows past
// kc and columns past nc are 0),
// so that vpdpbusd multiplies four k of 16 columns by the four int8 activations of one row at once.
void q8_pack(const PackedWeight& w, int64_t k0, int64_t kc, int64_t n0, int64_t nc, uint32_t* out) {
  const bool u4 = w.format == WeightFormat::U4;
  const int64_t kc4 = (kc + kQ8KGroup - 1) / kQ8KGroup * kQ8KGroup / 4;  // whole activation groups
  // 64 codes of row k0 + k from column n0 + j, as bytes: 0 past kc and past nc (masked loads read nothing there;
  // 64 divides tile_cols and n0, so no panel straddles a stored tile)
  auto codes64 = [&](int64_t k, int64_t j) {
    if (k >= kc) return _mm512_setzero_si512();
    const __mmask64 m = first64(nc - j);
    int64_t col;
    const uint8_t* row = tile_row(w, k0 + k, n0 + j, col);
    if (!u4) return _mm512_maskz_loadu_epi8(m, row + col);
    const __m512i c = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(__mmask32(first64((nc - j + 1) / 2)), row + col / 2));
    return _mm512_maskz_mov_epi8(m, _mm512_or_si512(_mm512_and_si512(c, _mm512_set1_epi16(0x0f)),
                                                    _mm512_slli_epi16(_mm512_and_si512(c, _mm512_set1_epi16(0xf0)), 4)));
  };
  for (int64_t j = 0; j < nc; j += NR) {  // NR = 64: one panel per step, its padding columns 0
    uint32_t* dst = out + (j / NR) * kc4 * NR;
    for (int64_t q = 0; q < kc4; ++q, dst += NR) {
      const __m512i a = codes64(4 * q, j), b = codes64(4 * q + 1, j), c = codes64(4 * q + 2, j), d = codes64(4 * q + 3, j);
      const __m512i ab0 = _mm512_unpacklo_epi8(a, b), ab1 = _mm512_unpackhi_epi8(a, b);
      const __m512i cd0 = _mm512_unpacklo_epi8(c, d), cd1 = _mm512_unpackhi_epi8(c, d);
      // lane L of these holds the words of columns 16L + 0..3, 4..7, 8..11, 12..15: back in column order
      const __m512 wd[4] = {_mm512_castsi512_ps(_mm512_unpacklo_epi16(ab0, cd0)), _mm512_castsi512_ps(_mm512_unpackhi_epi16(ab0, cd0)),
                            _mm512_castsi512_ps(_mm512_unpacklo_epi16(ab1, cd1)), _mm512_castsi512_ps(_mm512_unpackhi_epi16(ab1, cd1))};
      __m512 o[4];
      untranspose(wd, o);
      for (int l = 0; l < 4; ++l) _mm512_storeu_ps(reinterpret_cast<float*>(dst + 16 * l), o[l]);
    }
  }
}

// One row's z (n values, a multiple of kQ8KGroup; with a NaN or Inf the result is meaningless, and the driver drops it) to int8: per group of kQ8KGroup, scale = max|z| / 127
// and q = z / scale rounded to nearest even (cvtps rounds so; |z| <= max|z| keeps it within [-127, 127]),
// sq = scale * sum of q.
void q8_quantise(const float* z, int64_t n, int8_t* q, float* scale, float* sq) {
  for (int64_t g = 0; g < n / kQ8KGroup; ++g) {
    const __m512 v0 = _mm512_loadu_ps(z + 32 * g), v1 = _mm512_loadu_ps(z + 32 * g + 16);
    const float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const __m512 inv = _mm512_set1_ps(m > 0.f ? 127.f / m : 0.f);
    const __m512i r0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)), r1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * g), _mm512_cvtepi32_epi8(r0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * g + 16), _mm512_cvtepi32_epi8(r1));
    scale[g] = m / 127.f;
    sq[g] = scale[g] * float(_mm512_reduce_add_epi32(_mm512_add_epi32(r0, r1)));
  }
}

// Ops::q8_live, two chunks of kQ8Chunk (= 8) per step: each 256-bit half finds its own max |z|.
double q8_live(float* z, int64_t n, int8_t* q, float* qs) {
  static_assert(kQ8Chunk == 8, "two chunks per 512-bit step");
  double total = 0.0;
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 in = first16(n - c);
    const __m512 v = _mm512_maskz_loadu_ps(in, z + c);
    __m512 m = _mm512_abs_ps(v);
    m = _mm512_max_ps(m, _mm512_permute_ps(m, 0xb1));                  // neighbours
    m = _mm512_max_ps(m, _mm512_permute_ps(m, 0x4e));                  // pairs
    m = _mm512_max_ps(m, _mm512_shuffle_f32x4(m, m, 0xb1));           // 128-bit lanes within each half
    const __m512 scale = _mm512_div_ps(m, _mm512_set1_ps(127.f));
    const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(127.f), m);
    __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));  // to nearest even
    r = _mm512_min_epi32(_mm512_max_epi32(r, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
    _mm_mask_storeu_epi8(q + c, in, _mm512_cvtepi32_epi8(r));
    const __m512 zq = _mm512_maskz_mul_ps(in, scale, _mm512_cvtepi32_ps(r));
    _mm512_mask_storeu_ps(z + c, in, zq);
    qs[c] = _mm512_cvtss_f32(scale);
    if (c + 8 < n) qs[c + 8] = _mm512_cvtss_f32(_mm512_shuffle_f32x4(scale, scale, 0x0e));
    total += double(_mm512_reduce_add_ps(zq));
  }
  return total;
}

// c[mr x nr] += scale * (A - zp * bsum[i]) for kQ8MR rows and NR columns, A = sum over the kc4 words of groups of
// kQ8KGroup k: sx[group][i] * (int32 dot of that group), scale and zero point from number s of w's params onward
// (one weight group, or per column for u8). qpan: [kc4][kQ8MR] words of four int8 activations; sx: [kc4 / 8][kQ8MR].
void q8_gemm(const int32_t* qpan, const float* sx, const uint32_t* wpan, int64_t kc4, const float* bsum,
             const PackedWeight& w, int64_t s, float* c, int64_t ldc, int64_t mr, int64_t nr) {
  constexpr int QM = int(kQ8MR), KW = int(kQ8KGroup / 4);  // rows, words per activation group
  __m512 f[QM][NV];
  for (int i = 0; i < QM; ++i)
    for (int v = 0; v < NV; ++v) f[i][v] = _mm512_setzero_ps();
  for (int64_t g = 0; g < kc4 / KW; ++g) {
    __m512i a[QM][NV];
    for (int i = 0; i < QM; ++i)
      for (int v = 0; v < NV; ++v) a[i][v] = _mm512_setzero_si512();
    for (int t = 0; t < KW; ++t) {
      const int64_t q = g * KW + t;
      __m512i wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_si512(wpan + q * NR + v * 16);
      for (int i = 0; i < QM; ++i) {
        const __m512i b = _mm512_set1_epi32(qpan[q * QM + i]);
        for (int v = 0; v < NV; ++v) a[i][v] = _mm512_dpbusd_epi32(a[i][v], wv[v], b);
      }
    }
    for (int i = 0; i < QM; ++i) {
      const __m512 sv = _mm512_set1_ps(sx[g * QM + i]);
      for (int v = 0; v < NV; ++v) f[i][v] = _mm512_fmadd_ps(sv, _mm512_cvtepi32_ps(a[i][v]), f[i][v]);
    }
  }
  for (int v = 0; v < NV && 16 * v < nr; ++v) {
    const __mmask16 k = first16(nr - 16 * v);
    const __m512 sc = scale16(w, s + 16 * v, k), zp = zero_point16(w, s + 16 * v, k);
    for (int i = 0; i < QM && i < mr; ++i) {
      float* ci = c + i * ldc + 16 * v;
      const __m512 t = _mm512_fnmadd_ps(zp, _mm512_set1_ps(bsum[i]), f[i][v]);
      _mm512_mask_storeu_ps(ci, k, _mm512_fmadd_ps(sc, t, _mm512_maskz_loadu_ps(k, ci)));
    }
  }
}

void rows(WeightFormat f, float* acc, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx, const float* z,
          int64_t R, bool prefetch_l2) {
  if (f == WeightFormat::U4)
    return prefetch_l2 ? u4_rows<true>(acc, n, base, rb, idx, z, R) : u4_rows<false>(acc, n, base, rb, idx, z, R);
  ops_avx512()->rows(f, acc, n, base, rb, idx, z, R, prefetch_l2);
}

}  // namespace

const Ops* ops_avx512bf16() {
  static const Ops ops = [] {
    Ops o = *ops_avx512();
    o.pair_pack = pack_pairs;
    o.pair_gemm = gemm_pairs;
    o.rows = rows;
    o.u4_bf16 = true;
    o.rows_q8 = rows_q8;
    o.u4_group_q8 = u4_group_q8;
    o.u4_group = u4_group;
    o.q8_pack = q8_pack;
    o.q8_gemm = q8_gemm;
    o.q8_quantise = q8_quantise;
    o.q8_live = q8_live;
    return o;
  }();
  return &ops;
}

}  // namespace detail
}  // namespace actsparse
