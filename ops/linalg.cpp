// Matrix products (ops/linalg.h). Everything funnels into batched_matmul ([..., m, k] x [..., k, n] with
// broadcast batch dims), which fills a GemmArgs for gemm_stub and records the backward:
//   grad_a = g @ b^T, grad_b = a^T @ g, each summed back over the batch dims it was broadcast along.
#include "flexgrad/ops/linalg.h"

#include "flexgrad/autograd/record.h"
#include "flexgrad/ops/autocast.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/linalg_kernels.h"
#include "flexgrad/ops/reduce.h"
#include "flexgrad/ops/view.h"

namespace fg {

FG_DEFINE_STUB(GemmKernelFn, gemm_stub);

namespace {

void check_operands(const Tensor& a, const Tensor& b, const char* op) {
  FG_CHECK(a.defined() && b.defined(), ValueError, "{}: got an undefined tensor", op);
  FG_CHECK(a.device() == b.device(), DeviceError, "{}: expected both operands on the same device, got {} and {}", op,
           a.device(), b.device());
  FG_CHECK(a.dtype() == b.dtype(), DTypeError, "{}: expected both operands to have the same dtype, got {} and {}", op,
           a.dtype(), b.dtype());
  FG_CHECK(a.dtype() != kBool, DTypeError, "{}: bool tensors are not supported", op);
}

// a [..., m, k] @ b [..., k, n] -> [broadcast(...), m, n]; both at least 2-D.
Tensor batched_matmul(const Tensor& a, const Tensor& b, const char* op) {
  const int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1);
  FG_CHECK(b.size(-2) == k, ShapeError, "{}: shapes {} and {} cannot be multiplied ({} columns vs {} rows)", op,
           shape_str(a.sizes()), shape_str(b.sizes()), k, b.size(-2));
  Shape abatch(a.sizes().begin(), a.sizes().end() - 2), bbatch(b.sizes().begin(), b.sizes().end() - 2);
  Shape batch = broadcast_shapes(abatch, bbatch, op);
  FG_CHECK(static_cast<int>(batch.size()) <= GemmArgs::kMaxBatchDims, NotImplementedError,
           "{}: at most {} batch dims are supported, got {}", op, GemmArgs::kMaxBatchDims, batch.size());
  Shape out_shape = batch;
  out_shape.push_back(m);
  out_shape.push_back(n);
  Tensor out = empty(out_shape, a.options());

  GemmArgs g;
  g.m = m; g.n = n; g.k = k;
  g.dtype = a.dtype();
  g.batch_ndim = static_cast<int>(batch.size());
  g.batch = shape_numel(batch);
  const size_t nb = batch.size();
  for (size_t d = 0; d < nb; ++d) {
    g.batch_sizes[d] = batch[d];
    // Right-aligned batch dims; a missing or size-1 dim broadcasts with stride 0.
    auto stride_of = [&](const Tensor& t, size_t tb) -> int64_t {
      int64_t i = static_cast<int64_t>(d) - static_cast<int64_t>(nb - tb);
      return i < 0 || t.sizes()[i] == 1 ? 0 : t.strides()[i];
    };
    g.a_batch_strides[d] = stride_of(a, abatch.size());
    g.b_batch_strides[d] = stride_of(b, bbatch.size());
    g.c_batch_strides[d] = out.strides()[d];
  }
  g.a = a.data_ptr(); g.a_rs = a.stride(-2); g.a_cs = a.stride(-1);
  g.b = b.data_ptr(); g.b_rs = b.stride(-2); g.b_cs = b.stride(-1);
  g.c = out.data_ptr();
  if (out.numel() > 0) {
    if (k == 0) out.zero_();  // an empty inner dim sums nothing
    else gemm_stub(a.device(), g);
  }

  if (needs_grad({a, b})) {
    SavedTensor sa = a, sb = b;
    const bool ga = a.requires_grad(), gb = b.requires_grad();
    record("MatmulBackward", {a, b}, {out}, [sa, sb, ga, gb, op](const TensorList& gr) {
      Tensor da, db;
      if (ga) {
        da = sum_to_shape(batched_matmul(gr[0], transpose(sb.unpack(), -1, -2), op), sa.unpack().sizes());
      }
      if (gb) {
        Tensor aa = sa.unpack();
        db = sum_to_shape(batched_matmul(transpose(aa, -1, -2), gr[0], op), sb.unpack().sizes());
      }
      return TensorList{da, db};
    });
  }
  return out;
}

}  // namespace

