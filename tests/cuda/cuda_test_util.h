// Helpers shared by the CUDA test files.
#pragma once
#include <string>

#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/attention/cuda/jit.h"
#endif

namespace fg::testing {

// The architecture NVRTC targets on device 0 ("" in a build without CUDA, where these tests skip before asking).
inline std::string device_arch() {
#ifdef FLEXGRAD_WITH_CUDA
  return cuda::jit::target_arch(0);
#else
  return "";
#endif
}

}  // namespace fg::testing
