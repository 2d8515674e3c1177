// bind_op: the one place that decides whether an ActSparseMatMul node is well formed (docs/op.md).
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "actsparse_core.hpp"

namespace actsparse {
namespace {

template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream s;
  s << "ActSparseMatMul: ";
  (s << ... << args);
  throw std::invalid_argument(s.str());
}

const char* element_name(Element e) {
  switch (e) {
    case Element::F32: return "f32";
    case Element::BF16: return "bf16";
    case Element::F16: return "f16";
    case Element::U8: return "u8";
    default: return "another type";
  }
}

using wide = __int128;

// A byte count for a message (an int128 has no operator<<).
std::string said(wide n) { return n > std::numeric_limits<int64_t>::max() ? "more than 2^63" : std::to_string(int64_t(n)); }

std::string format_names() {
  std::string s;
  for (int i = 0; i < kFormatCount; ++i)
    s += std::string(i == 0 ? "" : i + 1 == kFormatCount ? " or " : ", ") + kFormats[i].name;
  return s;
}

}  // namespace

BoundOp bind_op(const OpDesc& d) {
  const FormatInfo* f = find_format(d.weight_format);
  if (!f) fail("unknown weight_format '", d.weight_format, "' (", format_names(), ")");
  if (d.prefill != "dense" && d.prefill != "sparse") fail("prefill must be dense or sparse, got '", d.prefill, "'");
  constexpr int64_t kMaxDim = std::numeric_limits<int32_t>::max();  // live-channel lists hold int32 indices
  if (d.out_features < 1 || d.out_features > kMaxDim)
    fail("out_features must be from 1 to ", kMaxDim, ", got ", d.out_features);
  if (!valid_tile_cols(d.tile_cols)) fail("tile_cols must be a power of two from 128 to ", kMaxTileCols, ", got ", d.tile_cols);
  if (!std::isfinite(d.mode)) fail("mode must be finite, got ", d.mode);
  if (std::isnan(d.threshold) || d.threshold == -std::numeric_limits<float>::infinity())
    fail("threshold must be finite or +inf, got ", d.threshold);
  if (d.x_type != Element::Unknown && d.x_type != Element::F32 && d.x_type != Element::BF16 && d.x_type != Element::F16)
    fail("x must be f32, bf16 or f16, got ", element_name(d.x_type));
  const bool known_k = d.K >= 0;
  if (known_k && (d.K < 1 || d.K > kMaxDim)) fail("x's last dimension K must be from 1 to ", kMaxDim, ", got ", d.K);

  BoundOp b;
  b.format = f->format;
  b.K = d.K;
  b.N = d.out_features;
  b.group_size = d.group_size;
  b.tile_cols = d.tile_cols;
  b.mode = d.mode;
  b.threshold = d.threshold;
  b.prune_prefill = d.prefill == "sparse";
  b.has_bias = d.has_bias;

  // Params first, then the weight, then the group size: a runtime that does not know K yet (ONNX Runtime
  // creating a kernel) then reports the same first fault as one that does.
  const int64_t G = d.group_size;
  switch (f->params) {
    case ParamsLayout::None: b.per_channel = 0; break;
    case ParamsLayout::PerColumn: b.per_channel = b.N; break;
    case ParamsLayout::PerGroup: b.per_channel = known_k && G >= 1 && d.K % G == 0 ? d.K / G * b.N : -1; break;
  }
  if (d.params_type != Element::Unknown && d.params_type != Element::F32 &&
      !(d.params_type == Element::U8 && f->compact_params))
    fail("params must be f32", f->compact_params ? " (or u8, compact)" : "", " for weight_format ", f->name, ", got ",
         element_name(d.params_type));
  b.compact = d.params_type == Element::U8;
  if (b.per_channel >= 0 && d.params_bytes >= 0) {
    const int64_t bias_n = b.has_bias ? b.N : 0;
    // (K/G)·N and K·row bytes may pass 2^63 for absurd attributes: counted in 128 bits
    const wide expect = b.compact ? 4 * wide(bias_n) + 3 * wide(b.per_channel) : 4 * (wide(bias_n) + 2 * wide(b.per_channel));
    if (d.params_bytes != expect)
      fail("params has ", d.params_bytes, " bytes, expected ", said(expect), " for N=", b.N, ", has_bias=", int(b.has_bias),
           ", weight_format ", f->name, b.compact ? " (compact)" : "");
    b.params_bytes = d.params_bytes;
  }
  if (d.weight_type != Element::Unknown && d.weight_type != f->storage)
    fail("weight of weight_format ", f->name, " must be ", element_name(f->storage), ", got ", element_name(d.weight_type));
  if (known_k && d.weight_bytes >= 0) {
    const wide expect = wide(d.K) * row_bytes(f->format, b.N);
    if (d.weight_bytes != expect)
      fail("weight has ", d.weight_bytes, " bytes, expected ", said(expect), " for K=", d.K, ", N=", b.N, ", weight_format ",
           f->name);
    b.weight_bytes = d.weight_bytes;
  }

  switch (f->params) {
    case ParamsLayout::None:
      if (G != 0) fail("group_size must be 0 for weight_format ", f->name, ", got ", G);
      break;
    case ParamsLayout::PerColumn:
      if (G < 0 || (known_k && G != 0 && G != d.K))
        fail("group_size must be 0 or K for weight_format ", f->name, ", got ", G);
      break;
    case ParamsLayout::PerGroup:
      if (G < 1) fail("group_size must be >= 1 for weight_format ", f->name, ", got ", G);
      if (known_k && d.K % G) fail("group_size ", G, " does not divide K=", d.K);
      break;
  }

  return b;
}

PackedWeight BoundOp::weight(const void* data, const void* params) const {
  PackedWeight w{format, K, N, group_size, data, nullptr, nullptr, tile_cols};
  const auto* p = static_cast<const uint8_t*>(params) + (has_bias ? 4 * N : 0);
  if (compact) {
    w.scale16 = reinterpret_cast<const uint16_t*>(p);
    w.zp8 = p + 2 * per_channel;
  } else if (per_channel) {
    w.scale = reinterpret_cast<const float*>(p);
    w.zero_point = w.scale + per_channel;
  }
  return w;
}

}  // namespace actsparse
