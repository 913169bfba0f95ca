// The operations autograd's engine needs (autograd/grad_arith.h), provided by the op layer.
#include "flexgrad/autograd/grad_arith.h"

#include "flexgrad/autograd/grad_mode.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/index.h"
#include "flexgrad/ops/reduce.h"
#include "flexgrad/ops/view.h"

namespace fg::autograd_arith {

Tensor add(const Tensor& a, const Tensor& b) {
  NoGradGuard g;
  return fg::add(a, b);
}
Tensor ones_like(const Tensor& t) { return fg::ones_like(t); }
Tensor clone_contiguous(const Tensor& t) {
  NoGradGuard g;
  return fg::clone(t.detach());
}

void copy_into(const Tensor& dst, const Tensor& src) {
  NoGradGuard g;
  Tensor d = dst.detach();
  fg::copy_(d, src.detach());
}

void fill_zero(const Tensor& dst) {
  NoGradGuard g;
  Tensor d = dst.detach();
  fg::fill_(d, 0);
}

void add_into(const Tensor& dst, const Tensor& src) {
  NoGradGuard g;
  Tensor s = src.detach().expand(dst.sizes());
  // Elements that differ only along a stride-0 dim share a location: sum them first (expand's backward).
  Shape sizes = dst.sizes(), strides = dst.strides(), reduced = dst.sizes();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (strides[d] == 0) reduced[d] = 1;
  }
  s = sum_to_shape(s, reduced);
  Tensor d = dst.alias_with_layout(reduced, strides, dst.storage_offset());
  if (is_provably_non_overlapping(reduced, strides)) {
    copy_into(d, fg::add(d, s));
    return;
  }
  // Any other overlap (as_strided with crossing strides): scatter-add by storage position.
  const int64_t storage_elems = static_cast<int64_t>(dst.storage()->nbytes() / dst.element_size());
  TensorOptions pos_opt = TensorOptions().dtype(kInt64).device(dst.device());
  Tensor pos = full({}, d.storage_offset(), pos_opt).expand(reduced);
  for (size_t k = 0; k < reduced.size(); ++k) {
    Shape sh(reduced.size(), 1);
    sh[k] = reduced[k];
    pos = pos + arange(0, static_cast<double>(reduced[k]), 1, pos_opt).view(sh) * strides[k];
  }
  Tensor flat = dst.alias_with_layout({storage_elems}, {1}, 0);
  copy_into(flat, index_add(flat, 0, reshape(pos, {-1}), reshape(s, {-1})));
}

}  // namespace fg::autograd_arith
