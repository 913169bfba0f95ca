// CUDA softmax / log_softmax rows (ops/softmax_kernels.h). One block per row. Unit-stride rows whose
// length is a multiple of 16 bytes (up to 64 KiB) are held in registers and moved with 16-byte accesses,
// several in flight per thread (one read, one write of memory); other unit-stride rows up to 8192
// elements are held in registers with scalar accesses; the rest take three strided passes. Half types compute in float; an all -inf row gives 0 (log: -inf) as on the CPU.
#include "flexgrad/ops/cuda/layout_device.cuh"
#include "flexgrad/ops/softmax_kernels.h"

namespace fg::cuda {
namespace {

// NaN-propagating max (as the CPU kernel and PyTorch): a NaN in a row must not be taken for an all -inf row.
template <class C> __device__ __forceinline__ C cmax(C a, C b) { return (a > b || a != a) ? a : b; }
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

// Rows held in registers and moved with 16-byte accesses: THREADS threads per row (one warp for short
// rows, so the reductions are shuffles only), each issuing all VECS vector loads before the first use
// (VECS * 16 bytes in flight per thread). Element e of vector j of thread t is row element
// (j * THREADS + t) * V + e. Rows whose start is not 16-byte aligned take the same mapping with scalar
// accesses. n must be a multiple of V and at most THREADS * VECS * V.
template <int THREADS, class C, class Combine>
__device__ __forceinline__ C row_allreduce(C v, Combine combine, C* shared) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = combine(v, __shfl_xor_sync(0xffffffffu, v, off));
  if constexpr (THREADS > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // shared may still be read by the previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = shared[0];
#pragma unroll
    for (int w = 1; w < THREADS / 32; ++w) v = combine(v, shared[w]);
    (void)lane;
  }
  return v;
}

template <class D, int THREADS, int VECS>
__global__ void __launch_bounds__(THREADS) softmax_vec_kernel(ReduceLayout l, const D* __restrict__ in,
                                                              D* __restrict__ out, bool log) {
  using C = std::conditional_t<std::is_same_v<D, double>, double, float>;
  constexpr int V = 16 / sizeof(D);
  using Vt = Vec<D, V>;
  __shared__ C shared[THREADS / 32];
  const int64_t o = blockIdx.x;
  const int n = static_cast<int>(inner_n(l));
  const int nv = n / V;
  const D* x = in + kept_in_off(l, o);
  D* y = out + kept_out_off(l, o);
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) & 15) == 0;
  Vt raw[VECS];
  if (aligned) {
#pragma unroll
    for (int j = 0; j < VECS; ++j) {
      const int vi = j * THREADS + threadIdx.x;
      if (vi < nv) raw[j] = *reinterpret_cast<const Vt*>(x + vi * V);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VECS; ++j) {
      const int vi = j * THREADS + threadIdx.x;
      if (vi < nv) {
#pragma unroll
        for (int e = 0; e < V; ++e) raw[j].v[e] = x[vi * V + e];
      }
    }
  }
  C v[VECS][V];
  C m = -INFINITY;
#pragma unroll
  for (int j = 0; j < VECS; ++j) {
    const bool ok = j * THREADS + static_cast<int>(threadIdx.x) < nv;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      v[j][e] = ok ? static_cast<C>(load_c(raw[j].v[e])) : C(-INFINITY);
      m = cmax(m, v[j][e]);
    }
  }
  m = row_allreduce<THREADS>(m, [](C a, C b) { return cmax(a, b); }, shared);
  C sum = 0;
  if (m != C(-INFINITY)) {
#pragma unroll
    for (int j = 0; j < VECS; ++j)
#pragma unroll
      for (int e = 0; e < V; ++e) {
        v[j][e] -= m;  // masked slots: -inf - m = -inf, exp gives 0
        sum += cexp(v[j][e]);
      }
  }
  sum = row_allreduce<THREADS>(sum, [](C a, C b) { return a + b; }, shared);
  const bool all_inf = m == C(-INFINITY);
  const C lse = ::log(sum), inv = C(1) / sum;
#pragma unroll
  for (int j = 0; j < VECS; ++j) {
    const int vi = j * THREADS + threadIdx.x;
    if (vi >= nv) continue;
    Vt r;
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const C val = all_inf ? (log ? C(-INFINITY) : C(0)) : (log ? v[j][e] - lse : cexp(v[j][e]) * inv);
      r.v[e] = store_c<D>(val);
    }
    if (aligned) *reinterpret_cast<Vt*>(y + vi * V) = r;
    else {
#pragma unroll
      for (int e = 0; e < V; ++e) y[vi * V + e] = r.v[e];
    }
  }
}

// Picks a vector configuration for unit-stride rows of n elements; false when none fits.
template <class D>
bool launch_softmax_vec(const ReduceLayout& l, const D* x, D* y, bool log, int64_t n, unsigned grid, cudaStream_t s) {
  constexpr int V = 16 / sizeof(D);
  if (n % V != 0) return false;
  const int64_t nv = n / V;
#define FG_SOFTMAX_VEC(T, K)                                          \
  if (nv <= (T) * (K)) {                                              \
    softmax_vec_kernel<D, T, K><<<grid, T, 0, s>>>(l, x, y, log);     \
    return true;                                                      \
  }
  FG_SOFTMAX_VEC(32, 1)
  FG_SOFTMAX_VEC(32, 2)
  FG_SOFTMAX_VEC(32, 4)
  FG_SOFTMAX_VEC(32, 8)
  FG_SOFTMAX_VEC(128, 4)
  FG_SOFTMAX_VEC(128, 8)
  FG_SOFTMAX_VEC(512, 4)
  FG_SOFTMAX_VEC(512, 8)
#undef FG_SOFTMAX_VEC
  return false;
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
    if (unit && launch_softmax_vec<D>(l, x, y, log, n, grid, s)) {
      FG_CUDA_CHECK_LAUNCH();
      return;
    }
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
