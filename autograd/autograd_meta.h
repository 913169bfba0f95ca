// The autograd state of one tensor, hung off TensorImpl's single autograd slot.
#pragma once
#include <memory>
#include <vector>

#include "autograd/node.h"

namespace fg {

struct AutogradMeta final : AutogradMetaInterface {
  bool requires_grad = false;
  Tensor grad;
  std::shared_ptr<Node> grad_fn;          // null for leaves
  uint32_t output_nr = 0;                 // which output of grad_fn this tensor is
  std::weak_ptr<Node> grad_accumulator;   // leaves only; the graph holds it strongly
  std::vector<GradHook> leaf_hooks;       // hooks of a leaf, run by its AccumulateGrad
  bool retains_grad = false;
};

// Null when the tensor never took part in autograd.
AutogradMeta* autograd_meta(const Tensor& t);
AutogradMeta& materialize_autograd_meta(const Tensor& t);

// The edge along which a gradient for `t` flows: its grad_fn, or its AccumulateGrad (created lazily).
Edge gradient_edge(const Tensor& t);
// Makes `t` the output number `output_nr` of `fn` (sets requires_grad when t is floating).
void set_history(const Tensor& t, const std::shared_ptr<Node>& fn, uint32_t output_nr);

}  // namespace fg
