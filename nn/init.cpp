#include "flexgrad/nn/init.h"

#include "flexgrad/autograd/grad_mode.h"
#include "flexgrad/ops/elementwise.h"

namespace fg::nn::init {

Tensor normal(const Shape& shape, double std, TensorOptions options, Generator* gen) {
  NoGradGuard ng;
  return randn(shape, options.requires_grad(false), gen) * std;
}

Tensor uniform(const Shape& shape, double bound, TensorOptions options, Generator* gen) {
  NoGradGuard ng;
  return rand(shape, options.requires_grad(false), gen) * (2 * bound) - bound;
}

}  // namespace fg::nn::init
