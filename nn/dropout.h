// Inverted dropout with its own seeded Generator: in training each element is kept with probability
// 1 - p and scaled by 1 / (1 - p); in eval mode (or p = 0) it is the identity. The masks depend only on
// the seed and the number of calls, so a run can be replayed exactly.
#pragma once
#include "flexgrad/nn/module.h"
#include "flexgrad/tensor/random.h"

namespace fg::nn {

class Dropout : public Module {
 public:
  explicit Dropout(double p = 0.5, uint64_t seed = 0xd40u);
  Tensor forward(const Tensor& x);
  Tensor operator()(const Tensor& x) { return forward(x); }
  std::string extra_repr() const override;
  Generator& generator() { return gen_; }

  double p;

 private:
  Generator gen_;
};

}  // namespace fg::nn
