// Running an ElementwisePlan on the GPU. The plan is passed to kernels by value. Three paths:
//   - every operand contiguous: each thread moves V elements with one 16-byte load/store per operand
//     when all pointers are aligned to it (V = 16 / widest element), grid-stride over the tensor;
//   - otherwise the offset calculator: the plan's sizes and byte strides turn a linear index into one
//     byte offset per operand (32-bit index math when the tensor allows it), once per run of V elements
//     when every operand is contiguous and aligned along the innermost dim, else once per element.
// Functors F are called with device values (D types) and return the output's device type.
#pragma once
#include <cstdint>
#include <cstring>
#include <algorithm>

#include "flexgrad/ops/cuda/cuda_common.cuh"
#include "flexgrad/ops/elementwise_plan.h"

namespace fg::cuda {

struct NoInput {};  // placeholder type of unused input slots

template <int NIN, class Out, class I0, class I1, class I2, class F>
__device__ __forceinline__ Out apply_f(const F& f, const I0& a, const I1& b, const I2& c) {
  if constexpr (NIN == 0) return f();
  else if constexpr (NIN == 1) return f(a);
  else if constexpr (NIN == 2) return f(a, b);
  else return f(a, b, c);
}

template <int NIN, int V, class Out, class I0, class I1, class I2, class F>
__global__ void __launch_bounds__(kThreads) contig_kernel(int64_t n, Out* __restrict__ out, const I0* __restrict__ a,
                                                          const I1* __restrict__ b, const I2* __restrict__ c, F f) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t base = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; base < n; base += step) {
    if (V > 1 && base + V <= n) {
      Vec<I0, V> va;
      Vec<I1, V> vb;
      Vec<I2, V> vc;
      if constexpr (NIN >= 1) va = *reinterpret_cast<const Vec<I0, V>*>(a + base);
      if constexpr (NIN >= 2) vb = *reinterpret_cast<const Vec<I1, V>*>(b + base);
      if constexpr (NIN >= 3) vc = *reinterpret_cast<const Vec<I2, V>*>(c + base);
      Vec<Out, V> vo;
#pragma unroll
      for (int j = 0; j < V; ++j) vo.v[j] = apply_f<NIN, Out>(f, va.v[j], vb.v[j], vc.v[j]);
      *reinterpret_cast<Vec<Out, V>*>(out + base) = vo;
    } else {
      const int64_t end = base + V < n ? base + V : n;
      for (int64_t i = base; i < end; ++i) {
        I0 x{};
        I1 y{};
        I2 z{};
        if constexpr (NIN >= 1) x = a[i];
        if constexpr (NIN >= 2) y = b[i];
        if constexpr (NIN >= 3) z = c[i];
        out[i] = apply_f<NIN, Out>(f, x, y, z);
      }
    }
  }
}

// Adds to off[op] the byte offsets of position `rem` over the plan's dims first..ndim-1 (innermost first):
// the offset calculator both strided kernels share.
template <int NIN, class Idx>
__device__ __forceinline__ void add_plan_offsets(const ElementwisePlan& p, int first, Idx rem, int64_t (&off)[NIN + 1]) {
#pragma unroll
  for (int d = 0; d < kMaxPlanDims; ++d) {
    if (d >= p.ndim) break;
    if (d < first) continue;
    const Idx sz = static_cast<Idx>(p.sizes[d]);
    const Idx q = rem / sz;
    const Idx idx = rem - q * sz;
    rem = q;
#pragma unroll
    for (int op = 0; op <= NIN; ++op) off[op] += static_cast<int64_t>(idx) * p.strides[op][d];
  }
}

template <int NIN, class Idx, class Out, class I0, class I1, class I2, class F>
__global__ void __launch_bounds__(kThreads) strided_kernel(ElementwisePlan p, F f) {
  const Idx n = static_cast<Idx>(p.numel);
  const Idx step = static_cast<Idx>(gridDim.x) * blockDim.x;
  for (Idx i = static_cast<Idx>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    // The offset calculator: linear index -> byte offset of each operand.
    int64_t off[NIN + 1] = {};
    add_plan_offsets<NIN>(p, 0, i, off);
    I0 x{};
    I1 y{};
    I2 z{};
    if constexpr (NIN >= 1) x = *reinterpret_cast<const I0*>(p.data[1] + off[1]);
    if constexpr (NIN >= 2) y = *reinterpret_cast<const I1*>(p.data[2] + off[2]);
    if constexpr (NIN >= 3) z = *reinterpret_cast<const I2*>(p.data[3] + off[3]);
    *reinterpret_cast<Out*>(p.data[0] + off[0]) = apply_f<NIN, Out>(f, x, y, z);
  }
}

