// softmax / log_softmax: forward through softmax_stub, backward recorded right below.
#include "flexgrad/ops/softmax.h"

#include "flexgrad/autograd/record.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/reduce.h"
#include "flexgrad/ops/softmax_kernels.h"

namespace fg {

FG_DEFINE_STUB(SoftmaxKernelFn, softmax_stub);

namespace {

Tensor softmax_impl(const Tensor& t, int64_t dim, std::optional<DType> dtype, bool log) {
  const char* op = log ? "log_softmax" : "softmax";
  // As PyTorch: an explicit dtype casts the input first (differentiably); integers need one.
  Tensor x = dtype ? cast(t, *dtype) : t;
  FG_CHECK(x.is_floating_point(), DTypeError, "{}: expected a floating point input (or pass dtype=), got {}", op,
           x.dtype());
  const int64_t d = wrap_dim(dim, x.dim(), op);
  Tensor out = empty(x.sizes(), x.options());
  std::vector<bool> mask(x.dim(), false);
  if (x.dim() > 0) mask[d] = true;
  ReduceLayout l = make_reduce_layout(x, mask, out.strides());
  if (out.numel() > 0) softmax_stub(x.device(), l, x.data_ptr(), out.data_ptr(), x.dtype(), log);
  if (needs_grad({x})) {
    SavedTensor so = out;
    const Shape dims = x.dim() > 0 ? Shape{d} : Shape{};
    record(log ? "LogSoftmaxBackward" : "SoftmaxBackward", {x}, {out}, [so, dims, log](const TensorList& g) {
      Tensor y = so.unpack();
      // softmax:     dx = y * (g - sum(g * y))
      // log_softmax: dx = g - exp(y) * sum(g)      (exp(-inf) = 0 keeps all -inf rows finite)
      if (log) return TensorList{sub(g[0], mul(exp(y), sum(g[0], dims, true)))};
      return TensorList{mul(y, sub(g[0], sum(mul(g[0], y), dims, true)))};
    });
  }
  return out;
}

}  // namespace

Tensor softmax(const Tensor& t, int64_t dim, std::optional<DType> dtype) { return softmax_impl(t, dim, dtype, false); }
Tensor log_softmax(const Tensor& t, int64_t dim, std::optional<DType> dtype) {
  return softmax_impl(t, dim, dtype, true);
}

}  // namespace fg
