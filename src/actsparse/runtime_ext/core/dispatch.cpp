// Kernel selection and the format-independent driver: live-channel lists, tiling, threading, epilogues.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>
#include <stdexcept>

#include "kernel_ops.hpp"
#include "tuning.hpp"

namespace actsparse {
namespace {

using detail::Ops;

struct KernelEntry { const char* name; bool (*supported)(); bool automatic; const Ops* (*ops)(); };

const KernelEntry kKernels[] = {
#define ACTSPARSE_KERNEL(name, check, automatic) {#name, [] { return bool(check); }, automatic, detail::ops_##name},
#include "kernels.inc"
#undef ACTSPARSE_KERNEL
};

const KernelEntry* find_kernel(const char* name) {
  if (!name || !*name) {  // best = last supported automatic entry, or $ACTSPARSE_KERNEL; picked once
    static const KernelEntry* best = [] {
      const char* forced = std::getenv("ACTSPARSE_KERNEL");
      if (forced && *forced) return find_kernel(forced);
      const KernelEntry* b = nullptr;
      for (const auto& k : kKernels)
        if (k.supported() && k.automatic) b = &k;
      return b;
    }();
    return best;
  }
  for (const auto& k : kKernels)
    if (std::strcmp(k.name, name) == 0) {
      if (!k.supported()) throw std::invalid_argument(std::string("kernel not supported on this CPU: ") + name);
      return &k;
    }
  throw std::invalid_argument(std::string("unknown kernel: ") + name);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// The knobs of Tuning (read with relaxed loads on every call: cheaper than a getenv).
const Tuning kLoaded = detail::loaded_tuning().tuning;
std::atomic<int64_t> g_par_bytes{kLoaded.par_bytes};
std::atomic<char> g_split{kLoaded.split};
std::atomic<bool> g_prefetch_l2{kLoaded.prefetch_l2};
std::atomic<int64_t> g_decode_max_rows{kLoaded.decode_max_rows};
std::atomic<int64_t> g_union_pct{kLoaded.union_pct};

template <class T>
std::unique_ptr<T[]> scratch(int64_t n) { return std::unique_ptr<T[]>(new T[size_t(std::max<int64_t>(n, 1))]); }

// ---------------------------------------------------------------------------------------------
// Decode (M small): per row, the list of live channels, then stream only those weight rows.

struct LiveRow {
  int32_t* idx;
  float* z;
  int64_t L = 0;
  float zsum = 0.f;    // U8: sum of z
  int64_t* gpos;       // live positions [gpos[g], gpos[g+1]) belong to group g (U4; one group otherwise)
  float* gsum;         // U4: sum of z per group
  int8_t* q;           // int8 activations: z / scale of its chunk of kQ8Chunk live rows
  float* qs;           // the scale of the chunk starting at each position
};

// bf16: x and y hold bf16 values (uint16 bits), widened as the live rows are built and rounded as y is
// written.
void decode(const Ops& ops, const void* xv, int64_t M, const PackedWeight& w, const float* bias, const Params& p,
            void* yv, bool bf16, const Executor& ex) {
  const WeightFormat f = w.format;
  const int64_t K = w.K, N = w.N, rb = row_bytes(f, N);  // bytes of one whole (all-tile) row
  const int64_t ng = f == WeightFormat::U4 ? K / w.group_size : 1;
  auto idx_buf = scratch<int32_t>(M * K + detail::kLiveSlack);
  auto z_buf = scratch<float>(M * K + detail::kLiveSlack);
  auto gpos_buf = scratch<int64_t>(M * (ng + 1));
  auto gsum_buf = scratch<float>(M * ng);
  std::vector<LiveRow> rows(static_cast<size_t>(M));
  int64_t live_total = 0;
  int nonfinite = 0;
  for (int64_t i = 0; i < M; ++i) {
    LiveRow& r = rows[i];
    r.idx = idx_buf.get() + i * K;
    r.z = z_buf.get() + i * K;
    r.gpos = gpos_buf.get() + i * (ng + 1);
    r.gsum = gsum_buf.get() + i * ng;
    auto x_at = [&](int64_t k) {
      return bf16 ? bf16_bits_to_float(static_cast<const uint16_t*>(xv)[i * K + k]) : static_cast<const float*>(xv)[i * K + k];
    };
    const int64_t gs = f == WeightFormat::U4 ? w.group_size : K;
    int64_t L = 0;
    for (int64_t g = 0; g < ng; ++g) {
      r.gpos[g] = L;
      if (ops.live) {  // AVX-512: a mask and a compress per 16 channels, far cheaper than the loop below
        const auto* xg = static_cast<const char*>(xv) + (i * K + g * gs) * (bf16 ? 2 : 4);
        L += ops.live(xg, bf16, gs, g * gs, p.mode, p.threshold, p.mask, r.idx + L, r.z + L, &nonfinite);
        continue;
      }
      // Branch-free: at s = 0.5 a branch on keep mispredicts every other channel, which costs more than the
      // call's weight rows on short ones.
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
        const float v = x_at(k) - p.mode, a = std::fabs(v);
        r.idx[L] = int32_t(k);
        r.z[L] = v;
        const int keep = int(!p.mask) | int(!(a <= p.threshold));  // NaN/Inf are kept
        L += keep;
        nonfinite |= keep & int(!(a <= std::numeric_limits<float>::max()));
      }
    }
    r.gpos[ng] = L;
    r.L = L;
    live_total += L;
  }

  // U8/U4: z as the kernel multiplies it, and the zero-point sums (zsum; U4: gsum per group) of exactly those
  // values. With int8 activations, each chunk of kQ8Chunk live rows (U4: counted from the start of its group)
  // gets the scale max|z| / 127 and z becomes scale * q; a NaN or Inf among the live values keeps a call off
  // them. Otherwise U4 on a kernel with bf16 rows (Ops::u4_bf16) rounds z to bf16.
  const bool q8 = (f == WeightFormat::U8 || f == WeightFormat::U4) && p.int8_activations && ops.rows_q8 && !nonfinite;
  const bool round = f == WeightFormat::U4 && ops.u4_bf16 && !q8;
  auto q_buf = scratch<int8_t>(q8 ? M * K : 0);
  auto qs_buf = scratch<float>(q8 ? M * K : 0);
  for (int64_t i = 0; i < M && (f == WeightFormat::U8 || f == WeightFormat::U4); ++i) {
    LiveRow& r = rows[i];
    if (q8) {
      r.q = q_buf.get() + i * K;
      r.qs = qs_buf.get() + i * K;
    }
    double total = 0.0;
    for (int64_t g = 0; g < ng; ++g) {
      if (q8 && ops.q8_live) {  // the same per group, two chunks per 512-bit step
        const int64_t a = r.gpos[g];
        r.gsum[g] = float(ops.q8_live(r.z + a, r.gpos[g + 1] - a, r.q + a, r.qs + a));
        total += r.gsum[g];
        continue;
      }
      double gs = 0.0;
      for (int64_t c0 = r.gpos[g]; c0 < r.gpos[g + 1]; c0 += detail::kQ8Chunk) {
        const int64_t c1 = std::min(r.gpos[g + 1], c0 + detail::kQ8Chunk);
        float m = 0.f;
        for (int64_t k = c0; q8 && k < c1; ++k) m = std::max(m, std::fabs(r.z[k]));
        const float scale = m / 127.f, inv = m > 0.f ? 127.f / m : 0.f;
        if (q8) r.qs[c0] = scale;
        for (int64_t k = c0; k < c1; ++k) {
          if (q8) {
            // to nearest even without a libm call: |z * inv| <= 127, far below 2^22
            const float qk = std::min(127.f, std::max(-127.f, (r.z[k] * inv + 0x1.8p23f) - 0x1.8p23f));
            r.q[k] = int8_t(qk);
            r.z[k] = scale * qk;
          } else if (round) {
            r.z[k] = bf16_bits_to_float(float_to_bf16(r.z[k]));
          }
          gs += r.z[k];
        }
      }
      r.gsum[g] = float(gs);
      total += gs;
    }
    r.zsum = float(total);
  }

  // Several tokens: one list of the rows live in any of them, each token's z 0 where it pruned the row, so that
  // a call reads and converts each row once per four tokens instead of once per token (continuous batching sends
  // such calls). That multiplies every token by the whole union, so it pays only while the union is dense next
  // to the tokens' own lists (docs/op.md). U4 (an ISA-private accumulator per group) and int8 activations keep a
  // list per token.
  bool multi = M > 1 && !q8 && f != WeightFormat::U4 && ops.rows_multi;
  std::vector<int32_t> uidx, upos;  // the union's rows, and each row's position in it (-1: in none)
  std::vector<float> uz;            // [M][union]
  if (multi) {
    upos.assign(static_cast<size_t>(K), -1);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t l = 0; l < rows[i].L; ++l) upos[size_t(rows[i].idx[l])] = 0;
    for (int64_t k = 0; k < K; ++k)
      if (upos[size_t(k)] == 0) {
        upos[size_t(k)] = int32_t(uidx.size());
        uidx.push_back(int32_t(k));
      }
    const int64_t U = int64_t(uidx.size());
    // the union holds at most union_pct % of the tokens' mean list
    multi = 100 * U * M <= g_union_pct.load(std::memory_order_relaxed) * live_total;
    if (multi) {
      uz.assign(size_t(M * U), 0.f);
      for (int64_t i = 0; i < M; ++i)
        for (int64_t l = 0; l < rows[i].L; ++l) uz[size_t(i * U + upos[size_t(rows[i].idx[l])])] = rows[i].z[l];
    }
  }

