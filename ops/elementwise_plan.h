// ElementwisePlan: the iteration space of an elementwise op over strided, broadcast operands (a small
// TensorIterator). Operand 0 is the output. Sizes are broadcast, dims of size 1 dropped, and adjacent
// dims merged where every operand's strides allow, so most plans end up 1-D and contiguous. Kernels on
// every device consume the same plan.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "flexgrad/tensor/tensor.h"

namespace fg {

inline constexpr int kMaxPlanDims = 12;
inline constexpr int kMaxPlanOperands = 4;

struct ElementwisePlan {
  int ndim = 0;
  int noperands = 0;
  int64_t numel = 0;
  std::array<int64_t, kMaxPlanDims> sizes{};  // innermost dim first
  // byte strides [operand][dim], innermost dim first
  std::array<std::array<int64_t, kMaxPlanDims>, kMaxPlanOperands> strides{};
  std::array<char*, kMaxPlanOperands> data{};
  std::array<DType, kMaxPlanOperands> dtypes{};

  // True when operand i advances by its element size along the single dim (a flat contiguous loop).
  bool is_contiguous(int i) const;
  // Byte offset of element `linear` (row-major over the plan's dims) for operand i.
  int64_t offset(int i, int64_t linear) const;
};

// Builds a plan writing into `out` (already of the broadcast shape) from `inputs` (broadcast to it).
ElementwisePlan make_elementwise_plan(const Tensor& out, const TensorList& inputs);

}  // namespace fg
