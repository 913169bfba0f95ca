#include "flexgrad/nn/linear.h"

#include <cmath>

#include "flexgrad/nn/init.h"
#include "flexgrad/ops/linalg.h"

namespace fg::nn {

Linear::Linear(int64_t in, int64_t out, bool with_bias, Generator* gen)
    : Module("Linear"), in_features(in), out_features(out) {
  FG_CHECK(in > 0 && out > 0, ValueError, "Linear: in_features ({}) and out_features ({}) must be positive", in, out);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  weight = init::uniform({out, in}, bound, {}, gen);
  register_parameter("weight", &weight);
  if (with_bias) {
    bias = init::uniform({out}, bound, {}, gen);
    register_parameter("bias", &bias);
  }
}

Tensor Linear::forward(const Tensor& x) const { return linear(x, weight, bias); }

std::string Linear::extra_repr() const {
  return fmt::format("in_features={}, out_features={}, bias={}", in_features, out_features, bias.defined());
}

}  // namespace fg::nn
