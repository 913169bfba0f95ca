// CUDA dropout (ops/dropout_kernels.h): a thread per four elements computes their Philox block and writes
// in * mask * scale.
#include "flexgrad/ops/cuda/cuda_common.cuh"
#include "flexgrad/ops/dropout_kernels.h"
#include "flexgrad/tensor/philox.h"

namespace fg::cuda {
namespace {

template <class D>
__global__ void __launch_bounds__(kThreads) dropout_kernel(DropoutArgs a) {
  using C = dc_t<D>;
  const auto* in = static_cast<const D*>(a.in);
  auto* out = static_cast<D*>(a.out);
  const C scale = static_cast<C>(a.scale);
  const int64_t groups = (a.n + 3) / 4;
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < groups;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t w[4];
    Philox4x32::generate(a.seed, a.base + static_cast<uint64_t>(k), w);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * k + j;
      if (i >= a.n) break;
      const C m = w[j] * 0x1p-32 < a.keep_prob ? scale : C(0);
      out[i] = store_c<D>(load_c(in[i]) * m);
    }
  }
}

void dropout_cuda(const DropoutArgs& a) {
  const int dev = device_of(a.out);
  DeviceGuard g(dev);
  dispatch_floating(a.dtype, "dropout", [&]<class D>() {
    dropout_kernel<D><<<grid_for((a.n + 3) / 4, kThreads, dev), kThreads, 0, stream(dev)>>>(a);
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(dropout_stub, CUDA, dropout_cuda);

}  // namespace fg::cuda
