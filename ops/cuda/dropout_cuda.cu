// CUDA dropout (ops/dropout_kernels.h): a thread per element computes its Philox block (as bernoulli's CUDA
// fill) and writes in * mask * scale.
#include "ops/cuda/cuda_common.cuh"
#include "ops/dropout_kernels.h"
#include "tensor/philox.h"

namespace fg::cuda {
namespace {

template <class D>
__global__ void __launch_bounds__(kThreads) dropout_kernel(DropoutArgs a) {
  using C = dc_t<D>;
  const auto* in = static_cast<const D*>(a.in);
  auto* out = static_cast<D*>(a.out);
  const C scale = static_cast<C>(a.scale);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < a.n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t w[4];
    Philox4x32::generate(a.seed, a.base + static_cast<uint64_t>(i), w);
    const C m = Philox4x32::to_double(w[0], w[1]) < a.keep_prob ? scale : C(0);
    out[i] = store_c<D>(load_c(in[i]) * m);
  }
}

void dropout_cuda(const DropoutArgs& a) {
  const int dev = device_of(a.out);
  DeviceGuard g(dev);
  dispatch_floating(a.dtype, "dropout", [&]<class D>() {
    dropout_kernel<D><<<grid_for(a.n, kThreads, dev), kThreads, 0, stream(dev)>>>(a);
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(dropout_stub, CUDA, dropout_cuda);

}  // namespace fg::cuda
