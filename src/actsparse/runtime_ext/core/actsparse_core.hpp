#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace actsparse {

// The helpers below are static (internal linkage): every translation unit, the AVX-512 ones
// included, gets its own copy, so no copy compiled for one ISA can be picked by the linker for another.

// A bf16 value is the high half of an f32.
static inline float bf16_bits_to_float(uint16_t b) {
  return __builtin_bit_cast(float, uint32_t(b) << 16);  // a loop of it vectorises, which memcpy's does not
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

// f32 -> IEEE half bits, rounded to nearest even (the compiler's conversion, F16C where the ISA has it).
static inline uint16_t float_to_half(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

// f32 -> bf16 bits, rounded to nearest even; NaN stays NaN. Branch-free, so loops over it vectorise.
static inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fff + ((u >> 16) & 1)) >> 16, quiet = (u >> 16) | 0x40;
  return uint16_t((u & 0x7fffffff) > 0x7f800000 ? quiet : rounded);
}

enum class WeightFormat : int {
#define ACTSPARSE_FORMAT(name, Enum, id) Enum = id,
#include "formats.inc"
#undef ACTSPARSE_FORMAT
};

// Where a format's scales and zero points live in params: nowhere, one per column, or one per K group and column.
enum class ParamsLayout : int { None = 0, PerColumn = 1, PerGroup = 2 };

// Element type of an op input as a graph stores it: Other is any type the contract refuses, Unknown one not known yet.
enum class Element : int { Unknown = -1, F32 = 0, BF16 = 1, U8 = 2, Other = 3, F16 = 4 };

// Per format: bits per stored weight, the graph element the weight travels as (f16/bf16 as raw bytes, since a
// plugin would widen such a constant to f32), the params layout, whether params may be the compact bytes
// (PackedWeight::scale16), the column tile width exports choose (see PackedWeight), and raw(row, j), the stored
// (not dequantised) value of column j. Defined in an unnamed namespace so no ISA's copy is shared (see below).
namespace {
template <WeightFormat F> struct FormatTraits;

template <> struct FormatTraits<WeightFormat::F32> {
  static constexpr int bits = 32;
  static constexpr Element storage = Element::F32;
  static constexpr ParamsLayout params = ParamsLayout::None;
  static constexpr bool compact_params = false;
  static constexpr int64_t tile_cols = 2048;
  static float raw(const uint8_t* row, int64_t j) { float v; std::memcpy(&v, row + 4 * j, 4); return v; }
};
template <> struct FormatTraits<WeightFormat::F16> {
  static constexpr int bits = 16;
  static constexpr Element storage = Element::U8;
  static constexpr ParamsLayout params = ParamsLayout::None;
  static constexpr bool compact_params = false;
  static constexpr int64_t tile_cols = 2048;
  static float raw(const uint8_t* row, int64_t j);  // after half_to_float, below
};
template <> struct FormatTraits<WeightFormat::BF16> {
  static constexpr int bits = 16;
  static constexpr Element storage = Element::U8;
  static constexpr ParamsLayout params = ParamsLayout::None;
  static constexpr bool compact_params = false;
  static constexpr int64_t tile_cols = 2048;
  static float raw(const uint8_t* row, int64_t j);
};
// u8 and u4 use wider tiles: 2048-column slices (2 KB, 1 KB) are too short to stream well at sparsity 0.5.
template <> struct FormatTraits<WeightFormat::U8> {
  static constexpr int bits = 8;
  static constexpr Element storage = Element::U8;
  static constexpr ParamsLayout params = ParamsLayout::PerColumn;
  static constexpr bool compact_params = false;
  static constexpr int64_t tile_cols = 8192;
  static float raw(const uint8_t* row, int64_t j) { return float(row[j]); }
};
// Two codes a byte, the even column in the low nibble.
template <> struct FormatTraits<WeightFormat::U4> {
  static constexpr int bits = 4;
  static constexpr Element storage = Element::U8;
  static constexpr ParamsLayout params = ParamsLayout::PerGroup;
  static constexpr bool compact_params = true;
  static constexpr int64_t tile_cols = 8192;
  static float raw(const uint8_t* row, int64_t j) { return float((row[j >> 1] >> ((j & 1) * 4)) & 0xf); }
};

inline float FormatTraits<WeightFormat::F16>::raw(const uint8_t* row, int64_t j) {
  uint16_t h;
  std::memcpy(&h, row + 2 * j, 2);
  return half_to_float(h);
}
inline float FormatTraits<WeightFormat::BF16>::raw(const uint8_t* row, int64_t j) { return bf16_to_float(row + 2 * j); }

// fn(std::integral_constant<WeightFormat, F>{}) for the format f: one switch, generated from the list.
template <class Fn>
inline decltype(auto) with_format(WeightFormat f, Fn&& fn) {
  switch (f) {
#define ACTSPARSE_FORMAT(name, Enum, id) \
    case WeightFormat::Enum: return fn(std::integral_constant<WeightFormat, WeightFormat::Enum>{});
#include "formats.inc"
#undef ACTSPARSE_FORMAT
  }
  return fn(std::integral_constant<WeightFormat, WeightFormat::F32>{});  // unreachable for a valid f
}
}  // namespace

