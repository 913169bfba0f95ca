// Tensor's convenience methods (declared in tensor/tensor.h) forward to the differentiable free
// functions of the op layer, as ATen's methods forward to its operators.
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/reduce.h"
#include "flexgrad/ops/view.h"

namespace fg {

Tensor Tensor::view(const Shape& shape) const { return fg::view(*this, shape); }
Tensor Tensor::reshape(const Shape& shape) const { return fg::reshape(*this, shape); }
Tensor Tensor::permute(const Shape& dims) const { return fg::permute(*this, dims); }
Tensor Tensor::transpose(int64_t d0, int64_t d1) const { return fg::transpose(*this, d0, d1); }
Tensor Tensor::t() const {
  FG_CHECK(dim() <= 2, ShapeError, "t: expects a tensor with <= 2 dimensions, but got {} (shape {})", dim(),
           shape_str(sizes()));
  return dim() < 2 ? *this : fg::transpose(*this, 0, 1);
}
Tensor Tensor::unsqueeze(int64_t d) const { return fg::unsqueeze(*this, d); }
Tensor Tensor::squeeze() const { return fg::squeeze(*this); }
Tensor Tensor::squeeze(int64_t d) const { return fg::squeeze(*this, d); }
Tensor Tensor::narrow(int64_t d, int64_t start, int64_t length) const { return fg::narrow(*this, d, start, length); }
Tensor Tensor::slice(int64_t d, int64_t start, int64_t end, int64_t step) const {
  return fg::slice(*this, d, start, end, step);
}
Tensor Tensor::select(int64_t d, int64_t index) const { return fg::select(*this, d, index); }
Tensor Tensor::expand(const Shape& shape) const { return fg::expand(*this, shape); }
Tensor Tensor::as_strided(const Shape& sizes, const Shape& strides, int64_t offset) const {
  return fg::as_strided(*this, sizes, strides, offset);
}
Tensor Tensor::flatten(int64_t start_dim, int64_t end_dim) const { return fg::flatten(*this, start_dim, end_dim); }
Tensor Tensor::unflatten(int64_t d, const Shape& sizes) const { return fg::unflatten(*this, d, sizes); }
std::vector<Tensor> Tensor::split(int64_t split_size, int64_t d) const { return fg::split(*this, split_size, d); }
std::vector<Tensor> Tensor::split_with_sizes(const Shape& sizes, int64_t d) const {
  return fg::split_with_sizes(*this, sizes, d);
}
std::vector<Tensor> Tensor::chunk(int64_t chunks, int64_t d) const { return fg::chunk(*this, chunks, d); }
Tensor Tensor::contiguous() const { return fg::contiguous(*this); }
Tensor Tensor::clone() const { return fg::clone(*this); }
Tensor Tensor::to(DType dtype) const { return fg::cast(*this, dtype); }
Tensor Tensor::to(Device device) const { return fg::to_device(*this, device); }
Tensor Tensor::to(Device device, DType dtype) const { return fg::cast(fg::to_device(*this, device), dtype); }
Tensor Tensor::sum() const { return fg::sum(*this); }
Tensor Tensor::mean() const { return fg::mean(*this); }

Tensor& Tensor::add_(const Tensor& other, Scalar alpha) { return fg::add_(*this, other, alpha); }
Tensor& Tensor::add_(Scalar other) { return fg::add_(*this, other); }
Tensor& Tensor::mul_(const Tensor& other) { return fg::mul_(*this, other); }
Tensor& Tensor::mul_(Scalar other) { return fg::mul_(*this, other); }
Tensor& Tensor::zero_() { return fg::zero_(*this); }
Tensor& Tensor::fill_(Scalar value) { return fg::fill_(*this, value); }
Tensor& Tensor::copy_(const Tensor& src) { return fg::copy_(*this, src); }

}  // namespace fg
