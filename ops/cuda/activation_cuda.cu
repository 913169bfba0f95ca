// CUDA kernels of gelu_fused (ops/activation_kernels.h): flat grid-stride loops, the same formulas as the
// CPU kernel. tanh goes through one exp (1 - 2 / (exp(2u) + 1)) as on the CPU. Each thread moves one 16-byte
// vector per operand when every pointer allows it (the pass is memory bound). Half types load, compute in
// float and store once in their own dtype; float32/float64 keep tanh in aux when the backward will need it,
// half types recompute it in the backward (no float aux next to a half x).
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "flexgrad/ops/activation_kernels.h"
#include "flexgrad/ops/cuda/cuda_common.cuh"

namespace fg::cuda {
namespace {

template <class T> struct GeluConst {
  static constexpr T beta = static_cast<T>(0.79788456080286535587989211986876);  // sqrt(2 / pi)
  static constexpr T kappa = static_cast<T>(0.044715);
  static constexpr T inv_sqrt2 = static_cast<T>(0.70710678118654752440084436210485);
  static constexpr T inv_sqrt2pi = static_cast<T>(0.39894228040143267793994605993438);
};

template <class C> __device__ __forceinline__ C tanh_via_exp(C u) { return C(1) - C(2) / (::exp(C(2) * u) + C(1)); }

// tanh(u), u = beta (x + kappa x^3)
template <class C> __device__ __forceinline__ C gelu_tanh_of(C v) {
  using K = GeluConst<C>;
  return tanh_via_exp(K::beta * (v + K::kappa * v * v * v));
}

template <class C> __device__ __forceinline__ C gelu_erf(C v) {
  return C(0.5) * v * (C(1) + ::erf(v * GeluConst<C>::inv_sqrt2));
}

// d/dx 0.5 x (1 + tanh(u)) given t = tanh(u)
template <class C> __device__ __forceinline__ C dgelu_tanh(C v, C t) {
  using K = GeluConst<C>;
  return C(0.5) * (C(1) + t) + C(0.5) * v * (C(1) - t * t) * K::beta * (C(1) + C(3) * K::kappa * v * v);
}

// Phi(x) + x phi(x)
template <class C> __device__ __forceinline__ C dgelu_erf(C v) {
  using K = GeluConst<C>;
  return C(0.5) * (C(1) + ::erf(v * K::inv_sqrt2)) + v * K::inv_sqrt2pi * ::exp(C(-0.5) * v * v);
}

// One element of the forward; *t receives tanh(u) on the tanh path.
template <class C> __device__ __forceinline__ C gelu_fwd_one(C v, bool tanh_approx, C* t) {
  if (!tanh_approx) return gelu_erf(v);
  *t = gelu_tanh_of(v);
  return C(0.5) * v * (C(1) + *t);
}

template <class C> __device__ __forceinline__ C gelu_bwd_one(C v, const C* aux_t, bool tanh_approx) {
  if (!tanh_approx) return dgelu_erf(v);
  return dgelu_tanh(v, aux_t ? *aux_t : gelu_tanh_of(v));
}

// aux is used only where the compute type is the stored type (float32/float64).
template <class D, int V>
__global__ void __launch_bounds__(kThreads) gelu_fwd_kernel(const D* __restrict__ x, D* __restrict__ y,
                                                            dc_t<D>* __restrict__ aux, int64_t n, bool tanh_approx) {
  using C = dc_t<D>;
  constexpr bool kAux = std::is_same_v<C, D>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; base < n; base += step) {
    if (V > 1 && base + V <= n) {
      const Vec<D, V> vx = *reinterpret_cast<const Vec<D, V>*>(x + base);
      Vec<D, V> vy;
      Vec<C, V> vt;
#pragma unroll
      for (int j = 0; j < V; ++j) vy.v[j] = store_c<D>(gelu_fwd_one(load_c(vx.v[j]), tanh_approx, &vt.v[j]));
      *reinterpret_cast<Vec<D, V>*>(y + base) = vy;
      if constexpr (kAux) {
        if (aux && tanh_approx) *reinterpret_cast<Vec<C, V>*>(aux + base) = vt;
      }
    } else {
      const int64_t end = base + V < n ? base + V : n;
      for (int64_t i = base; i < end; ++i) {
        C t{};
        y[i] = store_c<D>(gelu_fwd_one(load_c(x[i]), tanh_approx, &t));
        if constexpr (kAux) {
          if (aux && tanh_approx) aux[i] = t;
        }
      }
    }
  }
}

template <class D, int V>
__global__ void __launch_bounds__(kThreads) gelu_bwd_kernel(const D* __restrict__ x, const dc_t<D>* __restrict__ aux,
                                                            const D* __restrict__ gy, D* __restrict__ gx, int64_t n,
                                                            bool tanh_approx) {
  using C = dc_t<D>;
  constexpr bool kAux = std::is_same_v<C, D>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; base < n; base += step) {
    if (V > 1 && base + V <= n) {
      const Vec<D, V> vx = *reinterpret_cast<const Vec<D, V>*>(x + base);
      const Vec<D, V> vg = *reinterpret_cast<const Vec<D, V>*>(gy + base);
      Vec<C, V> vt{};
      const bool have_aux = kAux && aux;
      if constexpr (kAux) {
        if (aux) vt = *reinterpret_cast<const Vec<C, V>*>(aux + base);
      }
      Vec<D, V> vo;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const C d = gelu_bwd_one(load_c(vx.v[j]), have_aux ? &vt.v[j] : nullptr, tanh_approx);
        vo.v[j] = store_c<D>(load_c(vg.v[j]) * d);
      }
      *reinterpret_cast<Vec<D, V>*>(gx + base) = vo;
    } else {
      const int64_t end = base + V < n ? base + V : n;
      for (int64_t i = base; i < end; ++i) {
        const C* t = nullptr;
        if constexpr (kAux) t = aux ? aux + i : nullptr;
        gx[i] = store_c<D>(load_c(gy[i]) * gelu_bwd_one(load_c(x[i]), t, tanh_approx));
      }
    }
  }
}

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;  // null is aligned
  }
  return true;
}

