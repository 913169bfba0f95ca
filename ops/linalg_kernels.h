// Kernel family behind ops/linalg.h: a batch of matrix products C[b] = A[b] @ B[b] described by element
// strides only (any layout, broadcast batch dims with stride 0), so each backend decides whether to hand
// a matrix to its BLAS directly or to copy it first.
#pragma once
#include <array>
#include <cstdint>

#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/dtype.h"

namespace fg {

struct GemmArgs {
  static constexpr int kMaxBatchDims = 16;
  int64_t m = 0, n = 0, k = 0;
  DType dtype = kFloat32;  // A, B and C share it
  // Batch dims (outermost first) and the element strides of A, B, C along them.
  int batch_ndim = 0;
  int64_t batch = 1;
  std::array<int64_t, kMaxBatchDims> batch_sizes{}, a_batch_strides{}, b_batch_strides{}, c_batch_strides{};
  const void* a = nullptr;  // [m, k] with row stride a_rs and column stride a_cs
  int64_t a_rs = 0, a_cs = 0;
  const void* b = nullptr;  // [k, n]
  int64_t b_rs = 0, b_cs = 0;
  void* c = nullptr;        // [m, n], row-major with leading dimension n (always written, never read)

  // Element offsets of batch index bi in A, B, C.
  void batch_offsets(int64_t bi, int64_t& oa, int64_t& ob, int64_t& oc) const {
    oa = ob = oc = 0;
    for (int d = batch_ndim - 1; d >= 0; --d) {
      int64_t i = bi % batch_sizes[d];
      bi /= batch_sizes[d];
      oa += i * a_batch_strides[d];
      ob += i * b_batch_strides[d];
      oc += i * c_batch_strides[d];
    }
  }
};

using GemmKernelFn = void (*)(const GemmArgs& args);
FG_DECLARE_STUB(GemmKernelFn, gemm_stub);

}  // namespace fg
