// CUDA kernels of the fused cross_entropy (ops/loss_kernels.h). One block per row: the forward makes one
// pass for the max and the plain sum (label smoothing), one for the sum of exponentials. Exponentials are
// taken in the dtype (a float64 exp per logit would cost as much as reading the row) and the sums
// accumulate in float64, as on the CPU: rows reach 50k classes.
// Out-of-range targets: the kernel writes NaN for the row and records the smallest bad row with an
// atomicMin (order-free); the host reads that one word after the kernel (one stream sync per forward)
// and raises the CPU's IndexError, naming the row and the value.
#include <cstdint>

#include "flexgrad/ops/cuda/layout_device.cuh"
#include "flexgrad/ops/loss_kernels.h"

namespace fg::cuda {
namespace {

constexpr unsigned long long kNoBadRow = ~0ull;

template <class T> __device__ __forceinline__ T nan_max(T a, T b) { return (a > b || a != a) ? a : b; }

template <class T>
__global__ void ce_fwd_kernel(CrossEntropyArgs a, T* __restrict__ loss, T* __restrict__ lse_out,
                              unsigned long long* __restrict__ bad_row) {
  __shared__ double shared_d[32];
  __shared__ T shared_t[32];
  const int64_t r = blockIdx.x, C = a.classes;
  const T* x = static_cast<const T*>(a.logits) + r * C;
  T m = -INFINITY;
  double sx = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    const T v = x[c];
    m = nan_max(m, v);
    sx += v;
  }
  m = block_allreduce(m, [](T p, T q) { return nan_max(p, q); }, shared_t);
  double s = 0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) s += static_cast<double>(::exp(x[c] - m));
  auto add = [](double p, double q) { return p + q; };
  s = block_reduce(s, add, shared_d);
  sx = block_reduce(sx, add, shared_d);
  if (threadIdx.x != 0) return;
  const double lse = static_cast<double>(m) + ::log(s);
  lse_out[r] = static_cast<T>(lse);
  const int64_t t = a.target[r];
  if (t == a.ignore_index) {
    loss[r] = 0;
  } else if (t < 0 || t >= C) {
    loss[r] = static_cast<T>(NAN);
    atomicMin(bad_row, static_cast<unsigned long long>(r));
  } else {
    loss[r] = static_cast<T>(lse - (1 - a.smoothing) * x[t] - a.smoothing * sx / static_cast<double>(C));
  }
}

// grad[r, c] = scale[r] (exp(x - lse) - s/C) - scale[r] (1 - s) [c == t]; a grid-stride loop over the row's
// columns per block row, so every element has one writer.
template <class T>
__global__ void ce_bwd_kernel(CrossEntropyArgs a, const T* __restrict__ lse, const T* __restrict__ scale,
                              T* __restrict__ grad) {
  const int64_t r = blockIdx.x, C = a.classes;
  const T* x = static_cast<const T*>(a.logits) + r * C;
  T* g = grad + r * C;
  const int64_t t = a.target[r];
  if (t == a.ignore_index) {
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) g[c] = 0;
    return;
  }
  const T off = static_cast<T>(a.smoothing / static_cast<double>(C)), on = static_cast<T>(1 - a.smoothing);
  const T l = lse[r], sc = scale[r];
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    T v = sc * (::exp(x[c] - l) - off);
    if (c == t) v -= sc * on;
    g[c] = v;
  }
}

int row_threads(int64_t C) {
  if (C <= 256) return 64;
  if (C <= 2048) return 256;
  return 512;
}

template <class F> void dispatch_ce(DType t, F&& f) {
  FG_CHECK(t == kFloat32 || t == kFloat64, DTypeError, "cross_entropy: CUDA kernel takes float32/float64, got {}", t);
  if (t == kFloat32) f.template operator()<float>();
  else f.template operator()<double>();
}

void ce_fwd_cuda(const CrossEntropyArgs& a, void* loss, void* lse) {
  if (a.rows == 0) return;
  FG_CHECK(a.rows <= 0x7fffffff, NotImplementedError, "cross_entropy: {} rows exceed the CUDA grid", a.rows);
  const int dev = device_of(a.logits);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  Workspace flag(sizeof(unsigned long long), dev);
  FG_CUDA_CHECK(cudaMemsetAsync(flag.get(), 0xff, sizeof(unsigned long long), s));  // kNoBadRow
  dispatch_ce(a.dtype, [&]<class T>() {
    ce_fwd_kernel<T><<<static_cast<unsigned>(a.rows), row_threads(a.classes), 0, s>>>(
        a, static_cast<T*>(loss), static_cast<T*>(lse), flag.as<unsigned long long>());
    FG_CUDA_CHECK_LAUNCH();
  });
  unsigned long long bad = kNoBadRow;
  FG_CUDA_CHECK(cudaMemcpyAsync(&bad, flag.get(), sizeof bad, cudaMemcpyDeviceToHost, s));
  FG_CUDA_CHECK(cudaStreamSynchronize(s));
  if (bad == kNoBadRow) return;
  int64_t t = 0;  // only on the error path: the offending value itself
  FG_CUDA_CHECK(cudaMemcpyAsync(&t, a.target + bad, sizeof t, cudaMemcpyDeviceToHost, s));
  FG_CUDA_CHECK(cudaStreamSynchronize(s));
  FG_FAIL(IndexError, "cross_entropy: target {} at row {} is out of range for {} classes (ignore_index {})", t,
          static_cast<int64_t>(bad), a.classes, a.ignore_index);
}

void ce_bwd_cuda(const CrossEntropyArgs& a, const void* lse, const void* scale, void* grad) {
  if (a.rows == 0) return;
  FG_CHECK(a.rows <= 0x7fffffff, NotImplementedError, "cross_entropy: {} rows exceed the CUDA grid", a.rows);
  const int dev = device_of(a.logits);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  dispatch_ce(a.dtype, [&]<class T>() {
    ce_bwd_kernel<T><<<static_cast<unsigned>(a.rows), row_threads(a.classes), 0, s>>>(
        a, static_cast<const T*>(lse), static_cast<const T*>(scale), static_cast<T*>(grad));
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(cross_entropy_fwd_stub, CUDA, ce_fwd_cuda);
FG_REGISTER_KERNEL(cross_entropy_bwd_stub, CUDA, ce_bwd_cuda);

}  // namespace fg::cuda