  const int conc = std::max(1, ex.concurrency());
  // Below par_bytes of live weights a thread hand-off costs more than it saves.
  const bool par = conc > 1 && live_total * rb >= g_par_bytes.load(std::memory_order_relaxed);
  const bool prefetch_l2 = g_prefetch_l2.load(std::memory_order_relaxed);

  // One token: split-K (each task a slice of live rows over all N, then a reduce). Every thread then reads
  // whole stored row slices; split-N cut them at a column inside a tile, leaving one thread short pieces in
  // two tiles (docs/op.md). Several tokens split N. Tuning::split forces a choice for measurement.
  const bool split_k = M == 1 && par && g_split.load(std::memory_order_relaxed) != 'n';

  auto finish_cols = [&](int64_t i, const float* acc, int64_t n0, int64_t n, float zsum) {
    // y = acc (+bias) for F32/F16/BF16; y = scale*(acc - zp*zsum) (+bias) for U8; U4 groups already applied.
    if (ops.finish) {
      const bool u8 = f == WeightFormat::U8;
      void* y = bf16 ? static_cast<void*>(static_cast<uint16_t*>(yv) + i * N + n0)
                     : static_cast<void*>(static_cast<float*>(yv) + i * N + n0);
      ops.finish(acc, n, u8 ? w.scale + n0 : nullptr, u8 ? w.zero_point + n0 : nullptr, zsum,
                 bias ? bias + n0 : nullptr, bf16, y);
      return;
    }
    for (int64_t j = 0; j < n; ++j) {
      float v = acc[j];
      if (f == WeightFormat::U8) v = w.scale[n0 + j] * (v - w.zero_point[n0 + j] * zsum);
      if (bias) v += bias[n0 + j];
      if (bf16) static_cast<uint16_t*>(yv)[i * N + n0 + j] = float_to_bf16(v);
      else static_cast<float*>(yv)[i * N + n0 + j] = v;
    }
  };

