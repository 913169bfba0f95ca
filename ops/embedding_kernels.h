// Kernel family of embedding's weight gradient on devices where the generic index_add path (serial over
// tokens for each column) is too slow. Devices without a kernel here take that generic path (ops/index.cpp).
// Contract: the sum over the tokens of each id is taken in token order, so float32/float64 results equal the
// index_add path's bit for bit and are identical run to run; half types accumulate in float32 and round once.
#pragma once
#include <cstdint>

#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/dtype.h"

namespace fg {

struct EmbeddingBwdArgs {
  int64_t tokens = 0;           // rows of grad
  int64_t num_embeddings = 0;   // rows of out
  int64_t dim = 0;              // columns of grad and out
  DType dtype = kFloat32;       // of grad and out
  const int64_t* index = nullptr;  // [tokens], every value validated in [0, num_embeddings)
  const void* grad = nullptr;      // [tokens, dim] contiguous
  void* out = nullptr;             // [num_embeddings, dim] contiguous, every element written
};

using EmbeddingBwdFn = void (*)(const EmbeddingBwdArgs& a);
FG_DECLARE_STUB(EmbeddingBwdFn, embedding_bwd_stub);

}  // namespace fg
