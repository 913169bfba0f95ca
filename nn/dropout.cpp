#include "flexgrad/nn/dropout.h"

#include "flexgrad/ops/dropout.h"

namespace fg::nn {

Dropout::Dropout(double prob, uint64_t seed) : Module("Dropout"), p(prob), gen_(seed) {
  FG_CHECK(prob >= 0 && prob < 1, ValueError, "Dropout: p must be in [0, 1), got {}", prob);
}

Tensor Dropout::forward(const Tensor& x) {
  if (!is_training() || p == 0) return x;
  // One fused pass each way (ops/dropout.h): the mask comes from counters of this generator (the same mask
  // on every device) and is drawn again in the backward instead of being stored.
  return fg::dropout(x, p, &gen_);
}

std::string Dropout::extra_repr() const { return fmt::format("p={}", p); }

}  // namespace fg::nn
