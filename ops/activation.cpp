// gelu_fused: forward through gelu_fwd_stub, backward (gelu_bwd_stub) recorded next to it.
#include "ops/activation.h"

#include "autograd/record.h"
#include "ops/activation_kernels.h"
#include "ops/elementwise.h"

namespace fg {

FG_DEFINE_STUB(GeluFwdFn, gelu_fwd_stub);
FG_DEFINE_STUB(GeluBwdFn, gelu_bwd_stub);

Tensor gelu_fused(const Tensor& x_in, bool tanh_approx) {
  FG_CHECK(x_in.defined(), ValueError, "gelu_fused: input is undefined");
  FG_CHECK(x_in.is_floating_point(), DTypeError, "gelu_fused: input must be floating, got {}", x_in.dtype());
  const DType dt = x_in.dtype();
  const bool low = dt == kFloat16 || dt == kBFloat16;
  Tensor x = contiguous(low ? cast(x_in, kFloat32) : x_in);
  Tensor y = empty(x.sizes(), x.options());
  const bool grad = needs_grad({x});
  Tensor aux = grad && tanh_approx ? empty(x.sizes(), x.options()) : Tensor();
  if (x.numel() > 0) {
    gelu_fwd_stub(x.device(), x.data_ptr(), y.data_ptr(), aux.defined() ? aux.data_ptr() : nullptr, x.numel(), x.dtype(),
                  tanh_approx);
  }
  if (grad) {
    SavedTensor sx = x, saux = aux;
    record("GeluFusedBackward", {x}, {y}, [sx, saux, tanh_approx](const TensorList& g) {
      Tensor xx = sx.unpack(), a = saux.unpack(), gy = contiguous(g[0]);
      Tensor gx = empty(xx.sizes(), xx.options());
      if (xx.numel() > 0) {
        gelu_bwd_stub(xx.device(), xx.data_ptr(), a.defined() ? a.data_ptr() : nullptr, gy.data_ptr(), gx.data_ptr(),
                      xx.numel(), xx.dtype(), tanh_approx);
      }
      return TensorList{gx};
    });
  }
  return low ? cast(y, dt) : y;
}

}  // namespace fg
