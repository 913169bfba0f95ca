#include "flexgrad/autograd/node.h"

#include <atomic>

#include "flexgrad/autograd/autograd_meta.h"
#include "flexgrad/autograd/grad_arith.h"

namespace fg {
namespace {
std::atomic<uint64_t> next_sequence_nr{0};
}

Node::Node() : sequence_nr_(next_sequence_nr.fetch_add(1, std::memory_order_relaxed)) {}

Node::~Node() {
  // Children whose last owner is this node would be destroyed recursively by shared_ptr. Instead they
  // are parked on a per-thread list and released one at a time by the outermost destructor.
  thread_local std::vector<std::shared_ptr<Node>> pending;
  thread_local bool draining = false;
  for (auto& e : next_edges) {
    if (e.fn) pending.push_back(std::move(e.fn));
  }
  next_edges.clear();
  if (draining) return;
  draining = true;
  while (!pending.empty()) {
    std::shared_ptr<Node> n = std::move(pending.back());
    pending.pop_back();
    n.reset();  // may park more nodes on `pending`
  }
  draining = false;
}

SavedTensor::SavedTensor(const Tensor& t) {
  if (!t.defined()) return;
  data_ = t.alias_with_layout(t.sizes(), t.strides(), t.storage_offset());
  saved_version_ = t.version();
}

Tensor SavedTensor::unpack() const {
  if (!data_.defined()) return data_;
  FG_CHECK(data_.version() == saved_version_, AutogradError,
           "one of the tensors needed for gradient computation has been modified by an inplace operation: "
           "[{} tensor of shape {}] is at version {}; expected version {} instead",
           data_.dtype(), shape_str(data_.sizes()), data_.version(), saved_version_);
  return data_;
}

namespace {
// Whether `g` may become .grad as it is, without a copy (libtorch's AccumulateGrad steals such a gradient too): no
// other handle shares its TensorImpl, no other TensorImpl shares its storage (a view of the caller's tensor, a saved
// alias), it is contiguous (the layout a copy would have) and carries no autograd state. Then nobody else can see it,
// so a later in-place change of .grad (zero_, an optimizer step) reaches nothing else; a backward that made fresh
// gradients (flex_attention's dQ, dK, dV) saves a whole read and write of each.
bool stealable(const Tensor& g) {
  return g.impl_ptr().use_count() == 1 && g.impl()->storage().use_count() == 1 && g.is_contiguous() &&
         g.impl()->autograd_meta() == nullptr;
}
}  // namespace

TensorList AccumulateGrad::apply(TensorList&& grads) {
  Tensor g = std::move(grads.at(0));
  grads.clear();
  if (!g.defined()) return {};
  if (auto* meta = autograd_meta(leaf_)) {
    for (auto& hook : meta->leaf_hooks) {
      Tensor r = hook(g);
      if (r.defined()) g = r;
    }
  }
  FG_CHECK(g.sizes() == leaf_.sizes(), AutogradError,
           "AccumulateGrad: gradient of shape {} does not match the leaf's shape {}", shape_str(g.sizes()),
           shape_str(leaf_.sizes()));
  Tensor& slot = leaf_.mutable_grad();
  if (g.dtype() != leaf_.dtype()) g = g.to(leaf_.dtype());
  if (slot.defined()) {
    slot = autograd_arith::add(slot, g);
  } else {
    slot = stealable(g) ? std::move(g) : autograd_arith::clone_contiguous(g);
  }
  return {};
}

TensorList LambdaNode::apply(TensorList&& grads) {
  FG_CHECK(fn_ != nullptr, AutogradError,
           "Trying to backward through the graph a second time (or directly access saved tensors after they "
           "have already been freed) in {}. Saved intermediate values of the graph are freed when you call "
           "backward(). Specify retain_graph=true if you need to backward through the graph a second time.",
           name_);
  return fn_(grads);
}

}  // namespace fg