  // Accumulates live positions [s0, s1) of row r into out[n0, n0+n) (U4: full dequantised contribution,
  // otherwise raw acc); the columns lie in one stored tile. acc is an L1 tile buffer.
  auto tile = [&](const LiveRow& r, int64_t s0, int64_t s1, int64_t n0, int64_t n, float* out, float* acc) {
    int64_t col;
    const uint8_t* base = tile_row(w, 0, n0, col);
    base += row_bytes(f, col);  // col is a multiple of 128, so even for U4
    const int64_t trb = tile_row_bytes(w, n0);
    if (f != WeightFormat::U4 && q8) {  // s0 starts a chunk
      ops.rows_q8(out, n, base, trb, r.idx + s0, r.q + s0, r.qs + s0, s1 - s0, prefetch_l2);
      return;
    }
    if (f != WeightFormat::U4) {
      ops.rows(f, out, n, base, trb, r.idx + s0, r.z + s0, s1 - s0, prefetch_l2);
      return;
    }
    for (int64_t g = 0; g < ng; ++g) {
      const int64_t a = std::max(s0, r.gpos[g]), b = std::min(s1, r.gpos[g + 1]);
      if (a >= b) continue;
      // a starts the group; the one-group calls prefetch the next group's live rows, from b on
      int64_t e = g + 2;
      while (e < ng && r.gpos[e] == b) ++e;  // past groups without live rows
      const int64_t ahead = std::max<int64_t>(0, std::min(s1, r.gpos[std::min(e, ng)]) - b);
      if (q8) {
        ops.u4_group_q8(out, n, base, trb, r.idx + a, r.q + a, r.qs + a, b - a, w, g * N + n0, r.gsum[g], prefetch_l2, acc,
                        ahead);
        continue;
      }
      if (ops.u4_group) {
        ops.u4_group(out, n, base, trb, r.idx + a, r.z + a, b - a, w, g * N + n0, r.gsum[g], prefetch_l2, acc, ahead);
        continue;
      }
      std::memset(acc, 0, sizeof(float) * size_t(n));
      ops.rows(f, acc, n, base, trb, r.idx + a, r.z + a, b - a, prefetch_l2);
      ops.u4_apply(out, acc, n, w, g * N + n0, r.gsum[g]);
    }
  };

