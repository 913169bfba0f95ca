// Kernel family behind ops/activation.h: contiguous n elements of float32/float64.
#pragma once
#include "ops/dispatch.h"
#include "tensor/dtype.h"

namespace fg {

// aux (tanh approximation only, else null): tanh(u) per element, kept so the backward needs no second
// tanh — the transcendental is most of the cost of both passes.
using GeluFwdFn = void (*)(const void* x, void* y, void* aux, int64_t n, DType dtype, bool tanh_approx);
using GeluBwdFn = void (*)(const void* x, const void* aux, const void* gy, void* gx, int64_t n, DType dtype,
                           bool tanh_approx);
FG_DECLARE_STUB(GeluFwdFn, gelu_fwd_stub);
FG_DECLARE_STUB(GeluBwdFn, gelu_bwd_stub);

}  // namespace fg