// The traits of every format as data, in the list's order (the C API hands this table to Python).
struct FormatInfo {
  const char* name;
  WeightFormat format;
  int bits;
  Element storage;
  ParamsLayout params;
  bool compact_params;
  int64_t tile_cols;
};
constexpr FormatInfo kFormats[] = {
#define ACTSPARSE_FORMAT(name, Enum, id)                                                                        \
  {#name, WeightFormat::Enum, FormatTraits<WeightFormat::Enum>::bits, FormatTraits<WeightFormat::Enum>::storage, \
   FormatTraits<WeightFormat::Enum>::params, FormatTraits<WeightFormat::Enum>::compact_params,                   \
   FormatTraits<WeightFormat::Enum>::tile_cols},
#include "formats.inc"
#undef ACTSPARSE_FORMAT
};
constexpr int kFormatCount = int(sizeof(kFormats) / sizeof(kFormats[0]));

constexpr bool ids_in_order() {
  for (int i = 0; i < kFormatCount; ++i)
    if (int(kFormats[i].format) != i) return false;
  return true;
}
static_assert(ids_in_order(), "formats.inc lists the formats by id, from 0: kFormats[id] is format id");

// The entry of a format, or null for a number or name no format has.
constexpr const FormatInfo* find_format(int id) { return id >= 0 && id < kFormatCount ? &kFormats[id] : nullptr; }
inline const FormatInfo* find_format(const std::string& name) {
  for (const auto& f : kFormats)
    if (name == f.name) return &f;
  return nullptr;
}

// Bytes of n consecutive columns of one stored row.
static constexpr int64_t row_bytes(WeightFormat f, int64_t n) { return (n * kFormats[int(f)].bits + 7) / 8; }

// Weights are stored input-channel-major in column tiles: the columns are cut into tiles of tile_cols
// (the last one narrower), and tile t holds its K rows one after another, row stride
// row_bytes(format, width of t). A decode step then streams each live row's slice of a tile from one
// contiguous block (at sparsity 0 the whole tile is one sequential stream), not one slice every N columns.
// tile_cols is a power of two from 128 to kMaxTileCols (tile_row then needs no division). Exports choose
// it per format (FormatTraits::tile_cols). Models written before the width was an attribute of the op use
// kLegacyTileCols for every format.
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
// miss. The ops call it once per weight tensor, on their first call, which the copy slows. Does nothing off
// Linux, where nothing is 2 MB-aligned, or with $ACTSPARSE_HUGE_PAGES=0.
void to_huge_pages(const void* p, size_t bytes);

