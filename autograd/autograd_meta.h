// The autograd state of one tensor, hung off TensorImpl's single autograd slot.
#pragma once
#include <memory>
#include <vector>

#include "flexgrad/autograd/node.h"
#include "flexgrad/autograd/view.h"

namespace fg {

struct AutogradMeta final : AutogradMetaInterface {
  bool requires_grad = false;
  Tensor grad;
  std::shared_ptr<Node> grad_fn;          // null for leaves
  uint32_t output_nr = 0;                 // which output of grad_fn this tensor is
  std::weak_ptr<Node> grad_accumulator;   // leaves only; the graph holds it strongly
  std::vector<GradHook> leaf_hooks;       // hooks of a leaf, run by its AccumulateGrad
  bool retains_grad = false;
  // Outputs of view ops (autograd/view.h): the root base, and the version of the shared counter when
  // grad_fn was last set; a newer version means grad_fn must be regenerated from the base.
  std::optional<ViewInfo> view;
  uint32_t attr_version = 0;
};

// Null when the tensor never took part in autograd. Its grad_fn may be stale for a view: read history
// through gradient_edge, Tensor::grad_fn or fresh_autograd_meta.
AutogradMeta* autograd_meta(const Tensor& t);
// autograd_meta with a view's grad_fn regenerated from its base when needed.
AutogradMeta* fresh_autograd_meta(const Tensor& t);
AutogradMeta& materialize_autograd_meta(const Tensor& t);

// The edge along which a gradient for `t` flows: its grad_fn, or its AccumulateGrad (created lazily).
Edge gradient_edge(const Tensor& t);
// Makes `t` the output number `output_nr` of `fn` (sets requires_grad when t is floating).
void set_history(const Tensor& t, const std::shared_ptr<Node>& fn, uint32_t output_nr);

}  // namespace fg