  if (!split_k) {
    const int64_t ntasks = par ? std::min<int64_t>(conc, ceil_div(N, 128)) : 1;
    const int64_t chunk = round_up(ceil_div(N, ntasks), 128);
    ex.parallel(ceil_div(N, chunk), [&](int64_t t) {
      alignas(64) float acc[kMaxTileCols], out[kMaxTileCols];
      auto outs = scratch<float>(multi ? M * kMaxTileCols : 0);
      const int64_t c1 = std::min(N, (t + 1) * chunk), tc = w.tile_cols;
      for (int64_t n0 = t * chunk, n; n0 < c1; n0 += n) {
        n = std::min(c1, (n0 & -tc) + tc) - n0;  // up to the end of the chunk or stored tile
        if (multi) {
          std::memset(outs.get(), 0, sizeof(float) * size_t(M * n));
          int64_t col;
          const uint8_t* base = tile_row(w, 0, n0, col) + row_bytes(f, col);
          const int64_t U = int64_t(uidx.size());
          ops.rows_multi(f, outs.get(), n, M, n, base, tile_row_bytes(w, n0), uidx.data(), uz.data(), U, U);
          for (int64_t i = 0; i < M; ++i) finish_cols(i, outs.get() + i * n, n0, n, rows[i].zsum);
          continue;
        }
        for (int64_t i = 0; i < M; ++i) {
          std::memset(out, 0, sizeof(float) * size_t(n));
          tile(rows[i], 0, rows[i].L, n0, n, out, acc);
          finish_cols(i, out, n0, n, rows[i].zsum);
        }
      }
    });
    return;
  }

