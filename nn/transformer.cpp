#include "flexgrad/nn/transformer.h"

#include "flexgrad/ops/elementwise.h"

namespace fg::nn {

namespace {
std::shared_ptr<Module> make_norm(NormKind k, int64_t d) {
  if (k == NormKind::RMSNorm) return std::make_shared<RMSNorm>(d);
  return std::make_shared<LayerNorm>(d);
}
}  // namespace

TransformerBlock::TransformerBlock(const BlockConfig& c, Generator* gen) : Module("TransformerBlock"), config(c) {
  const int64_t d = c.attn.d_model;
  if (config.mlp_hidden == 0) config.mlp_hidden = 4 * d;
  norm1 = register_module("norm1", make_norm(c.norm, d));
  attn = register_module("attn", std::make_shared<FlexMultiheadAttention>(c.attn, gen));
  norm2 = register_module("norm2", make_norm(c.norm, d));
  mlp = register_module("mlp", std::make_shared<MLP>(d, config.mlp_hidden, c.activation, c.attn.bias, gen));
  if (c.dropout > 0) drop = register_module("drop", std::make_shared<Dropout>(c.dropout, c.dropout_seed));
}

Tensor TransformerBlock::norm(const std::shared_ptr<Module>& m, const Tensor& x) const {
  if (config.norm == NormKind::RMSNorm) return static_cast<const RMSNorm&>(*m).forward(x);
  return static_cast<const LayerNorm&>(*m).forward(x);
}

Tensor TransformerBlock::forward(const Tensor& x, const AttentionCall& call) {
  Tensor a = attn->forward(norm(norm1, x), call);
  if (drop) a = drop->forward(a);
  Tensor h = add(x, a);
  Tensor m = mlp->forward(norm(norm2, h));
  if (drop) m = drop->forward(m);
  return add(h, m);
}

std::string TransformerBlock::extra_repr() const {
  return fmt::format("norm={}, mlp_hidden={}, dropout={}", config.norm == NormKind::RMSNorm ? "rms" : "layer",
                     config.mlp_hidden, config.dropout);
}

}  // namespace fg::nn
