// CPU kernels of layer_norm / rms_norm. Rows are split across threads; statistics accumulate in double.
// The weight/bias gradients are per-thread partial column sums added at the end (deterministic for a
// fixed thread count, no atomics).
#include <omp.h>

#include <cmath>
#include <vector>

#include "flexgrad/ops/norm_kernels.h"

namespace fg {
namespace {

template <class T>
void norm_fwd(const NormArgs& a, T* y, T* mean_out, T* rstd_out) {
  const int64_t n = a.n;
  const T* X = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
#pragma omp parallel for schedule(static) if (a.rows * n > 32768)
  for (int64_t r = 0; r < a.rows; ++r) {
    const T* x = X + r * n;
    T* out = y + r * n;
    double m = 0;
    if (!a.rms) {
      for (int64_t i = 0; i < n; ++i) m += x[i];
      m /= n;
    }
    double v = 0;
    for (int64_t i = 0; i < n; ++i) { double d = x[i] - m; v += d * d; }
    v /= n;
    const T rs = static_cast<T>(1.0 / std::sqrt(v + a.eps)), mt = static_cast<T>(m);
    mean_out[r] = mt;
    rstd_out[r] = rs;
    for (int64_t i = 0; i < n; ++i) {
      T h = (x[i] - mt) * rs;
      if (w) h *= w[i];
      if (b) h += b[i];
      out[i] = h;
    }
  }
}

template <class T>
void norm_bwd(const NormArgs& a, const T* gy, const T* mean, const T* rstd, T* gx, T* gw, T* gb) {
  const int64_t n = a.n;
  const T* X = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight);
  const int nthreads = a.rows * n > 32768 ? omp_get_max_threads() : 1;
  // Per-thread column partial sums for gw and gb.
  std::vector<double> part_w(gw ? static_cast<size_t>(nthreads) * n : 0, 0.0);
  std::vector<double> part_b(gb ? static_cast<size_t>(nthreads) * n : 0, 0.0);
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    double* pw = gw ? part_w.data() + static_cast<size_t>(tid) * n : nullptr;
    double* pb = gb ? part_b.data() + static_cast<size_t>(tid) * n : nullptr;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) {
      const T* x = X + r * n;
      const T* g = gy + r * n;
      T* dx = gx + r * n;
      const T m = a.rms ? T(0) : mean[r], rs = rstd[r];
      // With xhat = (x - m) * rs and gh = g * w:  dx = rs * (gh - mean(gh) - xhat * mean(gh * xhat))
      // (RMSNorm drops the mean(gh) term since it does not centre).
      double sg = 0, sgx = 0;
      for (int64_t i = 0; i < n; ++i) {
        const T xh = (x[i] - m) * rs;
        const T gh = w ? g[i] * w[i] : g[i];
        sg += gh;
        sgx += static_cast<double>(gh) * xh;
        if (pw) pw[i] += static_cast<double>(g[i]) * xh;
        if (pb) pb[i] += g[i];
      }
      const T mg = a.rms ? T(0) : static_cast<T>(sg / n), mgx = static_cast<T>(sgx / n);
      for (int64_t i = 0; i < n; ++i) {
        const T xh = (x[i] - m) * rs;
        const T gh = w ? g[i] * w[i] : g[i];
        dx[i] = rs * (gh - mg - xh * mgx);
      }
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    double sw = 0, sb = 0;
    for (int t = 0; t < nthreads; ++t) {
      if (gw) sw += part_w[static_cast<size_t>(t) * n + i];
      if (gb) sb += part_b[static_cast<size_t>(t) * n + i];
    }
    if (gw) gw[i] = static_cast<T>(sw);
    if (gb) gb[i] = static_cast<T>(sb);
  }
}

void norm_fwd_cpu(const NormArgs& a, void* y, void* mean, void* rstd) {
  if (a.dtype == kFloat32) {
    return norm_fwd<float>(a, static_cast<float*>(y), static_cast<float*>(mean), static_cast<float*>(rstd));
  }
  FG_CHECK(a.dtype == kFloat64, DTypeError, "layer_norm/rms_norm: CPU kernel takes float32/float64, got {}", a.dtype);
  norm_fwd<double>(a, static_cast<double*>(y), static_cast<double*>(mean), static_cast<double*>(rstd));
}

void norm_bwd_cpu(const NormArgs& a, const void* gy, const void* mean, const void* rstd, void* gx, void* gw, void* gb) {
  if (a.dtype == kFloat32) {
    return norm_bwd<float>(a, static_cast<const float*>(gy), static_cast<const float*>(mean),
                           static_cast<const float*>(rstd), static_cast<float*>(gx), static_cast<float*>(gw),
                           static_cast<float*>(gb));
  }
  FG_CHECK(a.dtype == kFloat64, DTypeError, "layer_norm/rms_norm: CPU kernel takes float32/float64, got {}", a.dtype);
  norm_bwd<double>(a, static_cast<const double*>(gy), static_cast<const double*>(mean), static_cast<const double*>(rstd),
                   static_cast<double*>(gx), static_cast<double*>(gw), static_cast<double*>(gb));
}

}  // namespace

FG_REGISTER_KERNEL(norm_fwd_stub, CPU, norm_fwd_cpu);
FG_REGISTER_KERNEL(norm_bwd_stub, CPU, norm_bwd_cpu);

}  // namespace fg
