#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace actsparse {

enum class WeightFormat : int { F32 = 0, F16 = 1, U8 = 2, U4 = 3, BF16 = 4 };

// The helpers below are static (internal linkage): every translation unit, the AVX-512 ones
// included, gets its own copy, so no copy compiled for one ISA can be picked by the linker for another.

// Bytes of n consecutive columns of one stored row (u4: two codes a byte, even column in the low nibble).
static constexpr int64_t row_bytes(WeightFormat f, int64_t n) {
  return f == WeightFormat::F32 ? 4 * n : f == WeightFormat::F16 || f == WeightFormat::BF16 ? 2 * n
       : f == WeightFormat::U8 ? n : (n + 1) / 2;
}

// A weight_format attribute ("f32", "f16", "bf16", "u8" or "u4") as a WeightFormat; false for any other name.
static inline bool parse_weight_format(const std::string& name, WeightFormat& f) {
  static const std::pair<const char*, WeightFormat> names[] = {{"f32", WeightFormat::F32}, {"f16", WeightFormat::F16},
      {"bf16", WeightFormat::BF16}, {"u8", WeightFormat::U8}, {"u4", WeightFormat::U4}};
  for (const auto& [n, v] : names)
    if (name == n) return f = v, true;
  return false;
}

// A bf16 value is the high half of an f32.
static inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// The same from 2 bytes at p, little-endian (any alignment).
static inline float bf16_to_float(const uint8_t* p) { return bf16_bits_to_float(uint16_t(p[0] | p[1] << 8)); }

// IEEE half -> float (exact), without F16C.
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {  // zero or subnormal: man * 2^-24, exact in f32
    float v = float(man) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &v, 4);
  } else {
    bits = exp == 31 ? 0x7f800000u | man << 13 : (exp + 112) << 23 | man << 13;
  }
  bits |= sign;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

// f32 -> bf16 bits, rounded to nearest even; NaN stays NaN. Branch-free, so loops over it vectorise.
static inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fff + ((u >> 16) & 1)) >> 16, quiet = (u >> 16) | 0x40;
  return uint16_t((u & 0x7fffffff) > 0x7f800000 ? quiet : rounded);
}

// Weights are stored input-channel-major in column tiles: the columns are cut into tiles of tile_cols
// (the last one narrower), and tile t holds its K rows one after another, row stride
// row_bytes(format, width of t). A decode step then streams each live row's slice of a tile from one
// contiguous block (at sparsity 0 the whole tile is one sequential stream), not one slice every N columns.
// tile_cols is a power of two from 128 to kMaxTileCols (tile_row then needs no division). Exports choose
// it per format (kernels.TILE_COLS): 2048 columns (8 KB f32 or 4 KB f16/bf16 row slices), 8192 for u8/u4,
// whose 2048-column slices (2 KB, 1 KB) were too short to stream well at sparsity 0.5. Models written
// before the width was an attribute of the op use kLegacyTileCols for every format.
constexpr int64_t kLegacyTileCols = 2048, kMaxTileCols = 8192;
static constexpr bool valid_tile_cols(int64_t t) { return t >= 128 && t <= kMaxTileCols && (t & (t - 1)) == 0; }

struct PackedWeight {
  WeightFormat format;
  int64_t K, N;
  int64_t group_size;       // U4: K-group size; U8: K; F32/F16/BF16: 0
  const void* data;         // tile-major, see tile_cols
  const float* scale;       // U8: [N]; U4: [(K/G)*N]; null otherwise
  const float* zero_point;  // same shape as scale; null otherwise
  int64_t tile_cols = kLegacyTileCols;
  // U4 only, instead of scale and zero_point: the compact params, f16 scales and u8 zero points (the values
  // NNCF stores, exactly), 3 bytes per group and column instead of 8.
  const uint16_t* scale16 = nullptr;
  const uint8_t* zp8 = nullptr;
};

// Scale and zero point number s of a U8/U4 weight (index group * N + column for U4), either layout.
static inline float scale_at(const PackedWeight& w, int64_t s) { return w.scale16 ? half_to_float(w.scale16[s]) : w.scale[s]; }
static inline float zero_point_at(const PackedWeight& w, int64_t s) { return w.zp8 ? float(w.zp8[s]) : w.zero_point[s]; }

// Row stride in bytes of the tile holding column n (the last tile is narrower).
static inline int64_t tile_row_bytes(const PackedWeight& w, int64_t n) {
  return row_bytes(w.format, std::min(w.tile_cols, w.N - (n & -w.tile_cols)));
}

