// CUDA softmax / log_softmax rows (ops/softmax_kernels.h). One block per row. Rows of unit stride up to
// 8192 elements are held in registers (one read, one write of memory); other rows take three strided
// passes. Half types compute in float; an all -inf row gives 0 (log: -inf) as on the CPU.
#include "ops/cuda/layout_device.cuh"
#include "ops/softmax_kernels.h"

namespace fg::cuda {
namespace {

template <class C> __device__ __forceinline__ C cmax(C a, C b) { return a > b ? a : b; }
template <class C> __device__ __forceinline__ C cexp(C x) {
  if constexpr (std::is_same_v<C, float>) return __expf(x);
  else return ::exp(x);
}

template <class D, int ITEMS>
__global__ void __launch_bounds__(kThreads) softmax_reg_kernel(ReduceLayout l, const D* __restrict__ in, D* __restrict__ out,
                                                               bool log) {
  using C = std::conditional_t<std::is_same_v<D, double>, double, float>;
  __shared__ C shared[32];
  const int64_t o = blockIdx.x;
  const int64_t n = inner_n(l);
  const D* x = in + kept_in_off(l, o);
  D* y = out + kept_out_off(l, o);
  C v[ITEMS];
  C m = -INFINITY;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * kThreads;
    v[k] = i < n ? static_cast<C>(load_c(x[i])) : C(-INFINITY);
    m = cmax(m, v[k]);
  }
  m = block_allreduce(m, [](C a, C b) { return cmax(a, b); }, shared);
  if (m == C(-INFINITY)) {
    const C fill = log ? C(-INFINITY) : C(0);
#pragma unroll
    for (int k = 0; k < ITEMS; ++k) {
      const int64_t i = threadIdx.x + static_cast<int64_t>(k) * kThreads;
      if (i < n) y[i] = store_c<D>(fill);
    }
    return;
  }
  C sum = 0;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * kThreads;
    v[k] = v[k] - m;
    if (i < n) sum += cexp(v[k]);
  }
  sum = block_allreduce(sum, [](C a, C b) { return a + b; }, shared);
  const C lse = ::log(sum), inv = C(1) / sum;
#pragma unroll
  for (int k = 0; k < ITEMS; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * kThreads;
    if (i < n) y[i] = store_c<D>(log ? v[k] - lse : cexp(v[k]) * inv);
  }
}

template <class D>
__global__ void __launch_bounds__(kThreads) softmax_strided_kernel(ReduceLayout l, const D* __restrict__ in, D* __restrict__ out,
                                                                   bool log) {
  using C = std::conditional_t<std::is_same_v<D, double>, double, float>;
  __shared__ C shared[32];
  const int64_t o = blockIdx.x;
  const int64_t n = inner_n(l), s = inner_s(l), os = inner_os(l);
  const D* x = in + kept_in_off(l, o);
  D* y = out + kept_out_off(l, o);
  C m = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = cmax(m, static_cast<C>(load_c(x[i * s])));
  m = block_allreduce(m, [](C a, C b) { return cmax(a, b); }, shared);
  if (m == C(-INFINITY)) {
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) y[i * os] = store_c<D>(log ? C(-INFINITY) : C(0));
    return;
  }
  C sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += cexp(static_cast<C>(load_c(x[i * s])) - m);
  sum = block_allreduce(sum, [](C a, C b) { return a + b; }, shared);
  const C lse = ::log(sum), inv = C(1) / sum;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const C d = static_cast<C>(load_c(x[i * s])) - m;
    y[i * os] = store_c<D>(log ? d - lse : cexp(d) * inv);
  }
}

void softmax_cuda(const ReduceLayout& l, const void* in, void* out, DType dtype, bool log) {
  FG_ASSERT(l.red_ndim <= 1);
  if (l.n_out == 0) return;
  FG_CHECK(l.n_out <= 0x7fffffff, NotImplementedError, "softmax: {} rows exceed the CUDA grid", l.n_out);
  const int dev = device_of(in);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  const int64_t n = inner_n(l);
  const bool unit = inner_s(l) == 1 && inner_os(l) == 1;
  const unsigned grid = static_cast<unsigned>(l.n_out);
  dispatch_floating(dtype, log ? "log_softmax" : "softmax", [&]<class D>() {
    auto* x = static_cast<const D*>(in);
    auto* y = static_cast<D*>(out);
    if (unit && n <= kThreads * 1) softmax_reg_kernel<D, 1><<<grid, kThreads, 0, s>>>(l, x, y, log);
    else if (unit && n <= kThreads * 4) softmax_reg_kernel<D, 4><<<grid, kThreads, 0, s>>>(l, x, y, log);
    else if (unit && n <= kThreads * 8) softmax_reg_kernel<D, 8><<<grid, kThreads, 0, s>>>(l, x, y, log);
    else if (unit && n <= kThreads * 16) softmax_reg_kernel<D, 16><<<grid, kThreads, 0, s>>>(l, x, y, log);
    else if (unit && n <= kThreads * 32 && sizeof(D) <= 4) softmax_reg_kernel<D, 32><<<grid, kThreads, 0, s>>>(l, x, y, log);
    else softmax_strided_kernel<D><<<grid, kThreads, 0, s>>>(l, x, y, log);
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(softmax_stub, CUDA, softmax_cuda);

}  // namespace fg::cuda
