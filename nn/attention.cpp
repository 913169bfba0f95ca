#include "flexgrad/nn/attention.h"

#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/view.h"

namespace fg::nn {

FlexMultiheadAttention::FlexMultiheadAttention(const AttentionConfig& c, Generator* gen)
    : Module("FlexMultiheadAttention"), config(c) {
  if (config.n_kv_heads == 0) config.n_kv_heads = config.n_heads;
  FG_CHECK(c.n_heads > 0 && c.d_model % c.n_heads == 0, ValueError,
           "FlexMultiheadAttention: d_model {} must be a positive multiple of n_heads {}", c.d_model, c.n_heads);
  FG_CHECK(config.n_kv_heads > 0 && c.n_heads % config.n_kv_heads == 0, ValueError,
           "FlexMultiheadAttention: n_heads {} must be a multiple of n_kv_heads {}", c.n_heads, config.n_kv_heads);
  head_dim = c.d_model / c.n_heads;
  const int64_t kv_dim = config.n_kv_heads * head_dim;
  q_proj = register_module("q_proj", std::make_shared<Linear>(c.d_model, c.d_model, c.bias, gen));
  k_proj = register_module("k_proj", std::make_shared<Linear>(c.d_model, kv_dim, c.bias, gen));
  v_proj = register_module("v_proj", std::make_shared<Linear>(c.d_model, kv_dim, c.bias, gen));
  o_proj = register_module("o_proj", std::make_shared<Linear>(c.d_model, c.d_model, c.bias, gen));
  if (c.rotary) rope = register_module("rope", std::make_shared<RotaryEmbedding>(head_dim, c.max_positions, c.rope_base));
}

Tensor FlexMultiheadAttention::forward(const Tensor& x, const AttentionCall& call) const {
  FG_CHECK(x.dim() == 3 && x.size(2) == config.d_model, ShapeError,
           "FlexMultiheadAttention: expected x [B, L, {}], got {}", config.d_model, shape_str(x.sizes()));
  const int64_t B = x.size(0), L = x.size(1);
  // [B, L, H*E] -> [B, H, L, E]: the layout flex_attention takes.
  auto heads = [&](const Tensor& t, int64_t h) { return transpose(view(t, {B, L, h, head_dim}), 1, 2); };
  Tensor q = heads(q_proj->forward(x), config.n_heads);
  Tensor k = heads(k_proj->forward(x), config.n_kv_heads);
  Tensor v = heads(v_proj->forward(x), config.n_kv_heads);
  const int64_t offset = call.cache ? call.cache->length() : 0;
  if (rope) {
    q = rope->forward(q, offset);
    k = rope->forward(k, offset);
  }
  FlexAttentionOptions opt;
  opt.score_mod = call.score_mod;
  opt.block_mask = call.block_mask;
  opt.enable_gqa = config.n_kv_heads != config.n_heads;
  opt.kernel = call.kernel;
  Tensor out;  // [B, H, L, E]
  if (call.cache) {
    // The cache stores the new keys/values and attends over everything it holds, in its own layout.
    call.cache->append(k, v);
    out = call.cache->attend(contiguous(q), opt).out;
  } else {
    // The head views go in as they are: the CUDA kernels read them in place, the CPU path packs them itself.
    out = flex_attention(q, k, v, opt).out;
  }
  return o_proj->forward(reshape(transpose(out, 1, 2), {B, L, config.d_model}));
}

std::string FlexMultiheadAttention::extra_repr() const {
  return fmt::format("d_model={}, n_heads={}, n_kv_heads={}, head_dim={}", config.d_model, config.n_heads,
                     config.n_kv_heads, head_dim);
}

}  // namespace fg::nn
