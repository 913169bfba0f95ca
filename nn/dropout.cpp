#include "nn/dropout.h"

#include "ops/elementwise.h"

namespace fg::nn {

Dropout::Dropout(double prob, uint64_t seed) : Module("Dropout"), p(prob), gen_(seed) {
  FG_CHECK(prob >= 0 && prob < 1, ValueError, "Dropout: p must be in [0, 1), got {}", prob);
}

Tensor Dropout::forward(const Tensor& x) {
  if (!is_training() || p == 0) return x;
  // The mask is a constant of the graph: gradients flow through the multiply only.
  Tensor keep = bernoulli(x.sizes(), 1 - p, x.options(), &gen_);
  return mul(x, keep * (1.0 / (1 - p)));
}

std::string Dropout::extra_repr() const { return fmt::format("p={}", p); }

}  // namespace fg::nn