  // Split-K, M == 1: slice boundaries on group boundaries for U4 so each group is applied exactly once.
  const LiveRow& r = rows[0];
  const int64_t ntasks = std::min<int64_t>(conc, std::max<int64_t>(1, f == WeightFormat::U4 ? ng : r.L));
  std::vector<int64_t> cut(size_t(ntasks + 1));
  for (int64_t t = 0; t <= ntasks; ++t) {
    int64_t c = r.L * t / ntasks;
    if (q8) c -= c % detail::kQ8Chunk;  // U8 chunks are not split (U4 cuts on groups, below)
    if (f == WeightFormat::U4 && t > 0 && t < ntasks) c = r.gpos[std::upper_bound(r.gpos, r.gpos + ng, c) - r.gpos - 1];
    cut[size_t(t)] = t == ntasks ? r.L : c;
  }
  auto part = scratch<float>(ntasks * N);
  // Sums the partials of columns [c0, c1) into the first and finishes them.
  auto reduce = [&](int64_t c0, int64_t c1) {
    float* sum = part.get();
    for (int64_t u = 1; u < ntasks; ++u)
      for (int64_t j = c0; j < c1; ++j) sum[j] += sum[u * N + j];
    finish_cols(0, sum + c0, c0, c1 - c0, r.zsum);
  };
  // Two tasks: the last one to finish sums the partials (N adds, against K_live x N multiply-adds), cheaper
  // than a second hand-off to the pool. More tasks: a second parallel pass, each task a slice of the columns,
  // so the reduce does not read every other core's partial from one thread.
  const bool serial_reduce = ntasks <= 2;
  std::atomic<int64_t> finished{0};
  ex.parallel(ntasks, [&](int64_t t) {
    alignas(64) float acc[kMaxTileCols];
    float* pt = part.get() + t * N;
    std::memset(pt, 0, sizeof(float) * size_t(N));
    for (int64_t n0 = 0; n0 < N; n0 += w.tile_cols)
      tile(r, cut[size_t(t)], cut[size_t(t + 1)], n0, std::min(w.tile_cols, N - n0), pt + n0, acc);
    if (serial_reduce && finished.fetch_add(1, std::memory_order_acq_rel) + 1 == ntasks) reduce(0, N);
  });
  if (serial_reduce) return;
  const int64_t slice = round_up(ceil_div(N, ntasks), 16);  // whole 64-byte lines per task
  ex.parallel(ceil_div(N, slice), [&](int64_t t) { reduce(t * slice, std::min(N, (t + 1) * slice)); });
}

// ---------------------------------------------------------------------------------------------
// Prefill (M > decode_max_rows()): masked rows are packed into [K][MR] panels, weights dequantised per [KC x NC] block
// into a per-task buffer, then an MR x NR register-blocked micro-kernel. On a kernel with pair_gemm, BF16
// weights or bf16 activations (a graph OpenVINO runs in bf16; the weights are then rounded too, as its own
// FullyConnected does) multiply in bf16: panels hold pairs of bf16 values along K, one 32-bit word per pair.

// z[0..K) = row `row` of x minus the mode, pruned channels 0 (none when !p.mask; NaN and Inf are kept), in one
// pass the compiler vectorises. bf16: x holds bf16 values (uint16 bits).
void masked_row(const void* xv, bool bf16, int64_t row, int64_t K, const Params& p, float* z) {
  auto mask = [&](auto xr, auto widen) {
    for (int64_t k = 0; k < K; ++k) {
      const float v = widen(xr[k]) - p.mode;
      z[k] = (!p.mask || !(std::fabs(v) <= p.threshold)) ? v : 0.f;
    }
  };
  if (bf16) mask(static_cast<const uint16_t*>(xv) + row * K, [](uint16_t b) { return bf16_bits_to_float(b); });
  else mask(static_cast<const float*>(xv) + row * K, [](float v) { return v; });
}

// A prefill's work: (M-block, N-block) units, enough to balance the threads, N blocks first (they share the
// packed rows). Each task gets a buffer of col_words per column of an N block (rounded up to NR) for its weight blocks; for each unit, c (the unit's
// f32 results from row r0 and column n0 on, row stride ldc) starts from the bias, fill(unit, wbuf) adds the
// products, and a bf16 y is then rounded from a per-task buffer.
struct Unit {
  int64_t u, next, units;  // this unit, the next one its task takes (none when >= units), and how many
  int64_t n0, nc;     // columns
  int64_t p0, p1;     // M panels (of mr rows each)
  int64_t r0;         // first row
  float* c;
  int64_t ldc;
  int64_t NC, nnb;    // the N blocking: unit v covers columns from (v % nnb) * NC
};

template <class Fill>
void prefill_units(int64_t M, int64_t N, int64_t mr, int64_t NR, const float* bias, void* yv, bool bf16,
                   const Executor& ex, int64_t col_words, Fill fill) {
  const int conc = std::max(1, ex.concurrency());
  const int64_t nmp = ceil_div(M, mr);
  int64_t NC = std::min(round_up(N, NR), std::max(NR, round_up(ceil_div(N, 2 * conc), NR)));
  NC = std::min<int64_t>(NC, 256);
  const int64_t nnb = ceil_div(N, NC);
  int64_t nmb = 1;
  while (nnb * nmb < 2 * conc && ceil_div(nmp, nmb + 1) >= 8) ++nmb;
  const int64_t MCp = ceil_div(nmp, nmb);  // M panels per unit
  nmb = ceil_div(nmp, MCp);
  const int64_t units = nnb * nmb, ntasks = std::min<int64_t>(conc, units);
  ex.parallel(ntasks, [&](int64_t t) {
    auto wbuf = scratch<uint32_t>(col_words * round_up(NC, NR));
    auto ybuf = scratch<float>(bf16 ? MCp * mr * NC : 0);  // a unit's f32 result before it is rounded
    for (int64_t u = t; u < units; u += ntasks) {
      const int64_t nb = u % nnb, mb = u / nnb;
      const int64_t n0 = nb * NC, nc = std::min(NC, N - n0);
      const int64_t p0 = mb * MCp, p1 = std::min(nmp, p0 + MCp), r0 = p0 * mr, r1 = std::min(M, p1 * mr);
      const int64_t ldc = bf16 ? NC : N;
      float* const c = bf16 ? ybuf.get() : static_cast<float*>(yv) + r0 * N + n0;
      for (int64_t i = 0; i < r1 - r0; ++i)
        for (int64_t j = 0; j < nc; ++j) c[i * ldc + j] = bias ? bias[n0 + j] : 0.f;
      fill(Unit{u, u + ntasks, units, n0, nc, p0, p1, r0, c, ldc, NC, nnb}, wbuf.get());
      if (bf16)
        for (int64_t i = r0; i < r1; ++i) {
          uint16_t* yr = static_cast<uint16_t*>(yv) + i * N + n0;
          const float* cr = c + (i - r0) * ldc;
          for (int64_t j = 0; j < nc; ++j) yr[j] = float_to_bf16(cr[j]);
        }
    }
  });
}

// bf16: x and y hold bf16 values (uint16 bits). Rows are widened while they are packed, and each unit's
// f32 result is rounded into y from a per-task buffer once its last K block is done.
void prefill(const Ops& ops, const void* xv, int64_t M, const PackedWeight& w, const float* bias, const Params& p,
             void* yv, bool bf16, const Executor& ex) {
  const int64_t K = w.K, N = w.N, MR = ops.gemm_mr, NR = ops.gemm_nr;
  const bool pairs = (w.format == WeightFormat::BF16 || bf16 || p.bf16_products) && ops.pair_gemm;
  const int64_t U = pairs ? 2 : 1, KU = ceil_div(K, U);  // panel rows: K values, or ceil(K/2) pairs
  const int conc = std::max(1, ex.concurrency());
  const int64_t nmp = ceil_div(M, MR);
  auto zp = scratch<float>(nmp * KU * MR);  // f32 values, or bf16 pairs (4 bytes either way)
  ex.parallel(std::min<int64_t>(conc, nmp), [&](int64_t t) {
    // Each row is masked (and rounded) in one contiguous pass that the compiler vectorises, then
    // scattered into the panel's column i (stride MR).
    auto z = scratch<float>(K + 1);
    z[K] = 0.f;  // pads an odd K into its last pair; the row passes below write only z[0..K)
    auto zb = scratch<uint32_t>(KU);
    for (int64_t pm = t; pm < nmp; pm += std::min<int64_t>(conc, nmp)) {
      float* dst = zp.get() + pm * KU * MR;
      auto* pdst = reinterpret_cast<uint32_t*>(dst);
      for (int64_t i = 0; i < MR; ++i) {
        const int64_t row = pm * MR + i;
        if (row < M) {
          masked_row(xv, bf16, row, K, p, z.get());
        } else {
          std::fill(z.get(), z.get() + K, 0.f);  // rows past M are zero
        }
        if (pairs) {
          for (int64_t k = 0; k < KU; ++k) zb[k] = float_to_bf16(z[2 * k]) | uint32_t(float_to_bf16(z[2 * k + 1])) << 16;
          for (int64_t k = 0; k < KU; ++k) pdst[k * MR + i] = zb[k];
        } else {
          for (int64_t k = 0; k < K; ++k) dst[k * MR + i] = z[k];
        }
      }
    }
  });

  const int64_t KC = std::min<int64_t>(KU, pairs ? 128 : 256);  // panel rows per block
  prefill_units(M, N, MR, NR, bias, yv, bf16, ex, KC, [&](const Unit& un, uint32_t* wb) {
    float* const wbuf = reinterpret_cast<float*>(wb);
    const int64_t n0 = un.n0, nc = un.nc, p0 = un.p0, p1 = un.p1, r0 = un.r0, ldc = un.ldc;
    float* const c = un.c;
    for (int64_t k0 = 0; k0 < KU; k0 += KC) {
      const int64_t kc = std::min(KC, KU - k0);
      if (pairs) ops.pair_pack(w, 2 * k0, std::min(2 * kc, K - 2 * k0), n0, nc, wb);
      else ops.pack(w, k0, kc, n0, nc, wbuf);
      // While this block multiplies, the next one this task packs is prefetched into L2, a share per
      // M panel: each row's slice lies in its own page, where the hardware prefetchers stop.
      const int64_t nu = k0 + KC < KU ? un.u : un.next, nk0 = nu == un.u ? k0 + KC : 0;
      const int64_t pk0 = U * nk0, pk1 = nu < un.units ? std::min(K, U * std::min(KU, nk0 + KC)) : pk0;
      const int64_t pn0 = (nu % un.nnb) * un.NC, line_bytes = row_bytes(w.format, std::min(un.NC, N - pn0)) + 63;
      const int64_t lines = (pk1 - pk0) * (line_bytes / 64), share = ceil_div(lines, p1 - p0);
      int64_t line = 0;
      for (int64_t pm = p0; pm < p1; ++pm) {
        for (const int64_t end = std::min(lines, line + share); line < end; ++line) {
          int64_t col;
          const uint8_t* row = tile_row(w, pk0 + line / (line_bytes / 64), pn0, col);
          __builtin_prefetch(row + row_bytes(w.format, col) + 64 * (line % (line_bytes / 64)), 0, 2);
        }
        const float* zpan = zp.get() + (pm * KU + k0) * MR;
        const int64_t mr = std::min(MR, M - pm * MR);
        for (int64_t j = 0; j < nc; j += NR) {
          float* ct = c + (pm * MR - r0) * ldc + j;
          const float* wpan = wbuf + (j / NR) * kc * NR;
          if (pairs)
            ops.pair_gemm(reinterpret_cast<const uint32_t*>(zpan), reinterpret_cast<const uint32_t*>(wpan), kc, ct, ldc,
                          mr, std::min(NR, nc - j));
          else
            ops.gemm(zpan, wpan, kc, ct, ldc, mr, std::min(NR, nc - j));
        }
      }
    }
  });
}

// Prefill of U8/U4 on int8 activations (Params::int8_activations on a kernel with q8_gemm), as the plugin's own
// int8/int4 FullyConnected computes a prompt: each row's z, in groups of kQ8KGroup k, gets the scale max|z| / 127
// and q = round(z / scale); vpdpbusd then multiplies four k of 16 columns at once (twice the bf16 dot products'
// work per instruction). K blocks are one u4 group (its scale and zero point), or 256 k for u8. Returns false,
// having written nothing, where a z is NaN or Inf: the other path propagates those.
bool prefill_q8(const Ops& ops, const void* xv, int64_t M, const PackedWeight& w, const float* bias, const Params& p,
                void* yv, bool bf16, const Executor& ex) {
  const int64_t K = w.K, N = w.N, MR = detail::kQ8MR, NR = ops.gemm_nr, KG = detail::kQ8KGroup;
  const int64_t NG = ceil_div(K, KG), K4 = NG * KG / 4, nmp = ceil_div(M, MR);
  auto qpan = scratch<int32_t>(nmp * K4 * MR);  // [panel][K4][MR]: four int8 activations of one row per word
  auto sx = scratch<float>(nmp * NG * MR);      // [panel][NG][MR]: their scale per group
  auto sq = scratch<float>(nmp * NG * MR);      // and scale * sum of q, for the zero points
  const int64_t ntasks = std::min<int64_t>(std::max(1, ex.concurrency()), nmp);
  std::atomic<bool> finite{true};
  ex.parallel(ntasks, [&](int64_t t) {
    auto z = scratch<float>(NG * KG);
    auto q = scratch<int8_t>(NG * KG);
    auto gs = scratch<float>(NG), gq = scratch<float>(NG);
    for (int64_t pm = t; pm < nmp; pm += ntasks) {
      for (int64_t i = 0; i < MR; ++i) {
        const int64_t row = pm * MR + i;
        if (row < M) masked_row(xv, bf16, row, K, p, z.get());
        std::fill(z.get() + (row < M ? K : 0), z.get() + NG * KG, 0.f);  // past K, and rows past M, are 0
        float inf_nan = 0.f;  // 0 unless some z is NaN or Inf (z - z is NaN there, and NaN != 0)
        for (int64_t k = 0; k < K; ++k) inf_nan += z[k] - z[k];
        if (inf_nan != 0.f) finite.store(false, std::memory_order_relaxed);
        ops.q8_quantise(z.get(), NG * KG, q.get(), gs.get(), gq.get());
        for (int64_t g = 0; g < NG; ++g) {
          sx[(pm * NG + g) * MR + i] = gs[g];
          sq[(pm * NG + g) * MR + i] = gq[g];
        }
        for (int64_t k4 = 0; k4 < K4; ++k4) std::memcpy(&qpan[(pm * K4 + k4) * MR + i], &q[4 * k4], 4);
      }
    }
  });
  if (!finite.load()) return false;

  const int64_t KC = w.format == WeightFormat::U4 ? w.group_size : 256;  // k per block, a multiple of KG
  prefill_units(M, N, MR, NR, bias, yv, bf16, ex, KC / 4, [&](const Unit& un, uint32_t* wbuf) {
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = std::min(KC, K - k0), kc4 = round_up(kc, KG) / 4;
      ops.q8_pack(w, k0, kc, un.n0, un.nc, wbuf);
      const int64_t s0 = (w.format == WeightFormat::U4 ? k0 / w.group_size * N : 0) + un.n0;
      for (int64_t pm = un.p0; pm < un.p1; ++pm) {
        float bsum[detail::kQ8MR] = {};
        for (int64_t g = k0 / KG; g < k0 / KG + kc4 * 4 / KG; ++g)
          for (int64_t i = 0; i < MR; ++i) bsum[i] += sq[(pm * NG + g) * MR + i];
        const int32_t* qp = qpan.get() + (pm * K4 + k0 / 4) * MR;
        const float* sp = sx.get() + (pm * NG + k0 / KG) * MR;
        for (int64_t j = 0; j < un.nc; j += NR)
          ops.q8_gemm(qp, sp, wbuf + (j / NR) * kc4 * NR, kc4, bsum, w, s0 + j, un.c + (pm * MR - un.r0) * un.ldc + j,
                      un.ldc, std::min(MR, M - pm * MR), std::min(NR, un.nc - j));
      }
    }
  });
  return true;
}

