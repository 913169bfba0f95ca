// Dropout as one fused op: each element is zeroed with probability p and the rest scaled by 1 / (1 - p).
// The mask is drawn from `gen` (the default generator when null; ceil(numel / 4) counters, one Philox block
// per four elements: ops/dropout_kernels.h), so a seed gives the same mask on the CPU and on the GPU, and it
// is never stored: the backward draws it again from the same counters (one pass each way).
#pragma once
#include "flexgrad/tensor/random.h"
#include "flexgrad/tensor/tensor.h"

namespace fg {

Tensor dropout(const Tensor& x, double p, Generator* gen = nullptr);

}  // namespace fg
