// Reductions over any set of dims (empty dims = all), with keepdim. Gradients flow through all of them.
#pragma once
#include <optional>
#include <utility>

#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/tensor.h"

namespace fg {

Tensor sum(const Tensor& t, std::optional<DType> dtype = std::nullopt);  // integer/bool sums give int64
Tensor sum(const Tensor& t, const Shape& dims, bool keepdim = false, std::optional<DType> dtype = std::nullopt);
Tensor mean(const Tensor& t);
Tensor mean(const Tensor& t, const Shape& dims, bool keepdim = false);
Tensor prod(const Tensor& t, const Shape& dims = {}, bool keepdim = false);
Tensor amax(const Tensor& t, const Shape& dims = {}, bool keepdim = false);  // gradient split evenly among ties
Tensor amin(const Tensor& t, const Shape& dims = {}, bool keepdim = false);
Tensor max(const Tensor& t);  // the largest element (NaN if any)
Tensor min(const Tensor& t);
struct ValuesIndices {
  Tensor values;
  Tensor indices;  // int64
};
ValuesIndices max(const Tensor& t, int64_t dim, bool keepdim = false);  // first index among ties
ValuesIndices min(const Tensor& t, int64_t dim, bool keepdim = false);
Tensor argmax(const Tensor& t, std::optional<int64_t> dim = std::nullopt, bool keepdim = false);
Tensor argmin(const Tensor& t, std::optional<int64_t> dim = std::nullopt, bool keepdim = false);
Tensor logsumexp(const Tensor& t, const Shape& dims, bool keepdim = false);  // -inf rows stay -inf, no NaN
Tensor var(const Tensor& t, const Shape& dims = {}, int64_t correction = 1, bool keepdim = false);
Tensor std(const Tensor& t, const Shape& dims = {}, int64_t correction = 1, bool keepdim = false);
Tensor norm(const Tensor& t, double p = 2.0, const Shape& dims = {}, bool keepdim = false);
Tensor cumsum(const Tensor& t, int64_t dim);
ValuesIndices topk(const Tensor& t, int64_t k, int64_t dim = -1, bool largest = true);  // sorted
ValuesIndices sort(const Tensor& t, int64_t dim = -1, bool descending = false);         // stable
Tensor any(const Tensor& t);
Tensor all(const Tensor& t);

// Sum over every broadcast dim so that grad takes `shape` again (backward of broadcasting ops).
Tensor sum_to_shape(const Tensor& grad, const Shape& shape);

}  // namespace fg
