// Tensor's autograd methods and the bookkeeping of AutogradMeta.
#include <mutex>

#include "flexgrad/autograd/autograd_meta.h"
#include "flexgrad/autograd/engine.h"
#include "flexgrad/autograd/grad_mode.h"
#include "flexgrad/autograd/record.h"
#include "flexgrad/autograd/grad_arith.h"

namespace fg {

AutogradMeta* autograd_meta(const Tensor& t) {
  return t.defined() ? static_cast<AutogradMeta*>(t.impl()->autograd_meta()) : nullptr;
}

AutogradMeta* fresh_autograd_meta(const Tensor& t) {
  AutogradMeta* m = autograd_meta(t);
  if (m && m->view) refresh_view_grad_fn(t, *m);
  return m;
}

AutogradMeta& materialize_autograd_meta(const Tensor& t) {
  FG_CHECK(t.defined(), AutogradError, "autograd: the tensor is undefined");
  if (!t.impl()->autograd_meta()) t.impl()->set_autograd_meta(std::make_unique<AutogradMeta>());
  return *static_cast<AutogradMeta*>(t.impl()->autograd_meta());
}

Edge gradient_edge(const Tensor& t) {
  AutogradMeta* m = fresh_autograd_meta(t);
  if (!m) return {};
  if (m->grad_fn) return {m->grad_fn, m->output_nr};
  if (!m->requires_grad) return {};
  static std::mutex mu;  // leaves may be used from several threads at once
  std::lock_guard<std::mutex> lock(mu);
  auto acc = m->grad_accumulator.lock();
  if (!acc) {
    acc = std::make_shared<AccumulateGrad>(t);
    m->grad_accumulator = acc;
  }
  return {acc, 0};
}

void set_history(const Tensor& t, const std::shared_ptr<Node>& fn, uint32_t output_nr) {
  if (!t.defined() || !t.is_floating_point()) return;
  AutogradMeta& m = materialize_autograd_meta(t);
  const bool move_retain_hook = m.retains_grad && m.grad_fn != fn;  // an in-place op gave t a new history
  m.grad_fn = fn;
  m.output_nr = output_nr;
  m.requires_grad = true;
  if (m.view) m.attr_version = t.version();  // this history is current: no regeneration until the next write
  if (move_retain_hook) {
    m.retains_grad = false;
    t.retain_grad();
  }
}

namespace {
thread_local bool grad_mode_enabled = true;
}
bool GradMode::is_enabled() { return grad_mode_enabled; }
void GradMode::set_enabled(bool enabled) { grad_mode_enabled = enabled; }

bool needs_grad(std::initializer_list<Tensor> inputs) {
  if (!GradMode::is_enabled()) return false;
  for (const auto& t : inputs) if (t.defined() && t.requires_grad()) return true;
  return false;
}

bool needs_grad(const TensorList& inputs) {
  if (!GradMode::is_enabled()) return false;
  for (const auto& t : inputs) if (t.defined() && t.requires_grad()) return true;
  return false;
}

std::shared_ptr<Node> record(std::string name, const TensorList& inputs, const TensorList& outputs,
                             BackwardFn backward) {
  auto node = std::make_shared<LambdaNode>(std::move(name), std::move(backward));
  node->next_edges.reserve(inputs.size());
  for (const auto& in : inputs) node->next_edges.push_back(in.defined() ? gradient_edge(in) : Edge{});
  node->num_outputs = static_cast<uint32_t>(outputs.size());
  for (uint32_t i = 0; i < outputs.size(); ++i) set_history(outputs[i], node, i);
  return node;
}

// ---- Tensor methods ----

bool Tensor::requires_grad() const {
  AutogradMeta* m = fresh_autograd_meta(*this);
  return m && (m->requires_grad || m->grad_fn);
}

Tensor& Tensor::requires_grad_(bool on) {
  if (!on && !autograd_meta(*this)) return *this;
  fresh_autograd_meta(*this);
  AutogradMeta& m = materialize_autograd_meta(*this);
  FG_CHECK(!m.grad_fn || on, AutogradError,
           "requires_grad_: you can only change requires_grad flags of leaf tensors; use detach() to get a "
           "tensor without history");
  FG_CHECK(!on || is_floating_point(), AutogradError,
           "requires_grad_: only tensors of floating point dtype can require gradients (got {})", dtype());
  m.requires_grad = on;
  return *this;
}

const Tensor& Tensor::grad() const {
  static const Tensor undefined;
  AutogradMeta* m = autograd_meta(*this);
  return m ? m->grad : undefined;
}

Tensor& Tensor::mutable_grad() const { return materialize_autograd_meta(*this).grad; }
void Tensor::set_grad(const Tensor& g) const { materialize_autograd_meta(*this).grad = g; }

std::shared_ptr<Node> Tensor::grad_fn() const {
  AutogradMeta* m = fresh_autograd_meta(*this);
  return m ? m->grad_fn : nullptr;
}

std::string Tensor::grad_fn_name() const {
  auto fn = grad_fn();
  return fn ? fn->name() : std::string();
}

bool Tensor::is_leaf() const { return grad_fn() == nullptr; }

uint32_t Tensor::output_nr() const {
  AutogradMeta* m = fresh_autograd_meta(*this);
  return m ? m->output_nr : 0;
}

void Tensor::backward(const Tensor& gradient, bool retain_graph) const {
  run_backward({*this}, {gradient}, retain_graph);
}

Tensor Tensor::detach() const { return alias_with_layout(sizes(), strides(), storage_offset()); }

Tensor& Tensor::detach_() {
  FG_CHECK(!is_view(*this), AutogradError, "detach_: can't detach views in-place; use detach() instead");
  if (AutogradMeta* m = autograd_meta(*this)) {
    m->grad_fn = nullptr;
    m->output_nr = 0;
    m->requires_grad = false;
  }
  return *this;
}

void Tensor::register_hook(GradHook hook) const {
  FG_CHECK(requires_grad(), AutogradError,
           "register_hook: cannot register a hook on a tensor that doesn't require gradient");
  fresh_autograd_meta(*this);
  AutogradMeta& m = materialize_autograd_meta(*this);
  if (m.grad_fn) m.grad_fn->pre_hooks[m.output_nr].push_back(std::move(hook));
  else m.leaf_hooks.push_back(std::move(hook));
}

void Tensor::retain_grad() const {
  FG_CHECK(requires_grad(), AutogradError, "retain_grad: can't retain_grad on a Tensor that has requires_grad=False");
  fresh_autograd_meta(*this);
  AutogradMeta& m = materialize_autograd_meta(*this);
  if (!m.grad_fn || m.retains_grad) return;  // leaves keep their grad anyway
  m.retains_grad = true;
  std::weak_ptr<TensorImpl> weak = impl_ptr();
  std::weak_ptr<Node> owner = m.grad_fn;
  m.grad_fn->pre_hooks[m.output_nr].push_back([weak, owner](const Tensor& g) {
    if (auto impl = weak.lock()) {
      Tensor self(impl);
      // .grad is the gradient of the tensor's current version: once an in-place op (or a view's
      // regeneration) gave it a new grad_fn, the hook registered there takes over.
      AutogradMeta* meta = autograd_meta(self);
      if (meta && meta->grad_fn != owner.lock()) return Tensor();
      Tensor& slot = self.mutable_grad();
      slot = slot.defined() ? autograd_arith::add(slot, g) : autograd_arith::clone_contiguous(g);
    }
    return Tensor();
  });
}

bool Tensor::retains_grad() const {
  AutogradMeta* m = autograd_meta(*this);
  return m && m->retains_grad;
}

}  // namespace fg
