// The one place where a backend is chosen (tensor layer, so that tensor-level kernels such as the random
// fills dispatch the same way as the ops; ops/dispatch.h includes this). Each kernel family declares a DispatchStub; the CPU and
// CUDA implementations register themselves into its table at load time (FG_REGISTER_KERNEL), and the
// op calls `stub(device, args...)`. No `if (cuda)` chains anywhere else.
#pragma once
#include "flexgrad/tensor/device.h"
#include "flexgrad/tensor/error.h"

namespace fg {

template <class Fn> struct DispatchStub;

template <class Ret, class... Args>
struct DispatchStub<Ret (*)(Args...)> {
  using Fn = Ret (*)(Args...);
  // constexpr so the table is constant-initialised before any registration runs.
  constexpr explicit DispatchStub(const char* n) : name(n) {}
  const char* name;
  Fn table[kNumDeviceTypes] = {};

  Ret operator()(Device device, Args... args) const {
    Fn f = table[static_cast<int>(device.type)];
    FG_CHECK(f != nullptr, NotImplementedError, "{}: no kernel for device {} (was flexgrad built with it?)", name,
             device);
    return f(std::forward<Args>(args)...);
  }
  bool has(DeviceType t) const { return table[static_cast<int>(t)] != nullptr; }
};

#define FG_DECLARE_STUB(FnType, stub) extern ::fg::DispatchStub<FnType> stub
#define FG_DEFINE_STUB(FnType, stub) constinit ::fg::DispatchStub<FnType> stub{#stub}
#define FG_REGISTER_KERNEL_CAT_(a, b) a##b
#define FG_REGISTER_KERNEL_NAME_(a, b) FG_REGISTER_KERNEL_CAT_(a, b)
#define FG_REGISTER_KERNEL(stub, device_type, fn)                                                  \
  static const bool FG_REGISTER_KERNEL_NAME_(fg_registered_, __LINE__) = [] {                     \
    (stub).table[static_cast<int>(::fg::DeviceType::device_type)] = (fn);                         \
    return true;                                                                                  \
  }()

}  // namespace fg
