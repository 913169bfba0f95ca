// Indexing, gathering and joining. scatter_add and the backward of index_select/gather/embedding are
// deterministic on every device (no order-dependent atomics).
#pragma once
#include "flexgrad/tensor/tensor.h"

namespace fg {

Tensor index_select(const Tensor& t, int64_t dim, const Tensor& index);       // index: 1-D int32/int64
Tensor gather(const Tensor& t, int64_t dim, const Tensor& index);             // out[i][j] = t[i][index[i][j]] (dim 1)
Tensor scatter_add(const Tensor& t, int64_t dim, const Tensor& index, const Tensor& src);
Tensor index_add(const Tensor& t, int64_t dim, const Tensor& index, const Tensor& src);
Tensor embedding(const Tensor& weight, const Tensor& indices);                // weight [N, D], any-shape indices
Tensor cat(const TensorList& tensors, int64_t dim = 0);
Tensor stack(const TensorList& tensors, int64_t dim = 0);
// t[index] for an integer tensor indexing dim 0 (advanced indexing), and a bool mask selecting elements.
Tensor index(const Tensor& t, const Tensor& index);
Tensor masked_select(const Tensor& t, const Tensor& mask);
Tensor one_hot(const Tensor& indices, int64_t num_classes);
Tensor tril(const Tensor& t, int64_t diagonal = 0);
Tensor triu(const Tensor& t, int64_t diagonal = 0);

}  // namespace fg
