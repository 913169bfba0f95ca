// View tracking, the in-place checks and CopySlices (see autograd/view.h).
#include "flexgrad/autograd/view.h"

#include <mutex>

#include "flexgrad/autograd/autograd_meta.h"
#include "flexgrad/autograd/grad_arith.h"
#include "flexgrad/autograd/grad_mode.h"

namespace fg {
namespace {

// Elements a storage needs from offset 0 to hold every element of `g` (its largest offset + 1).
int64_t extent(const Geometry& g) {
  int64_t last = g.offset;
  for (size_t d = 0; d < g.sizes.size(); ++d) {
    if (g.sizes[d] == 0) return 0;
    last += (g.sizes[d] - 1) * g.strides[d];
  }
  return last + 1;
}

// Gradients of a base are built in a zeroed buffer laid out as the base (offset 0); the view is then the
// same region of that buffer as it is of the base's storage. Checked once, where the node is made.
void check_replayable(const Geometry& base, const Geometry& view, const char* what) {
  for (size_t d = 0; d < base.sizes.size(); ++d) {
    FG_CHECK(base.strides[d] != 0 || base.sizes[d] <= 1, NotImplementedError,
             "{}: the base of the view (shape {}, strides {}) has elements sharing one memory location", what,
             shape_str(base.sizes), shape_str(base.strides));
  }
  Geometry rel = view;
  rel.offset = view.offset - base.offset;
  FG_CHECK(rel.offset >= 0 && extent(rel) <= extent(Geometry{base.sizes, base.strides, 0}), NotImplementedError,
           "{}: the view (shape {}, strides {}, offset {}) reaches outside its base (shape {}, strides {}, offset {})",
           what, shape_str(view.sizes), shape_str(view.strides), view.offset, shape_str(base.sizes),
           shape_str(base.strides), base.offset);
}

// A zeroed buffer laid out as the base (offset 0): as_base and as_view alias it as the base and the view.
struct GradBuffer {
  Tensor as_base, as_view;
  GradBuffer(const Geometry& base, const Geometry& view, TensorOptions options) {
    Tensor buf = zeros({extent(Geometry{base.sizes, base.strides, 0})}, options);
    as_base = buf.alias_with_layout(base.sizes, base.strides, 0);
    as_view = buf.alias_with_layout(view.sizes, view.strides, view.offset - base.offset);
  }
};

// A view's history regenerated from its base: the view reads one region of the base, so its gradient is
// the base's gradient on that region and zero elsewhere (PyTorch's AsStridedBackward).
class ViewOfBaseBackward final : public Node {
 public:
  ViewOfBaseBackward(const Tensor& base, const Tensor& view) : base_(Geometry::of(base)), view_(Geometry::of(view)) {
    check_replayable(base_, view_, "view of a modified base");
  }
  std::string name() const override { return "AsStridedBackward"; }
  TensorList apply(TensorList&& grads) override {
    GradBuffer buf(base_, view_, grads.at(0).options());
    autograd_arith::add_into(buf.as_view, grads[0]);  // an expanded view's elements add up
    return {buf.as_base};
  }

