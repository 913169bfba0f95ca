// Kernel family behind ops/dropout.h: out[i] = in[i] * (keep_i ? scale : 0) over n contiguous elements.
// Element i reads word i % 4 of the Philox4x32 block of counter base + i / 4 under seed (one block serves
// four elements, a quarter of bernoulli's generator work): keep_i = word * 2^-32 < keep_prob. The mapping
// is the same on every device, so a generator state gives the same mask on the CPU and the GPU. Forward and
// backward are the same call (the backward passes the output gradient as `in`), so no mask is stored.
// Half types multiply in float and round once; NaN * 0 stays NaN (as x * mask).
#pragma once
#include <cstdint>

#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/dtype.h"

namespace fg {

struct DropoutArgs {
  uint64_t seed = 0, base = 0;
  int64_t n = 0;
  double keep_prob = 1, scale = 1;
  DType dtype = kFloat32;
  const void* in = nullptr;
  void* out = nullptr;
};

using DropoutKernelFn = void (*)(const DropoutArgs& a);
FG_DECLARE_STUB(DropoutKernelFn, dropout_stub);

}  // namespace fg
