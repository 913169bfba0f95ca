#include "flexgrad/ops/autocast.h"

#include <array>

#include "flexgrad/ops/elementwise.h"

namespace fg {

namespace {
// Per thread, as PyTorch's autocast state: a guard on one thread never changes another's numerics.
thread_local std::array<std::optional<DType>, kNumDeviceTypes> t_autocast{};
}  // namespace

AutocastGuard::AutocastGuard(DeviceType device, DType dtype, bool enabled) : device_(device) {
  FG_CHECK(!enabled || dtype == kBFloat16 || dtype == kFloat16, DTypeError,
           "AutocastGuard: dtype must be bfloat16 or float16, got {}", dtype);
  auto& slot = t_autocast[static_cast<int>(device)];
  prev_ = slot;
  slot = enabled ? std::optional<DType>(dtype) : std::nullopt;
}

AutocastGuard::~AutocastGuard() { t_autocast[static_cast<int>(device_)] = prev_; }

std::optional<DType> autocast_dtype(DeviceType device) { return t_autocast[static_cast<int>(device)]; }

Tensor autocast_operand(const Tensor& t) {
  if (!t.defined() || t.dtype() != kFloat32) return t;
  const auto dt = autocast_dtype(t.device().type);
  return dt ? cast(t, *dt) : t;
}

}  // namespace fg
