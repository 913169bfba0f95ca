// Internal to attention/cuda: TMA tensor maps (CUtensorMap) for the run-time compiled kernels, built by the
// driver's cuTensorMapEncodeTiled, reached through the runtime's driver entry point so libflexgrad still
// needs no libcuda at link time (jit.cpp's rule).
#pragma once
#include <string>

#include "flexgrad/tensor/tensor.h"

namespace fg::cuda {

// The 128 opaque bytes of a CUtensorMap, 64-byte aligned as the kernels' FgTmaMap mirror expects.
struct alignas(64) TmaMap {
  unsigned char bytes[128];
};

// A map of the 4-d bf16 / f16 / float32 tensor t ([B, H, L, E], last dim contiguous) as (E, L, H, B) with t's own
// strides, in boxes of (128 bytes of columns: 64 16-bit or 32 float32 elements, box_rows, 1, 1) in 128-byte-swizzled
// shared memory (for 16-bit data fg_sw128_atoms_offset's atoms), zeros outside the tensor on loads, dropped on
// reduces. Returns "" on success, else why TMA cannot describe t (the caller copies with cp.async instead).
std::string encode_tma_map_sw128(TmaMap& out, const Tensor& t, int box_rows);

}  // namespace fg::cuda
