// Sandwich: the position-position term of sinusoidal embeddings as a relative bias, scaled per head.
#pragma once
#include <cstdint>

#include "flexgrad/attention/expr.h"

namespace fg {

// The Sandwich score_mod and the two tables it builds and captures; callable as a ScoreMod.
struct SandwichBias {
  ScoreMod score_mod;
  // float32 [P], P = 2 max_seq_len - 1 rounded up to a multiple of 8:
  // rel_bias[j] = sum_{i < d_bar/2} cos(|j - (max_seq_len - 1)| * 10000^(-2i/d_bar)), in float32.
  Tensor rel_bias;
  Tensor head_scale;  // float32 [heads]: heads / (8 (h + 1)), the ALiBi-like compression ratio per head
  Expr operator()(Expr s, Expr b, Expr h, Expr q, Expr kv) const { return score_mod(s, b, h, q, kv); }
};

// score + rel_bias[q - kv + max_seq_len - 1] * head_scale[h], tables on `device`. Queries and keys must be
// below max_seq_len (IndexError when the mod reads past the table).
// Source: Chi, Fan, Rudnicky, Ramadge, "Dissecting Transformer Length Extrapolation via the Lens of Receptive
// Field Analysis", ACL 2023 (arXiv:2212.10356); attention-gym attn_gym/mods/sandwich.py.
// ValueError when heads < 1, max_seq_len < 1 or d_bar < 2.
SandwichBias sandwich_score_mod(int64_t heads, int64_t max_seq_len, int64_t d_bar = 128, Device device = kCPU);

}  // namespace fg
