#include "flexgrad/nn/norm.h"

#include "flexgrad/ops/norm.h"

namespace fg::nn {

LayerNorm::LayerNorm(int64_t d, double e, bool affine, bool with_bias) : Module("LayerNorm"), dim(d), eps(e) {
  FG_CHECK(d > 0, ValueError, "LayerNorm: dim must be positive, got {}", d);
  if (affine) {
    weight = ones({d});
    register_parameter("weight", &weight);
    if (with_bias) {
      bias = zeros({d});
      register_parameter("bias", &bias);
    }
  }
}

Tensor LayerNorm::forward(const Tensor& x) const {
  FG_CHECK(x.dim() >= 1 && x.size(-1) == dim, ShapeError, "LayerNorm({}): input shape {} does not end in {}", dim,
           shape_str(x.sizes()), dim);
  return layer_norm(x, weight, bias, eps);
}

std::string LayerNorm::extra_repr() const {
  return fmt::format("{}, eps={}, affine={}", dim, eps, weight.defined());
}

RMSNorm::RMSNorm(int64_t d, double e) : Module("RMSNorm"), dim(d), eps(e) {
  FG_CHECK(d > 0, ValueError, "RMSNorm: dim must be positive, got {}", d);
  weight = ones({d});
  register_parameter("weight", &weight);
}

Tensor RMSNorm::forward(const Tensor& x) const {
  FG_CHECK(x.dim() >= 1 && x.size(-1) == dim, ShapeError, "RMSNorm({}): input shape {} does not end in {}", dim,
           shape_str(x.sizes()), dim);
  return rms_norm(x, weight, eps);
}

std::string RMSNorm::extra_repr() const { return fmt::format("{}, eps={}", dim, eps); }

}  // namespace fg::nn
