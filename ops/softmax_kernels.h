// Kernel family behind ops/softmax.h: one row per kept position of a ReduceLayout whose single reduced
// dim is the softmax dim; input and output share the dtype and the layout (out strides in the layout).
#pragma once
#include "flexgrad/ops/dispatch.h"
#include "flexgrad/ops/reduce_layout.h"

namespace fg {

using SoftmaxKernelFn = void (*)(const ReduceLayout& l, const void* in, void* out, DType dtype, bool log);
FG_DECLARE_STUB(SoftmaxKernelFn, softmax_stub);

}  // namespace fg
