// Custom differentiable functions, as torch::autograd::Function:
//
//   struct Cube : fg::Function<Cube> {
//     static fg::TensorList forward(fg::FunctionCtx& ctx, const fg::TensorList& in) {
//       ctx.save_for_backward({in[0]});
//       return {in[0] * in[0] * in[0]};
//     }
//     static fg::TensorList backward(fg::FunctionCtx& ctx, const fg::TensorList& grad_out) {
//       auto x = ctx.saved_tensors()[0];
//       return {grad_out[0] * 3 * x * x};
//     }
//   };
//   fg::Tensor y = Cube::apply({x})[0];
#pragma once
#include <any>
#include <map>
#include <string>
#include <typeinfo>

#include "flexgrad/autograd/record.h"

namespace fg {

class FunctionCtx {
 public:
  void save_for_backward(const TensorList& tensors);
  TensorList saved_tensors() const;  // AutogradError when a saved tensor was changed in place
  // Non-tensor state (ints, shapes, flags) kept for backward.
  std::map<std::string, std::any> saved_data;
  // Whether input i requires a gradient (valid in forward and backward).
  bool needs_input_grad(size_t i) const { return i < needs_input_grad_.size() && needs_input_grad_[i]; }
  void release() { saved_.clear(); saved_data.clear(); }

 private:
  template <class F> friend struct Function;
  std::vector<SavedTensor> saved_;
  std::vector<bool> needs_input_grad_;
};

// "MyFn" for a Function subclass (its demangled type name, for grad_fn printouts).
std::string function_node_name(const std::type_info& type);

template <class Derived>
struct Function {
  static TensorList apply(const TensorList& inputs) {
    auto ctx = std::make_shared<FunctionCtx>();
    for (const auto& t : inputs) ctx->needs_input_grad_.push_back(t.defined() && t.requires_grad());
    TensorList outputs;
    {
      NoGradGuard no_grad;
      outputs = Derived::forward(*ctx, inputs);
    }
    if (needs_grad(inputs)) {
      record(function_node_name(typeid(Derived)) + "Backward", inputs, outputs, [ctx](const TensorList& grads) {
        FG_CHECK(ctx != nullptr, AutogradError, "custom Function: backward called after its state was released");
        return Derived::backward(*ctx, grads);
      });
    }
    return outputs;
  }
};

}  // namespace fg
