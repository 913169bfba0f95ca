// Fused activations for the hot path of transformer MLPs. fg::gelu (ops/elementwise.h) is general
// (any layout, autograd through ~15 elementwise nodes in its backward); gelu_fused computes the same
// values on a contiguous copy and differentiates in one kernel pass, which on the [B*T, 4*d] hidden
// activation of a transformer is the difference between the MLP and the whole model dominating a step.
#pragma once
#include "tensor/tensor.h"

namespace fg {

// gelu(x) (tanh approximation when tanh_approximation, else erf) with a fused backward.
// float32/float64 (half types through float32).
Tensor gelu_fused(const Tensor& x, bool tanh_approximation = true);

}  // namespace fg
