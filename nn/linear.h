// y = x @ weight^T + bias, weight [out, in] initialised U(-1/sqrt(in), 1/sqrt(in)) as torch.nn.Linear.
#pragma once
#include "flexgrad/nn/module.h"

namespace fg::nn {

class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias = true, Generator* gen = nullptr);
  Tensor forward(const Tensor& x) const;
  Tensor operator()(const Tensor& x) const { return forward(x); }
  std::string extra_repr() const override;

  int64_t in_features, out_features;
  Tensor weight, bias;  // bias undefined when disabled
};

}  // namespace fg::nn
