// Mixed precision by one switch, as torch.autocast(device_type, dtype). While an AutocastGuard for a device
// type is alive on this thread, the ops that gain most from lower precision — the matrix products (matmul,
// mm, bmm, linear) and flex_attention — cast their float32 operands on that device type to the guard's
// dtype (bfloat16 or float16) and return that dtype. Nothing else changes: parameters stay float32 (the
// master weights, and the optimizer state with them), the casts are differentiable so gradients reach the
// parameters in float32, a bf16 product added to a float32 residual promotes back to float32, and the ops
// that reduce (layer_norm, rms_norm, softmax, cross_entropy, gelu) already compute half inputs in float32.
//
//   { AutocastGuard amp(DeviceType::CUDA, kBFloat16);  Tensor loss = model(x); }  loss.backward();
#pragma once
#include <optional>

#include "flexgrad/tensor/tensor.h"

namespace fg {

class AutocastGuard {
 public:
  // enabled = false turns autocast off for the scope (an fp32 island inside a bf16 region).
  AutocastGuard(DeviceType device, DType dtype, bool enabled = true);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  DeviceType device_;
  std::optional<DType> prev_;
};

// The dtype autocast lowers to on `device` on this thread, or nullopt when it is off there.
std::optional<DType> autocast_dtype(DeviceType device);

// `t` cast to the autocast dtype of its device when autocast is on there and `t` is float32; `t` itself
// otherwise (float64, integers and tensors already in half precision are never touched).
Tensor autocast_operand(const Tensor& t);

}  // namespace fg
