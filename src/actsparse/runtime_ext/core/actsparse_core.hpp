#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace actsparse {

enum class WeightFormat : int { F32 = 0, F16 = 1, U8 = 2, U4 = 3 };

struct PackedWeight {
  WeightFormat format;
  int64_t K, N;
  int64_t group_size;       // U4: K-group size; U8: K; F32/F16: 0
  const void* data;
  const float* scale;       // U8: [N]; U4: [(K/G)*N]; null otherwise
  const float* zero_point;  // same shape as scale; null otherwise
};

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

struct Params { float mode = 0.f; float threshold = 0.f; bool mask = true; };

// y = z'·W + bias; x [M,K], y [M,N] float row-major contiguous; bias may be null.
// kernel: null = best for this CPU; else a name from available_kernels() (throws std::invalid_argument if unknown/unsupported).
void matmul(const float* x, int64_t M, const PackedWeight& w, const float* bias, const Params& p,
            float* y, const Executor& ex, const char* kernel = nullptr);
std::vector<std::string> available_kernels();  // supported on this CPU, e.g. {"scalar","avx2","avx512"}
std::string best_kernel();

}  // namespace actsparse
