// Tensor: a strided view (sizes, strides, offset, dtype) onto a shared Storage, as ATen's TensorImpl/Storage.
//
// The class is a cheap handle (shared_ptr to a TensorImpl). Which layer defines what:
//   - layout and element access: tensor/ (this layer);
//   - autograd state (requires_grad, grad, backward, hooks): autograd/, through the one slot
//     TensorImpl::autograd_meta, as c10's AutogradMeta;
//   - differentiable views, copies and in-place ops exposed as methods here: ops/tensor_methods.cpp,
//     which forwards to the free functions of ops/ (fg::permute, fg::add_, ...).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "flexgrad/tensor/dtype.h"
#include "flexgrad/tensor/device.h"
#include "flexgrad/tensor/error.h"
#include "flexgrad/tensor/scalar.h"
#include "flexgrad/tensor/storage.h"

namespace fg {

using Shape = std::vector<int64_t>;

class Tensor;
class Node;  // autograd graph node (autograd/node.h)

// Base of the autograd state that hangs off a TensorImpl; defined by autograd/.
struct AutogradMetaInterface {
  virtual ~AutogradMetaInterface() = default;
};

class TensorImpl {
 public:
  TensorImpl(Storage storage, Shape sizes, Shape strides, int64_t storage_offset, DType dtype);

  const Storage& storage() const { return storage_; }
  const Shape& sizes() const { return sizes_; }
  const Shape& strides() const { return strides_; }
  int64_t storage_offset() const { return storage_offset_; }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_->device(); }
  int64_t numel() const { return numel_; }
  // A 0-d tensor made from a C++ number for an op (`t * 2`): it takes part in type promotion with
  // the lowest priority, as PyTorch's wrapped numbers do.
  bool is_wrapped_number() const { return wrapped_number_; }
  void set_wrapped_number(bool w) { wrapped_number_ = w; }

  // The one slot for autograd state (null for tensors that never took part in autograd).
  AutogradMetaInterface* autograd_meta() const { return autograd_meta_.get(); }
  void set_autograd_meta(std::unique_ptr<AutogradMetaInterface> m) { autograd_meta_ = std::move(m); }

 private:
  friend class Tensor;
  Storage storage_;
  Shape sizes_;
  Shape strides_;
  int64_t storage_offset_ = 0;
  int64_t numel_ = 0;
  DType dtype_;
  bool wrapped_number_ = false;
  std::unique_ptr<AutogradMetaInterface> autograd_meta_;
};

// Options for factories: fg::zeros({2, 3}, kFloat64), fg::ones({4}, TensorOptions().device(kCUDA)).
struct TensorOptions {
  DType dtype_ = kFloat32;
  Device device_ = kCPU;
  bool requires_grad_ = false;
  TensorOptions() = default;
  TensorOptions(DType d) : dtype_(d) {}    // NOLINT: implicit so a dtype can stand for options
  TensorOptions(Device d) : device_(d) {}  // NOLINT
  TensorOptions dtype(DType d) const { auto o = *this; o.dtype_ = d; return o; }
  TensorOptions device(Device d) const { auto o = *this; o.device_ = d; return o; }
  TensorOptions requires_grad(bool r = true) const { auto o = *this; o.requires_grad_ = r; return o; }
};

using GradHook = std::function<Tensor(const Tensor& grad)>;  // returns a replacement grad, or undefined

class Tensor {
 public:
  Tensor() = default;
  explicit Tensor(std::shared_ptr<TensorImpl> impl) : impl_(std::move(impl)) {}

