// Differentiable views (share storage with their input; a write through one is seen by the other) and
// the shape ops built from them. reshape/flatten copy only when no view can express the result.
#pragma once
#include <optional>

#include "flexgrad/tensor/tensor.h"

namespace fg {

Tensor view(const Tensor& t, const Shape& shape);  // one entry may be -1
Tensor reshape(const Tensor& t, const Shape& shape);
Tensor permute(const Tensor& t, const Shape& dims);
Tensor transpose(const Tensor& t, int64_t d0, int64_t d1);
Tensor unsqueeze(const Tensor& t, int64_t d);
Tensor squeeze(const Tensor& t);
Tensor squeeze(const Tensor& t, int64_t d);
Tensor narrow(const Tensor& t, int64_t d, int64_t start, int64_t length);
Tensor slice(const Tensor& t, int64_t d, int64_t start, int64_t end, int64_t step = 1);  // Python-style clamping
Tensor select(const Tensor& t, int64_t d, int64_t index);
Tensor expand(const Tensor& t, const Shape& shape);  // -1 keeps a size
Tensor as_strided(const Tensor& t, const Shape& sizes, const Shape& strides, int64_t storage_offset = -1);
Tensor flatten(const Tensor& t, int64_t start_dim = 0, int64_t end_dim = -1);
Tensor unflatten(const Tensor& t, int64_t d, const Shape& sizes);
std::vector<Tensor> split(const Tensor& t, int64_t split_size, int64_t d = 0);
std::vector<Tensor> split_with_sizes(const Tensor& t, const Shape& sizes, int64_t d = 0);
std::vector<Tensor> chunk(const Tensor& t, int64_t chunks, int64_t d = 0);
// Strides of `sizes` viewing a tensor of `old_sizes`/`old_strides` without a copy, or empty if impossible.
std::optional<Shape> view_strides(const Shape& old_sizes, const Shape& old_strides, const Shape& sizes);
// Replaces a single -1 in `shape` so that it holds `numel` elements.
Shape infer_size(const Shape& shape, int64_t numel, const char* op);

}  // namespace fg
