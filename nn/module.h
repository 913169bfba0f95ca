// nn::Module, as torch.nn.Module / libtorch's Module: parameters, buffers and submodules registered by
// name, recursive traversal with dotted names ("blocks.0.attn.q_proj.weight"), train/eval mode, dtype
// conversion, zero_grad, state_dict and a printout of the tree.
//
// A layer keeps its tensors as plain members and registers their addresses:
//
//   struct Affine : nn::Module {
//     Tensor scale;
//     Affine() : Module("Affine") { scale = fg::ones({4}); register_parameter("scale", &scale); }
//     Tensor forward(const Tensor& x) { return x * scale; }
//   };
//
// so that to(dtype) and load_state_dict replace the member itself, never a stale copy. Modules live in
// shared_ptrs and are neither copied nor moved (the registered addresses must stay valid).
#pragma once
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "flexgrad/tensor/random.h"
#include "flexgrad/tensor/tensor.h"

namespace fg::nn {

// Ordered (name, tensor) pairs: state dicts keep the registration order, which is what a reader expects.
using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

class Module : public std::enable_shared_from_this<Module> {
 public:
  explicit Module(std::string type_name);
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  const std::string& type_name() const { return type_name_; }

  // ---- registration (names must be unique within a module and contain no '.') ----
  // The tensor is made a leaf that requires grad (when floating and requires_grad is set).
  void register_parameter(const std::string& name, Tensor* slot, bool requires_grad = true);
  // Buffers are state without gradients (RoPE tables, running stats). Non-persistent ones stay out of
  // the state dict (they are recomputed from the configuration).
  void register_buffer(const std::string& name, Tensor* slot, bool persistent = true);
  template <class M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    add_child(name, module);
    return module;
  }

  // ---- traversal ----
  TensorList parameters(bool recurse = true) const;
  NamedTensors named_parameters(bool recurse = true) const;
  NamedTensors named_buffers(bool recurse = true) const;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> named_children() const { return children_; }
  // This module ("" ) and every descendant, depth first.
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> named_modules();
  int64_t num_parameters() const;  // elements of all parameters
  // The parameter or buffer called `name` (dotted path); ValueError listing the names when absent.
  Tensor& get(const std::string& name);

  // ---- mode and conversion ----
  virtual void train(bool on = true);
  void eval() { train(false); }
  bool is_training() const { return training_; }
  // Casts every floating parameter and buffer (parameters stay leaves that require grad; grads dropped).
  void to(DType dtype);
  // Moves every parameter, buffer and gradient. The registered members are replaced by new tensors: build
  // optimizers after moving (an optimizer keeps the tensors it was given; its state lives on their device).
  void to(Device device);
  void zero_grad();  // drops the gradients (as set_to_none=True)

  // ---- state ----
  // Parameters and persistent buffers, by dotted name, in registration order.
  NamedTensors state_dict() const;
  // Copies values into the registered tensors. With strict, names must match exactly; in any case
  // shapes and dtypes must. Every problem is collected and reported in one ValueError.
  void load_state_dict(const NamedTensors& state, bool strict = true);

  // ---- printing ----
  // "GPT(...)\n  (blocks): ModuleList(...)" with each module's parameter count.
  std::string to_string() const;
  virtual std::string extra_repr() const { return ""; }

 protected:
  void add_child(const std::string& name, std::shared_ptr<Module> module);

 private:
  struct Slot {
    std::string name;
    Tensor* tensor;
    bool persistent = true;
  };
  void check_new_name(const std::string& name, const char* what) const;
  void collect(const std::string& prefix, bool params, bool buffers, bool persistent_only, bool recurse,
               std::vector<std::pair<std::string, Tensor*>>& out) const;
  void print(std::string& out, const std::string& name, int indent) const;

  std::string type_name_;
  bool training_ = true;
  std::vector<Slot> params_;
  std::vector<Slot> buffers_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
};

// An indexed list of submodules named "0", "1", ... (as torch.nn.ModuleList).
template <class M>
class ModuleList : public Module {
 public:
  ModuleList() : Module("ModuleList") {}
  void push_back(std::shared_ptr<M> m) {
    add_child(std::to_string(items_.size()), m);
    items_.push_back(std::move(m));
  }
  size_t size() const { return items_.size(); }
  const std::shared_ptr<M>& operator[](size_t i) const { return items_.at(i); }
  auto begin() const { return items_.begin(); }
  auto end() const { return items_.end(); }

 private:
  std::vector<std::shared_ptr<M>> items_;
};

}  // namespace fg::nn
