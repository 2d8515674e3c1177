// The activation between an MLP's two projections (ActSparseMLP), row by row. exp and erfc are polynomials the
// compiler vectorises; target_clones gives each ISA its own copy, chosen when the library loads.
#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "actsparse_core.hpp"

namespace actsparse {
namespace {

// Cephes' expf: |relative error| < 2e-7 over the clamped range.
inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.3365447504f), 88.3762626647949f);  // min and max keep NaN, and vectorise
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.f;
  return y * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);  // 2^n (memcpy would not vectorise)
}

// erfc(a) for a >= 0, Numerical Recipes' erfcc (Chebyshev): relative error under 1.2e-7 everywhere, so GELU keeps
// its precision where 1 + erf(x) is small.
inline float erfc_poly(float a) {
  const float t = 1.f / (1.f + 0.5f * a);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  return t * exp_poly(-a * a - 1.26551223f + t * p);
}

template <Activation A>
inline float act(float v) {
  if constexpr (A == Activation::Silu) {
    return v / (1.f + exp_poly(-v));
  } else if constexpr (A == Activation::GeluErf) {
    const float c = erfc_poly(std::fabs(v) * 0.70710678118654752f);  // 1 + erf(x) = 2 − erfc(x) = erfc(−x)
    return 0.5f * v * (v >= 0.f ? 2.f - c : c);
  } else {  // 1 + tanh(u) = 2 / (1 + e^{−2u}), which does not cancel where tanh(u) is near −1
    const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
    return v / (1.f + exp_poly(-2.f * u));
  }
}

// a[i] = act(g[i]) · u[i] (u null: act(g[i])), n floats.
template <Activation A>
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void apply(const float* g, const float* u, int64_t n, float* a) {
  if (u) {
    for (int64_t i = 0; i < n; ++i) a[i] = act<A>(g[i]) * u[i];
  } else {
    for (int64_t i = 0; i < n; ++i) a[i] = act<A>(g[i]);
  }
}

// bf16 or f16 bits to f32, and back (nearest even).
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void widen(const uint16_t* b, Activations type, int64_t n, float* out) {
  if (type == Activations::BF16) {
    for (int64_t i = 0; i < n; ++i) out[i] = bf16_bits_to_float(b[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(b[i]);
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void narrow(const float* a, Activations type, int64_t n, uint16_t* out) {
  if (type == Activations::BF16) {
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(a[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = float_to_half(a[i]);
  }
}

__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
void round_to_bf16(float* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = bf16_bits_to_float(float_to_bf16(a[i]));
}

}  // namespace

void activate(const void* h, Activations type, int64_t M, int64_t N, Activation act, Gate gate, bool round_bf16,
              void* a, const Executor& ex) {
  if (gate != Gate::None && N % 2) throw std::invalid_argument("activate: a gated intermediate needs an even width");
  const int64_t I = gate == Gate::None ? N : N / 2;
  const int64_t chunk = std::max<int64_t>(1, 16384 / N);  // rows per task: a decode step stays on this thread
  const auto rows = [&](int64_t task) {
    thread_local std::vector<float> wide;  // a row of h, then of a, in f32 (bf16 and f16)
    for (int64_t r = task * chunk; r < std::min(M, (task + 1) * chunk); ++r) {
      const float* hr;
      float* ar;
      if (type == Activations::F32) {
        hr = static_cast<const float*>(h) + r * N;
        ar = static_cast<float*>(a) + r * I;
      } else {
        wide.resize(2 * N);
        widen(static_cast<const uint16_t*>(h) + r * N, type, N, wide.data());
        hr = wide.data();
        ar = wide.data() + N;
      }
      const float* g = gate == Gate::Second ? hr + I : hr;
      const float* u = gate == Gate::None ? nullptr : gate == Gate::First ? hr + I : hr;
      switch (act) {
        case Activation::Silu: apply<Activation::Silu>(g, u, I, ar); break;
        case Activation::GeluErf: apply<Activation::GeluErf>(g, u, I, ar); break;
        case Activation::GeluTanh: apply<Activation::GeluTanh>(g, u, I, ar); break;
      }
      if (type != Activations::F32) {
        narrow(ar, type, I, static_cast<uint16_t*>(a) + r * I);
      } else if (round_bf16) {
        round_to_bf16(ar, I);
      }
    }
  };
  const int64_t tasks = (M + chunk - 1) / chunk;
  if (tasks == 1) {
    rows(0);
  } else {
    ex.parallel(tasks, rows);
  }
}

}  // namespace actsparse
