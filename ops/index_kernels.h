// Kernel family behind ops/index.h: moving slices along one dim under control of an int64 index.
//   accumulate = false (index_select, gather):     out[p, j]        = src[p, index[p, j]]
//   accumulate = true  (index_add, scatter_add):   out[p, index[p, j]] += src[p, j]
// p runs over every combination of the other dims ("positions"); j along the indexed dim. Writes of
// different positions never overlap, so kernels parallelise over positions and walk j in order: the
// accumulating forms are deterministic (no atomics). Index values are validated by the op beforehand.
#pragma once
#include <array>
#include <cstdint>

#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/dtype.h"

namespace fg {

struct DimIndexArgs {
  static constexpr int kMaxDims = 16;
  enum Operand { kOut = 0, kSrc = 1, kIndex = 2 };
  int ndim = 0;  // position dims, outermost first
  int64_t n_pos = 1;
  std::array<int64_t, kMaxDims> sizes{};
  std::array<std::array<int64_t, kMaxDims>, 3> strides{};  // element strides [operand][position dim]
  int64_t len = 0;                                         // extent of j
  std::array<int64_t, 3> dim_strides{};                    // element strides along the indexed dim
  DType dtype = kFloat32;                                  // of out and src
  void* out = nullptr;
  const void* src = nullptr;
  const int64_t* index = nullptr;

  int64_t offset(int op, int64_t p) const {
    int64_t off = 0;
    for (int d = ndim - 1; d >= 0; --d) {
      off += (p % sizes[d]) * strides[op][d];
      p /= sizes[d];
    }
    return off;
  }
};

using DimIndexKernelFn = void (*)(const DimIndexArgs& args, bool accumulate);
FG_DECLARE_STUB(DimIndexKernelFn, dim_index_stub);

}  // namespace fg
