#include "flexgrad/nn/gpt.h"

#include <cmath>

#include "flexgrad/autograd/grad_mode.h"
#include "flexgrad/nn/init.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/index.h"
#include "flexgrad/ops/linalg.h"
#include "flexgrad/ops/reduce.h"
#include "flexgrad/ops/softmax.h"
#include "flexgrad/ops/view.h"

namespace fg::nn {

BlockMask causal_block_mask(int64_t L, BlockSize block, Device device) {
  return create_block_mask([](Expr, Expr, Expr q, Expr kv) { return q >= kv; }, std::nullopt, std::nullopt, L, L,
                           block, device);
}

GPT::GPT(const GPTConfig& c, Generator* gen) : Module("GPT"), config(c) {
  FG_CHECK(c.vocab_size > 0 && c.context > 0 && c.n_layers > 0, ValueError,
           "GPT: vocab_size ({}), context ({}) and n_layers ({}) must be positive", c.vocab_size, c.context, c.n_layers);
  tok_emb = register_module("tok_emb", std::make_shared<Embedding>(c.vocab_size, c.d_model, gen));
  blocks = register_module("blocks", std::make_shared<ModuleList<TransformerBlock>>());
  BlockConfig bc;
  bc.attn.d_model = c.d_model;
  bc.attn.n_heads = c.n_heads;
  bc.attn.n_kv_heads = c.n_kv_heads;
  bc.attn.bias = c.bias;
  bc.attn.rotary = true;
  bc.attn.max_positions = c.context;
  bc.attn.rope_base = c.rope_base;
  bc.mlp_hidden = c.mlp_hidden;
  bc.activation = c.activation;
  bc.norm = c.norm;
  bc.dropout = c.dropout;
  for (int64_t i = 0; i < c.n_layers; ++i) {
    bc.dropout_seed = 0xd40u + static_cast<uint64_t>(i);
    blocks->push_back(std::make_shared<TransformerBlock>(bc, gen));
  }
  if (c.norm == NormKind::RMSNorm) norm_f = register_module("norm_f", std::make_shared<RMSNorm>(c.d_model));
  else norm_f = register_module("norm_f", std::make_shared<LayerNorm>(c.d_model));

  // GPT-2 initialisation: N(0, 0.02) everywhere, and the projections that write into the residual
  // stream scaled by 1/sqrt(2 n_layers) so its variance does not grow with depth.
  NoGradGuard ng;
  const double resid_std = 0.02 / std::sqrt(2.0 * c.n_layers);
  for (auto& [name, p] : named_parameters()) {
    if (p.dim() != 2) continue;
    const bool resid = name.ends_with("o_proj.weight") || name.ends_with("mlp.proj.weight");
    get(name).copy_(init::normal(p.sizes(), resid ? resid_std : 0.02, p.options(), gen));
  }
}

Tensor GPT::forward(const Tensor& idx, const AttentionCall& call, const std::vector<KVCache*>& caches) {
  FG_CHECK(idx.dim() == 2, ShapeError, "GPT: expected idx [B, L] of token ids, got {}", shape_str(idx.sizes()));
  FG_CHECK(caches.empty() || caches.size() == blocks->size(), ValueError,
           "GPT: got {} caches for {} layers (pass one per layer or none)", caches.size(), blocks->size());
  FG_CHECK(idx.device() == tok_emb->weight.device(), DeviceError,
           "GPT: idx on {} but the model on {} (move the input or the model with .to(device))", idx.device(),
           tok_emb->weight.device());
  const int64_t past = caches.empty() ? 0 : caches[0]->length();
  FG_CHECK(past + idx.size(1) <= config.context, ValueError, "GPT: {} cached + {} new tokens exceed the context of {}",
           past, idx.size(1), config.context);
  Tensor h = tok_emb->forward(idx);
  AttentionCall layer_call = call;
  for (size_t i = 0; i < blocks->size(); ++i) {
    layer_call.cache = caches.empty() ? nullptr : caches[i];
    h = (*blocks)[i]->forward(h, layer_call);
  }
  h = config.norm == NormKind::RMSNorm ? static_cast<RMSNorm&>(*norm_f).forward(h)
                                       : static_cast<LayerNorm&>(*norm_f).forward(h);
  return linear(h, tok_emb->weight);  // tied output head
}

Tensor GPT::generate(const Tensor& prompt, int64_t max_new_tokens, const SampleOptions& o) {
  FG_CHECK(prompt.dim() == 2 && prompt.size(0) >= 1 && prompt.size(1) >= 1, ShapeError,
           "GPT.generate: prompt must be [B, P] with B, P >= 1, got {}", shape_str(prompt.sizes()));
  FG_CHECK(o.temperature >= 0, ValueError, "GPT.generate: temperature must be >= 0, got {}", o.temperature);
  FG_CHECK(o.top_k >= 0, ValueError, "GPT.generate: top_k must be >= 0, got {}", o.top_k);
  const Device dev = tok_emb->weight.device();
  FG_CHECK(prompt.device() == dev, DeviceError, "GPT.generate: prompt on {} but the model on {}", prompt.device(), dev);
  NoGradGuard ng;
  const bool was_training = is_training();
  eval();
  const int64_t B = prompt.size(0);
  KVCacheFactory factory = o.cache_factory ? o.cache_factory : contiguous_kv_cache_factory();
  const auto& ac = (*blocks)[0]->attn->config;
  std::vector<std::unique_ptr<KVCache>> owned;
  std::vector<KVCache*> caches;
  for (size_t i = 0; i < blocks->size(); ++i) {
    owned.push_back(factory(static_cast<int64_t>(i), B, ac.n_kv_heads, config.context, (*blocks)[i]->attn->head_dim,
                            tok_emb->weight.options()));
    caches.push_back(owned.back().get());
  }
  // tokens[b]: row b so far.
  std::vector<std::vector<int64_t>> tokens(static_cast<size_t>(B));
  {
    std::vector<double> flat = prompt.to_vector();
    const int64_t P = prompt.size(1);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < P; ++t) tokens[static_cast<size_t>(b)].push_back(static_cast<int64_t>(flat[static_cast<size_t>(b * P + t)]));
  }

