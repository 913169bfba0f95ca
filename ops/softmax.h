// Numerically stable softmax and log_softmax along one dim (rows that are all -inf give 0 / -inf, no NaN).
#pragma once
#include <optional>

#include "flexgrad/tensor/tensor.h"

namespace fg {

Tensor softmax(const Tensor& t, int64_t dim, std::optional<DType> dtype = std::nullopt);
Tensor log_softmax(const Tensor& t, int64_t dim, std::optional<DType> dtype = std::nullopt);

}  // namespace fg
