// The device kernel of PagedAttention::assign, one implementation per device (DispatchStub): CPU in
// attention/cpu/paged_attention_cpu.cpp, CUDA in attention/cuda/paged_attention_cuda.cu.
#pragma once
#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/tensor.h"

namespace fg {

// Copies row (b, h, s) of val [B, H, S, D] (contiguous) to row (h, addr[b * S + s]) of cache [1, H, L, D]
// (contiguous, same dtype and device). addr is int64 [B * S] on the cache's device, every entry in [0, L):
// the caller has validated everything, so a kernel never fails half-way.
using PagedScatterFn = void (*)(const Tensor& val, const Tensor& addr, const Tensor& cache);
FG_DECLARE_STUB(PagedScatterFn, paged_scatter_stub);

}  // namespace fg
