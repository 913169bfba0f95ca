// Nodes of the autograd tape. Each differentiable op that saw an input requiring grad records one Node
// whose next_edges point at the nodes that produced its inputs (or at AccumulateGrad for leaves).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "flexgrad/tensor/tensor.h"

namespace fg {

class Node;

struct Edge {
  std::shared_ptr<Node> fn;  // null: this input needs no gradient
  uint32_t input_nr = 0;     // which of fn's outputs the gradient flows into
  bool valid() const { return fn != nullptr; }
};

// A tensor saved for the backward pass. It keeps a history-free alias (so a saved output does not keep
// its own grad_fn alive in a cycle) and the storage version at save time: unpacking after an in-place
// change is an AutogradError instead of a silently wrong gradient.
class SavedTensor {
 public:
  SavedTensor() = default;
  SavedTensor(const Tensor& t);  // NOLINT: implicit, so ops can save tensors by assignment
  Tensor unpack() const;
  bool defined() const { return data_.defined(); }
  void reset() { data_ = Tensor(); }

 private:
  Tensor data_;
  uint32_t saved_version_ = 0;
};

class Node : public std::enable_shared_from_this<Node> {
 public:
  Node();
  // Releases the graph below iteratively: a chain of 100k nodes must not recurse 100k deep.
  virtual ~Node();
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;

  virtual std::string name() const = 0;
  // Gradients for each output in, gradients for each input (next_edges) out. An output no path used
  // gets an undefined tensor; return undefined for an input that needs no gradient.
  virtual TensorList apply(TensorList&& grad_outputs) = 0;
  // Frees saved tensors after a backward without retain_graph.
  virtual void release_saved() {}

  std::vector<Edge> next_edges;
  uint64_t sequence_nr() const { return sequence_nr_; }
  uint32_t num_outputs = 1;
  // Hooks on the gradient of output i (tensor hooks of non-leaf tensors), run before apply().
  std::map<uint32_t, std::vector<GradHook>> pre_hooks;
  bool released = false;  // saved state was freed; running it again is an error

 private:
  uint64_t sequence_nr_;
};

// The sink for a leaf that requires grad: adds the incoming gradient into leaf.grad().
class AccumulateGrad final : public Node {
 public:
  explicit AccumulateGrad(Tensor leaf) : leaf_(std::move(leaf)) {}
  std::string name() const override { return "AccumulateGrad"; }
  TensorList apply(TensorList&& grads) override;
  const Tensor& leaf() const { return leaf_; }

 private:
  Tensor leaf_;
};

// A node whose backward is a lambda: ops keep forward and backward side by side (see autograd/record.h).
using BackwardFn = std::function<TensorList(const TensorList& grad_outputs)>;
class LambdaNode final : public Node {
 public:
  LambdaNode(std::string name, BackwardFn fn) : name_(std::move(name)), fn_(std::move(fn)) {}
  std::string name() const override { return name_; }
  TensorList apply(TensorList&& grads) override;
  void release_saved() override { fn_ = nullptr; }

 private:
  std::string name_;
  BackwardFn fn_;
};

}  // namespace fg
