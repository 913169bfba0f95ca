// Kernel family behind ops/activation.h: contiguous n elements of float16/bfloat16/float32/float64.
#pragma once
#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/dtype.h"

namespace fg {

// x, y, gy, gx are n elements of `dtype`. Half types (float16/bfloat16) are loaded, computed in float with
// exactly the float32 kernel's math and stored once in their own dtype, so a half result equals
// cast(float32 result, dtype): one rounding, no upcast copies.
// aux (tanh approximation of float32/float64 only, else null): n elements of `dtype` holding tanh(u), kept so
// the backward needs no second tanh — the transcendental is most of the cost of both passes. Half inputs
// pass null and the backward recomputes tanh from x: a float aux would cost twice x's bytes of saved
// memory per call, more than the recomputation saves in a memory-bound pass. A kernel given a non-null
// aux with a half dtype throws DTypeError.
using GeluFwdFn = void (*)(const void* x, void* y, void* aux, int64_t n, DType dtype, bool tanh_approx);
using GeluBwdFn = void (*)(const void* x, const void* aux, const void* gy, void* gx, int64_t n, DType dtype,
                           bool tanh_approx);
FG_DECLARE_STUB(GeluFwdFn, gelu_fwd_stub);
FG_DECLARE_STUB(GeluBwdFn, gelu_bwd_stub);

}  // namespace fg
