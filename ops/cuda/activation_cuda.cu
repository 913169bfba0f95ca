// CUDA kernels of gelu_fused (ops/activation_kernels.h): flat grid-stride loops, the same formulas as the
// CPU kernel. tanh goes through one exp (1 - 2 / (exp(2u) + 1)) as on the CPU, and the forward keeps it in
// aux when the backward will need it, so the backward evaluates no transcendental.
#include "ops/activation_kernels.h"
#include "ops/cuda/cuda_common.cuh"

namespace fg::cuda {
namespace {

template <class T> struct GeluConst {
  static constexpr T beta = static_cast<T>(0.79788456080286535587989211986876);  // sqrt(2 / pi)
  static constexpr T kappa = static_cast<T>(0.044715);
  static constexpr T inv_sqrt2 = static_cast<T>(0.70710678118654752440084436210485);
  static constexpr T inv_sqrt2pi = static_cast<T>(0.39894228040143267793994605993438);
};

template <class T> __device__ __forceinline__ T tanh_via_exp(T u) { return T(1) - T(2) / (::exp(T(2) * u) + T(1)); }

template <class T>
__global__ void gelu_fwd_kernel(const T* __restrict__ x, T* __restrict__ y, T* __restrict__ aux, int64_t n,
                                bool tanh_approx) {
  using K = GeluConst<T>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T v = x[i];
    if (tanh_approx) {
      const T t = tanh_via_exp(K::beta * (v + K::kappa * v * v * v));
      if (aux) aux[i] = t;
      y[i] = T(0.5) * v * (T(1) + t);
    } else {
      y[i] = T(0.5) * v * (T(1) + ::erf(v * K::inv_sqrt2));
    }
  }
}

template <class T>
__global__ void gelu_bwd_kernel(const T* __restrict__ x, const T* __restrict__ aux, const T* __restrict__ gy,
                                T* __restrict__ gx, int64_t n, bool tanh_approx) {
  using K = GeluConst<T>;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const T v = x[i];
    T d;
    if (tanh_approx) {
      // d/dx 0.5 x (1 + tanh(u)), u = beta (x + kappa x^3)
      const T t = aux ? aux[i] : tanh_via_exp(K::beta * (v + K::kappa * v * v * v));
      d = T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * K::beta * (T(1) + T(3) * K::kappa * v * v);
    } else {
      // Phi(x) + x phi(x)
      d = T(0.5) * (T(1) + ::erf(v * K::inv_sqrt2)) + v * K::inv_sqrt2pi * ::exp(T(-0.5) * v * v);
    }
    gx[i] = gy[i] * d;
  }
}

template <class F> void dispatch_gelu(DType t, F&& f) {
  FG_CHECK(t == kFloat32 || t == kFloat64, DTypeError, "gelu_fused: CUDA kernel takes float32/float64, got {}", t);
  if (t == kFloat32) f.template operator()<float>();
  else f.template operator()<double>();
}

void gelu_fwd_cuda(const void* x, void* y, void* aux, int64_t n, DType dtype, bool tanh_approx) {
  if (n == 0) return;
  const int dev = device_of(x);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  dispatch_gelu(dtype, [&]<class T>() {
    gelu_fwd_kernel<T><<<grid_for(n, kThreads, dev), kThreads, 0, s>>>(static_cast<const T*>(x), static_cast<T*>(y),
                                                                       static_cast<T*>(aux), n, tanh_approx);
    FG_CUDA_CHECK_LAUNCH();
  });
}

void gelu_bwd_cuda(const void* x, const void* aux, const void* gy, void* gx, int64_t n, DType dtype, bool tanh_approx) {
  if (n == 0) return;
  const int dev = device_of(x);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  dispatch_gelu(dtype, [&]<class T>() {
    gelu_bwd_kernel<T><<<grid_for(n, kThreads, dev), kThreads, 0, s>>>(
        static_cast<const T*>(x), static_cast<const T*>(aux), static_cast<const T*>(gy), static_cast<T*>(gx), n,
        tanh_approx);
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(gelu_fwd_stub, CUDA, gelu_fwd_cuda);
FG_REGISTER_KERNEL(gelu_bwd_stub, CUDA, gelu_bwd_cuda);

}  // namespace fg::cuda
