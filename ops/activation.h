// Fused activations for the hot path of transformer MLPs. fg::gelu (ops/elementwise.h) is general
// (any layout, autograd through ~15 elementwise nodes in its backward); gelu_fused computes the same
// values on a contiguous copy and differentiates in one kernel pass, which on the [B*T, 4*d] hidden
// activation of a transformer is the difference between the MLP and the whole model dominating a step.
#pragma once
#include "flexgrad/tensor/tensor.h"

namespace fg {

// gelu(x) (tanh approximation when tanh_approximation, else erf) with a fused backward.
// float16/bfloat16/float32/float64; half types are computed in float and rounded once into x's dtype, with
// no float32 copies (the result equals cast(gelu_fused(cast(x, float32)), dtype)).
Tensor gelu_fused(const Tensor& x, bool tanh_approximation = true);

}  // namespace fg