// The offset calculator over V-element runs: every operand is contiguous along the innermost dim, whose size
// is a multiple of V, and every pointer and outer stride is a multiple of V elements, so one offset
// computation serves V elements moved by one vector access per operand (a transposed copy or a broadcast
// along outer dims, e.g. [B, H, L, E] <- [B, L, H, E], spends most of its time in the index arithmetic).
template <int NIN, int V, class Idx, class Out, class I0, class I1, class I2, class F>
__global__ void __launch_bounds__(kThreads) strided_vec_kernel(ElementwisePlan p, F f) {
  const Idx nv = static_cast<Idx>(p.numel / V);
  const Idx inner = static_cast<Idx>(p.sizes[0] / V);
  const Idx step = static_cast<Idx>(gridDim.x) * blockDim.x;
  for (Idx j = static_cast<Idx>(blockIdx.x) * blockDim.x + threadIdx.x; j < nv; j += step) {
    const Idx outer = j / inner;
    const Idx i0 = (j - outer * inner) * V;
    int64_t off[NIN + 1];
#pragma unroll
    for (int op = 0; op <= NIN; ++op) off[op] = static_cast<int64_t>(i0) * p.strides[op][0];
    add_plan_offsets<NIN>(p, 1, outer, off);
    Vec<I0, V> va;
    Vec<I1, V> vb;
    Vec<I2, V> vc;
    if constexpr (NIN >= 1) va = *reinterpret_cast<const Vec<I0, V>*>(p.data[1] + off[1]);
    if constexpr (NIN >= 2) vb = *reinterpret_cast<const Vec<I1, V>*>(p.data[2] + off[2]);
    if constexpr (NIN >= 3) vc = *reinterpret_cast<const Vec<I2, V>*>(p.data[3] + off[3]);
    Vec<Out, V> vo;
#pragma unroll
    for (int k = 0; k < V; ++k) vo.v[k] = apply_f<NIN, Out>(f, va.v[k], vb.v[k], vc.v[k]);
    *reinterpret_cast<Vec<Out, V>*>(p.data[0] + off[0]) = vo;
  }
}

template <class T> constexpr size_t size_of_slot() {
  if constexpr (std::is_same_v<T, NoInput>) return 1;
  else return sizeof(T);
}

// Runs f over the plan (operand 0 = output of type Out, then NIN inputs of types I0..I2).
template <int NIN, class Out, class I0 = NoInput, class I1 = NoInput, class I2 = NoInput, class F>
void launch_elementwise(const ElementwisePlan& p, const F& f) {
  if (p.numel == 0) return;
  const int dev = device_of(p.data[0]);
  DeviceGuard guard(dev);
  cudaStream_t s = stream(dev);
  bool contiguous = true;
  for (int i = 0; i < p.noperands; ++i) contiguous = contiguous && p.is_contiguous(i);
  if (contiguous) {
    constexpr size_t widest = std::max({sizeof(Out), size_of_slot<I0>(), size_of_slot<I1>(), size_of_slot<I2>()});
    constexpr int V = static_cast<int>(16 / widest) > 8 ? 8 : static_cast<int>(16 / widest);
    bool aligned = true;
    for (int i = 0; i < p.noperands; ++i) {
      size_t es = element_size(p.dtypes[i]);
      aligned = aligned && reinterpret_cast<uintptr_t>(p.data[i]) % (es * V) == 0;
    }
    auto* out = reinterpret_cast<Out*>(p.data[0]);
    auto* a = reinterpret_cast<const I0*>(p.data[1]);
    auto* b = reinterpret_cast<const I1*>(p.data[2]);
    auto* c = reinterpret_cast<const I2*>(p.data[3]);
    if (aligned && V > 1) {
      contig_kernel<NIN, V, Out, I0, I1, I2><<<grid_for((p.numel + V - 1) / V, kThreads, dev), kThreads, 0, s>>>(
          p.numel, out, a, b, c, f);
    } else {
      contig_kernel<NIN, 1, Out, I0, I1, I2><<<grid_for(p.numel, kThreads, dev), kThreads, 0, s>>>(p.numel, out, a,
                                                                                                     b, c, f);
    }
    FG_CUDA_CHECK_LAUNCH();
    return;
  }
  // Strided: V-element runs when the innermost dim allows them (see strided_vec_kernel), else one element
  // per thread.
  constexpr size_t widest = std::max({sizeof(Out), size_of_slot<I0>(), size_of_slot<I1>(), size_of_slot<I2>()});
  constexpr int V = static_cast<int>(16 / widest) > 8 ? 8 : static_cast<int>(16 / widest);
  bool runs = V > 1 && p.ndim >= 2 && p.sizes[0] % V == 0;
  for (int i = 0; i < p.noperands && runs; ++i) {
    const int64_t es = static_cast<int64_t>(element_size(p.dtypes[i]));
    runs = p.strides[i][0] == es && reinterpret_cast<uintptr_t>(p.data[i]) % (es * V) == 0;
    for (int d = 1; d < p.ndim && runs; ++d) runs = p.strides[i][d] % (es * V) == 0;
  }
  if (runs && p.numel < (int64_t{1} << 31)) {
    strided_vec_kernel<NIN, V, uint32_t, Out, I0, I1, I2>
        <<<grid_for(p.numel / V, kThreads, dev), kThreads, 0, s>>>(p, f);
  } else if (runs) {
    strided_vec_kernel<NIN, V, int64_t, Out, I0, I1, I2>
        <<<grid_for(p.numel / V, kThreads, dev), kThreads, 0, s>>>(p, f);
  } else if (p.numel < (int64_t{1} << 31)) {
    strided_kernel<NIN, uint32_t, Out, I0, I1, I2><<<grid_for(p.numel, kThreads, dev), kThreads, 0, s>>>(p, f);
  } else {
    strided_kernel<NIN, int64_t, Out, I0, I1, I2><<<grid_for(p.numel, kThreads, dev), kThreads, 0, s>>>(p, f);
  }
  FG_CUDA_CHECK_LAUNCH();
}

}  // namespace fg::cuda