  // ---- layout (tensor/) ----
  bool defined() const { return impl_ != nullptr; }
  TensorImpl* impl() const { return impl_.get(); }
  const std::shared_ptr<TensorImpl>& impl_ptr() const { return impl_; }
  // The impl behind every layout accessor: on an undefined Tensor (default-constructed, an absent gradient)
  // they raise ValueError instead of reading through a null pointer.
  TensorImpl* checked() const {
    if (!impl_) throw_undefined();
    return impl_.get();
  }
  int64_t dim() const { return static_cast<int64_t>(checked()->sizes_.size()); }
  const Shape& sizes() const { return checked()->sizes_; }
  const Shape& strides() const { return checked()->strides_; }
  int64_t size(int64_t d) const;    // negative d counts from the end
  int64_t stride(int64_t d) const;
  int64_t storage_offset() const { return checked()->storage_offset_; }
  int64_t numel() const { return checked()->numel_; }
  DType dtype() const { return checked()->dtype_; }
  Device device() const { return checked()->device(); }
  bool is_cpu() const { return device().is_cpu(); }
  bool is_cuda() const { return device().is_cuda(); }
  size_t element_size() const { return fg::element_size(dtype()); }
  const Storage& storage() const { return checked()->storage_; }
  bool is_contiguous() const;
  bool is_floating_point() const { return is_floating(dtype()); }
  TensorOptions options() const { return TensorOptions().dtype(dtype()).device(device()); }
  // Same storage and layout.
  bool is_same(const Tensor& o) const { return impl_ == o.impl_; }
  bool shares_storage(const Tensor& o) const { return storage() == o.storage(); }

  // Address of element 0 (storage data + offset). data<T>() checks T against dtype().
  void* data_ptr() const;
  template <class T> T* data() const;

  // A new TensorImpl over the same storage with another layout; no autograd (used by view ops).
  Tensor alias_with_layout(Shape sizes, Shape strides, int64_t storage_offset) const;
  // Version of the underlying storage (bumped by every in-place write).
  uint32_t version() const { return storage()->version(); }
  void bump_version() const { storage()->bump_version(); }

  // ---- element access (tensor/; works for any device, converting through double) ----
  template <class T = double> T item() const;  // one-element tensors only
  double at(const Shape& index) const;          // read one element (negative indices count from the end)
  void set_at(const Shape& index, double value) const;  // write one element (tests, small setups)
  std::vector<double> to_vector() const;        // all elements in row-major order
  std::string to_string() const;                // PyTorch-like printout (tensor/print.cpp)

  // ---- autograd (autograd/variable.cpp) ----
  bool requires_grad() const;
  Tensor& requires_grad_(bool on = true);
  const Tensor& grad() const;   // undefined tensor when no gradient was accumulated
  Tensor& mutable_grad() const;
  void set_grad(const Tensor& g) const;
  std::shared_ptr<Node> grad_fn() const;
  std::string grad_fn_name() const;  // "MulBackward", or empty for leaves (printing)
  bool is_leaf() const;
  uint32_t output_nr() const;
  // Reverse-mode differentiation from this tensor. gradient may be omitted for one-element tensors.
  void backward(const Tensor& gradient = Tensor(), bool retain_graph = false) const;
  Tensor detach() const;       // shares storage, no history
  Tensor& detach_();
  void register_hook(GradHook hook) const;
  void retain_grad() const;    // keep .grad() on a non-leaf
  bool retains_grad() const;

  // ---- differentiable views and copies (ops/tensor_methods.cpp) ----
  Tensor view(const Shape& shape) const;
  Tensor reshape(const Shape& shape) const;
  Tensor permute(const Shape& dims) const;
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor t() const;  // 2-D transpose
  Tensor unsqueeze(int64_t d) const;
  Tensor squeeze() const;
  Tensor squeeze(int64_t d) const;
  Tensor narrow(int64_t d, int64_t start, int64_t length) const;
  Tensor slice(int64_t d, int64_t start, int64_t end, int64_t step = 1) const;
  Tensor select(int64_t d, int64_t index) const;
  Tensor operator[](int64_t index) const { return select(0, index); }
  Tensor expand(const Shape& shape) const;
  Tensor broadcast_to(const Shape& shape) const { return expand(shape); }
  Tensor expand_as(const Tensor& other) const { return expand(other.sizes()); }
  Tensor as_strided(const Shape& sizes, const Shape& strides, int64_t storage_offset = -1) const;
  Tensor flatten(int64_t start_dim = 0, int64_t end_dim = -1) const;
  Tensor unflatten(int64_t d, const Shape& sizes) const;
  std::vector<Tensor> split(int64_t split_size, int64_t d = 0) const;
  std::vector<Tensor> split_with_sizes(const Shape& sizes, int64_t d = 0) const;
  std::vector<Tensor> chunk(int64_t chunks, int64_t d = 0) const;
  Tensor contiguous() const;
  Tensor clone() const;
  Tensor to(DType dtype) const;
  Tensor to(Device device) const;
  Tensor to(Device device, DType dtype) const;
  Tensor cpu() const { return to(kCPU); }
  Tensor cuda() const { return to(kCUDA); }
  Tensor sum() const;
  Tensor mean() const;