Tensor mm(const Tensor& a_in, const Tensor& b_in) {
  const Tensor a = autocast_operand(a_in), b = autocast_operand(b_in);
  check_operands(a, b, "mm");
  FG_CHECK(a.dim() == 2 && b.dim() == 2, ShapeError, "mm: expected 2-D operands, got shapes {} and {}",
           shape_str(a.sizes()), shape_str(b.sizes()));
  return batched_matmul(a, b, "mm");
}

Tensor bmm(const Tensor& a_in, const Tensor& b_in) {
  const Tensor a = autocast_operand(a_in), b = autocast_operand(b_in);
  check_operands(a, b, "bmm");
  FG_CHECK(a.dim() == 3 && b.dim() == 3, ShapeError, "bmm: expected 3-D operands, got shapes {} and {}",
           shape_str(a.sizes()), shape_str(b.sizes()));
  FG_CHECK(a.size(0) == b.size(0), ShapeError, "bmm: batch sizes differ: shapes {} and {}", shape_str(a.sizes()),
           shape_str(b.sizes()));
  return batched_matmul(a, b, "bmm");
}

Tensor matmul(const Tensor& a_in, const Tensor& b_in) {
  const Tensor a = autocast_operand(a_in), b = autocast_operand(b_in);
  check_operands(a, b, "matmul");
  FG_CHECK(a.dim() >= 1 && b.dim() >= 1, ShapeError, "matmul: both arguments need at least 1 dimension, got shapes {} and {}",
           shape_str(a.sizes()), shape_str(b.sizes()));
  // torch.matmul's rules: a 1-D left operand is a row vector and a 1-D right operand a column vector;
  // the added dim is removed from the result again.
  if (a.dim() == 1 && b.dim() == 1) {
    FG_CHECK(a.size(0) == b.size(0), ShapeError, "matmul: 1-D operands of different lengths: {} and {}",
             shape_str(a.sizes()), shape_str(b.sizes()));
    return reshape(batched_matmul(unsqueeze(a, 0), unsqueeze(b, 1), "matmul"), {});
  }
  if (a.dim() == 1) return squeeze(batched_matmul(unsqueeze(a, 0), b, "matmul"), -2);
  if (b.dim() == 1) return squeeze(batched_matmul(a, unsqueeze(b, 1), "matmul"), -1);
  // [..., m, k] @ [k, n]: fold the batch into the rows for one large product when that needs no copy.
  if (b.dim() == 2 && a.dim() > 2 && a.numel() > 0 && view_strides(a.sizes(), a.strides(), {-1, a.size(-1)}).has_value()) {
    FG_CHECK(a.size(-1) == b.size(0), ShapeError, "matmul: shapes {} and {} cannot be multiplied ({} columns vs {} rows)",
             shape_str(a.sizes()), shape_str(b.sizes()), a.size(-1), b.size(0));
    Shape out_shape(a.sizes().begin(), a.sizes().end() - 1);
    out_shape.push_back(b.size(1));
    return reshape(batched_matmul(reshape(a, {-1, a.size(-1)}), b, "matmul"), out_shape);
  }
  return batched_matmul(a, b, "matmul");
}

Tensor linear(const Tensor& x_in, const Tensor& weight_in, const Tensor& bias_in) {
  const Tensor x = autocast_operand(x_in), weight = autocast_operand(weight_in), bias = autocast_operand(bias_in);
  check_operands(x, weight, "linear");
  FG_CHECK(weight.dim() == 2, ShapeError, "linear: weight must be 2-D [out_features, in_features], got {}",
           shape_str(weight.sizes()));
  FG_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), ShapeError,
           "linear: input shape {} does not end in in_features = {} (weight shape {})", shape_str(x.sizes()),
           weight.size(1), shape_str(weight.sizes()));
  Tensor y = matmul(x, transpose(weight, 0, 1));
  if (!bias.defined()) return y;
  FG_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), ShapeError,
           "linear: bias must be 1-D of size out_features = {}, got {}", weight.size(0), shape_str(bias.sizes()));
  return add(y, bias);
}

}  // namespace fg