void validate(const void* x, int64_t M, const PackedWeight& w, const void* y) {
  if (M < 0 || w.K < 1 || w.N < 1) throw std::invalid_argument("actsparse: need M >= 0, K >= 1, N >= 1");
  if (w.K > INT32_MAX) throw std::invalid_argument("actsparse: K too large");
  if (M > 0 && (!x || !y || !w.data)) throw std::invalid_argument("actsparse: null x, y or weight data");
  if (!valid_tile_cols(w.tile_cols))
    throw std::invalid_argument("actsparse: tile_cols must be a power of two from 128 to " + std::to_string(kMaxTileCols));
  const FormatInfo* f = find_format(int(w.format));
  if (!f) throw std::invalid_argument("actsparse: unknown weight format");
  switch (f->params) {
    case ParamsLayout::None: return;
    case ParamsLayout::PerColumn:
      if (!w.scale || !w.zero_point) throw std::invalid_argument(std::string("actsparse: ") + f->name + " needs scale and zero_point");
      if (w.group_size != 0 && w.group_size != w.K) throw std::invalid_argument(std::string("actsparse: ") + f->name + " group_size must be K");
      return;
    case ParamsLayout::PerGroup:
      if (!(w.scale && w.zero_point) && !(f->compact_params && w.scale16 && w.zp8))
        throw std::invalid_argument(std::string("actsparse: ") + f->name + " needs scale and zero_point (f32, or f16 and u8)");
      if (w.group_size < 1 || w.K % w.group_size != 0)
        throw std::invalid_argument(std::string("actsparse: ") + f->name + " group_size must divide K");
      return;
  }
}

}  // namespace