  // ---- in-place (ops/tensor_methods.cpp) ----
  Tensor& add_(const Tensor& other, Scalar alpha = 1);
  Tensor& add_(Scalar other);
  Tensor& mul_(const Tensor& other);
  Tensor& mul_(Scalar other);
  Tensor& zero_();
  Tensor& fill_(Scalar value);
  Tensor& copy_(const Tensor& src);

 private:
  [[noreturn]] static void throw_undefined();
  std::shared_ptr<TensorImpl> impl_;
};

using TensorList = std::vector<Tensor>;

// ---- layout helpers shared by ops and kernels ----
Shape contiguous_strides(const Shape& sizes);
// Whether the layout covers one contiguous range of its storage exactly once (some permutation of a
// contiguous layout): then whether two such tensors overlap follows from their ranges.
bool is_dense_non_overlapping(const Shape& sizes, const Shape& strides);
// Sufficient for no two elements sharing a memory location: with the dims sorted by stride, each stride
// steps over everything the smaller dims span. (False does not prove an overlap.)
bool is_provably_non_overlapping(const Shape& sizes, const Shape& strides);
// Number of elements; ShapeError for a negative size or a product past INT64_MAX (a shape never wraps).
int64_t shape_numel(const Shape& sizes);
// elements * element_size, ShapeError (naming `what`) past INT64_MAX.
int64_t checked_nbytes(int64_t elements, size_t element_size, const char* what);
// Wraps a possibly negative dim into [0, ndim); IndexError naming `op` otherwise.
int64_t wrap_dim(int64_t d, int64_t ndim, const char* op);
// The broadcast of two shapes (ShapeError naming `op` and both shapes when incompatible).
Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op);
// "[2, 3]" for messages.
std::string shape_str(const Shape& s);

// ---- construction (tensor/factory.cpp); random factories live in tensor/random.h ----
Tensor empty(const Shape& sizes, TensorOptions options = {});
Tensor empty_strided(const Shape& sizes, const Shape& strides, TensorOptions options = {});
Tensor empty_like(const Tensor& t);  // contiguous, same dtype and device
Tensor zeros(const Shape& sizes, TensorOptions options = {});
Tensor ones(const Shape& sizes, TensorOptions options = {});
Tensor full(const Shape& sizes, Scalar value, TensorOptions options = {});
Tensor zeros_like(const Tensor& t);
Tensor ones_like(const Tensor& t);
Tensor full_like(const Tensor& t, Scalar value);
Tensor scalar_tensor(Scalar value, TensorOptions options = {});
Tensor arange(double end, TensorOptions options = kInt64);
Tensor arange(double start, double end, double step = 1, TensorOptions options = kInt64);
Tensor linspace(double start, double end, int64_t steps, TensorOptions options = {});
Tensor eye(int64_t n, int64_t m = -1, TensorOptions options = {});
template <class T> Tensor from_vector(const std::vector<T>& values, const Shape& sizes, TensorOptions options = {});
// Wraps memory owned by the caller (not copied); deleter runs when the last view dies.
Tensor from_blob(void* data, const Shape& sizes, const Shape& strides, DType dtype, Device device = kCPU,
                 std::function<void(void*)> deleter = {});

}  // namespace fg

template <> struct fmt::formatter<fg::Tensor> : fmt::formatter<std::string> {
  auto format(const fg::Tensor& t, fmt::format_context& ctx) const {
    return fmt::formatter<std::string>::format(t.defined() ? t.to_string() : "Tensor(undefined)", ctx);
  }
};
