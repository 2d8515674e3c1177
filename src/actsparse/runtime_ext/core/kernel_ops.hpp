#pragma once
// Internal leaf-kernel table. ISA translation units see only this (raw pointers, no std templates),
// so no COMDAT code compiled with -mavx512f can leak into generic code.
#include "actsparse_core.hpp"

namespace actsparse {
namespace detail {

constexpr int64_t kQ8Chunk = 8;          // live rows per int8 activation scale (a multiple of 4)
constexpr int64_t kQ8GroupRows = 4 * kQ8Chunk;  // u4_group_q8 takes groups of up to this many live rows at once
constexpr int64_t kU4ChunkRows = 32;   // u4_group keeps the sums of this many live rows in registers
constexpr int64_t kU4ShortCols = 2048;  // and takes longer groups in such chunks only on row slices this short
constexpr int64_t kQ8KGroup = 32;  // prefill on int8 activations: k per activation scale (the plugin's group size)
constexpr int64_t kQ8MR = 3;       // and rows per q8_gemm tile
constexpr int64_t kLiveSlack = 16;  // Ops::live writes up to this many entries past the last live one

struct Ops {
  int gemm_mr, gemm_nr;  // prefill micro-tile
  // Decode: acc[0..n) += sum_r z[r] * Q[idx[r]][0..n), Q the raw stored values (u8/u4 not dequantised).
  // base points at column 0 of the slice (u4: the slice starts at an even column), rb = row stride in bytes.
  // U4 acc uses an ISA-private layout; only u4_apply reads it. prefetch_l2: where upcoming rows are
  // prefetched to (L2 far ahead, or L1 one group ahead; see Tuning::prefetch_l2).
  void (*rows)(WeightFormat f, float* acc, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx,
               const float* z, int64_t R, bool prefetch_l2);
  // y[0..n) += scale * (acc - zp * zsum) for one U4 group, its scales and zero points from number s of w's
  // (either layout: PackedWeight::scale16)
  void (*u4_apply)(float* y, const float* acc, int64_t n, const PackedWeight& w, int64_t s, float zsum);
  // Dequantise W[k0:k0+kc, n0:n0+nc] into panels out[ceil(nc/NR)][kc][NR], zero padded. n0 % NR == 0.
  void (*pack)(const PackedWeight& w, int64_t k0, int64_t kc, int64_t n0, int64_t nc, float* out);
  // c[mr x nr] += zpan[kc][MR] * wpan[kc][NR]; c row stride ldc; mr <= MR, nr <= NR valid.
  void (*gemm)(const float* zpan, const float* wpan, int64_t kc, float* c, int64_t ldc, int64_t mr, int64_t nr);
  // Optional bf16 prefill (null where the CPU has no bf16 dot product), same MR x NR
  // tiles: values travel as pairs along K in one 32-bit word (row k0 + 2q in the low half, k0 + 2q + 1 in the
  // high). pair_pack: W[k0:k0+kc, n0:n0+nc] (dequantised, rounded to bf16) into out[ceil(nc/NR)][ceil(kc/2)][NR],
  // zero padded.
  void (*pair_pack)(const PackedWeight& w, int64_t k0, int64_t kc, int64_t n0, int64_t nc, uint32_t* out) = nullptr;
  // c[mr x nr] += zpan[kc2][MR] · wpan[kc2][NR], both of bf16 pairs, accumulated in f32.
  void (*pair_gemm)(const uint32_t* zpan, const uint32_t* wpan, int64_t kc2, float* c, int64_t ldc, int64_t mr,
                    int64_t nr) = nullptr;
  // Optional decode on int8 activations (null where the CPU has no int8 dot product). rows_q8, for U8:
  // acc[0..n) += sum over chunks c of qscale[c*kQ8Chunk] * sum_r q[r] * Q[idx[r]][0..n), chunk c holding rows
  // [c*kQ8Chunk, (c+1)*kQ8Chunk) of this call. u4_group_q8, for the live rows of one U4 group: y[0..n) +=
  // scale * (that sum - zp * zsum), with scales and zero points from number s of w's (as u4_apply); acc is
  // scratch for kMaxTileCols floats; idx[R .. R + R_ahead) are the live rows read next (the next group's), to prefetch.
  void (*rows_q8)(float* acc, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx, const int8_t* q,
                  const float* qscale, int64_t R, bool prefetch_l2) = nullptr;
  void (*u4_group_q8)(float* y, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx, const int8_t* q,
                      const float* qscale, int64_t R, const PackedWeight& w, int64_t s, float zsum,
                      bool prefetch_l2, float* acc, int64_t R_ahead) = nullptr;
  // Optional U4 decode of one group's live rows straight into y (null: the driver calls rows() into acc, then
  // u4_apply): y[0..n) += scale * (sum_r z[r] * Q[idx[r]] - zp * zsum), scales and zero points from number s of
  // w's (as u4_apply); acc is scratch for kMaxTileCols floats; idx[R .. R + R_ahead) are the live rows read next,
  // to prefetch.
  void (*u4_group)(float* y, int64_t n, const uint8_t* base, int64_t rb, const int32_t* idx, const float* z, int64_t R,
                   const PackedWeight& w, int64_t s, float zsum, bool prefetch_l2, float* acc, int64_t R_ahead) = nullptr;
  // Optional prefill of U8/U4 on int8 activations (same NR as gemm). q8_pack: the codes of W[k0:k0+kc, n0:n0+nc] as
  // words of four rows' bytes, out[ceil(nc/NR)][kc4][NR], kc4 = kc rounded up to whole kQ8KGroup, over 4; zero padded. q8_gemm: for kQ8MR rows of int8
  // activations qpan[kc4][kQ8MR] (words of four k) with a scale per kQ8KGroup k, sx[kc4/8][kQ8MR] (kc4 a multiple
  // of 8), c[i][j] += scale * (sum over groups of sx * dot - zp * bsum[i]), scale and zero point from number s of
  // w's params on (one number per column: a u8 weight, or one u4 group, the whole kc).
  void (*q8_pack)(const PackedWeight& w, int64_t k0, int64_t kc, int64_t n0, int64_t nc, uint32_t* out) = nullptr;
  void (*q8_gemm)(const int32_t* qpan, const float* sx, const uint32_t* wpan, int64_t kc4, const float* bsum,
                  const PackedWeight& w, int64_t s, float* c, int64_t ldc, int64_t mr, int64_t nr) = nullptr;
  // q8_quantise: one row's z[0..n) (n a multiple of kQ8KGroup) as int8, per group g of kQ8KGroup: scale[g] = max|z| / 127,
  // q = z / scale[g] rounded to nearest even, sq[g] = scale[g] * the sum of its q.
  void (*q8_quantise)(const float* z, int64_t n, int8_t* q, float* scale, float* sq) = nullptr;
  // Decode's U4 rows multiply z rounded to bf16: the driver rounds z (and sums the rounded values).
  bool u4_bf16 = false;
  // Optional decode preparation (null: the driver's scalar loops do the same). live: the live channels of
  // x[0..n) (f32, or bf16 bits when bf16): in order, every k with !mask or !(|x[k] - mode| <= tau) (so NaN and
  // Inf are kept) appends k0 + k to idx and x[k] - mode to z; returns how many. It stores whole vectors:
  // idx and z need kLiveSlack entries of room past the last live one. *nonfinite |= 1 if a kept value is
  // NaN or Inf.
  int64_t (*live)(const void* x, bool bf16, int64_t n, int64_t k0, float mode, float tau, bool mask, int32_t* idx,
                  float* z, int* nonfinite) = nullptr;
  // q8_live: int8 activations for n live values z, in chunks of kQ8Chunk from z[0]: qs[c] = max|z| / 127 of the
  // chunk starting at c, q = z / qs[c] rounded to nearest even, and z becomes qs[c] * q; returns the sum of
  // the new z.
  double (*q8_live)(float* z, int64_t n, int8_t* q, float* qs) = nullptr;
  // Optional decode epilogue (null: the driver's scalar loop, the same arithmetic in the same order): for
  // j < n, v = acc[j], then v = scale[j] * (v - zp[j] * zsum) where scale is not null (U8), then v += bias[j]
  // where bias is not null; y[j] = v, or v rounded to bf16 bits (as float_to_bf16) when bf16.
  void (*finish)(const float* acc, int64_t n, const float* scale, const float* zp, float zsum, const float* bias,
                 bool bf16, void* y) = nullptr;
  // Optional decode of several tokens over one row list, any format but U4 (null: the driver calls rows() per
  // token): acc[t*lda + 0..n) += sum_r z[t*ldz + r] * Q[idx[r]][0..n) for t < M, each row read once per 4 tokens.
  void (*rows_multi)(WeightFormat f, float* acc, int64_t lda, int64_t M, int64_t n, const uint8_t* base, int64_t rb,
                     const int32_t* idx, const float* z, int64_t ldz, int64_t R) = nullptr;
};

#define ACTSPARSE_KERNEL(name, check, automatic) const Ops* ops_##name();
#include "kernels.inc"
#undef ACTSPARSE_KERNEL

}  // namespace detail
}  // namespace actsparse