// int8_activations: U8/U4 may quantise the activations to int8, as OpenVINO's CPU plugin quantises those of its
// int8/int4 FullyConnected by default (and ONNX Runtime those of MatMulNBits at accuracy level 4), where the
// kernel has int8 dot products (Ops::rows_q8, Ops::q8_gemm): a decode one scale per 8 live activations (U4:
// within a group), a prefill one per 32 consecutive channels (U4: groups of a multiple of 128 only). It computes
// as without it otherwise, and whenever an activation is NaN or Inf.
// bf16_products: f32 x that holds bf16 values (a graph the runtime computes in bf16, widened for the op): a
// prefill multiplies bf16 pairs, as it does for bf16 x.
struct Params {
  float mode = 0.f;
  float threshold = 0.f;
  bool mask = true;
  bool int8_activations = false;
  bool bf16_products = false;
};

// Calls of up to Tuning::decode_max_rows rows stream the live weight rows once per row (decode); longer ones pack
// the weights for a GEMM (prefill). Continuous batching sends calls of a few rows.
int64_t decode_max_rows();

// Whether every one of the n floats is a bf16 value (its low 16 bits are zero).
bool holds_bf16(const float* x, int64_t n);

// The op contract (docs/op.md): what a runtime knows of one ActSparseMatMul node. Unknown sizes (-1) and
// types (Element::Unknown) are not checked: a runtime binds again once it knows them, at the latest on its
// first call.
struct OpDesc {
  std::string weight_format, prefill = "dense";
  int64_t out_features = 0, group_size = 0, tile_cols = kLegacyTileCols;
  float mode = 0.f, threshold = 0.f;
  bool has_bias = false;
  int64_t K = -1;  // x's last dimension
  Element x_type = Element::Unknown, weight_type = Element::Unknown, params_type = Element::Unknown;
  int64_t weight_bytes = -1, params_bytes = -1;
};

// A node's contract once checked: the format, the sizes, and where bias, scales and zero points lie in params
// ([bias f32 (N, if has_bias) | scale | zero point], f32, or for compact params f16 scales and u8 zero points).
struct BoundOp {
  WeightFormat format = WeightFormat::F32;
  int64_t K = -1, N = 0, group_size = 0, tile_cols = kLegacyTileCols;
  float mode = 0.f, threshold = 0.f;
  bool prune_prefill = false, has_bias = false, compact = false;
  int64_t per_channel = 0;                       // scales in params (and as many zero points)
  int64_t weight_bytes = -1, params_bytes = -1;  // as checked; -1: unknown when bound
  bool complete() const { return K > 0 && weight_bytes >= 0 && params_bytes >= 0; }
  // Whether a call's sizes are the ones checked, so the call needs no other check.
  bool matches(int64_t k, int64_t w_bytes, int64_t p_bytes) const {
    return k == K && w_bytes == weight_bytes && p_bytes == params_bytes;
  }
  const float* bias(const void* params) const { return has_bias ? static_cast<const float*>(params) : nullptr; }
  PackedWeight weight(const void* data, const void* params) const;  // a complete binding's view of the buffers
};

// A node's binding as its runtime keeps it: a call whose sizes match the first complete binding reuses it
// (one atomic load and three compares); any other call is bound by bind() first. get is thread-safe; set
// (a graph edit) must not run during a call.
class OpBinding {
 public:
  void set(const BoundOp& b) {
    std::lock_guard<std::mutex> lock(mutex_);
    op_ = b;
    complete_.store(b.complete(), std::memory_order_release);
  }
  template <class Bind>
  BoundOp get(int64_t K, int64_t weight_bytes, int64_t params_bytes, Bind bind) {
    if (complete_.load(std::memory_order_acquire) && op_.matches(K, weight_bytes, params_bytes)) return op_;
    const BoundOp b = bind();
    std::lock_guard<std::mutex> lock(mutex_);
    if (!complete_.load(std::memory_order_relaxed) && b.complete()) {
      op_ = b;
      complete_.store(true, std::memory_order_release);
    }
    return b;
  }

 private:
  std::mutex mutex_;
  std::atomic<bool> complete_{false};
  BoundOp op_;  // written only while complete_ is false
};

