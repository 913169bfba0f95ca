// Normalisation over the last dim, each one fused op: forward keeps the per-row statistics and the
// backward reuses them in one pass (gx) plus a column reduction (gw, gb), instead of the ~10 elementwise
// and reduction nodes of the composite form.
#pragma once
#include "flexgrad/tensor/tensor.h"

namespace fg {

// (x - mean) / sqrt(var + eps) * weight + bias over the last dim (biased variance, as PyTorch).
// weight and bias are [x.size(-1)] or undefined.
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps = 1e-5);
// x / sqrt(mean(x^2) + eps) * weight over the last dim; weight [x.size(-1)] or undefined.
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps = 1e-6);

}  // namespace fg