  // Runs the last L tokens of every row through the model continuing the caches; returns the logits of
  // the last position, [B, V].
  auto step = [&](int64_t L) {
    std::vector<int64_t> ids;
    for (const auto& row : tokens) ids.insert(ids.end(), row.end() - L, row.end());
    AttentionCall call;
    // A prefill of several tokens into empty caches needs the causal mask; one new token sees all the past.
    if (L > 1) call.block_mask = causal_block_mask(L);
    Tensor logits = forward(from_vector(ids, {B, L}, kInt64).to(dev), call, caches);
    // Sampled on the CPU (a few values per row): the same draws from the generator whatever the model's device.
    return select(logits, 1, L - 1).to(kCPU);
  };
  auto prefill = [&]() {
    for (auto* c : caches) c->reset();
    return step(std::min<int64_t>(static_cast<int64_t>(tokens[0].size()), std::max<int64_t>(1, config.context / 2)));
  };
  Tensor logits = prefill();
  for (int64_t n = 0; n < max_new_tokens; ++n) {
    for (int64_t b = 0; b < B; ++b) {
      Tensor row = select(logits, 0, b);  // [V]
      int64_t next;
      if (o.temperature == 0) {
        next = argmax(row).item<int64_t>();
      } else {
        Tensor scaled = cast(row, kFloat64) / o.temperature;
        if (o.top_k > 0 && o.top_k < scaled.size(0)) {
          // Keep the k largest logits; everything below the k-th is removed before the softmax.
          const double kth = topk(scaled, o.top_k).values.at({o.top_k - 1});
          scaled = masked_fill(scaled, lt(scaled, scalar_tensor(kth, kFloat64)), -INFINITY);
        }
        next = multinomial(softmax(scaled, 0), o.generator).item<int64_t>();
      }
      tokens[static_cast<size_t>(b)].push_back(next);
    }
    if (n + 1 == max_new_tokens) break;
    logits = caches[0]->length() < config.context ? step(1) : prefill();
  }
  train(was_training);
  std::vector<int64_t> flat;
  for (const auto& row : tokens) flat.insert(flat.end(), row.begin(), row.end());
  return from_vector(flat, {B, static_cast<int64_t>(tokens[0].size())}, kInt64).to(dev);
}

std::string GPT::extra_repr() const {
  return fmt::format("vocab={}, context={}, d_model={}, n_layers={}, n_heads={}, tied embeddings", config.vocab_size,
                     config.context, config.d_model, config.n_layers, config.n_heads);
}

}  // namespace fg::nn
