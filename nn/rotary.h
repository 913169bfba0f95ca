// Rotary position embedding (RoFormer, as in LLaMA's "rotate half" layout): pairs (x[i], x[i + E/2]) of
// each head are rotated by angle pos * base^(-2i/E). Relative positions then show up in q.k directly,
// so the model needs no learned position table and a KV cache only needs the offset of new tokens.
#pragma once
#include "flexgrad/nn/module.h"

namespace fg::nn {

class RotaryEmbedding : public Module {
 public:
  RotaryEmbedding(int64_t head_dim, int64_t max_positions, double base = 10000.0);
  // x [B, H, L, E]; token l sits at position offset + l. Differentiable in x.
  Tensor forward(const Tensor& x, int64_t offset = 0) const;
  std::string extra_repr() const override;

  int64_t head_dim, max_positions;
  double base;
  Tensor cos_table, sin_table;  // [max_positions, E/2], non-persistent buffers (recomputed from config)
};

}  // namespace fg::nn
