// Reductions. Each lays its input out as [kept, reduced] (a permute + contiguous copy when needed),
// reduces rows through reduce_rows_stub, and reshapes back; backward expands the gradient again.
#include "ops/reduce.h"

#include <algorithm>

#include "autograd/record.h"
#include "ops/elementwise.h"
#include "ops/reduce_kernels.h"
#include "ops/view.h"

namespace fg {

FG_DEFINE_STUB(ReduceRowsKernelFn, reduce_rows_stub);

namespace {

struct ReducePlan {
  std::vector<bool> reduced;  // per input dim
  Shape kept_shape;           // output shape without keepdim
  Shape keepdim_shape;        // output shape with keepdim
  int64_t rows = 1, cols = 1;
};

ReducePlan plan_reduction(const Tensor& t, const Shape& dims, const char* op) {
  ReducePlan p;
  const int64_t n = t.dim();
  p.reduced.assign(n, dims.empty());
  for (int64_t d : dims) {
    int64_t w = wrap_dim(d, n, op);
    if (n == 0) continue;
    FG_CHECK(!p.reduced[w] || dims.empty(), ValueError, "{}: dim {} appears multiple times in the list of dims", op, w);
    p.reduced[w] = true;
  }
  for (int64_t d = 0; d < n; ++d) {
    if (p.reduced[d]) {
      p.cols *= t.sizes()[d];
      p.keepdim_shape.push_back(1);
    } else {
      p.rows *= t.sizes()[d];
      p.kept_shape.push_back(t.sizes()[d]);
      p.keepdim_shape.push_back(t.sizes()[d]);
    }
  }
  return p;
}

// [rows, cols] contiguous layout of t with reduced dims innermost (no history).
Tensor rows_layout(const Tensor& t, const ReducePlan& p) {
  Shape perm;
  for (int64_t d = 0; d < t.dim(); ++d) if (!p.reduced[d]) perm.push_back(d);
  for (int64_t d = 0; d < t.dim(); ++d) if (p.reduced[d]) perm.push_back(d);
  NoGradGuard no_grad;
  Tensor x = contiguous(permute(t.detach(), perm));
  return x.view({p.rows, p.cols});
}

Tensor reduce_raw(const Tensor& t, const Shape& dims, bool keepdim, ReduceOp op, DType out_dtype, const char* name) {
  FG_CHECK(t.defined(), ValueError, "{}: got an undefined tensor", name);
  ReducePlan p = plan_reduction(t, dims, name);
  Tensor out = empty({p.rows}, TensorOptions().dtype(out_dtype).device(t.device()));
  if (p.rows > 0) {
    if (p.cols == 0) {
      FG_CHECK(op == ReduceOp::Sum || op == ReduceOp::Prod || op == ReduceOp::Any || op == ReduceOp::All, ValueError,
               "{}: expected reduction dim to have non-zero size (input shape {})", name, shape_str(t.sizes()));
      fill_(out, op == ReduceOp::Prod || op == ReduceOp::All ? 1 : 0);
    } else {
      reduce_rows_stub(t.device(), rows_layout(t, p), out, op);
    }
  }
  return out.view(keepdim ? p.keepdim_shape : p.kept_shape);
}

DType sum_dtype(const Tensor& t, std::optional<DType> dtype) {
  if (dtype) return *dtype;
  return is_integral(t.dtype(), true) ? kInt64 : t.dtype();
}

}  // namespace

Tensor sum_to_shape(const Tensor& grad, const Shape& shape) {
  if (grad.sizes() == shape) return grad;
  const int64_t lead = grad.dim() - static_cast<int64_t>(shape.size());
  FG_CHECK(lead >= 0, ShapeError, "sum_to_shape: gradient of shape {} cannot be reduced to {}",
           shape_str(grad.sizes()), shape_str(shape));
  Shape dims;
  for (int64_t d = 0; d < grad.dim(); ++d) {
    if (d < lead || (shape[d - lead] == 1 && grad.sizes()[d] != 1)) dims.push_back(d);
  }
  Tensor r = dims.empty() ? grad : sum(grad, dims, true);
  return r.numel() == shape_numel(shape) ? reshape(r, shape) : r;
}

Tensor sum(const Tensor& t, std::optional<DType> dtype) { return sum(t, {}, false, dtype); }

Tensor sum(const Tensor& t, const Shape& dims, bool keepdim, std::optional<DType> dtype) {
  Tensor out = reduce_raw(t, dims, keepdim, ReduceOp::Sum, sum_dtype(t, dtype), "sum");
  if (needs_grad({t})) {
    ReducePlan p = plan_reduction(t, dims, "sum");
    record("SumBackward", {t}, {out}, [shape = t.sizes(), ks = p.keepdim_shape, dt = t.dtype()](const TensorList& g) {
      Tensor gi = reshape(g[0], ks).expand(shape);
      return TensorList{gi.dtype() == dt ? gi : cast(gi, dt)};
    });
  }
  return out;
}

Tensor mean(const Tensor& t) { return mean(t, {}, false); }

Tensor mean(const Tensor& t, const Shape& dims, bool keepdim) {
  FG_CHECK(is_floating(t.dtype()), DTypeError,
           "mean: could not infer output dtype; input dtype must be floating point, got {}", t.dtype());
  ReducePlan p = plan_reduction(t, dims, "mean");
  return sum(t, dims, keepdim) / static_cast<double>(std::max<int64_t>(p.cols, 0) == 0 ? 0 : p.cols);
}

Tensor any(const Tensor& t) { return reduce_raw(t, {}, false, ReduceOp::Any, kBool, "any"); }
Tensor all(const Tensor& t) { return reduce_raw(t, {}, false, ReduceOp::All, kBool, "all"); }

}  // namespace fg
