#include "flexgrad/tensor/tensor.h"

#include <algorithm>
#include <cstring>
#include <numeric>

namespace fg {

TensorImpl::TensorImpl(Storage storage, Shape sizes, Shape strides, int64_t storage_offset, DType dtype)
    : storage_(std::move(storage)), sizes_(std::move(sizes)), strides_(std::move(strides)),
      storage_offset_(storage_offset), numel_(shape_numel(sizes_)), dtype_(dtype) {
  FG_ASSERT(sizes_.size() == strides_.size());
}

Shape contiguous_strides(const Shape& sizes) {
  Shape strides(sizes.size());
  int64_t s = 1;
  for (size_t i = sizes.size(); i-- > 0;) {
    strides[i] = s;
    // Only an outermost stride is never used to step; an overflow anywhere else would wrap (checked).
    if (i > 0) {
      FG_CHECK(!__builtin_mul_overflow(s, std::max<int64_t>(sizes[i], 1), &s), ShapeError,
               "shape {} has strides past the int64 range", shape_str(sizes));
    }
  }
  return strides;
}

namespace {
// The dims of size > 1, by increasing stride.
std::vector<size_t> dims_by_stride(const Shape& sizes, const Shape& strides) {
  std::vector<size_t> dims;
  for (size_t d = 0; d < sizes.size(); ++d)
    if (sizes[d] > 1) dims.push_back(d);
  std::sort(dims.begin(), dims.end(), [&](size_t a, size_t b) { return strides[a] < strides[b]; });
  return dims;
}
}  // namespace

bool is_dense_non_overlapping(const Shape& sizes, const Shape& strides) {
  int64_t expected = 1;
  for (size_t d : dims_by_stride(sizes, strides)) {
    if (strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

bool is_provably_non_overlapping(const Shape& sizes, const Shape& strides) {
  int64_t span = 0;  // largest offset reachable through the dims seen so far
  for (size_t d : dims_by_stride(sizes, strides)) {
    if (strides[d] <= span) return false;
    span += (sizes[d] - 1) * strides[d];
  }
  return true;
}

int64_t shape_numel(const Shape& sizes) {
  bool empty = false;
  for (int64_t s : sizes) {
    FG_CHECK(s >= 0, ShapeError, "negative size {} in shape {}", s, shape_str(sizes));
    empty = empty || s == 0;
  }
  if (empty) return 0;  // [2^62, 0] holds nothing: no product to overflow
  int64_t n = 1;
  for (int64_t s : sizes) {
    FG_CHECK(!__builtin_mul_overflow(n, s, &n), ShapeError, "shape {} has more elements than an int64 can count",
             shape_str(sizes));
  }
  return n;
}

int64_t checked_nbytes(int64_t elements, size_t element_size, const char* what) {
  int64_t bytes = 0;
  FG_CHECK(elements >= 0 && !__builtin_mul_overflow(elements, static_cast<int64_t>(element_size), &bytes), ShapeError,
           "{}: {} elements of {} bytes need more bytes than an int64 can count", what, elements, element_size);
  return bytes;
}

int64_t wrap_dim(int64_t d, int64_t ndim, const char* op) {
  int64_t n = std::max<int64_t>(ndim, 1);  // a 0-d tensor accepts dim 0 and -1, as in PyTorch
  FG_CHECK(d >= -n && d < n, IndexError,
           "{}: dimension out of range (expected to be in range of [{}, {}], but got {})", op, -n, n - 1, d);
  return d < 0 ? d + n : d;
}

std::string shape_str(const Shape& s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op) {
  size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t x = i < n - a.size() ? 1 : a[i - (n - a.size())];
    int64_t y = i < n - b.size() ? 1 : b[i - (n - b.size())];
    FG_CHECK(x == y || x == 1 || y == 1, ShapeError,
             "{}: shapes {} and {} cannot be broadcast (size {} vs {} at dimension {})", op, shape_str(a),
             shape_str(b), x, y, i);
    out[i] = x == 1 ? y : x;
  }
  return out;
}

void Tensor::throw_undefined() {
  throw ValueError("the tensor is undefined (a default-constructed Tensor, or a gradient that was never computed); "
                   "this operation needs a defined tensor");
}

int64_t Tensor::size(int64_t d) const { return sizes()[wrap_dim(d, dim(), "size")]; }
int64_t Tensor::stride(int64_t d) const { return strides()[wrap_dim(d, dim(), "stride")]; }

bool Tensor::is_contiguous() const {
  int64_t expected = 1;
  for (int64_t i = dim() - 1; i >= 0; --i) {
    if (sizes()[i] == 1) continue;
    if (strides()[i] != expected) return false;
    expected *= sizes()[i];
  }
  return true;
}

void* Tensor::data_ptr() const {
  FG_CHECK(defined(), ValueError, "data_ptr: the tensor is undefined");
  return static_cast<char*>(storage()->data()) + storage_offset() * static_cast<int64_t>(element_size());
}

template <class T> T* Tensor::data() const {
  FG_CHECK(dtype() == dtype_of<T>(), DTypeError, "data<T>(): tensor has dtype {} but T is {}", dtype(),
           dtype_of<T>());
  return static_cast<T*>(data_ptr());
}
template bool* Tensor::data<bool>() const;
template int32_t* Tensor::data<int32_t>() const;
template int64_t* Tensor::data<int64_t>() const;
template Half* Tensor::data<Half>() const;
template BFloat16* Tensor::data<BFloat16>() const;
template float* Tensor::data<float>() const;
template double* Tensor::data<double>() const;

Tensor Tensor::alias_with_layout(Shape sizes, Shape strides, int64_t storage_offset) const {
  return Tensor(std::make_shared<TensorImpl>(storage(), std::move(sizes), std::move(strides), storage_offset,
                                             dtype()));
}

namespace {

// Offset (in elements, from storage start) of a multi-index; checks bounds.
int64_t element_offset(const Tensor& t, const Shape& index, const char* op) {
  FG_CHECK(static_cast<int64_t>(index.size()) == t.dim(), IndexError,
           "{}: index {} has {} entries but the tensor has {} dimensions (shape {})", op, shape_str(index),
           index.size(), t.dim(), shape_str(t.sizes()));
  int64_t off = t.storage_offset();
  for (int64_t d = 0; d < t.dim(); ++d) {
    int64_t i = index[d];
    int64_t n = t.sizes()[d];
    FG_CHECK(i >= -n && i < n, IndexError, "{}: index {} is out of bounds for dimension {} with size {}", op, i, d,
             n);
    off += (i < 0 ? i + n : i) * t.strides()[d];
  }
  return off;
}

double read_element(const Tensor& t, int64_t offset) {
  alignas(8) unsigned char buf[8];
  size_t es = t.element_size();
  const char* src = static_cast<const char*>(t.storage()->data()) + offset * static_cast<int64_t>(es);
  device_backend(t.device()).copy_bytes(buf, kCPU, src, t.device(), es);
  return FG_DISPATCH_ALL_TYPES(t.dtype(), "at", [&]<class T>() {
    T v;
    std::memcpy(&v, buf, sizeof(T));
    return static_cast<double>(static_cast<compute_t<T>>(v));
  });
}

}  // namespace

double Tensor::at(const Shape& index) const { return read_element(*this, element_offset(*this, index, "at")); }

void Tensor::set_at(const Shape& index, double value) const {
  int64_t off = element_offset(*this, index, "set_at");
  size_t es = element_size();
  alignas(8) unsigned char buf[8];
  FG_DISPATCH_ALL_TYPES(dtype(), "set_at", [&]<class T>() {
    T v = static_cast<T>(static_cast<compute_t<T>>(value));
    std::memcpy(buf, &v, sizeof(T));
  });
  char* dst = static_cast<char*>(storage()->data()) + off * static_cast<int64_t>(es);
  device_backend(device()).copy_bytes(dst, device(), buf, kCPU, es);
  bump_version();
}

template <class T> T Tensor::item() const {
  FG_CHECK(defined() && numel() == 1, ValueError,
           "item: a Tensor with {} elements cannot be converted to a scalar (shape {})", defined() ? numel() : 0,
           defined() ? shape_str(sizes()) : "undefined");
  double v = read_element(*this, storage_offset());
  if constexpr (std::is_same_v<T, bool>) return v != 0.0;
  else return static_cast<T>(v);
}
template double Tensor::item<double>() const;
template float Tensor::item<float>() const;
template int64_t Tensor::item<int64_t>() const;
template int32_t Tensor::item<int32_t>() const;
template bool Tensor::item<bool>() const;

std::vector<double> Tensor::to_vector() const {
  std::vector<double> out;
  out.reserve(numel());
  Shape idx(dim(), 0);
  for (int64_t n = 0; n < numel(); ++n) {
    out.push_back(read_element(*this, element_offset(*this, idx, "to_vector")));
    for (int64_t d = dim() - 1; d >= 0; --d) {
      if (++idx[d] < sizes()[d]) break;
      idx[d] = 0;
    }
  }
  return out;
}

}  // namespace fg