// Checks every known fact of desc against the contract and returns the binding. A fault throws
// std::invalid_argument with one line, "ActSparseMatMul: <what>", the same in every runtime.
BoundOp bind_op(const OpDesc& desc);

// y = z'·W + bias; x [M,K], y [M,N] float row-major contiguous; bias may be null.
// kernel: null = best for this CPU; else a name from available_kernels() (throws std::invalid_argument if unknown/unsupported).
void matmul(const float* x, int64_t M, const PackedWeight& w, const float* bias, const Params& p,
            float* y, const Executor& ex, const char* kernel = nullptr);

// The same with x and y of one activation type: bf16 (uint16 bits) computes in f32 from the widened x
// and rounds y to nearest even, with no f32 copy of a prefill's x or y. f16 (IEEE half bits, OpenVINO GPU
// graphs) does the same through an f32 copy of x and y.
enum class Activations : int { F32 = 0, BF16 = 1, F16 = 2 };
void matmul(const void* x, Activations type, int64_t M, const PackedWeight& w, const float* bias, const Params& p,
            void* y, const Executor& ex, const char* kernel = nullptr);
// The activation between an MLP's two projections (ActSparseMLP): SiLU, or GELU exact (erf) or as its tanh
// approximation, within a few float ulps (polynomial exp and erf).
enum class Activation : int { Silu = 0, GeluErf = 1, GeluTanh = 2 };
// Which half of the up projection's output the activation takes: None (no gate, I = N), First (I = N/2,
// a = act(h[:, :I]) · h[:, I:]) or Second (a = h[:, :I] · act(h[:, I:])).
enum class Gate : int { None = 0, First = 1, Second = 2 };
// a [M, I] from h [M, N], both of `type` (bf16 and f16 round a to nearest even). round_bf16 (f32 only): a is
// rounded to bf16 values, as a graph the runtime computes in bf16 would hold it.
void activate(const void* h, Activations type, int64_t M, int64_t N, Activation act, Gate gate, bool round_bf16,
              void* a, const Executor& ex);
std::vector<std::string> available_kernels();  // supported on this CPU, e.g. {"scalar","avx2","avx512"}
std::string best_kernel();

// Decode knobs, process-wide (docs/op.md, "Tuning"). When the library loads, each comes from its environment
// variable ($ACTSPARSE_PAR_BYTES, _SPLIT (n|k), _PREFETCH (l1|l2), _DECODE_MAX_ROWS, _UNION_PCT), else from the
// tuning file `actsparse tune` wrote for this CPU model, kernel and kTuningVersion (tuning_report()), else from a
// rule or a default. set_tuning changes them (not while a matmul is running).
struct Tuning {
  int64_t par_bytes;        // decode stays on one thread below this many live weight bytes
  char split;               // 'n' or 'k' forces decode's split over columns or over live rows; '\0': by shape
  bool prefetch_l2;         // upcoming weight rows are prefetched into L2 far ahead, else into L1 one group ahead
  int64_t decode_max_rows;  // calls of up to this many rows take the decode path, longer ones the GEMM
  int64_t union_pct;        // tokens of one decode call share one pass over the union of their live rows while it
                            // holds at most this percentage of their mean list's rows
};
Tuning tuning();
void set_tuning(const Tuning& t);  // throws std::invalid_argument for a value out of range

// Bumped when the decode path changes enough that tuning files measured on older code no longer apply.
// 2: eight-row decode prefetches into L1 16 lines ahead, so an l1-or-l2 choice measured on 1 may differ.
constexpr int kTuningVersion = 2;
// The knobs as JSON: each value, where it came from ("env", "file", "rule", "default", "set_tuning") and its
// value without file or environment ("fallback"); the tuning file for this CPU model, kernel and version,
// $ACTSPARSE_CACHE (default ~/.cache/actsparse)/tuning/<model>_<kernel>_v<version>.txt, whether it was used and
// why not where it exists.
std::string tuning_report();

}  // namespace actsparse
