// LayerNorm and RMSNorm over the last dim (fused ops from ops/norm.h), weight 1 and bias 0 at init.
#pragma once
#include "flexgrad/nn/module.h"

namespace fg::nn {

class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t dim, double eps = 1e-5, bool affine = true, bool bias = true);
  Tensor forward(const Tensor& x) const;
  Tensor operator()(const Tensor& x) const { return forward(x); }
  std::string extra_repr() const override;

  int64_t dim;
  double eps;
  Tensor weight, bias;
};

class RMSNorm : public Module {
 public:
  explicit RMSNorm(int64_t dim, double eps = 1e-6);
  Tensor forward(const Tensor& x) const;
  Tensor operator()(const Tensor& x) const { return forward(x); }
  std::string extra_repr() const override;

  int64_t dim;
  double eps;
  Tensor weight;
};

}  // namespace fg::nn
