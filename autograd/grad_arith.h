// The few tensor operations the autograd engine itself performs (summing gradients that meet at a
// node, seeding a scalar root with 1, moving gradients between a view and its base). They are defined by
// ops/ (ops/grad_arith.cpp): autograd names what it needs here instead of including the op layer above it.
// None of them records history.
#pragma once
#include "flexgrad/tensor/tensor.h"

namespace fg::autograd_arith {

Tensor add(const Tensor& a, const Tensor& b);  // a + b, same shape, no history
Tensor ones_like(const Tensor& t);
Tensor clone_contiguous(const Tensor& t);     // a fresh contiguous copy, no history
// dst = src elementwise (src broadcast to dst); dst may be any strided alias without internal overlap.
void copy_into(const Tensor& dst, const Tensor& src);
// Zeroes every element of dst, which may share memory locations (an expanded view).
void fill_zero(const Tensor& dst);
// Adds each element of src into the memory location its dst element refers to: where several elements
// of dst share a location (an expanded or overlapping view), their values add up there.
void add_into(const Tensor& dst, const Tensor& src);

}  // namespace fg::autograd_arith
