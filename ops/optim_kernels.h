// Kernel families behind nn/optim.cpp: fused multi-tensor optimizer steps and the global gradient norm.
// One call handles every parameter of one (device, dtype) group: the CUDA kernels walk a table of chunks
// of all the tensors in a single launch (as PyTorch's multi_tensor_apply / foreach kernels), instead of
// several elementwise kernels per parameter per step.
//
// Every tensor handed in is contiguous, of the group's dtype, on the group's device, with `numel`
// elements; the caller (nn/optim.cpp) makes it so. Half types compute in float, f32 in float, f64 in double.
#pragma once
#include <cstdint>
#include <vector>

#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/dtype.h"

namespace fg {

// One parameter of a fused step. state1/state2: SGD's momentum buffer (state2 unused) or Adam's
// exp_avg / exp_avg_sq. fresh: SGD's momentum buffer is used for the first time (buf = g, as PyTorch).
struct OptimSlot {
  void* param = nullptr;
  const void* grad = nullptr;
  void* state1 = nullptr;
  void* state2 = nullptr;
  int64_t numel = 0;
  bool fresh = false;
};

enum class OptimKind { SGD, Adam };

// The per-step scalars, the same formulas as torch.optim:
//   SGD:  g += wd p;  buf = fresh ? g : momentum buf + (1 - dampening) g  (momentum != 0);
//         g = nesterov ? g + momentum buf : buf;  p -= lr g
//   Adam: decoupled ? p *= 1 - lr wd : g += wd p;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g g;
//         p -= step_size m / (sqrt(v) / sqrt_bc2 + eps)   with step_size = lr / (1 - b1^t), sqrt_bc2 = sqrt(1 - b2^t)
struct OptimStep {
  OptimKind kind = OptimKind::SGD;
  double lr = 0, weight_decay = 0;
  double momentum = 0, dampening = 0;
  bool nesterov = false;
  double beta1 = 0, beta2 = 0, eps = 0, step_size = 0, sqrt_bc2 = 1;
  bool decoupled = false;
};

// A gradient (read by the norm, scaled in place by the clip).
struct GradSlot {
  void* data = nullptr;
  int64_t numel = 0;
};

// device_index: the CUDA ordinal (0 on the CPU).
using OptimStepFn = void (*)(int device_index, DType dtype, const std::vector<OptimSlot>& slots, const OptimStep& step);
// Sum of squares of every element of every slot, accumulated in double in a fixed order (deterministic).
// Returns to the host: one synchronisation on the GPU.
using GradSqSumFn = double (*)(int device_index, DType dtype, const std::vector<GradSlot>& slots);
// g *= coef for every element of every slot (coef rounded to the compute type first, as mul_ does).
using GradScaleFn = void (*)(int device_index, DType dtype, const std::vector<GradSlot>& slots, double coef);

FG_DECLARE_STUB(OptimStepFn, optim_step_stub);
FG_DECLARE_STUB(GradSqSumFn, grad_sq_sum_stub);
FG_DECLARE_STUB(GradScaleFn, grad_scale_stub);

}  // namespace fg
