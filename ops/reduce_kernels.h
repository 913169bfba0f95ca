// Kernel families behind ops/reduce.h. Each takes a ReduceLayout (element strides) plus raw pointers to
// element 0 of the input and output, so a CUDA file can register the same signatures.
#pragma once
#include <cstdint>

#include "flexgrad/ops/dispatch.h"
#include "flexgrad/ops/reduce_layout.h"

namespace fg {

enum class ReduceOp : uint8_t { Sum, Prod, Max, Min, Any, All };

// out[o] = op over the reduced elements of kept position o; output contiguous over the kept positions.
// Output dtype: Sum/Prod give int64 for bool/int inputs and the input dtype otherwise; Max/Min the input
// dtype (NaN propagates); Any/All bool. Floating sums accumulate in double.
using ReduceKernelFn = void (*)(ReduceOp op, const ReduceLayout& l, const void* in, DType in_dtype, void* out);
// Arg-reduction over exactly one reduced dim: values (input dtype) and int64 indices, contiguous over kept
// positions. The first index wins among ties; NaN counts as the extreme.
using ArgReduceKernelFn = void (*)(bool is_max, const ReduceLayout& l, const void* in, DType dtype, void* values,
                                   int64_t* indices);
// Inclusive prefix sum along the one reduced dim (reverse: suffix sum); out uses the layout's out strides.
// out_dtype is int64 for integer inputs, the input dtype otherwise.
using ScanKernelFn = void (*)(const ReduceLayout& l, const void* in, DType in_dtype, void* out, bool reverse);
// Sorts each row of the one reduced dim and keeps its first k (k == row length: a full stable sort).
// values/indices are written with the layout's out strides (the output row has length k). NaN sorts as
// the largest value, as in PyTorch.
using SortKernelFn = void (*)(const ReduceLayout& l, const void* in, DType dtype, void* values, int64_t* indices,
                              int64_t k, bool descending);

FG_DECLARE_STUB(ReduceKernelFn, reduce_stub);
FG_DECLARE_STUB(ArgReduceKernelFn, arg_reduce_stub);
FG_DECLARE_STUB(ScanKernelFn, scan_stub);
FG_DECLARE_STUB(SortKernelFn, sort_stub);

// The output dtype of a Sum/Prod kernel for `in`.
inline DType sum_result_dtype(DType in) { return is_integral(in, /*include_bool=*/true) ? kInt64 : in; }

}  // namespace fg
