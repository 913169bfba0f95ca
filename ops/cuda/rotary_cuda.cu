// CUDA rotary embedding (ops/rotary_kernels.h): a thread per (row, V frequencies i..i+V-1 < E/2), reading x1
// and x2 and writing both outputs; consecutive threads take consecutive i, so rows are read and written
// coalesced.
#include "flexgrad/ops/cuda/cuda_common.cuh"
#include "flexgrad/ops/rotary_kernels.h"

namespace fg::cuda {
namespace {

// V consecutive frequencies per thread (one vector access per half-row when the layout allows); Idx is
// 32-bit when the pair count fits, as the index divisions dominate a kernel this light.
template <class D, class C, int V, class Idx>
__global__ void __launch_bounds__(kThreads) rotary_kernel(RotaryArgs a, Idx groups) {
  const Idx half = static_cast<Idx>(a.sizes[3] / 2), L = static_cast<Idx>(a.sizes[2]), B = static_cast<Idx>(a.sizes[1]);
  const Idx per_row = half / V;
  const auto* x = static_cast<const D*>(a.x);
  const auto* ct = static_cast<const C*>(a.cos);
  const auto* st = static_cast<const C*>(a.sin);
  auto* out = static_cast<D*>(a.out);
  const C sign = static_cast<C>(a.sign);
  for (Idx p = static_cast<Idx>(blockIdx.x) * blockDim.x + threadIdx.x; p < groups;
       p += static_cast<Idx>(gridDim.x) * blockDim.x) {
    const Idx r = p / per_row, i = (p - r * per_row) * V;
    const Idx lb = r / L, l = r - lb * L, i0 = lb / B, b = lb - i0 * B;
    const D* xr = x + static_cast<int64_t>(i0) * a.x_strides[0] + static_cast<int64_t>(b) * a.x_strides[1] +
                  static_cast<int64_t>(l) * a.x_strides[2];
    D* o = out + static_cast<int64_t>(r) * 2 * half;
    const Vec<D, V> v1 = *reinterpret_cast<const Vec<D, V>*>(xr + i);
    const Vec<D, V> v2 = *reinterpret_cast<const Vec<D, V>*>(xr + i + half);
    Vec<D, V> o1, o2;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const C c = ct[l * half + i + k], s = sign * st[l * half + i + k];
      const C x1 = static_cast<C>(load_c(v1.v[k])), x2 = static_cast<C>(load_c(v2.v[k]));
      o1.v[k] = store_c<D>(x1 * c - x2 * s);
      o2.v[k] = store_c<D>(x2 * c + x1 * s);
    }
    *reinterpret_cast<Vec<D, V>*>(o + i) = o1;
    *reinterpret_cast<Vec<D, V>*>(o + i + half) = o2;
  }
}

template <class D, class C, int V>
void launch(const RotaryArgs& a, int64_t pairs, int dev) {
  const int64_t groups = pairs / V;
  const unsigned grid = grid_for(groups, kThreads, dev);
  if (pairs < (int64_t{1} << 31)) rotary_kernel<D, C, V, uint32_t><<<grid, kThreads, 0, stream(dev)>>>(a, static_cast<uint32_t>(groups));
  else rotary_kernel<D, C, V, int64_t><<<grid, kThreads, 0, stream(dev)>>>(a, groups);
}

void rotary_cuda(const RotaryArgs& a) {
  const int dev = device_of(a.out);
  DeviceGuard g(dev);
  const int64_t half = a.sizes[3] / 2;
  const int64_t pairs = a.sizes[0] * a.sizes[1] * a.sizes[2] * half;
  if (pairs == 0) return;
  dispatch_floating(a.dtype, "rotary_embedding", [&]<class D>() {
    using C = std::conditional_t<std::is_same_v<D, double>, double, float>;
    // Pairs of frequencies when every half-row start is 2-element aligned (x's strides and pointer, E/2).
    bool two = half % 2 == 0 && reinterpret_cast<uintptr_t>(a.x) % (2 * sizeof(D)) == 0;
    for (int d = 0; d < 3; ++d) two = two && a.x_strides[d] % 2 == 0;
    if (two) launch<D, C, 2>(a, pairs, dev);
    else launch<D, C, 1>(a, pairs, dev);
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(rotary_stub, CUDA, rotary_cuda);

}  // namespace fg::cuda
