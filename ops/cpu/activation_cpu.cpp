// CPU kernels of gelu_fused: flat loops split across threads.
// Without FP traps GCC can if-convert the selects of vec_math.h and vectorise the float loops.
#pragma GCC optimize("no-trapping-math")
#include <cmath>
#include <numbers>

#include "ops/activation_kernels.h"
#include "tensor/vec_math.h"

namespace fg {
namespace {

// tanh through one exp: 1 - 2 / (exp(2u) + 1), exact up to rounding (saturates cleanly to +-1 when exp
// over/underflows). float uses the branch-free fg::vec::exp so the loops vectorise (libm's expf is a
// scalar call per element); double keeps libm.
template <class T>
inline T tanh_via_exp(T u) {
  return T(1) - T(2) / (vec::exp(T(2) * u) + T(1));
}

template <class T>
void gelu_fwd(const T* x, T* y, T* aux, int64_t n, bool tanh_approx) {
  const T beta = static_cast<T>(std::sqrt(2.0 / std::numbers::pi)), kappa = static_cast<T>(0.044715);
  const T inv_sqrt2 = static_cast<T>(1.0 / std::sqrt(2.0));
  if (tanh_approx && aux) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
      const T v = x[i];
      const T t = tanh_via_exp(beta * (v + kappa * v * v * v));
      aux[i] = t;
      y[i] = T(0.5) * v * (T(1) + t);
    }
    return;
  }
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    if (tanh_approx) {
      const T t = tanh_via_exp(beta * (v + kappa * v * v * v));
      y[i] = T(0.5) * v * (T(1) + t);
    } else {
      y[i] = T(0.5) * v * (T(1) + std::erf(v * inv_sqrt2));
    }
  }
}

template <class T>
void gelu_bwd(const T* x, const T* aux, const T* gy, T* gx, int64_t n, bool tanh_approx) {
  const T beta = static_cast<T>(std::sqrt(2.0 / std::numbers::pi)), kappa = static_cast<T>(0.044715);
  const T inv_sqrt2 = static_cast<T>(1.0 / std::sqrt(2.0)), inv_sqrt2pi = static_cast<T>(1.0 / std::sqrt(2.0 * std::numbers::pi));
  if (tanh_approx && aux) {
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) {
      const T v = x[i], t = aux[i];
      const T d = T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * beta * (T(1) + T(3) * kappa * v * v);
      gx[i] = gy[i] * d;
    }
    return;
  }
#pragma omp parallel for schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    T d;
    if (tanh_approx) {
      // d/dx 0.5 x (1 + tanh(u)), u = beta (x + kappa x^3)
      const T t = aux ? aux[i] : tanh_via_exp(beta * (v + kappa * v * v * v));
      d = T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * beta * (T(1) + T(3) * kappa * v * v);
    } else {
      // Phi(x) + x phi(x)
      d = T(0.5) * (T(1) + std::erf(v * inv_sqrt2)) + v * inv_sqrt2pi * std::exp(T(-0.5) * v * v);
    }
    gx[i] = gy[i] * d;
  }
}

void gelu_fwd_cpu(const void* x, void* y, void* aux, int64_t n, DType dtype, bool tanh_approx) {
  if (dtype == kFloat32) {
    return gelu_fwd(static_cast<const float*>(x), static_cast<float*>(y), static_cast<float*>(aux), n, tanh_approx);
  }
  FG_CHECK(dtype == kFloat64, DTypeError, "gelu_fused: CPU kernel takes float32/float64, got {}", dtype);
  gelu_fwd(static_cast<const double*>(x), static_cast<double*>(y), static_cast<double*>(aux), n, tanh_approx);
}

void gelu_bwd_cpu(const void* x, const void* aux, const void* gy, void* gx, int64_t n, DType dtype, bool tanh_approx) {
  if (dtype == kFloat32) {
    return gelu_bwd(static_cast<const float*>(x), static_cast<const float*>(aux), static_cast<const float*>(gy),
                    static_cast<float*>(gx), n, tanh_approx);
  }
  FG_CHECK(dtype == kFloat64, DTypeError, "gelu_fused: CPU kernel takes float32/float64, got {}", dtype);
  gelu_bwd(static_cast<const double*>(x), static_cast<const double*>(aux), static_cast<const double*>(gy),
           static_cast<double*>(gx), n, tanh_approx);
}

}  // namespace

FG_REGISTER_KERNEL(gelu_fwd_stub, CPU, gelu_fwd_cpu);
FG_REGISTER_KERNEL(gelu_bwd_stub, CPU, gelu_bwd_cpu);

}  // namespace fg
