// The backward pass: discover the graph reachable from the roots (iteratively), count each node's
// producers, then run nodes as their gradients become complete, newest first (as PyTorch orders them).
#include "flexgrad/autograd/engine.h"

#include <queue>
#include <unordered_map>
#include <unordered_set>

#include "flexgrad/autograd/autograd_meta.h"
#include "flexgrad/autograd/grad_arith.h"
#include "flexgrad/autograd/grad_mode.h"

namespace fg {
namespace {

struct NewestFirst {
  bool operator()(const Node* a, const Node* b) const { return a->sequence_nr() < b->sequence_nr(); }
};

void accumulate_into(TensorList& buffer, uint32_t slot, const Tensor& g) {
  if (buffer.size() <= slot) buffer.resize(slot + 1);
  buffer[slot] = buffer[slot].defined() ? autograd_arith::add(buffer[slot], g) : g;
}

// Executes the graph. When `capture` is non-empty, gradients flowing into those edges are returned
// instead of being accumulated into leaves (and no AccumulateGrad runs).
TensorList execute(const std::vector<Edge>& root_edges, const TensorList& root_grads, bool retain_graph,
                   const std::vector<Edge>& capture) {
  NoGradGuard no_grad;  // backward formulas are not themselves recorded (no double backward)
  // 1. Dependencies: how many edges from reachable nodes point at each node.
  std::unordered_map<Node*, int> deps;
  std::unordered_set<Node*> seen;
  std::vector<Node*> stack;
  for (const auto& e : root_edges) {
    if (e.fn && seen.insert(e.fn.get()).second) stack.push_back(e.fn.get());
  }
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    for (const auto& e : n->next_edges) {
      if (!e.fn) continue;
      ++deps[e.fn.get()];
      if (seen.insert(e.fn.get()).second) stack.push_back(e.fn.get());
    }
  }
  // 2. Seed the roots' buffers.
  std::unordered_map<Node*, TensorList> buffers;
  std::unordered_map<Node*, std::shared_ptr<Node>> keep_alive;
  for (size_t i = 0; i < root_edges.size(); ++i) {
    accumulate_into(buffers[root_edges[i].fn.get()], root_edges[i].input_nr, root_grads[i]);
    keep_alive[root_edges[i].fn.get()] = root_edges[i].fn;
  }
  std::priority_queue<Node*, std::vector<Node*>, NewestFirst> ready;
  std::unordered_set<Node*> queued;
  for (const auto& e : root_edges) {
    if (deps[e.fn.get()] == 0 && queued.insert(e.fn.get()).second) ready.push(e.fn.get());
  }
  TensorList captured(capture.size());
  bool capturing = !capture.empty();
  // 3. Run.
  while (!ready.empty()) {
    Node* node = ready.top();
    ready.pop();
    TensorList grads = std::move(buffers[node]);
    buffers.erase(node);
    grads.resize(node->num_outputs);
    for (auto& [slot, hooks] : node->pre_hooks) {
      if (slot >= grads.size() || !grads[slot].defined()) continue;
      for (auto& hook : hooks) {
        Tensor r = hook(grads[slot]);
        if (r.defined()) grads[slot] = r;
      }
    }
    if (capturing) {
      for (size_t c = 0; c < capture.size(); ++c) {
        if (capture[c].fn.get() == node && capture[c].input_nr < grads.size()) captured[c] = grads[capture[c].input_nr];
      }
    }
    TensorList outs;
    bool is_sink = dynamic_cast<AccumulateGrad*>(node) != nullptr;
    bool any_grad = false;
    for (const auto& g : grads) any_grad = any_grad || g.defined();
    // A node no gradient reached is still "run" so that the nodes below it see their counts drop.
    if (any_grad && !(capturing && is_sink)) {
      outs = node->apply(std::move(grads));
      if (!retain_graph && !is_sink) {
        node->release_saved();
        node->released = true;
      }
    }
    FG_CHECK(outs.empty() || outs.size() == node->next_edges.size(), AutogradError,
             "{} returned {} gradients but has {} inputs", node->name(), outs.size(), node->next_edges.size());
    for (size_t i = 0; i < node->next_edges.size(); ++i) {
      const Edge& e = node->next_edges[i];
      if (!e.fn) continue;
      Node* next = e.fn.get();
      keep_alive.try_emplace(next, e.fn);
      if (!outs.empty() && outs[i].defined()) accumulate_into(buffers[next], e.input_nr, outs[i]);
      if (--deps[next] == 0 && queued.insert(next).second) ready.push(next);
    }
    keep_alive.erase(node);
  }
  return captured;
}

Tensor root_grad(const Tensor& root, const Tensor& given, size_t i) {
  if (given.defined()) {
    FG_CHECK(given.sizes() == root.sizes(), ShapeError,
             "backward: gradient {} has shape {} but the output has shape {}", i, shape_str(given.sizes()),
             shape_str(root.sizes()));
    return given;
  }
  FG_CHECK(root.numel() == 1, AutogradError,
           "backward: grad can be implicitly created only for scalar outputs (output {} has shape {})", i,
           shape_str(root.sizes()));
  return autograd_arith::ones_like(root);
}

std::vector<Edge> root_edges_of(const TensorList& roots) {
  std::vector<Edge> edges;
  for (size_t i = 0; i < roots.size(); ++i) {
    FG_CHECK(roots[i].defined(), AutogradError, "backward: output {} is undefined", i);
    Edge e = gradient_edge(roots[i]);
    FG_CHECK(e.valid(), AutogradError,
             "backward: element {} of tensors does not require grad and does not have a grad_fn", i);
    edges.push_back(e);
  }
  return edges;
}

}  // namespace

void run_backward(const TensorList& roots, const TensorList& grads, bool retain_graph) {
  FG_CHECK(grads.empty() || grads.size() == roots.size(), ValueError,
           "backward: got {} gradients for {} outputs", grads.size(), roots.size());
  auto edges = root_edges_of(roots);
  TensorList seeds;
  for (size_t i = 0; i < roots.size(); ++i) seeds.push_back(root_grad(roots[i], grads.empty() ? Tensor() : grads[i], i));
  execute(edges, seeds, retain_graph, {});
}

TensorList grad(const TensorList& outputs, const TensorList& inputs, const TensorList& grad_outputs,
                bool retain_graph, bool allow_unused) {
  FG_CHECK(grad_outputs.empty() || grad_outputs.size() == outputs.size(), ValueError,
           "grad: got {} grad_outputs for {} outputs", grad_outputs.size(), outputs.size());
  auto edges = root_edges_of(outputs);
  TensorList seeds;
  for (size_t i = 0; i < outputs.size(); ++i) {
    seeds.push_back(root_grad(outputs[i], grad_outputs.empty() ? Tensor() : grad_outputs[i], i));
  }
  std::vector<Edge> capture;
  for (size_t i = 0; i < inputs.size(); ++i) {
    Edge e = gradient_edge(inputs[i]);
    FG_CHECK(e.valid(), AutogradError, "grad: input {} does not require grad", i);
    capture.push_back(e);
  }
  TensorList result = execute(edges, seeds, retain_graph, capture);
  for (size_t i = 0; i < result.size(); ++i) {
    FG_CHECK(result[i].defined() || allow_unused, AutogradError,
             "grad: input {} was not used in the graph; pass allow_unused=true if this is intended", i);
  }
  return result;
}

}  // namespace fg
