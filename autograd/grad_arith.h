// The few tensor operations the autograd engine itself performs (summing gradients that meet at a
// node, seeding a scalar root with 1). They are defined by ops/ (ops/grad_arith.cpp): autograd names what
// it needs here instead of including the op layer above it.
#pragma once
#include "tensor/tensor.h"

namespace fg::autograd_arith {

Tensor add(const Tensor& a, const Tensor& b);  // a + b, same shape, no history
Tensor ones_like(const Tensor& t);
Tensor clone_contiguous(const Tensor& t);     // a fresh contiguous copy, no history

}  // namespace fg::autograd_arith
