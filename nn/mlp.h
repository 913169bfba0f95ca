// The transformer feed-forward block: GELU (fc -> gelu -> proj) or SwiGLU (silu(gate x) * up x -> down).
#pragma once
#include "flexgrad/nn/linear.h"

namespace fg::nn {

enum class Activation : uint8_t { GELU, SwiGLU };

class MLP : public Module {
 public:
  // hidden is the width of the inner layer (for SwiGLU the width of each of gate and up).
  MLP(int64_t dim, int64_t hidden, Activation act = Activation::GELU, bool bias = true, Generator* gen = nullptr);
  Tensor forward(const Tensor& x) const;
  Tensor operator()(const Tensor& x) const { return forward(x); }
  std::string extra_repr() const override;

  Activation activation;
  std::shared_ptr<Linear> fc, gate, proj;  // gate only for SwiGLU
};

}  // namespace fg::nn