void check_aux(const void* aux, DType dtype) {
  FG_CHECK(aux == nullptr || dtype == kFloat32 || dtype == kFloat64, DTypeError,
           "gelu_fused: aux is float32/float64 only, got an aux buffer with dtype {}", dtype);
}

template <class D, int V>
void launch_fwd(const void* x, void* y, void* aux, int64_t n, bool tanh_approx, int dev, cudaStream_t s) {
  gelu_fwd_kernel<D, V><<<grid_for((n + V - 1) / V, kThreads, dev), kThreads, 0, s>>>(
      static_cast<const D*>(x), static_cast<D*>(y), static_cast<dc_t<D>*>(aux), n, tanh_approx);
  FG_CUDA_CHECK_LAUNCH();
}

template <class D, int V>
void launch_bwd(const void* x, const void* aux, const void* gy, void* gx, int64_t n, bool tanh_approx, int dev,
                cudaStream_t s) {
  gelu_bwd_kernel<D, V><<<grid_for((n + V - 1) / V, kThreads, dev), kThreads, 0, s>>>(
      static_cast<const D*>(x), static_cast<const dc_t<D>*>(aux), static_cast<const D*>(gy), static_cast<D*>(gx), n,
      tanh_approx);
  FG_CUDA_CHECK_LAUNCH();
}

void gelu_fwd_cuda(const void* x, void* y, void* aux, int64_t n, DType dtype, bool tanh_approx) {
  check_aux(aux, dtype);
  if (n == 0) return;
  const int dev = device_of(x);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  const bool vec = aligned16({x, y, aux});
  dispatch_floating(dtype, "gelu_fused", [&]<class D>() {
    if (vec) launch_fwd<D, 16 / sizeof(D)>(x, y, aux, n, tanh_approx, dev, s);
    else launch_fwd<D, 1>(x, y, aux, n, tanh_approx, dev, s);
  });
}

void gelu_bwd_cuda(const void* x, const void* aux, const void* gy, void* gx, int64_t n, DType dtype, bool tanh_approx) {
  check_aux(aux, dtype);
  if (n == 0) return;
  const int dev = device_of(x);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  const bool vec = aligned16({x, aux, gy, gx});
  dispatch_floating(dtype, "gelu_fused", [&]<class D>() {
    if (vec) launch_bwd<D, 16 / sizeof(D)>(x, aux, gy, gx, n, tanh_approx, dev, s);
    else launch_bwd<D, 1>(x, aux, gy, gx, n, tanh_approx, dev, s);
  });
}

}  // namespace

FG_REGISTER_KERNEL(gelu_fwd_stub, CUDA, gelu_fwd_cuda);
FG_REGISTER_KERNEL(gelu_bwd_stub, CUDA, gelu_bwd_cuda);

}  // namespace fg::cuda