 private:
  Geometry base_, view_;
};

std::mutex regenerate_mutex;  // a view read from several threads regenerates once

}  // namespace

void set_view_of(const Tensor& view, const Tensor& input) {
  if (!view.is_floating_point()) return;
  ViewCreation mode = GradMode::is_enabled() ? ViewCreation::Default : ViewCreation::NoGradMode;
  ViewInfo info;
  AutogradMeta* in = autograd_meta(input);
  if (in && in->view) {
    info = *in->view;  // views of views share the root base and keep a restrictive creation mode
    if (info.creation == ViewCreation::Default) info.creation = mode;
  } else {
    info.base = input;
    info.creation = mode;
  }
  AutogradMeta& m = materialize_autograd_meta(view);
  m.view = std::move(info);
  m.attr_version = view.version();
}

void mark_multi_output_views(const TensorList& views, const char* op) {
  for (size_t i = 0; i < views.size(); ++i) {
    AutogradMeta* m = autograd_meta(views[i]);
    if (!m || !m->view || m->view->creation == ViewCreation::NoGradMode) continue;
    m->view->creation = ViewCreation::MultiOutput;
    m->view->creator = op;
    m->view->output_index = static_cast<uint32_t>(i);
  }
}

bool is_view(const Tensor& t) {
  AutogradMeta* m = autograd_meta(t);
  return m && m->view.has_value();
}

Tensor view_base(const Tensor& t) {
  AutogradMeta* m = autograd_meta(t);
  return m && m->view ? m->view->base : Tensor();
}

void check_inplace_autograd(const Tensor& self, const char* op, bool recording) {
  if (!GradMode::is_enabled()) return;
  AutogradMeta* m = autograd_meta(self);
  if (m && m->view) {
    const ViewInfo& v = *m->view;
    // A view made under no_grad from a base that requires grad counts as requiring grad here (PyTorch's
    // views do), though it has no history of its own.
    if (!recording && !(v.creation == ViewCreation::NoGradMode && v.base.requires_grad())) return;
    FG_CHECK(v.creation != ViewCreation::NoGradMode, AutogradError,
             "{}: a view was created in no_grad mode and is being modified in-place with grad mode enabled. This is "
             "ambiguous and therefore forbidden: create the view and modify it both inside the no_grad block (the "
             "write is not tracked) or both outside it (the write is tracked)", op);
    FG_CHECK(v.creation != ViewCreation::MultiOutput, AutogradError,
             "{}: output {} of {} is a view and is being modified in-place. This view is one of several views "
             "returned by one function, and such views do not allow in-place modification; replace the in-place "
             "operation by an out-of-place one", op, v.output_index, v.creator);
    // A view that requires grad over a leaf: the leaf itself (or a view made a leaf with requires_grad_).
    FG_CHECK(!(self.requires_grad() && v.base.is_leaf()), AutogradError,
             "{}: a view of a leaf Variable that requires grad is being used in an in-place operation", op);
    return;
  }
  FG_CHECK(!(recording && self.requires_grad() && self.is_leaf()), AutogradError,
           "{}: a leaf Variable that requires grad is being used in an in-place operation", op);
}

void rebase_history(const Tensor& self, const std::shared_ptr<Node>& fn) {
  AutogradMeta* m = autograd_meta(self);
  if (!m || !m->view) {
    set_history(self, fn, 0);
    return;
  }
  const Tensor& base = m->view->base;
  auto copy_slices = std::make_shared<CopySlices>(base, self, fn);
  set_history(base, copy_slices, 0);
  // self's grad_fn is left stale on purpose: the write bumped the shared version, so the next read of
  // self's history regenerates it from the base (as every other view of the base is).
}

void refresh_view_grad_fn(const Tensor& view, AutogradMeta& m) {
  const Tensor& base = m.view->base;
  if (m.attr_version == view.version()) return;
  if (!m.grad_fn && !base.requires_grad()) return;
  bool retained = false;
  {
    std::lock_guard<std::mutex> lock(regenerate_mutex);
    const uint32_t now = view.version();
    if (m.attr_version == now) return;
    if (base.requires_grad()) {
      auto fn = std::make_shared<ViewOfBaseBackward>(base, view);
      fn->next_edges = {gradient_edge(base)};
      m.grad_fn = std::move(fn);
    } else {
      m.grad_fn = nullptr;  // the base left the graph (detach_)
      m.requires_grad = false;
    }
    m.output_nr = 0;
    m.attr_version = now;
    retained = m.retains_grad;
    m.retains_grad = false;
  }
  if (retained) view.retain_grad();  // its hook lived on the old grad_fn
}

CopySlices::CopySlices(const Tensor& base, const Tensor& view, std::shared_ptr<Node> fn)
    : base_(Geometry::of(base)), view_(Geometry::of(view)), fn_(std::move(fn)) {
  check_replayable(base_, view_, "in-place operation on a view");
  FG_CHECK(fn_->num_outputs == 1 && !fn_->next_edges.empty(), AutogradError,
           "in-place operation on a view: {} must have one output and self as its first input", fn_->name());
  // The base's old history replaces the view's: the written region's gradient is handed back to it.
  next_edges = fn_->next_edges;
  next_edges[0] = gradient_edge(base);
}

TensorList CopySlices::apply(TensorList&& grads) {
  const Tensor& g = grads.at(0);
  GradBuffer buf(base_, view_, g.options());
  autograd_arith::copy_into(buf.as_base, g);
  TensorList res = fn_->apply({autograd_arith::clone_contiguous(buf.as_view)});
  FG_CHECK(res.size() == next_edges.size(), AutogradError, "CopySlices: {} returned {} gradients for {} inputs",
           fn_->name(), res.size(), next_edges.size());
  // The region's old values reach the output only through the in-place op: its gradient replaces them
  // (zero when the op overwrote them, as copy_ and fill_ do; fill_ may have written an expanded view).
  if (res[0].defined()) autograd_arith::copy_into(buf.as_view, res[0]);
  else autograd_arith::fill_zero(buf.as_view);
  res[0] = buf.as_base;
  return res;
}

}  // namespace fg
