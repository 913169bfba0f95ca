// cross_entropy (fused, backward next to it), nll_loss and mse_loss (composites of differentiable ops).
#include "flexgrad/ops/loss.h"

#include "flexgrad/autograd/record.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/index.h"
#include "flexgrad/ops/loss_kernels.h"
#include "flexgrad/ops/reduce.h"
#include "flexgrad/ops/view.h"

namespace fg {

FG_DEFINE_STUB(CrossEntropyFwdFn, cross_entropy_fwd_stub);
FG_DEFINE_STUB(CrossEntropyBwdFn, cross_entropy_bwd_stub);

namespace {

void check_target(const Tensor& logits, const Tensor& target, const char* op) {
  FG_CHECK(logits.defined() && target.defined(), ValueError, "{}: got an undefined tensor", op);
  FG_CHECK(logits.is_floating_point(), DTypeError, "{}: logits must be floating, got {}", op, logits.dtype());
  FG_CHECK(target.dtype() == kInt64 || target.dtype() == kInt32, DTypeError,
           "{}: target must hold int64 or int32 class indices, got {}", op, target.dtype());
  FG_CHECK(logits.dim() == 1 || logits.dim() == 2, ShapeError,
           "{}: logits must be [N, C] or [C], got {} (flatten the batch dims first)", op, shape_str(logits.sizes()));
  FG_CHECK(target.dim() == logits.dim() - 1 && (logits.dim() == 1 || target.size(0) == logits.size(0)), ShapeError,
           "{}: target shape {} does not match logits shape {} (expected [N] for [N, C])", op,
           shape_str(target.sizes()), shape_str(logits.sizes()));
  FG_CHECK(logits.device() == target.device(), DeviceError, "{}: logits on {} but target on {}", op, logits.device(),
           target.device());
}

Tensor reduce(const Tensor& per_row, const Tensor& count, Reduction r) {
  if (r == Reduction::None) return per_row;
  Tensor s = sum(per_row);
  return r == Reduction::Sum ? s : div(s, cast(count, s.dtype()));
}

}  // namespace

Tensor cross_entropy(const Tensor& logits_in, const Tensor& target_in, const CrossEntropyOptions& o) {
  check_target(logits_in, target_in, "cross_entropy");
  FG_CHECK(o.label_smoothing >= 0 && o.label_smoothing <= 1, ValueError,
           "cross_entropy: label_smoothing must be in [0, 1], got {}", o.label_smoothing);
  // Half types compute in float32 (the cast is differentiable, so gradients come back in the input dtype).
  const bool low = logits_in.dtype() == kFloat16 || logits_in.dtype() == kBFloat16;
  Tensor x2 = (low ? cast(logits_in, kFloat32) : logits_in);
  if (x2.dim() == 1) x2 = unsqueeze(x2, 0);
  Tensor x = contiguous(x2);
  Tensor t = contiguous(cast(reshape(target_in, {-1}), kInt64));
  CrossEntropyArgs a;
  a.rows = x.size(0);
  a.classes = x.size(1);
  a.ignore_index = o.ignore_index;
  a.smoothing = o.label_smoothing;
  a.dtype = x.dtype();
  a.logits = x.data_ptr();
  a.target = t.data<int64_t>();
  Tensor loss = empty({a.rows}, x.options()), lse = empty({a.rows}, x.options());
  if (a.rows > 0) cross_entropy_fwd_stub(x.device(), a, loss.data_ptr(), lse.data_ptr());
  Tensor count = sum(ne(t, scalar_tensor(o.ignore_index, TensorOptions(kInt64).device(t.device()))));

  if (needs_grad({x})) {
    SavedTensor sx = x, st = t, slse = lse, scount = count;
    const Reduction red = o.reduction;
    record("CrossEntropyBackward", {x}, {loss}, [sx, st, slse, scount, a, red](const TensorList& g) {
      Tensor xx = sx.unpack(), tt = st.unpack();
      // Per-row scale: the upstream gradient of each row loss (already divided by count for Mean).
      Tensor scale = contiguous(expand(g[0], {a.rows}));
      CrossEntropyArgs b = a;
      b.logits = xx.data_ptr();
      b.target = tt.data<int64_t>();
      Tensor grad = empty(xx.sizes(), xx.options());
      if (b.rows > 0) cross_entropy_bwd_stub(xx.device(), b, slse.unpack().data_ptr(), scale.data_ptr(), grad.data_ptr());
      return TensorList{grad};
    });
  }
  // The reduction is ordinary differentiable ops on the per-row losses, so Mean/Sum/None share one node.
  Tensor out = reduce(loss, count, o.reduction);
  if (logits_in.dim() == 1 && o.reduction == Reduction::None) out = squeeze(out, 0);
  return low ? cast(out, logits_in.dtype()) : out;
}

Tensor nll_loss(const Tensor& logp, const Tensor& target, int64_t ignore_index, Reduction reduction) {
  check_target(logp, target, "nll_loss");
  Tensor lp = logp.dim() == 1 ? unsqueeze(logp, 0) : logp;
  Tensor t = cast(reshape(target, {-1}), kInt64);
  Tensor keep = ne(t, scalar_tensor(ignore_index, TensorOptions(kInt64).device(t.device())));
  // Ignored targets may be out of range (e.g. -100): gather at class 0 and zero them afterwards.
  Tensor safe = where(keep, t, scalar_tensor(0, TensorOptions(kInt64).device(t.device())));
  Tensor picked = squeeze(gather(lp, 1, unsqueeze(safe, 1)), 1);
  Tensor per_row = where(keep, neg(picked), scalar_tensor(0, lp.options()));
  Tensor out = reduce(per_row, sum(keep), reduction);
  if (logp.dim() == 1 && reduction == Reduction::None) out = squeeze(out, 0);
  return out;
}

Tensor mse_loss(const Tensor& input, const Tensor& target, Reduction reduction) {
  FG_CHECK(input.defined() && target.defined(), ValueError, "mse_loss: got an undefined tensor");
  FG_CHECK(input.sizes() == target.sizes(), ShapeError, "mse_loss: input shape {} and target shape {} differ",
           shape_str(input.sizes()), shape_str(target.sizes()));
  Tensor sq = square(sub(input, target));
  if (reduction == Reduction::None) return sq;
  return reduction == Reduction::Sum ? sum(sq) : mean(sq);
}

}  // namespace fg
