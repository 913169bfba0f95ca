// PagedAttention::assign's scatter on CUDA (attention/paged_attention_kernels.h): one CTA per source row
// (b, h, s) copies it to its physical cache row, 16 bytes at a time where rows are 16-byte aligned.
#include <cstdint>

#include "flexgrad/attention/paged_attention_kernels.h"
#include "flexgrad/tensor/cuda/cuda_check.h"

namespace fg::cuda {
namespace {

constexpr int kThreads = 128;

template <class W>
__global__ void __launch_bounds__(kThreads)
    paged_scatter_kernel(const W* __restrict__ src, W* __restrict__ dst, const int64_t* __restrict__ addr, int64_t H,
                         int64_t S, int64_t L, int64_t row_words) {
  const int64_t row = blockIdx.x;  // (b * H + h) * S + s
  const int64_t s = row % S, h = (row / S) % H, b = row / (S * H);
  const W* in = src + row * row_words;
  W* out = dst + (h * L + addr[b * S + s]) * row_words;
  for (int64_t i = threadIdx.x; i < row_words; i += kThreads) out[i] = in[i];
}

void scatter_cuda(const Tensor& val, const Tensor& addr, const Tensor& cache) {
  const int64_t B = val.size(0), H = val.size(1), S = val.size(2), L = cache.size(2);
  const int64_t rows = B * H * S;
  if (rows == 0) return;
  const int64_t row_bytes = val.size(3) * static_cast<int64_t>(val.element_size());
  const int dev = cache.device().index;
  DeviceGuard g(dev);
  const auto* a = static_cast<const int64_t*>(addr.data_ptr());
  const auto src = reinterpret_cast<uintptr_t>(val.data_ptr()), dst = reinterpret_cast<uintptr_t>(cache.data_ptr());
  const bool wide = row_bytes % 16 == 0 && src % 16 == 0 && dst % 16 == 0;
  if (wide) {
    paged_scatter_kernel<uint4><<<static_cast<unsigned>(rows), kThreads, 0, stream(dev)>>>(
        reinterpret_cast<const uint4*>(src), reinterpret_cast<uint4*>(dst), a, H, S, L, row_bytes / 16);
  } else {
    paged_scatter_kernel<unsigned char><<<static_cast<unsigned>(rows), kThreads, 0, stream(dev)>>>(
        reinterpret_cast<const unsigned char*>(src), reinterpret_cast<unsigned char*>(dst), a, H, S, L, row_bytes);
  }
  FG_CUDA_CHECK_LAUNCH();
}

}  // namespace

FG_REGISTER_KERNEL(paged_scatter_stub, CUDA, &scatter_cuda);

}  // namespace fg::cuda
