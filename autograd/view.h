// View tracking: what makes in-place writes through views differentiable, as PyTorch's differentiable
// views and CopySlices do.
//
// A view op's output remembers its root base (views of views share it) and how it was created. An
// in-place op on a view then gives the *base* a new history, a CopySlices node: the gradient of the
// untouched part of the base flows to the base's old history, the written region's gradient goes through
// the in-place op's backward and lands on the same region of the old history. A view's grad_fn is
// regenerated from its base, lazily, whenever the shared version counter moved since the view's grad_fn
// was set: reading a view after an in-place write through its base (or through another view) sees the new
// history.
//
//   b = a * 1.0;  v = b[0];  v.mul_(10.0);    b: CopySlices(MulBackward in place)  v: AsStridedBackward(b)
#pragma once
#include <memory>
#include <optional>

#include "flexgrad/autograd/node.h"

namespace fg {

// How a view came to be; PyTorch forbids in-place writes with autograd through some of them.
enum class ViewCreation {
  Default,
  NoGradMode,   // created while grad mode was off
  MultiOutput,  // one of several views returned by one op (split, chunk)
};

// A strided layout over a storage (the replay of a view: as_strided(storage, sizes, strides, offset)).
struct Geometry {
  Shape sizes, strides;
  int64_t offset = 0;
  static Geometry of(const Tensor& t) { return {t.sizes(), t.strides(), t.storage_offset()}; }
};

struct ViewInfo {
  Tensor base;  // the root base: never itself a view
  ViewCreation creation = ViewCreation::Default;
  std::string creator;  // the op that made a MultiOutput view, for the error message
  uint32_t output_index = 0;
};

// Marks `view`, just made by a view op from `input`, as a view of input's root base. Views of integer
// tensors are not tracked (they carry no gradient), as in PyTorch.
void set_view_of(const Tensor& view, const Tensor& input);
// Marks the outputs of an op returning several views (split, chunk): in-place writes to them under
// autograd are refused, as PyTorch does.
void mark_multi_output_views(const TensorList& views, const char* op);

bool is_view(const Tensor& t);
// The root base of a view (undefined for a tensor that is not a view).
Tensor view_base(const Tensor& t);

// PyTorch's checks before an in-place op on self; `recording` says whether the op will be recorded (grad
// mode on, some input requires grad). Refused: leaves that require grad and views of them, views made in
// no_grad mode or by multi-output ops.
void check_inplace_autograd(const Tensor& self, const char* op, bool recording);

// Makes `fn` (one output, next_edges[0] = self's previous history) the new history of `self` after an
// in-place op. On a view, the base gets a CopySlices node around fn instead and the view's grad_fn is
// regenerated from the base when next read.
void rebase_history(const Tensor& self, const std::shared_ptr<Node>& fn);

// For views: rebuilds grad_fn from the base when the version counter moved since it was set. Called by
// every accessor of a tensor's history (grad_fn, gradient_edge, requires_grad, ...).
struct AutogradMeta;
void refresh_view_grad_fn(const Tensor& view, AutogradMeta& meta);

// The base's new history after an in-place op on one of its views.
class CopySlices final : public Node {
 public:
  CopySlices(const Tensor& base, const Tensor& view, std::shared_ptr<Node> fn);
  std::string name() const override { return "CopySlices"; }
  TensorList apply(TensorList&& grads) override;
  void release_saved() override { fn_->release_saved(); fn_->released = true; }

 private:
  Geometry base_, view_;
  std::shared_ptr<Node> fn_;  // the in-place op's node; its edges other than the first are ours too
};

}  // namespace fg
