// CPU kernels of the fused cross_entropy: one row per iteration, rows split across threads.
#include <cmath>
#include <limits>

#include "flexgrad/ops/loss_kernels.h"

namespace fg {
namespace {

template <class T>
void ce_fwd(const CrossEntropyArgs& a, T* loss, T* lse_out) {
  const int64_t C = a.classes;
  const T* X = static_cast<const T*>(a.logits);
#pragma omp parallel for schedule(static) if (a.rows * C > 32768)
  for (int64_t r = 0; r < a.rows; ++r) {
    const T* x = X + r * C;
    const int64_t t = a.target[r];
    T m = -std::numeric_limits<T>::infinity();
    double sx = 0;
    for (int64_t c = 0; c < C; ++c) { m = std::max(m, x[c]); sx += x[c]; }
    double s = 0;
    for (int64_t c = 0; c < C; ++c) s += std::exp(static_cast<double>(x[c] - m));
    const double lse = static_cast<double>(m) + std::log(s);
    lse_out[r] = static_cast<T>(lse);
    if (t == a.ignore_index) { loss[r] = 0; continue; }
    // Out-of-range targets are a user error; they cannot be reported from inside a parallel loop, so
    // they produce NaN here and are reported after the loop.
    if (t < 0 || t >= C) { loss[r] = std::numeric_limits<T>::quiet_NaN(); continue; }
    loss[r] = static_cast<T>(lse - (1 - a.smoothing) * x[t] - a.smoothing * sx / C);
  }
  for (int64_t r = 0; r < a.rows; ++r) {
    const int64_t t = a.target[r];
    FG_CHECK(t == a.ignore_index || (t >= 0 && t < C), IndexError,
             "cross_entropy: target {} at row {} is out of range for {} classes (ignore_index {})", t, r, C,
             a.ignore_index);
  }
}

template <class T>
void ce_bwd(const CrossEntropyArgs& a, const T* lse, const T* scale, T* grad) {
  const int64_t C = a.classes;
  const T* X = static_cast<const T*>(a.logits);
  const T off = static_cast<T>(a.smoothing / C), on = static_cast<T>(1 - a.smoothing);
#pragma omp parallel for schedule(static) if (a.rows * C > 32768)
  for (int64_t r = 0; r < a.rows; ++r) {
    const T* x = X + r * C;
    T* g = grad + r * C;
    const int64_t t = a.target[r];
    if (t == a.ignore_index) {
      for (int64_t c = 0; c < C; ++c) g[c] = 0;
      continue;
    }
    const T l = lse[r], s = scale[r];
    for (int64_t c = 0; c < C; ++c) g[c] = s * (std::exp(x[c] - l) - off);
    g[t] -= s * on;
  }
}

void ce_fwd_cpu(const CrossEntropyArgs& a, void* loss, void* lse) {
  if (a.dtype == kFloat32) return ce_fwd<float>(a, static_cast<float*>(loss), static_cast<float*>(lse));
  FG_CHECK(a.dtype == kFloat64, DTypeError, "cross_entropy: CPU kernel takes float32/float64, got {}", a.dtype);
  ce_fwd<double>(a, static_cast<double*>(loss), static_cast<double*>(lse));
}

void ce_bwd_cpu(const CrossEntropyArgs& a, const void* lse, const void* scale, void* grad) {
  if (a.dtype == kFloat32) {
    return ce_bwd<float>(a, static_cast<const float*>(lse), static_cast<const float*>(scale), static_cast<float*>(grad));
  }
  FG_CHECK(a.dtype == kFloat64, DTypeError, "cross_entropy: CPU kernel takes float32/float64, got {}", a.dtype);
  ce_bwd<double>(a, static_cast<const double*>(lse), static_cast<const double*>(scale), static_cast<double*>(grad));
}

}  // namespace

FG_REGISTER_KERNEL(cross_entropy_fwd_stub, CPU, ce_fwd_cpu);
FG_REGISTER_KERNEL(cross_entropy_bwd_stub, CPU, ce_bwd_cpu);

}  // namespace fg