bool holds_bf16(const float* x, int64_t n) {
  uint32_t low = 0;
  for (int64_t i = 0; i < n; ++i) {  // no early exit: the compiler vectorises the OR
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    low |= bits & 0xFFFFu;
  }
  return low == 0;
}

void matmul(const void* x, Activations type, int64_t M, const PackedWeight& w, const float* bias, const Params& p,
            void* y, const Executor& ex, const char* kernel) {
  const KernelEntry* k = find_kernel(kernel);
  validate(x, M, w, y);
  if (type != Activations::F32 && type != Activations::BF16 && type != Activations::F16)
    throw std::invalid_argument("actsparse: unknown activation type");
  if (M == 0) return;
  if (type == Activations::F16) {  // widened and rounded here, so no kernel reads halves
    const int64_t K = w.K, N = w.N;
    auto xf = scratch<float>(M * K);
    auto yf = scratch<float>(M * N);
    const auto* xh = static_cast<const uint16_t*>(x);
    for (int64_t i = 0; i < M * K; ++i) xf[i] = half_to_float(xh[i]);
    matmul(xf.get(), Activations::F32, M, w, bias, p, yf.get(), ex, kernel);
    auto* yh = static_cast<uint16_t*>(y);
    for (int64_t i = 0; i < M * N; ++i) yh[i] = float_to_half(yf[i]);
    return;
  }
  const Ops& ops = *k->ops();
  const bool bf16 = type == Activations::BF16;
  // u4 only in groups of a multiple of 128 k: each group's scales and zero points cost a pass over the outputs,
  // and smaller groups make the int8 prefill slower than bf16 pairs (docs/op.md)
  const bool q8 = p.int8_activations && ops.q8_gemm && ops.q8_quantise &&
                  (w.format == WeightFormat::U8 || (w.format == WeightFormat::U4 && w.group_size % 128 == 0));
  if (M <= decode_max_rows()) decode(ops, x, M, w, bias, p, y, bf16, ex);
  else if (!(q8 && prefill_q8(ops, x, M, w, bias, p, y, bf16, ex))) prefill(ops, x, M, w, bias, p, y, bf16, ex);
}

