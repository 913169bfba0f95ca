// Kernel family behind the reductions: reduce each row of a contiguous [rows, cols] tensor.
// Ops lay their input out so that the reduced dims are the contiguous inner ones, then call this.
#pragma once
#include "ops/dispatch.h"
#include "tensor/tensor.h"

namespace fg {

enum class ReduceOp : uint8_t { Sum, Prod, Max, Min, Any, All };

// in: contiguous [rows, cols]; out: contiguous [rows] of the result dtype (Any/All: bool).
// Floating sums accumulate in double; integer sums in int64.
using ReduceRowsKernelFn = void (*)(const Tensor& in, const Tensor& out, ReduceOp op);
FG_DECLARE_STUB(ReduceRowsKernelFn, reduce_rows_stub);

}  // namespace fg
