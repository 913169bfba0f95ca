// gelu_fused: forward through gelu_fwd_stub, backward (gelu_bwd_stub) recorded next to it.
#include "flexgrad/ops/activation.h"

#include "flexgrad/autograd/record.h"
#include "flexgrad/ops/activation_kernels.h"
#include "flexgrad/ops/elementwise.h"

namespace fg {

FG_DEFINE_STUB(GeluFwdFn, gelu_fwd_stub);
FG_DEFINE_STUB(GeluBwdFn, gelu_bwd_stub);

Tensor gelu_fused(const Tensor& x_in, bool tanh_approx) {
  FG_CHECK(x_in.defined(), ValueError, "gelu_fused: input is undefined");
  FG_CHECK(x_in.is_floating_point(), DTypeError, "gelu_fused: input must be floating, got {}", x_in.dtype());
  // Half types go to the kernels as they are (one pass, float math inside, one rounding at the store).
  const bool half = x_in.dtype() == kFloat16 || x_in.dtype() == kBFloat16;
  Tensor x = contiguous(x_in);
  Tensor y = empty(x.sizes(), x.options());
  const bool grad = needs_grad({x});
  // aux saves the backward's tanh for float32/float64; a half backward recomputes it from x instead of
  // keeping a float buffer twice the size of x (see ops/activation_kernels.h).
  Tensor aux = grad && tanh_approx && !half ? empty(x.sizes(), x.options()) : Tensor();
  if (x.numel() > 0) {
    gelu_fwd_stub(x.device(), x.data_ptr(), y.data_ptr(), aux.defined() ? aux.data_ptr() : nullptr, x.numel(), x.dtype(),
                  tanh_approx);
  }
  if (grad) {
    SavedTensor sx = x, saux = aux;
    record("GeluFusedBackward", {x}, {y}, [sx, saux, tanh_approx](const TensorList& g) {
      Tensor xx = sx.unpack(), a = saux.unpack(), gy = contiguous(g[0]);
      if (gy.dtype() != xx.dtype()) gy = cast(gy, xx.dtype());  // the kernels take one dtype for all operands
      Tensor gx = empty(xx.sizes(), xx.options());
      if (xx.numel() > 0) {
        gelu_bwd_stub(xx.device(), xx.data_ptr(), a.defined() ? a.data_ptr() : nullptr, gy.data_ptr(), gx.data_ptr(),
                      xx.numel(), xx.dtype(), tanh_approx);
      }
      return TensorList{gx};
    });
  }
  return y;
}

}  // namespace fg