void matmul(const float* x, int64_t M, const PackedWeight& w, const float* bias, const Params& p, float* y,
            const Executor& ex, const char* kernel) {
  matmul(x, Activations::F32, M, w, bias, p, y, ex, kernel);
}

std::vector<std::string> available_kernels() {
  std::vector<std::string> out;
  for (const auto& k : kKernels)
    if (k.supported()) out.emplace_back(k.name);
  return out;
}

std::string best_kernel() { return find_kernel(nullptr)->name; }

int64_t decode_max_rows() { return g_decode_max_rows.load(std::memory_order_relaxed); }

Tuning tuning() {
  return {g_par_bytes.load(std::memory_order_relaxed), g_split.load(std::memory_order_relaxed),
          g_prefetch_l2.load(std::memory_order_relaxed), g_decode_max_rows.load(std::memory_order_relaxed),
          g_union_pct.load(std::memory_order_relaxed)};
}

void set_tuning(const Tuning& t) {
  detail::check_tuning(t);
  g_par_bytes.store(t.par_bytes, std::memory_order_relaxed);
  g_split.store(t.split, std::memory_order_relaxed);
  g_prefetch_l2.store(t.prefetch_l2, std::memory_order_relaxed);
  g_decode_max_rows.store(t.decode_max_rows, std::memory_order_relaxed);
  g_union_pct.store(t.union_pct, std::memory_order_relaxed);
}

}  // namespace actsparse
