// Reductions (ops/reduce.h). Each op validates, runs a kernel of ops/reduce_kernels.h through its stub
// on the strided input as it is (a ReduceLayout, no permute-and-copy), and records its backward right
// below the forward. Backward formulas use differentiable ops and run with grad mode off (the engine's
// choice), so they are plain tensor code.
#include "flexgrad/ops/reduce.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "flexgrad/autograd/record.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/index.h"
#include "flexgrad/ops/reduce_kernels.h"
#include "flexgrad/ops/view.h"

namespace fg {

FG_DEFINE_STUB(ReduceKernelFn, reduce_stub);
FG_DEFINE_STUB(ArgReduceKernelFn, arg_reduce_stub);
FG_DEFINE_STUB(ScanKernelFn, scan_stub);
FG_DEFINE_STUB(SortKernelFn, sort_stub);

namespace {

// The dims marked in mask, as a list for the dims-taking ops.
Shape reduced_dims(const Shape& sizes, const std::vector<bool>& mask) {
  Shape dims;
  for (size_t d = 0; d < mask.size(); ++d) if (mask[d]) dims.push_back(static_cast<int64_t>(d));
  return dims;
}

// Runs a ReduceOp kernel over the dims in `mask`; no autograd.
Tensor reduce_raw(ReduceOp op, const Tensor& t, const std::vector<bool>& mask, bool keepdim) {
  DType out_dtype = op == ReduceOp::Sum || op == ReduceOp::Prod ? sum_result_dtype(t.dtype())
                    : op == ReduceOp::Max || op == ReduceOp::Min ? t.dtype()
                                                                 : kBool;
  Shape kd = reduced_shape(t.sizes(), mask, /*keepdim=*/true);
  Tensor out = empty(kd, TensorOptions(out_dtype).device(t.device()));
  Shape ostr = out.strides();
  for (size_t d = 0; d < mask.size(); ++d) if (mask[d]) ostr[d] = 0;
  ReduceLayout l = make_reduce_layout(t, mask, ostr);
  if (l.n_out > 0) reduce_stub(t.device(), op, l, t.data_ptr(), t.dtype(), out.data_ptr());
  if (keepdim) return out;
  Shape s = reduced_shape(t.sizes(), mask, false);
  return out.alias_with_layout(s, contiguous_strides(s), 0);
}

// Views a reduced gradient (keepdim or not) with the reduced dims as size 1, ready to broadcast.
Tensor keepdim_view(const Tensor& g, const Shape& in_sizes, const std::vector<bool>& mask) {
  return reshape(g, reduced_shape(in_sizes, mask, true));
}

void check_nonempty(const Tensor& t, const std::vector<bool>& mask, const char* op) {
  for (int64_t d = 0; d < t.dim(); ++d) {
    FG_CHECK(!(mask[d] && t.sizes()[d] == 0) && t.numel() > 0, IndexError,
             "{}: cannot reduce over a zero-size dimension (input shape {}); the operation has no identity", op,
             shape_str(t.sizes()));
  }
  FG_CHECK(t.numel() > 0, IndexError, "{}: expected a non-empty input, got shape {}", op, shape_str(t.sizes()));
}

void check_floating(const Tensor& t, const char* op) {
  FG_CHECK(t.is_floating_point(), DTypeError, "{}: expected a floating point input, got {}", op, t.dtype());
}

Tensor extreme(const Tensor& t, const Shape& dims, bool keepdim, bool is_max) {
  const char* op = is_max ? "amax" : "amin";
  auto mask = reduce_dims_mask(dims, t.dim(), op);
  check_nonempty(t, mask, op);
  Tensor out = reduce_raw(is_max ? ReduceOp::Max : ReduceOp::Min, t, mask, keepdim);
  if (needs_grad({t})) {
    SavedTensor st = t, so = out;
    Shape sizes = t.sizes();
    record(is_max ? "AmaxBackward" : "AminBackward", {t}, {out}, [st, so, sizes, mask](const TensorList& g) {
      // The gradient is shared evenly among the elements equal to the extreme (PyTorch's amax rule).
      Tensor x = st.unpack();
      Tensor hit = eq(x, keepdim_view(so.unpack(), sizes, mask));
      Tensor count = sum(hit, reduced_dims(sizes, mask), /*keepdim=*/true);
      return TensorList{div(mul(keepdim_view(g[0], sizes, mask), hit), count)};
    });
  }
  return out;
}

ValuesIndices extreme_dim(const Tensor& t, int64_t dim, bool keepdim, bool is_max) {
  const char* op = is_max ? "max" : "min";
  int64_t d = wrap_dim(dim, t.dim(), op);
  std::vector<bool> mask(t.dim(), false);
  if (t.dim() > 0) mask[d] = true;
  check_nonempty(t, mask, op);
  Shape kd = reduced_shape(t.sizes(), mask, true);
  Tensor values = empty(kd, t.options());
  Tensor indices = empty(kd, TensorOptions(kInt64).device(t.device()));
  Shape ostr = values.strides();
  if (t.dim() > 0) ostr[d] = 0;
  ReduceLayout l = make_reduce_layout(t, mask, ostr);
  arg_reduce_stub(t.device(), is_max, l, t.data_ptr(), t.dtype(), values.data_ptr(), indices.data<int64_t>());
  if (!keepdim) {
    Shape s = reduced_shape(t.sizes(), mask, false);
    values = values.alias_with_layout(s, contiguous_strides(s), 0);
    indices = indices.alias_with_layout(s, contiguous_strides(s), 0);
  }
  if (needs_grad({t})) {
    Shape sizes = t.sizes();
    Tensor idx = keepdim_view(indices, sizes, mask);
    record(is_max ? "MaxBackward" : "MinBackward", {t}, {values}, [sizes, mask, idx, d](const TensorList& g) {
      Tensor gk = keepdim_view(g[0], sizes, mask);
      if (sizes.empty()) return TensorList{gk};
      return TensorList{scatter_add(zeros(sizes, gk.options()), d, idx, gk)};
    });
  }
  return {values, indices};
}

Tensor arg_extreme(const Tensor& t, std::optional<int64_t> dim, bool keepdim, bool is_max) {
  const char* op = is_max ? "argmax" : "argmin";
  std::vector<bool> mask = dim ? std::vector<bool>(t.dim(), false) : std::vector<bool>(t.dim(), true);
  if (dim && t.dim() > 0) mask[wrap_dim(*dim, t.dim(), op)] = true;
  if (dim && t.dim() == 0) wrap_dim(*dim, 0, op);
  check_nonempty(t, mask, op);
  Shape kd = reduced_shape(t.sizes(), mask, true);
  Tensor values = empty(kd, t.options());
  Tensor indices = empty(kd, TensorOptions(kInt64).device(t.device()));
  Shape ostr = indices.strides();
  for (size_t d = 0; d < mask.size(); ++d) if (mask[d]) ostr[d] = 0;
  // Several reduced dims give the row-major index into them: the flattened index when all are reduced.
  ReduceLayout l = make_reduce_layout(t, mask, ostr);
  arg_reduce_stub(t.device(), is_max, l, t.data_ptr(), t.dtype(), values.data_ptr(), indices.data<int64_t>());
  if (keepdim) return indices;
  Shape s = reduced_shape(t.sizes(), mask, false);
  return indices.alias_with_layout(s, contiguous_strides(s), 0);
}

// Prefix sum along dim (suffix sum when reverse); no autograd.
Tensor scan_raw(const Tensor& t, int64_t d, bool reverse) {
  Tensor out = empty(t.sizes(), TensorOptions(sum_result_dtype(t.dtype())).device(t.device()));
  std::vector<bool> mask(t.dim(), false);
  if (t.dim() > 0) mask[d] = true;
  ReduceLayout l = make_reduce_layout(t, mask, out.strides());
  if (out.numel() > 0) scan_stub(t.device(), l, t.data_ptr(), t.dtype(), out.data_ptr(), reverse);
  return out;
}

// sort and topk share the kernel: the first k of each row in sorted order, plus the scatter backward.
ValuesIndices sorted_prefix(const Tensor& t, int64_t k, int64_t dim, bool descending, const char* op) {
  int64_t d = wrap_dim(dim, t.dim(), op);
  int64_t n = t.dim() == 0 ? 1 : t.sizes()[d];
  FG_CHECK(k >= 0 && k <= n, IndexError, "{}: k ({}) is out of range for dimension {} of size {} (input shape {})",
           op, k, d, n, shape_str(t.sizes()));
  Shape os = t.sizes();
  if (t.dim() > 0) os[d] = k;
  Tensor values = empty(os, t.options());
  Tensor indices = empty(os, TensorOptions(kInt64).device(t.device()));
  std::vector<bool> mask(t.dim(), false);
  if (t.dim() > 0) mask[d] = true;
  ReduceLayout l = make_reduce_layout(t, mask, values.strides());
  if (values.numel() > 0 || (t.numel() > 0 && k > 0)) {
    sort_stub(t.device(), l, t.data_ptr(), t.dtype(), values.data_ptr(), indices.data<int64_t>(), k, descending);
  }
  if (needs_grad({t})) {
    Shape sizes = t.sizes();
    record(op == std::string("sort") ? "SortBackward" : "TopkBackward", {t}, {values},
           [sizes, indices, d](const TensorList& g) {
             if (sizes.empty()) return TensorList{g[0]};
             return TensorList{scatter_add(zeros(sizes, g[0].options()), d, indices, g[0])};
           });
  }
  return {values, indices};
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
  FG_CHECK(t.defined(), ValueError, "sum: got an undefined tensor");
  // As PyTorch, an explicit dtype casts the input before summing (differentiably between floats).
  if (dtype && *dtype != t.dtype()) return sum(cast(t, *dtype), dims, keepdim, std::nullopt);
  auto mask = reduce_dims_mask(dims, t.dim(), "sum");
  Tensor out = reduce_raw(ReduceOp::Sum, t, mask, keepdim);
  if (needs_grad({t})) {
    record("SumBackward", {t}, {out}, [shape = t.sizes(), mask](const TensorList& g) {
      return TensorList{keepdim_view(g[0], shape, mask).expand(shape)};
    });
  }
  return out;
}

Tensor mean(const Tensor& t) { return mean(t, {}, false); }

Tensor mean(const Tensor& t, const Shape& dims, bool keepdim) {
  FG_CHECK(is_floating(t.dtype()), DTypeError,
           "mean: could not infer output dtype; input dtype must be floating point, got {}", t.dtype());
  auto mask = reduce_dims_mask(dims, t.dim(), "mean");
  int64_t n = 1;
  for (int64_t d = 0; d < t.dim(); ++d) if (mask[d]) n *= t.sizes()[d];
  return sum(t, dims, keepdim) / static_cast<double>(n);  // n == 0 gives NaN, as PyTorch
}

Tensor prod(const Tensor& t, const Shape& dims, bool keepdim) {
  auto mask = reduce_dims_mask(dims, t.dim(), "prod");
  Tensor out = reduce_raw(ReduceOp::Prod, t, mask, keepdim);
  if (needs_grad({t})) {
    SavedTensor st = t, so = out;
    Shape sizes = t.sizes();
    record("ProdBackward", {t}, {out}, [st, so, sizes, mask](const TensorList& g) {
      // d prod / d x_i is the product of the other elements: out / x_i when no element is zero. With one
      // zero in a group only that zero gets a gradient (the product of the non-zeros); with two, none does.
      Tensor x = st.unpack();
      Tensor gk = keepdim_view(g[0], sizes, mask);
      Tensor outk = keepdim_view(so.unpack(), sizes, mask);
      Tensor is_zero = eq(x, scalar_tensor(0, x.options()));
      if (!any(is_zero).item<bool>()) return TensorList{div(mul(gk, outk), x)};
      Shape rd = reduced_dims(sizes, mask);
      Tensor zeros_in_group = sum(is_zero, rd, true);
      Tensor prod_nonzero = keepdim_view(prod(where(is_zero, scalar_tensor(1, x.options()), x), rd, false), sizes, mask);
      Tensor no_zero = eq(zeros_in_group, scalar_tensor(0, zeros_in_group.options()));
      Tensor one_zero = logical_and(eq(zeros_in_group, scalar_tensor(1, zeros_in_group.options())), is_zero);
      Tensor grad = where(no_zero, div(mul(gk, outk), where(is_zero, scalar_tensor(1, x.options()), x)),
                          where(one_zero, mul(gk, prod_nonzero), scalar_tensor(0, x.options())));
      return TensorList{grad};
    });
  }
  return out;
}

Tensor amax(const Tensor& t, const Shape& dims, bool keepdim) { return extreme(t, dims, keepdim, true); }
Tensor amin(const Tensor& t, const Shape& dims, bool keepdim) { return extreme(t, dims, keepdim, false); }
Tensor max(const Tensor& t) { return extreme(t, {}, false, true); }
Tensor min(const Tensor& t) { return extreme(t, {}, false, false); }
ValuesIndices max(const Tensor& t, int64_t dim, bool keepdim) { return extreme_dim(t, dim, keepdim, true); }
ValuesIndices min(const Tensor& t, int64_t dim, bool keepdim) { return extreme_dim(t, dim, keepdim, false); }
Tensor argmax(const Tensor& t, std::optional<int64_t> dim, bool keepdim) { return arg_extreme(t, dim, keepdim, true); }
Tensor argmin(const Tensor& t, std::optional<int64_t> dim, bool keepdim) { return arg_extreme(t, dim, keepdim, false); }

Tensor logsumexp(const Tensor& t, const Shape& dims, bool keepdim) {
  Tensor x = t.is_floating_point() ? t : cast(t, kDefaultFloat);
  auto mask = reduce_dims_mask(dims, x.dim(), "logsumexp");
  Shape rd = reduced_dims(x.sizes(), mask);
  Tensor out;
  {
    NoGradGuard no_grad;
    // Shift by the row max for stability. An infinite max (all -inf, or a +inf) is replaced by 0 so that
    // x - m never forms inf - inf: an all -inf row then sums exp(-inf) = 0 and gives log(0) = -inf.
    Tensor m = x.numel() > 0 ? reduce_raw(ReduceOp::Max, x, mask, true) : zeros(reduced_shape(x.sizes(), mask, true), x.options());
    Tensor m_safe = where(isinf(m), scalar_tensor(0, m.options()), m);
    Tensor s = reduce_raw(ReduceOp::Sum, exp(sub(x, m_safe)), mask, true);
    out = add(log(s), m_safe);
    if (!keepdim) out = reshape(out, reduced_shape(x.sizes(), mask, false));
  }
  if (needs_grad({x})) {
    SavedTensor sx = x, so = out;
    Shape sizes = x.sizes();
    record("LogsumexpBackward", {x}, {out}, [sx, so, sizes, mask](const TensorList& g) {
      // d/dx = softmax(x) = exp(x - lse); rows whose lse is -inf (all -inf) get 0 instead of exp(NaN).
      Tensor lse = keepdim_view(so.unpack(), sizes, mask);
      Tensor lse_safe = where(isinf(lse), scalar_tensor(0, lse.options()), lse);
      Tensor p = exp(sub(sx.unpack(), lse_safe));
      Tensor row_is_neg_inf = logical_and(isinf(lse), lt(lse, scalar_tensor(0, lse.options())));
      p = where(row_is_neg_inf, scalar_tensor(0, p.options()), p);
      return TensorList{mul(keepdim_view(g[0], sizes, mask), p)};
    });
  }
  return out;
}

Tensor var(const Tensor& t, const Shape& dims, int64_t correction, bool keepdim) {
  check_floating(t, "var");
  auto mask = reduce_dims_mask(dims, t.dim(), "var");
  Shape rd = reduced_dims(t.sizes(), mask);
  int64_t n = 1;
  for (int64_t d = 0; d < t.dim(); ++d) if (mask[d]) n *= t.sizes()[d];
  // Two passes (mean, then squared deviations) keep precision where E[x^2] - E[x]^2 would cancel.
  // Built from differentiable ops, so autograd derives 2 (x - mean) / (n - correction) itself.
  Tensor dev = sub(t, mean(t, rd, true));
  // As PyTorch: a non-positive n - correction divides by 0 (inf or NaN), it is not an error.
  double denom = std::max(0.0, static_cast<double>(n - correction));
  return sum(mul(dev, dev), rd, keepdim) / denom;
}

Tensor std(const Tensor& t, const Shape& dims, int64_t correction, bool keepdim) {
  check_floating(t, "std");
  return sqrt(var(t, dims, correction, keepdim));
}

Tensor norm(const Tensor& t, double p, const Shape& dims, bool keepdim) {
  check_floating(t, "norm");
  auto mask = reduce_dims_mask(dims, t.dim(), "norm");
  Shape rd = reduced_dims(t.sizes(), mask);
  if (std::isinf(p)) {
    Tensor a = abs(t);
    return p > 0 ? amax(a, rd, keepdim) : amin(a, rd, keepdim);
  }
  if (p == 1.0) return sum(abs(t), rd, keepdim);
  if (p == 0.0) {
    NoGradGuard no_grad;  // the count of non-zeros is piecewise constant: no gradient
    return cast(sum(ne(t, scalar_tensor(0, t.options())), rd, keepdim), t.dtype());
  }
  Tensor out;
  {
    NoGradGuard no_grad;
    Tensor a = abs(t);
    out = p == 2.0 ? sqrt(sum(mul(a, a), rd, keepdim)) : pow(sum(pow(a, p), rd, keepdim), 1.0 / p);
  }
  if (needs_grad({t})) {
    SavedTensor st = t, so = out;
    Shape sizes = t.sizes();
    record("NormBackward", {t}, {out}, [st, so, sizes, mask, p](const TensorList& g) {
      // d||x||_p / dx = x |x|^(p-2) / ||x||^(p-1); a zero norm (all-zero group) gets gradient 0, not NaN.
      Tensor x = st.unpack();
      Tensor nk = keepdim_view(so.unpack(), sizes, mask);
      Tensor zero = scalar_tensor(0, x.options());
      Tensor scale = where(eq(nk, zero), zero, div(keepdim_view(g[0], sizes, mask), p == 2.0 ? nk : pow(nk, p - 1)));
      Tensor dir = p == 2.0 ? x : where(eq(x, zero), zero, mul(x, pow(abs(x), p - 2)));
      return TensorList{mul(dir, scale)};
    });
  }
  return out;
}

Tensor cumsum(const Tensor& t, int64_t dim) {
  int64_t d = wrap_dim(dim, t.dim(), "cumsum");
  Tensor out = scan_raw(t, d, /*reverse=*/false);
  if (needs_grad({t})) {
    record("CumsumBackward", {t}, {out}, [d](const TensorList& g) {
      // out_j = sum_{i<=j} x_i, so dL/dx_i = sum_{j>=i} g_j: the suffix sum.
      return TensorList{scan_raw(g[0], d, /*reverse=*/true)};
    });
  }
  return out;
}

ValuesIndices topk(const Tensor& t, int64_t k, int64_t dim, bool largest) {
  return sorted_prefix(t, k, dim, largest, "topk");
}

ValuesIndices sort(const Tensor& t, int64_t dim, bool descending) {
  int64_t d = wrap_dim(dim, t.dim(), "sort");
  return sorted_prefix(t, t.dim() == 0 ? 1 : t.sizes()[d], dim, descending, "sort");
}

Tensor any(const Tensor& t) { return reduce_raw(ReduceOp::Any, t, std::vector<bool>(t.dim(), true), false); }
Tensor all(const Tensor& t) { return reduce_raw(ReduceOp::All, t, std::vector<bool>(t.dim(), true), false); }

}  // namespace fg
