// Parameter initialisers (torch.nn.init), drawn from a seeded Generator so runs are reproducible.
#pragma once
#include "flexgrad/tensor/random.h"
#include "flexgrad/tensor/tensor.h"

namespace fg::nn::init {

// N(0, std^2) / U(-bound, bound) tensors of `shape` (float32 unless options say otherwise).
Tensor normal(const Shape& shape, double std, TensorOptions options = {}, Generator* gen = nullptr);
Tensor uniform(const Shape& shape, double bound, TensorOptions options = {}, Generator* gen = nullptr);

}  // namespace fg::nn::init
