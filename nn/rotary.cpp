#include "flexgrad/nn/rotary.h"

#include <cmath>
#include <vector>

#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/index.h"
#include "flexgrad/ops/rotary.h"
#include "flexgrad/ops/view.h"

namespace fg::nn {

RotaryEmbedding::RotaryEmbedding(int64_t e, int64_t max_pos, double b)
    : Module("RotaryEmbedding"), head_dim(e), max_positions(max_pos), base(b) {
  FG_CHECK(e > 0 && e % 2 == 0, ValueError, "RotaryEmbedding: head_dim must be even and positive, got {}", e);
  FG_CHECK(max_pos > 0, ValueError, "RotaryEmbedding: max_positions must be positive, got {}", max_pos);
  const int64_t half = e / 2;
  std::vector<double> c(max_pos * half), s(max_pos * half);
  for (int64_t p = 0; p < max_pos; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const double ang = p * std::pow(base, -2.0 * i / e);
      c[p * half + i] = std::cos(ang);
      s[p * half + i] = std::sin(ang);
    }
  }
  cos_table = from_vector(c, {max_pos, half}, kFloat32);
  sin_table = from_vector(s, {max_pos, half}, kFloat32);
  register_buffer("cos", &cos_table, /*persistent=*/false);
  register_buffer("sin", &sin_table, /*persistent=*/false);
}

Tensor RotaryEmbedding::forward(const Tensor& x, int64_t offset) const {
  FG_CHECK(x.dim() == 4 && x.size(-1) == head_dim, ShapeError,
           "RotaryEmbedding: expected x [B, H, L, {}], got {}", head_dim, shape_str(x.sizes()));
  const int64_t L = x.size(2);
  FG_CHECK(offset >= 0 && offset + L <= max_positions, IndexError,
           "RotaryEmbedding: positions [{}, {}) exceed max_positions {}", offset, offset + L, max_positions);
  // One fused pass (ops/rotary.h); the tables' rows offset..offset+L are a contiguous slice.
  return rotary_embedding(x, narrow(cos_table, 0, offset, L), narrow(sin_table, 0, offset, L));
}

std::string RotaryEmbedding::extra_repr() const {
  return fmt::format("head_dim={}, max_positions={}, base={}", head_dim, max_positions, base);
}

}  // namespace fg::nn
