// layer_norm / rms_norm: forward through norm_fwd_stub, backward (norm_bwd_stub) recorded next to it.
#include "flexgrad/ops/norm.h"

#include "flexgrad/autograd/record.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/norm_kernels.h"
#include "flexgrad/ops/view.h"

namespace fg {

FG_DEFINE_STUB(NormFwdFn, norm_fwd_stub);
FG_DEFINE_STUB(NormBwdFn, norm_bwd_stub);

namespace {

void check_affine(const Tensor& p, const Tensor& x, const char* op, const char* name) {
  if (!p.defined()) return;
  FG_CHECK(p.dim() == 1 && p.size(0) == x.size(-1), ShapeError, "{}: {} must be [{}] (the last dim of input {}), got {}",
           op, name, x.size(-1), shape_str(x.sizes()), shape_str(p.sizes()));
  FG_CHECK(p.dtype() == x.dtype(), DTypeError, "{}: {} dtype {} differs from input dtype {}", op, name, p.dtype(),
           x.dtype());
  FG_CHECK(p.device() == x.device(), DeviceError, "{}: {} on {} but input on {}", op, name, p.device(), x.device());
}

Tensor norm_impl(const Tensor& x_in, const Tensor& w_in, const Tensor& b_in, double eps, bool rms) {
  const char* op = rms ? "rms_norm" : "layer_norm";
  FG_CHECK(x_in.defined(), ValueError, "{}: input is undefined", op);
  FG_CHECK(x_in.dim() >= 1, ShapeError, "{}: input must have at least 1 dim, got a scalar", op);
  FG_CHECK(x_in.is_floating_point(), DTypeError, "{}: input must be floating, got {}", op, x_in.dtype());
  FG_CHECK(eps >= 0, ValueError, "{}: eps must be >= 0, got {}", op, eps);
  check_affine(w_in, x_in, op, "weight");
  check_affine(b_in, x_in, op, "bias");
  // Half types compute in float32 through differentiable casts.
  const DType dt = x_in.dtype();
  const bool low = dt == kFloat16 || dt == kBFloat16;
  auto up = [&](const Tensor& t) { return t.defined() && low ? cast(t, kFloat32) : t; };
  Tensor x = contiguous(up(x_in)), w = w_in.defined() ? contiguous(up(w_in)) : Tensor(),
         b = b_in.defined() ? contiguous(up(b_in)) : Tensor();
  NormArgs a;
  a.n = x.size(-1);
  a.rows = a.n == 0 ? 0 : x.numel() / a.n;
  a.eps = eps;
  a.rms = rms;
  a.dtype = x.dtype();
  a.x = x.data_ptr();
  a.weight = w.defined() ? w.data_ptr() : nullptr;
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  Tensor y = empty(x.sizes(), x.options());
  Tensor mean = empty({a.rows}, x.options()), rstd = empty({a.rows}, x.options());
  if (a.rows > 0) norm_fwd_stub(x.device(), a, y.data_ptr(), mean.data_ptr(), rstd.data_ptr());

  if (needs_grad({x, w, b})) {
    SavedTensor sx = x, sw = w, smean = mean, srstd = rstd;
    const bool gw = w.defined() && w.requires_grad(), gb = b.defined() && b.requires_grad();
    const bool has_b = b.defined();
    record(rms ? "RmsNormBackward" : "LayerNormBackward", {x, w, b}, {y},
           [sx, sw, smean, srstd, a, gw, gb, has_b](const TensorList& g) {
             Tensor xx = sx.unpack(), ww = sw.unpack();
             Tensor gy = contiguous(g[0]);
             NormArgs b2 = a;
             b2.x = xx.data_ptr();
             b2.weight = ww.defined() ? ww.data_ptr() : nullptr;
             Tensor gx = empty(xx.sizes(), xx.options());
             Tensor dw = gw ? empty({a.n}, xx.options()) : Tensor();
             Tensor db = gb ? empty({a.n}, xx.options()) : Tensor();
             if (a.rows > 0) {
               norm_bwd_stub(xx.device(), b2, gy.data_ptr(), smean.unpack().data_ptr(), srstd.unpack().data_ptr(),
                             gx.data_ptr(), gw ? dw.data_ptr() : nullptr, gb ? db.data_ptr() : nullptr);
             } else {
               if (gw) dw.zero_();
               if (gb) db.zero_();
             }
             return TensorList{gx, dw, has_b ? db : Tensor()};
           });
  }
  return low ? cast(y, dt) : y;
}

}  // namespace

Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  return norm_impl(x, weight, bias, eps, false);
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) { return norm_impl(x, weight, Tensor(), eps, true); }

}  // namespace fg
