// Kernel family behind ops/rotary.h: rotary position embedding in the rotate-half layout over a 4-D x
// [A, B, L, E] whose last dim is contiguous (the leading three may be strided: a [B, H, L, E] view of a
// [B, L, H, E] projection is read in place), written to a contiguous out [A, B, L, E]:
//   out[..., l, i]        = x1 c - x2 s,   out[..., l, i + E/2] = x2 c + x1 s,   i < E/2,
// with x1 = x[..., l, i], x2 = x[..., l, i + E/2], c = cos[l, i], s = sign * sin[l, i]. sign = -1 is the
// inverse rotation, which is also the backward (the rotation is orthogonal). The tables are float64 for
// float64 x and float32 otherwise, contiguous rows of E/2; half x computes in float and rounds once.
#pragma once
#include <array>
#include <cstdint>

#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/dtype.h"

namespace fg {

struct RotaryArgs {
  std::array<int64_t, 4> sizes{};      // A, B, L, E
  std::array<int64_t, 3> x_strides{};  // element strides of A, B, L (E has stride 1)
  DType dtype = kFloat32;              // of x and out
  const void* x = nullptr;
  const void* cos = nullptr;  // [L, E/2]
  const void* sin = nullptr;  // [L, E/2]
  double sign = 1;
  void* out = nullptr;
};

using RotaryKernelFn = void (*)(const RotaryArgs& a);
FG_DECLARE_STUB(RotaryKernelFn, rotary_stub);

}  // namespace fg
