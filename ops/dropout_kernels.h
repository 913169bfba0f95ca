// Kernel family behind ops/dropout.h: out[i] = in[i] * (keep_i ? scale : 0) over n contiguous elements,
// keep_i = (Philox4x32 words of counter base + i under seed, as a double in [0, 1)) < keep_prob — exactly
// bernoulli(keep_prob)'s mapping (tensor/random.h), so the mask equals bernoulli's for the same generator
// state on every device. Forward and backward are the same call (the backward passes the output gradient
// as `in`), so no mask is stored. Half types multiply in float and round once; NaN * 0 stays NaN (as x * mask).
#pragma once
#include <cstdint>

#include "ops/dispatch.h"
#include "tensor/dtype.h"

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
