// Kernel family behind the fused cross_entropy (ops/loss.h). Contiguous [rows, C] logits in one floating
// dtype, int64 targets; per-row outputs are in the logits' dtype.
#pragma once
#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/dtype.h"

namespace fg {

struct CrossEntropyArgs {
  int64_t rows = 0, classes = 0;
  int64_t ignore_index = -100;
  double smoothing = 0;
  DType dtype = kFloat32;
  const void* logits = nullptr;   // [rows, C]
  const int64_t* target = nullptr;  // [rows]
};

// loss[r] = lse - (1-s) x[t] - s mean(x) (0 for ignored rows); lse[r] saved for backward.
using CrossEntropyFwdFn = void (*)(const CrossEntropyArgs& a, void* loss, void* lse);
// grad[r, c] = scale[r] * (exp(x - lse) - (1-s) [c == t] - s / C), all zero for ignored rows.
using CrossEntropyBwdFn = void (*)(const CrossEntropyArgs& a, const void* lse, const void* scale, void* grad);
FG_DECLARE_STUB(CrossEntropyFwdFn, cross_entropy_fwd_stub);
FG_DECLARE_STUB(CrossEntropyBwdFn, cross_entropy_bwd_stub);

}  // namespace fg