// Row k of the tile holding column n, and n's column within that tile.
static inline const uint8_t* tile_row(const PackedWeight& w, int64_t k, int64_t n, int64_t& col) {
  const int64_t start = n & -w.tile_cols;  // the tile's first column
  col = n - start;
  // the tiles before hold K rows of `start` columns in all (start is even: u4 bytes are exact)
  return static_cast<const uint8_t*>(w.data) + w.K * row_bytes(w.format, start) + k * tile_row_bytes(w, n);
}

struct Executor {  // runs fn(0..ntasks-1), maybe in parallel
  virtual ~Executor() = default;
  virtual int concurrency() const = 0;
  virtual void parallel(int64_t ntasks, const std::function<void(int64_t)>& fn) const = 0;
};

// Persistent std::thread pool; the calling thread takes part. One parallel() at a time per object.
struct ThreadExecutor final : Executor {
  explicit ThreadExecutor(int threads);
  ~ThreadExecutor() override;
  ThreadExecutor(const ThreadExecutor&) = delete;
  ThreadExecutor& operator=(const ThreadExecutor&) = delete;
  int concurrency() const override;
  void parallel(int64_t ntasks, const std::function<void(int64_t)>& fn) const override;
  struct Pool;

 private:
  std::unique_ptr<Pool> pool_;
};

// Moves the 2 MB-aligned part of [p, p + bytes) onto 2 MB pages where it is: same address, same bytes (a
// copy on fresh anonymous huge pages takes the old pages' place in one mremap, which unmaps them, so one
// copy stays resident). Decode reads live rows at random, and on 4 KB pages nearly every row costs a TLB
// miss: 4096x4096 u4 from DRAM on one thread, five alternating runs, s=0.9 0.070-0.072 -> 0.063-0.065 ms,
// s=0.5 0.252-0.270 -> 0.248-0.256 ms. The ops call it once per weight tensor, on their first call, which
// the copy slows (2-6 GB/s here). Does nothing off Linux, where nothing is 2 MB-aligned, or with
// $ACTSPARSE_HUGE_PAGES=0.
void to_huge_pages(const void* p, size_t bytes);

// int8_activations: U8/U4 may quantise the activations to int8, as OpenVINO's CPU plugin quantises those of its
// int8/int4 FullyConnected by default (and ONNX Runtime those of MatMulNBits at accuracy level 4), where the
// kernel has int8 dot products (Ops::rows_q8, Ops::q8_gemm): a decode one scale per 8 live activations (U4:
// within a group), a prefill one per 32 consecutive channels (U4: groups of a multiple of 128 only). It computes
// as without it otherwise, and whenever an activation is NaN or Inf.
struct Params { float mode = 0.f; float threshold = 0.f; bool mask = true; bool int8_activations = false; };

// y = z'·W + bias; x [M,K], y [M,N] float row-major contiguous; bias may be null.
// kernel: null = best for this CPU; else a name from available_kernels() (throws std::invalid_argument if unknown/unsupported).
void matmul(const float* x, int64_t M, const PackedWeight& w, const float* bias, const Params& p,
            float* y, const Executor& ex, const char* kernel = nullptr);

// The same with x and y of one activation type: bf16 (uint16 bits) computes in f32 from the widened x
// and rounds y to nearest even, with no f32 copy of a prefill's x or y.
enum class Activations : int { F32 = 0, BF16 = 1 };
void matmul(const void* x, Activations type, int64_t M, const PackedWeight& w, const float* bias, const Params& p,
            void* y, const Executor& ex, const char* kernel = nullptr);
std::vector<std::string> available_kernels();  // supported on this CPU, e.g. {"scalar","avx2","avx512"}
std::string best_kernel();

// Decode knobs for measurement and tests, process-wide. Initialised from $ACTSPARSE_PAR_BYTES,
// $ACTSPARSE_SPLIT (n|k) and $ACTSPARSE_PREFETCH (l1|l2) when the library loads; set_tuning changes them
// (not while a matmul is running).
struct Tuning {
  int64_t par_bytes;  // decode stays on one thread below this many live weight bytes
  char split;         // 'n' or 'k' forces decode's split over columns or over live rows; '\0': by shape
  bool prefetch_l2;   // upcoming weight rows are prefetched into L2 far ahead, else into L1 one group ahead
};
Tuning tuning();
void set_tuning(const Tuning& t);

}  // namespace actsparse
