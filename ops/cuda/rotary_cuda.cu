// CUDA rotary embedding (ops/rotary_kernels.h): a thread per (row, i < E/2) pair, reading x1 and x2 and
// writing both outputs; consecutive threads take consecutive i, so rows are read and written coalesced.
#include "ops/cuda/cuda_common.cuh"
#include "ops/rotary_kernels.h"

namespace fg::cuda {
namespace {

template <class D, class C>
__global__ void __launch_bounds__(kThreads) rotary_kernel(RotaryArgs a, int64_t pairs) {
  const int64_t half = a.sizes[3] / 2, L = a.sizes[2], B = a.sizes[1];
  const auto* x = static_cast<const D*>(a.x);
  const auto* ct = static_cast<const C*>(a.cos);
  const auto* st = static_cast<const C*>(a.sin);
  auto* out = static_cast<D*>(a.out);
  const C sign = static_cast<C>(a.sign);
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = p / half, i = p - r * half;
    const int64_t l = r % L, b = (r / L) % B, i0 = r / (L * B);
    const D* xr = x + i0 * a.x_strides[0] + b * a.x_strides[1] + l * a.x_strides[2];
    const C c = ct[l * half + i], s = sign * st[l * half + i];
    const C x1 = static_cast<C>(load_c(xr[i])), x2 = static_cast<C>(load_c(xr[i + half]));
    D* o = out + r * 2 * half;
    o[i] = store_c<D>(x1 * c - x2 * s);
    o[i + half] = store_c<D>(x2 * c + x1 * s);
  }
}

void rotary_cuda(const RotaryArgs& a) {
  const int dev = device_of(a.out);
  DeviceGuard g(dev);
  const int64_t pairs = a.sizes[0] * a.sizes[1] * a.sizes[2] * (a.sizes[3] / 2);
  if (pairs == 0) return;
  dispatch_floating(a.dtype, "rotary_embedding", [&]<class D>() {
    using C = std::conditional_t<std::is_same_v<D, double>, double, float>;
    rotary_kernel<D, C><<<grid_for(pairs, kThreads, dev), kThreads, 0, stream(dev)>>>(a, pairs);
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(rotary_stub, CUDA, rotary_cuda);

}  // namespace fg::cuda
