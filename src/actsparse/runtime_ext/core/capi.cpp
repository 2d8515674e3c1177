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

__attribute__((visibility("default"))) int actsparse_core_matmul(
    const void* x, int64_t M, int format, int64_t K, int64_t N, int64_t group_size, const void* data,
    const void* scale, const void* zero_point, const float* bias, float mode, float threshold, int mask, void* y,
    int threads, const char* kernel, int activations, int64_t tile_cols, int int8_activations, int compact_params) {
  try {
    if (format < 0 || format > 4) throw std::invalid_argument("actsparse: format must be 0..4");
    // compact_params (U4): scale holds f16 values, zero_point u8 ones
    actsparse::PackedWeight w{actsparse::WeightFormat(format), K, N, group_size, data,
                              compact_params ? nullptr : static_cast<const float*>(scale),
                              compact_params ? nullptr : static_cast<const float*>(zero_point), tile_cols};
    if (compact_params) {
      w.scale16 = static_cast<const uint16_t*>(scale);
      w.zp8 = static_cast<const uint8_t*>(zero_point);
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

__attribute__((visibility("default"))) const char* actsparse_core_last_error(void) { return g_error.c_str(); }

__attribute__((visibility("default"))) void actsparse_core_get_tuning(int64_t* par_bytes, char* split, int* prefetch_l2) {
  const actsparse::Tuning t = actsparse::tuning();
  *par_bytes = t.par_bytes;
  *split = t.split;
  *prefetch_l2 = t.prefetch_l2;
}

__attribute__((visibility("default"))) int actsparse_core_set_tuning(int64_t par_bytes, char split, int prefetch_l2) {
  try {
    actsparse::set_tuning({par_bytes, split, prefetch_l2 != 0});
    return 0;
  } catch (const std::exception& e) {
    g_error = e.what();
  }
  return 1;
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
