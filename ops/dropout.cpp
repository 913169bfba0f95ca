// dropout: counters reserved from the generator, then the fused kernel forward and (same counters) backward.
#include "flexgrad/ops/dropout.h"

#include "flexgrad/autograd/record.h"
#include "flexgrad/ops/dropout_kernels.h"
#include "flexgrad/ops/elementwise.h"

namespace fg {

FG_DEFINE_STUB(DropoutKernelFn, dropout_stub);

namespace {

// in * mask * scale with the mask of counters base.. under seed; differentiable (its backward is itself).
Tensor apply_mask(const Tensor& in_any, DropoutArgs a) {
  const Tensor in = contiguous(in_any);
  Tensor out = empty(in.sizes(), in.options());
  a.n = in.numel();
  a.dtype = in.dtype();
  a.in = in.data_ptr();
  a.out = out.data_ptr();
  if (a.n > 0) dropout_stub(in.device(), a);
  if (needs_grad({in})) {
    record("DropoutBackward", {in}, {out}, [a](const TensorList& g) { return TensorList{apply_mask(g[0], a)}; });
  }
  return out;
}

}  // namespace

Tensor dropout(const Tensor& x, double p, Generator* gen) {
  FG_CHECK(x.defined(), ValueError, "dropout: input is undefined");
  FG_CHECK(p >= 0 && p < 1, ValueError, "dropout: p must be in [0, 1), got {}", p);
  FG_CHECK(x.is_floating_point(), DTypeError, "dropout: input must be floating, got {}", x.dtype());
  Generator& g = gen ? *gen : default_generator();
  DropoutArgs a;
  a.base = g.advance((static_cast<uint64_t>(x.numel()) + 3) / 4);  // one Philox block per four elements
  a.seed = g.seed();
  a.keep_prob = 1 - p;
  a.scale = 1 / (1 - p);
  return apply_mask(x, a);
}

}  // namespace fg
