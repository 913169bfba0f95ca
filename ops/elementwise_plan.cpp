#include "flexgrad/ops/elementwise_plan.h"

#include <numeric>

namespace fg {

bool ElementwisePlan::is_contiguous(int i) const {
  return ndim == 1 && strides[i][0] == static_cast<int64_t>(element_size(dtypes[i]));
}

int64_t ElementwisePlan::offset(int i, int64_t linear) const {
  int64_t off = 0;
  for (int d = 0; d < ndim; ++d) {
    int64_t idx = linear % sizes[d];
    linear /= sizes[d];
    off += idx * strides[i][d];
  }
  return off;
}

ElementwisePlan make_elementwise_plan(const Tensor& out, const TensorList& inputs) {
  ElementwisePlan p;
  p.noperands = static_cast<int>(inputs.size()) + 1;
  FG_ASSERT(p.noperands <= kMaxPlanOperands);
  const Shape& shape = out.sizes();
  const int nd = static_cast<int>(shape.size());
  p.numel = out.numel();
  // Per operand strides aligned to the output shape (0 for broadcast dims), outermost first.
  std::vector<std::vector<int64_t>> st(p.noperands, std::vector<int64_t>(nd, 0));
  auto fill = [&](int op, const Tensor& t) {
    p.data[op] = static_cast<char*>(t.data_ptr());
    p.dtypes[op] = t.dtype();
    int64_t es = static_cast<int64_t>(t.element_size());
    int off = nd - static_cast<int>(t.dim());
    FG_ASSERT(off >= 0);
    for (int d = 0; d < t.dim(); ++d) {
      int64_t s = t.sizes()[d];
      FG_ASSERT(s == shape[d + off] || s == 1);
      st[op][d + off] = s == 1 ? 0 : t.strides()[d] * es;
    }
  };
  fill(0, out);
  for (size_t i = 0; i < inputs.size(); ++i) fill(static_cast<int>(i) + 1, inputs[i]);
  // Innermost first, dropping size-1 dims, then merging dims where possible.
  std::vector<int64_t> sizes;
  std::vector<std::vector<int64_t>> strides(p.noperands);
  for (int d = nd - 1; d >= 0; --d) {
    if (shape[d] == 1) continue;
    sizes.push_back(shape[d]);
    for (int op = 0; op < p.noperands; ++op) strides[op].push_back(st[op][d]);
  }
  if (sizes.empty()) {  // a single element
    sizes.push_back(1);
    for (int op = 0; op < p.noperands; ++op) strides[op].push_back(0);
  }
  std::vector<int64_t> msizes{sizes[0]};
  std::vector<std::vector<int64_t>> mstrides(p.noperands);
  for (int op = 0; op < p.noperands; ++op) mstrides[op].push_back(strides[op][0]);
  for (size_t d = 1; d < sizes.size(); ++d) {
    bool can_merge = true;
    for (int op = 0; op < p.noperands; ++op) {
      can_merge = can_merge && strides[op][d] == mstrides[op].back() * msizes.back();
    }
    if (can_merge) {
      msizes.back() *= sizes[d];
    } else {
      msizes.push_back(sizes[d]);
      for (int op = 0; op < p.noperands; ++op) mstrides[op].push_back(strides[op][d]);
    }
  }
  FG_CHECK(msizes.size() <= kMaxPlanDims, NotImplementedError,
           "elementwise ops support at most {} non-mergeable dimensions, got {}", kMaxPlanDims, msizes.size());
  p.ndim = static_cast<int>(msizes.size());
  for (int d = 0; d < p.ndim; ++d) {
    p.sizes[d] = msizes[d];
    for (int op = 0; op < p.noperands; ++op) p.strides[op][d] = mstrides[op][d];
  }
  return p;
}

}  // namespace fg
