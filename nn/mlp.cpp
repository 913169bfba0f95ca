#include "flexgrad/nn/mlp.h"

#include "flexgrad/ops/activation.h"
#include "flexgrad/ops/elementwise.h"

namespace fg::nn {

MLP::MLP(int64_t dim, int64_t hidden, Activation act, bool bias, Generator* gen) : Module("MLP"), activation(act) {
  fc = register_module("fc", std::make_shared<Linear>(dim, hidden, bias, gen));
  if (act == Activation::SwiGLU) gate = register_module("gate", std::make_shared<Linear>(dim, hidden, bias, gen));
  proj = register_module("proj", std::make_shared<Linear>(hidden, dim, bias, gen));
}

Tensor MLP::forward(const Tensor& x) const {
  if (activation == Activation::SwiGLU) return proj->forward(mul(silu(gate->forward(x)), fc->forward(x)));
  // The tanh form is what GPT-2 used and is cheaper than erf.
  return proj->forward(gelu_fused(fc->forward(x), /*tanh_approximation=*/true));
}

std::string MLP::extra_repr() const { return activation == Activation::SwiGLU ? "SwiGLU" : "GELU"; }

}  // namespace fg::nn
