// FlexMultiheadAttention: q/k/v/o projections around fg::flex_attention, with grouped-query heads
// (n_kv_heads divides n_heads), optional rotary embedding, a score_mod and BlockMask chosen per call, and
// an optional KV cache for generation (the cache runs the attention: contiguous or paged).
#pragma once
#include <optional>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/nn/kv_cache.h"
#include "flexgrad/nn/linear.h"
#include "flexgrad/nn/rotary.h"

namespace fg::nn {

// What varies per call. With a cache, the new tokens sit at positions cache->length() + [0, L): a
// block_mask must then be expressed in those absolute positions (q_idx counts from the new tokens'
// first position only when the cache was empty); a single decoded token needs no mask at all.
struct AttentionCall {
  ScoreMod score_mod;
  std::optional<BlockMask> block_mask;
  KVCache* cache = nullptr;
  FlexKernelOptions kernel;
};

struct AttentionConfig {
  int64_t d_model = 128;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 0;  // 0: n_heads (plain multi-head attention)
  bool bias = false;
  bool rotary = true;
  int64_t max_positions = 2048;  // rotary table length
  double rope_base = 10000.0;
};

class FlexMultiheadAttention : public Module {
 public:
  explicit FlexMultiheadAttention(const AttentionConfig& config, Generator* gen = nullptr);
  // x [B, L, d_model] -> [B, L, d_model].
  Tensor forward(const Tensor& x, const AttentionCall& call = {}) const;
  Tensor operator()(const Tensor& x, const AttentionCall& call = {}) const { return forward(x, call); }
  std::string extra_repr() const override;

  AttentionConfig config;
  int64_t head_dim;
  std::shared_ptr<Linear> q_proj, k_proj, v_proj, o_proj;
  std::shared_ptr<RotaryEmbedding> rope;  // null when config.rotary is off
};

}  // namespace fg::nn
