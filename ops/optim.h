// Fused multi-tensor optimizer updates and the global gradient norm (the tensor-level half of
// nn/optim.h). Tensors are grouped by (device, dtype) and each group is one kernel call
// (ops/optim_kernels.h): on the GPU one launch per group per step, whatever the number of parameters.
// None of these record the tape; they write the parameters, states and gradients in place.
#pragma once
#include <vector>

#include "flexgrad/ops/optim_kernels.h"
#include "flexgrad/tensor/tensor.h"

namespace fg {

// One parameter's update. param: a floating tensor (updated in place, its version bumped); grad: same
// shape and device (cast to param's dtype when it differs); state1/state2: contiguous buffers of param's
// dtype, shape and device (state2 undefined for SGD; state1 undefined for SGD without momentum).
struct OptimTensors {
  Tensor param, grad, state1, state2;
  bool fresh = false;  // SGD: first use of the momentum buffer
};

// DeviceError when a grad or state is not on its parameter's device, ShapeError / DTypeError for
// shapes and dtypes that do not match, ValueError for a state that is not contiguous.
void fused_optim_step(const std::vector<OptimTensors>& items, const OptimStep& step);

// sum over every element of every gradient of g^2, in double (one host synchronisation per device/dtype
// group). Undefined tensors are skipped.
double grads_sq_sum(const TensorList& grads);
// g *= coef in place for every defined gradient (one kernel call per device/dtype group).
void scale_grads_(const TensorList& grads, double coef);

}  // namespace fg
