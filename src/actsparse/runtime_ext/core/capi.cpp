// extern "C" API for ctypes (tests, benchmarks, Python fallback).
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>

#include "actsparse_core.hpp"

namespace {
thread_local std::string g_error;

// One pool per calling thread and thread count: calls from different Python threads never share state.
const actsparse::ThreadExecutor& executor(int threads) {
  thread_local std::unique_ptr<actsparse::ThreadExecutor> ex;
  if (threads < 1) threads = 1;
  if (!ex || ex->concurrency() != threads) {
    ex.reset();
    ex.reset(new actsparse::ThreadExecutor(threads));
  }
  return *ex;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& e : v) s += (s.empty() ? "" : ",") + e;
  return s;
}
}  // namespace

extern "C" {

// weight_bytes: the bytes at data; scale_count: the values at scale (as many at zero_point). They are checked
// with the op contract (bind_op), as the runtimes check a node's inputs.
__attribute__((visibility("default"))) int actsparse_core_matmul(
    const void* x, int64_t M, int format, int64_t K, int64_t N, int64_t group_size, const void* data,
    int64_t weight_bytes, const void* scale, const void* zero_point, int64_t scale_count, const float* bias, float mode,
    float threshold, int mask, void* y, int threads, const char* kernel, int activations, int64_t tile_cols,
    int int8_activations, int compact_params) {
  try {
    const actsparse::FormatInfo* f = actsparse::find_format(format);
    actsparse::OpDesc d;
    d.weight_format = f ? f->name : std::to_string(format);
    d.out_features = N;
    d.group_size = group_size;
    d.tile_cols = tile_cols;
    d.mode = mode;
    d.threshold = threshold;
    d.has_bias = bias != nullptr;
    d.K = K;
    d.weight_type = f ? f->storage : actsparse::Element::Unknown;  // the caller passes bytes of any type
    d.weight_bytes = weight_bytes;
    d.params_type = compact_params ? actsparse::Element::U8 : actsparse::Element::F32;
    const int64_t bias_n = bias ? N : 0;
    d.params_bytes = compact_params ? 4 * bias_n + 3 * scale_count : 4 * (bias_n + 2 * scale_count);
    const actsparse::BoundOp op = actsparse::bind_op(d);
    // scale and zero point are separate buffers here, not one params tensor
    actsparse::PackedWeight w{op.format, K, N, group_size, data, nullptr, nullptr, tile_cols};
    if (compact_params) {
      w.scale16 = static_cast<const uint16_t*>(scale);
      w.zp8 = static_cast<const uint8_t*>(zero_point);
    } else if (op.per_channel) {
      w.scale = static_cast<const float*>(scale);
      w.zero_point = static_cast<const float*>(zero_point);
    }
    actsparse::Params p;
    p.mode = mode;
    p.threshold = threshold;
    p.mask = mask != 0;
    p.int8_activations = int8_activations != 0;
    actsparse::matmul(x, actsparse::Activations(activations), M, w, bias, p, y, executor(threads), kernel);
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
  } catch (...) {
    g_error = "actsparse: unknown error";
  }
  return 1;
}

// actsparse::activate on M rows of h [M, N] (activations as in actsparse_core_matmul), into a [M, N or N/2].
__attribute__((visibility("default"))) int actsparse_core_activate(const void* h, int activations, int64_t M, int64_t N,
                                                                   int activation, int gate, int round_bf16, void* a,
                                                                   int threads) {
  try {
    if (activation < 0 || activation > 2 || gate < 0 || gate > 2) throw std::invalid_argument("activate: bad enum");
    actsparse::activate(h, actsparse::Activations(activations), M, N, actsparse::Activation(activation),
                        actsparse::Gate(gate), round_bf16 != 0, a, executor(threads));
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
  }
  return 1;
}

// The format table (formats.inc and its traits) as JSON, so Python keeps no copy of it.
__attribute__((visibility("default"))) const char* actsparse_core_formats(void) {
  static const std::string s = [] {
    static const char* const params[] = {"none", "per_column", "per_group"};
    std::string j = "[";
    for (const auto& f : actsparse::kFormats)
      j += std::string(j.size() > 1 ? "," : "") + "{\"name\":\"" + f.name + "\",\"id\":" + std::to_string(int(f.format)) +
           ",\"bits\":" + std::to_string(f.bits) + ",\"storage\":\"" + (f.storage == actsparse::Element::F32 ? "f32" : "u8") +
           "\",\"params\":\"" + params[int(f.params)] + "\",\"compact_params\":" + (f.compact_params ? "true" : "false") +
           ",\"tile_cols\":" + std::to_string(f.tile_cols) + "}";
    return j + "]";
  }();
  return s.c_str();
}

__attribute__((visibility("default"))) const char* actsparse_core_last_error(void) { return g_error.c_str(); }

// The knobs in Tuning's order: par_bytes, split, prefetch_l2, decode_max_rows, union_pct.
__attribute__((visibility("default"))) void actsparse_core_get_tuning(int64_t* par_bytes, char* split, int* prefetch_l2,
                                                                      int64_t* decode_max_rows, int64_t* union_pct) {
  const actsparse::Tuning t = actsparse::tuning();
  *par_bytes = t.par_bytes;
  *split = t.split;
  *prefetch_l2 = t.prefetch_l2;
  *decode_max_rows = t.decode_max_rows;
  *union_pct = t.union_pct;
}

__attribute__((visibility("default"))) int actsparse_core_set_tuning(int64_t par_bytes, char split, int prefetch_l2,
                                                                     int64_t decode_max_rows, int64_t union_pct) {
  try {
    actsparse::set_tuning({par_bytes, split, prefetch_l2 != 0, decode_max_rows, union_pct});
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
  }
  return 1;
}

// actsparse::tuning_report(), as of this call.
__attribute__((visibility("default"))) const char* actsparse_core_tuning_report(void) {
  thread_local std::string s;
  s = actsparse::tuning_report();
  return s.c_str();
}

__attribute__((visibility("default"))) void actsparse_core_to_huge_pages(const void* p, int64_t bytes) {
  actsparse::to_huge_pages(p, size_t(bytes));
}

__attribute__((visibility("default"))) const char* actsparse_core_kernels(void) {
  static const std::string s = join(actsparse::available_kernels());
  return s.c_str();
}

__attribute__((visibility("default"))) const char* actsparse_core_best_kernel(void) {
  static const std::string s = actsparse::best_kernel();
  return s.c_str();
}

}  // extern "C"
