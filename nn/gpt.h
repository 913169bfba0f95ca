// A GPT-style decoder: token embedding -> n pre-norm blocks (rotary positions) -> final norm -> logits
// through the embedding matrix itself (tied weights: one table both reads and writes tokens, which saves
// vocab * d_model parameters and helps small models). Attention structure comes in per call (causal,
// document masks...), so one model trains under any flex_attention mask.
#pragma once
#include "flexgrad/nn/transformer.h"
#include "flexgrad/nn/embedding.h"
#include "flexgrad/tensor/random.h"

namespace fg::nn {

struct GPTConfig {
  int64_t vocab_size = 256;
  int64_t context = 128;  // longest sequence trained on; the rotary table and generation window
  int64_t d_model = 128;
  int64_t n_layers = 4;
  int64_t n_heads = 4;
  int64_t n_kv_heads = 0;  // 0: n_heads
  int64_t mlp_hidden = 0;  // 0: 4 * d_model
  Activation activation = Activation::GELU;
  NormKind norm = NormKind::LayerNorm;
  double dropout = 0.0;
  bool bias = false;
  double rope_base = 10000.0;  // smaller bases separate short offsets better (tiny algorithmic tasks)
};

struct SampleOptions {
  double temperature = 1.0;  // 0: greedy
  int64_t top_k = 0;         // 0: the whole vocabulary
  Generator* generator = nullptr;
  KVCacheFactory cache_factory;  // empty: contiguous caches
};

class GPT : public Module {
 public:
  explicit GPT(const GPTConfig& config, Generator* gen = nullptr);
  // idx [B, L] int64 -> logits [B, L, vocab]. With caches (one per layer), tokens continue the cached ones.
  Tensor forward(const Tensor& idx, const AttentionCall& call = {}, const std::vector<KVCache*>& caches = {});
  // Continues prompt [B, P] (B independent rows of one length) by max_new_tokens sampled tokens each,
  // through per-layer KV caches of batch B from options.cache_factory (no grad); returns [B, P + new].
  // When the window of `context` tokens fills, the caches restart from the last context/2 tokens.
  // The prompt and the result are on the model's device (DeviceError otherwise); sampling runs on the CPU
  // from the last position's logits, so a generator gives the same draws whatever the model's device.
  Tensor generate(const Tensor& prompt, int64_t max_new_tokens, const SampleOptions& options = {});
  std::string extra_repr() const override;

  GPTConfig config;
  std::shared_ptr<Embedding> tok_emb;
  std::shared_ptr<ModuleList<TransformerBlock>> blocks;
  std::shared_ptr<Module> norm_f;
};

// The causal BlockMask of a [L, L] sequence (B, H broadcast), built on `device`.
BlockMask causal_block_mask(int64_t L, BlockSize block = 64, Device device = kCPU);

}  // namespace fg::nn
