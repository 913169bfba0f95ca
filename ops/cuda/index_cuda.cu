// CUDA kernel behind ops/index_kernels.h (index_select, gather, index_add, scatter_add, embedding and
// their backwards). Copies run one thread per (position, j). Accumulating forms run one thread per
// position walking j in order, as the CPU does: no atomics, so results are deterministic and identical
// run to run (and, for integer and exactly representable sums, to the CPU).
#include "flexgrad/ops/cuda/cuda_common.cuh"
#include "flexgrad/ops/index_kernels.h"

namespace fg::cuda {
namespace {

__device__ __forceinline__ int64_t pos_offset(const DimIndexArgs& a, int op, int64_t p) {
  int64_t off = 0;
  for (int d = a.ndim - 1; d >= 0; --d) {
    off += (p % a.sizes[d]) * a.strides[op][d];
    p /= a.sizes[d];
  }
  return off;
}

template <class D>
__global__ void index_copy_kernel(DimIndexArgs a) {
  const int64_t total = a.n_pos * a.len;
  D* out = static_cast<D*>(a.out);
  const D* src = static_cast<const D*>(a.src);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = t / a.len, j = t - p * a.len;
    const int64_t v = a.index[pos_offset(a, DimIndexArgs::kIndex, p) + j * a.dim_strides[DimIndexArgs::kIndex]];
    out[pos_offset(a, DimIndexArgs::kOut, p) + j * a.dim_strides[DimIndexArgs::kOut]] =
        src[pos_offset(a, DimIndexArgs::kSrc, p) + v * a.dim_strides[DimIndexArgs::kSrc]];
  }
}

template <class D>
__global__ void index_accumulate_kernel(DimIndexArgs a) {
  D* out = static_cast<D*>(a.out);
  const D* src = static_cast<const D*>(a.src);
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < a.n_pos; p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t oo = pos_offset(a, DimIndexArgs::kOut, p), so = pos_offset(a, DimIndexArgs::kSrc, p);
    const int64_t io = pos_offset(a, DimIndexArgs::kIndex, p);
    for (int64_t j = 0; j < a.len; ++j) {
      const int64_t v = a.index[io + j * a.dim_strides[DimIndexArgs::kIndex]];
      D& dst = out[oo + v * a.dim_strides[DimIndexArgs::kOut]];
      const D s = src[so + j * a.dim_strides[DimIndexArgs::kSrc]];
      if constexpr (std::is_same_v<D, bool>) dst = dst || s;
      else dst = store_c<D>(load_c(dst) + load_c(s));
    }
  }
}

void dim_index_cuda(const DimIndexArgs& a, bool accumulate) {
  if (a.n_pos == 0 || a.len == 0) return;
  const int dev = device_of(a.out);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  dispatch_all(a.dtype, accumulate ? "index_add" : "index_select", [&]<class D>() {
    if (accumulate) {
      // Small blocks so that few positions still spread over many SMs.
      index_accumulate_kernel<D><<<grid_for(a.n_pos, 64, dev), 64, 0, s>>>(a);
    } else {
      index_copy_kernel<D><<<grid_for(a.n_pos * a.len, kThreads, dev), kThreads, 0, s>>>(a);
    }
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(dim_index_stub, CUDA, dim_index_cuda);

}  // namespace fg::cuda
