// Kernel family behind ops/activation.h: contiguous n elements of float32/float64.
#pragma once
#include "ops/dispatch.h"
#include "tensor/dtype.h"

namespace fg {

using GeluFwdFn = void (*)(const void* x, void* y, int64_t n, DType dtype, bool tanh_approx);
using GeluBwdFn = void (*)(const void* x, const void* gy, void* gx, int64_t n, DType dtype, bool tanh_approx);
FG_DECLARE_STUB(GeluFwdFn, gelu_fwd_stub);
FG_DECLARE_STUB(GeluBwdFn, gelu_bwd_stub);

}  // namespace fg
