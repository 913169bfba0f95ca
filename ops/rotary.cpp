// rotary_embedding: checks, the 4-D view the kernels take, and the backward (the inverse rotation).
#include "flexgrad/ops/rotary.h"

#include "flexgrad/autograd/record.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/rotary_kernels.h"
#include "flexgrad/ops/view.h"

namespace fg {

FG_DEFINE_STUB(RotaryKernelFn, rotary_stub);

namespace {

// x viewed as [A, B, L, E] (leading 1s added; its strides kept, so no copy unless E is strided).
Tensor as_4d(const Tensor& x) {
  Tensor t = x;
  while (t.dim() < 4) t = unsqueeze(t, 0);
  if (t.stride(-1) != 1 && t.size(-1) > 1) t = contiguous(t);
  return t;
}

// out = rotation of x by sign * angle (tables already in the compute dtype, on x's device).
Tensor rotate(const Tensor& x, const Tensor& c, const Tensor& s, double sign) {
  const Tensor x4 = as_4d(x);
  Tensor out = empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  RotaryArgs a;
  for (int d = 0; d < 4; ++d) a.sizes[d] = x4.size(d);
  for (int d = 0; d < 3; ++d) a.x_strides[d] = x4.stride(d);
  a.dtype = x.dtype();
  a.x = x4.data_ptr();
  a.cos = c.data_ptr();
  a.sin = s.data_ptr();
  a.sign = sign;
  a.out = out.data_ptr();
  rotary_stub(x.device(), a);
  return out;
}

// The differentiable rotation: its backward is the rotation by the opposite sign (so gradients of any order).
Tensor rotate_recorded(const Tensor& x, const Tensor& c, const Tensor& s, double sign) {
  Tensor out = rotate(x, c, s, sign);
  if (needs_grad({x})) {
    SavedTensor sc = c, ss = s;
    record("RotaryEmbeddingBackward", {x}, {out}, [sc, ss, sign](const TensorList& g) {
      return TensorList{rotate_recorded(g[0], sc.unpack(), ss.unpack(), -sign)};
    });
  }
  return out;
}

}  // namespace

Tensor rotary_embedding(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  FG_CHECK(x.defined() && cos.defined() && sin.defined(), ValueError, "rotary_embedding: got an undefined tensor");
  FG_CHECK(x.is_floating_point(), DTypeError, "rotary_embedding: x must be floating, got {}", x.dtype());
  FG_CHECK(x.dim() >= 2 && x.dim() <= 4, ShapeError, "rotary_embedding: expected x [..., L, E] with 2 to 4 dims, got {}",
           shape_str(x.sizes()));
  const int64_t L = x.size(-2), E = x.size(-1);
  FG_CHECK(E % 2 == 0, ShapeError, "rotary_embedding: the last dim of x must be even, got x {}", shape_str(x.sizes()));
  const Shape table{L, E / 2};
  FG_CHECK(cos.sizes() == table && sin.sizes() == table, ShapeError,
           "rotary_embedding: expected cos and sin of shape {} for x {}, got cos {} and sin {}", shape_str(table),
           shape_str(x.sizes()), shape_str(cos.sizes()), shape_str(sin.sizes()));
  FG_CHECK(cos.device() == x.device() && sin.device() == x.device(), DeviceError,
           "rotary_embedding: expected cos and sin on x's device {}, got {} and {}", x.device(), cos.device(),
           sin.device());
  FG_CHECK(cos.is_floating_point() && sin.is_floating_point(), DTypeError,
           "rotary_embedding: cos and sin must be floating, got {} and {}", cos.dtype(), sin.dtype());
  FG_CHECK(!cos.requires_grad() && !sin.requires_grad(), NotImplementedError,
           "rotary_embedding: cos and sin are constants (no gradient flows to them); detach them first");
  const DType tdt = x.dtype() == kFloat64 ? kFloat64 : kFloat32;
  const Tensor c = contiguous(cos.to(tdt)), s = contiguous(sin.to(tdt));
  return rotate_recorded(x, c, s, 1.0);
}

}  // namespace fg
