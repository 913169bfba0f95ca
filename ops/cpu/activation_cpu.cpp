// CPU kernels of gelu_fused: flat loops split across threads. Half types run the float kernel on blocks
// converted into a stack buffer, so they share its math bit for bit and round once at the store.
// Without FP traps GCC can if-convert the selects of vec_math.h and vectorise the float loops.
#pragma GCC optimize("no-trapping-math")
#include <algorithm>
#include <cmath>
#include <numbers>
#include <type_traits>

#include "flexgrad/ops/activation_kernels.h"
#include "flexgrad/tensor/half.h"
#include "flexgrad/tensor/vec_math.h"

namespace fg {
namespace {

constexpr int64_t kGrain = 65536;  // elements below which threads cost more than they save
constexpr int64_t kBlock = 512;    // half elements converted per stack buffer (3 float buffers: 6 KiB)

// tanh through one exp: 1 - 2 / (exp(2u) + 1), exact up to rounding (saturates cleanly to +-1 when exp
// over/underflows). float uses the branch-free fg::vec::exp so the loops vectorise (libm's expf is a
// scalar call per element); double keeps libm.
template <class T>
inline T tanh_via_exp(T u) {
  return T(1) - T(2) / (vec::exp(T(2) * u) + T(1));
}

// Serial loops over n elements of a float type; the drivers below split the work.
template <class T>
void gelu_fwd_span(const T* x, T* y, T* aux, int64_t n, bool tanh_approx) {
  const T beta = static_cast<T>(std::sqrt(2.0 / std::numbers::pi)), kappa = static_cast<T>(0.044715);
  const T inv_sqrt2 = static_cast<T>(1.0 / std::sqrt(2.0));
  if (tanh_approx && aux) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = x[i];
      const T t = tanh_via_exp(beta * (v + kappa * v * v * v));
      aux[i] = t;
      y[i] = T(0.5) * v * (T(1) + t);
    }
    return;
  }
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
void gelu_bwd_span(const T* x, const T* aux, const T* gy, T* gx, int64_t n, bool tanh_approx) {
  const T beta = static_cast<T>(std::sqrt(2.0 / std::numbers::pi)), kappa = static_cast<T>(0.044715);
  const T inv_sqrt2 = static_cast<T>(1.0 / std::sqrt(2.0)), inv_sqrt2pi = static_cast<T>(1.0 / std::sqrt(2.0 * std::numbers::pi));
  if (tanh_approx && aux) {
    for (int64_t i = 0; i < n; ++i) {
      const T v = x[i], t = aux[i];
      const T d = T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * beta * (T(1) + T(3) * kappa * v * v);
      gx[i] = gy[i] * d;
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const T v = x[i];
    T d;
    if (tanh_approx) {
      // d/dx 0.5 x (1 + tanh(u)), u = beta (x + kappa x^3); the same expression as the forward's tanh, so
      // recomputing gives the value the forward would have kept in aux.
      const T t = tanh_via_exp(beta * (v + kappa * v * v * v));
      d = T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * beta * (T(1) + T(3) * kappa * v * v);
    } else {
      // Phi(x) + x phi(x)
      d = T(0.5) * (T(1) + std::erf(v * inv_sqrt2)) + v * inv_sqrt2pi * std::exp(T(-0.5) * v * v);
    }
    gx[i] = gy[i] * d;
  }
}

// body(begin, len) over [0, n) in contiguous pieces, threaded above kGrain.
template <class Body>
void parallel_spans(int64_t n, Body&& body) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(n / kGrain, 256));
  const int64_t per = (n + chunks - 1) / chunks;
#pragma omp parallel for if (chunks > 1) schedule(static)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * per, len = std::min(per, n - begin);
    if (len > 0) body(begin, len);
  }
}

template <class T>
void gelu_fwd(const T* x, T* y, T* aux, int64_t n, bool tanh_approx) {
  parallel_spans(n, [&](int64_t b, int64_t len) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      gelu_fwd_span(x + b, y + b, aux ? aux + b : nullptr, len, tanh_approx);
    } else {
      float xf[kBlock], yf[kBlock];
      for (int64_t s = b; s < b + len; s += kBlock) {
        const int64_t m = std::min(kBlock, b + len - s);
        for (int64_t i = 0; i < m; ++i) xf[i] = static_cast<float>(x[s + i]);
        gelu_fwd_span<float>(xf, yf, nullptr, m, tanh_approx);
        for (int64_t i = 0; i < m; ++i) y[s + i] = T(yf[i]);
      }
    }
  });
}

template <class T>
void gelu_bwd(const T* x, const T* aux, const T* gy, T* gx, int64_t n, bool tanh_approx) {
  parallel_spans(n, [&](int64_t b, int64_t len) {
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
      gelu_bwd_span(x + b, aux ? aux + b : nullptr, gy + b, gx + b, len, tanh_approx);
    } else {
      float xf[kBlock], gyf[kBlock], gxf[kBlock];
      for (int64_t s = b; s < b + len; s += kBlock) {
        const int64_t m = std::min(kBlock, b + len - s);
        for (int64_t i = 0; i < m; ++i) xf[i] = static_cast<float>(x[s + i]), gyf[i] = static_cast<float>(gy[s + i]);
        gelu_bwd_span<float>(xf, nullptr, gyf, gxf, m, tanh_approx);
        for (int64_t i = 0; i < m; ++i) gx[s + i] = T(gxf[i]);
      }
    }
  });
}

// f.template operator()<T>() with the stored type of dtype; half types must come without aux.
template <class F>
void dispatch_gelu(DType t, bool has_aux, F&& f) {
  switch (t) {
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    case DType::Float16:
    case DType::BFloat16:
      FG_CHECK(!has_aux, DTypeError, "gelu_fused: aux is float32/float64 only, got an aux buffer with dtype {}", t);
      if (t == DType::Float16) return f.template operator()<Half>();
      return f.template operator()<BFloat16>();
    default: break;
  }
  FG_FAIL(DTypeError, "gelu_fused: CPU kernel takes float16/bfloat16/float32/float64, got {}", t);
}

void gelu_fwd_cpu(const void* x, void* y, void* aux, int64_t n, DType dtype, bool tanh_approx) {
  dispatch_gelu(dtype, aux != nullptr, [&]<class T>() {
    gelu_fwd(static_cast<const T*>(x), static_cast<T*>(y), static_cast<T*>(aux), n, tanh_approx);
  });
}

void gelu_bwd_cpu(const void* x, const void* aux, const void* gy, void* gx, int64_t n, DType dtype, bool tanh_approx) {
  dispatch_gelu(dtype, aux != nullptr, [&]<class T>() {
    gelu_bwd(static_cast<const T*>(x), static_cast<const T*>(aux), static_cast<const T*>(gy), static_cast<T*>(gx), n,
             tanh_approx);
  });
}

}  // namespace

FG_REGISTER_KERNEL(gelu_fwd_stub, CPU, gelu_fwd_cpu);
FG_REGISTER_KERNEL(gelu_bwd_stub, CPU, gelu_bwd_cpu);

}  // namespace fg
