#include "flexgrad/nn/embedding.h"

#include "flexgrad/nn/init.h"
#include "flexgrad/ops/index.h"

namespace fg::nn {

Embedding::Embedding(int64_t n, int64_t d, Generator* gen) : Module("Embedding"), num_embeddings(n), embedding_dim(d) {
  FG_CHECK(n > 0 && d > 0, ValueError, "Embedding: num_embeddings ({}) and embedding_dim ({}) must be positive", n, d);
  weight = init::normal({n, d}, 1.0, {}, gen);
  register_parameter("weight", &weight);
}

Tensor Embedding::forward(const Tensor& indices) const {
  FG_CHECK(indices.device() == weight.device(), DeviceError,
           "Embedding: indices on {} but the weight on {} (move the input or the module with .to(device))",
           indices.device(), weight.device());
  return embedding(weight, indices);
}

std::string Embedding::extra_repr() const { return fmt::format("{}, {}", num_embeddings, embedding_dim); }

}  // namespace fg::nn
