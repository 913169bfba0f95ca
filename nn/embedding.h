// Lookup table: indices (any shape, int64/int32) -> rows of weight [num_embeddings, dim], init N(0, 1).
#pragma once
#include "flexgrad/nn/module.h"

namespace fg::nn {

class Embedding : public Module {
 public:
  Embedding(int64_t num_embeddings, int64_t embedding_dim, Generator* gen = nullptr);
  Tensor forward(const Tensor& indices) const;
  Tensor operator()(const Tensor& indices) const { return forward(indices); }
  std::string extra_repr() const override;

  int64_t num_embeddings, embedding_dim;
  Tensor weight;
};

}  // namespace fg::nn
