// Pre-norm transformer block (GPT-2 / LLaMA style): x + attn(norm1(x)), then + mlp(norm2(x)), with
// optional residual dropout. The norm is LayerNorm or RMSNorm.
#pragma once
#include "flexgrad/nn/attention.h"
#include "flexgrad/nn/dropout.h"
#include "flexgrad/nn/mlp.h"
#include "flexgrad/nn/norm.h"

namespace fg::nn {

enum class NormKind : uint8_t { LayerNorm, RMSNorm };

struct BlockConfig {
  AttentionConfig attn;
  int64_t mlp_hidden = 0;  // 0: 4 * d_model
  Activation activation = Activation::GELU;
  NormKind norm = NormKind::LayerNorm;
  double dropout = 0.0;
  uint64_t dropout_seed = 0xd40u;
};

class TransformerBlock : public Module {
 public:
  explicit TransformerBlock(const BlockConfig& config, Generator* gen = nullptr);
  Tensor forward(const Tensor& x, const AttentionCall& call = {});
  std::string extra_repr() const override;

  BlockConfig config;
  std::shared_ptr<Module> norm1, norm2;  // LayerNorm or RMSNorm
  std::shared_ptr<FlexMultiheadAttention> attn;
  std::shared_ptr<MLP> mlp;
  std::shared_ptr<Dropout> drop;  // null when dropout is 0

 private:
  Tensor norm(const std::shared_ptr<Module>& m, const Tensor& x) const;
};

}  // namespace fg::nn
