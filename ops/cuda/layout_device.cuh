// Device-side readers of ReduceLayout (the same arithmetic as its host member functions) and block-wide
// reductions shared by the reduction, softmax and scan kernels.
#pragma once
#include "flexgrad/ops/cuda/cuda_common.cuh"
#include "flexgrad/ops/reduce_layout.h"

namespace fg::cuda {

__device__ __forceinline__ int64_t kept_in_off(const ReduceLayout& l, int64_t o) {
  int64_t off = 0;
  for (int d = l.kept_ndim - 1; d >= 0; --d) {
    off += (o % l.kept_sizes[d]) * l.kept_in_strides[d];
    o /= l.kept_sizes[d];
  }
  return off;
}
__device__ __forceinline__ int64_t kept_out_off(const ReduceLayout& l, int64_t o) {
  int64_t off = 0;
  for (int d = l.kept_ndim - 1; d >= 0; --d) {
    off += (o % l.kept_sizes[d]) * l.kept_out_strides[d];
    o /= l.kept_sizes[d];
  }
  return off;
}
__device__ __forceinline__ int64_t red_in_off(const ReduceLayout& l, int64_t r) {
  if (l.red_ndim == 1) return r * l.red_in_strides[0];
  int64_t off = 0;
  for (int d = l.red_ndim - 1; d >= 0; --d) {
    off += (r % l.red_sizes[d]) * l.red_in_strides[d];
    r /= l.red_sizes[d];
  }
  return off;
}

// The innermost reduced dim (as ReduceLayout::inner_*, usable in kernels).
__host__ __device__ __forceinline__ int64_t inner_n(const ReduceLayout& l) { return l.red_ndim ? l.red_sizes[l.red_ndim - 1] : 1; }
__host__ __device__ __forceinline__ int64_t inner_s(const ReduceLayout& l) { return l.red_ndim ? l.red_in_strides[l.red_ndim - 1] : 0; }
__host__ __device__ __forceinline__ int64_t inner_os(const ReduceLayout& l) { return l.red_ndim ? l.red_out_strides[l.red_ndim - 1] : 0; }

template <class T> __device__ __forceinline__ T shfl_down(T v, int delta) {
  if constexpr (std::is_same_v<T, bool>) return __shfl_down_sync(0xffffffffu, static_cast<int>(v), delta) != 0;
  else return __shfl_down_sync(0xffffffffu, v, delta);
}

// Reduces v over the block with combine(a, b) (a holds the lower-numbered threads' part); thread 0 gets
// the result. `shared` holds at least 32 T. Every thread of the block must call it.
template <class T, class Combine>
__device__ T block_reduce(T v, Combine combine, T* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    T o = shfl_down(v, d);
    if (lane + d < 32) v = combine(v, o);
  }
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? shared[lane] : shared[0];
    for (int d = 16; d > 0; d >>= 1) {
      T o = shfl_down(v, d);
      if (lane + d < nwarps) v = combine(v, o);
    }
  }
  return v;
}

// As block_reduce, but every thread gets the result.
template <class T, class Combine>
__device__ T block_allreduce(T v, Combine combine, T* shared) {
  v = block_reduce(v, combine, shared);
  __syncthreads();
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  return shared[0];
}

}  // namespace fg::cuda
