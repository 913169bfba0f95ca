// Factories that need no kernels: values are produced on the CPU and copied to the target device.
#include <cmath>

#include "flexgrad/tensor/tensor.h"

namespace fg {
namespace {

// Builds a contiguous CPU tensor of `sizes`, fills element i with gen(i), then moves it to the device.
template <class Gen>
Tensor generate(const Shape& sizes, TensorOptions o, const char* op, Gen gen) {
  for (int64_t s : sizes) FG_CHECK(s >= 0, ShapeError, "{}: negative size {} in shape {}", op, s, shape_str(sizes));
  Tensor cpu = empty(sizes, TensorOptions().dtype(o.dtype_));
  int64_t n = cpu.numel();
  FG_DISPATCH_ALL_TYPES(o.dtype_, op, [&]<class T>() {
    T* p = cpu.data<T>();
    for (int64_t i = 0; i < n; ++i) {
      if constexpr (std::is_same_v<T, bool>) p[i] = gen(i) != 0.0;
      else p[i] = static_cast<T>(static_cast<compute_t<T>>(gen(i)));
    }
  });
  Tensor out = cpu;
  if (!o.device_.is_cpu()) {
    out = empty(sizes, TensorOptions().dtype(o.dtype_).device(o.device_));
    device_backend(o.device_).copy_bytes(out.data_ptr(), o.device_, cpu.data_ptr(), kCPU,
                                         static_cast<size_t>(n) * cpu.element_size());
  }
  if (o.requires_grad_) out.requires_grad_(true);
  return out;
}

}  // namespace

Tensor empty_strided(const Shape& sizes, const Shape& strides, TensorOptions o) {
  FG_CHECK(sizes.size() == strides.size(), ShapeError, "empty_strided: sizes {} and strides {} differ in length",
           shape_str(sizes), shape_str(strides));
  for (size_t i = 0; i < sizes.size(); ++i) {
    FG_CHECK(sizes[i] >= 0, ShapeError, "empty: negative size {} in shape {}", sizes[i], shape_str(sizes));
    FG_CHECK(strides[i] >= 0, ShapeError, "empty_strided: negative stride {} in strides {}", strides[i],
             shape_str(strides));
  }
  shape_numel(sizes);  // the element count itself must be countable
  // Elements the storage must hold: 1 + the largest offset, every step overflow-checked.
  int64_t extent = 1;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (sizes[i] == 0) { extent = 0; break; }
    int64_t span = 0;
    FG_CHECK(!__builtin_mul_overflow(sizes[i] - 1, strides[i], &span) && !__builtin_add_overflow(extent, span, &extent),
             ShapeError, "empty_strided: sizes {} with strides {} reach past the int64 range", shape_str(sizes),
             shape_str(strides));
  }
  const int64_t nbytes = checked_nbytes(extent, element_size(o.dtype_), "empty");
  auto storage = std::make_shared<StorageImpl>(static_cast<size_t>(nbytes), o.device_);
  Tensor t(std::make_shared<TensorImpl>(std::move(storage), sizes, strides, 0, o.dtype_));
  if (o.requires_grad_) t.requires_grad_(true);
  return t;
}

Tensor empty(const Shape& sizes, TensorOptions o) { return empty_strided(sizes, contiguous_strides(sizes), o); }
Tensor empty_like(const Tensor& t) { return empty(t.sizes(), t.options()); }

Tensor zeros(const Shape& sizes, TensorOptions o) {
  bool rg = o.requires_grad_;
  Tensor t = empty(sizes, o.requires_grad(false));
  device_backend(o.device_).fill_zero(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size(),
                                      o.device_.index);
  if (rg) t.requires_grad_(true);
  return t;
}

Tensor full(const Shape& sizes, Scalar value, TensorOptions o) {
  double v = value.to_double();
  return generate(sizes, o, "full", [v](int64_t) { return v; });
}
Tensor ones(const Shape& sizes, TensorOptions o) { return full(sizes, 1, o); }
Tensor zeros_like(const Tensor& t) { return zeros(t.sizes(), t.options()); }
Tensor ones_like(const Tensor& t) { return ones(t.sizes(), t.options()); }
Tensor full_like(const Tensor& t, Scalar value) { return full(t.sizes(), value, t.options()); }
Tensor scalar_tensor(Scalar value, TensorOptions o) { return full({}, value, o); }

Tensor arange(double end, TensorOptions o) { return arange(0, end, 1, o); }

Tensor arange(double start, double end, double step, TensorOptions o) {
  FG_CHECK(step != 0, ValueError, "arange: step must be nonzero");
  FG_CHECK((end - start) / step >= 0 || start == end, ValueError,
           "arange: upper bound and larger bound inconsistent with step sign (start={}, end={}, step={})", start,
           end, step);
  auto n = static_cast<int64_t>(std::ceil((end - start) / step));
  return generate({std::max<int64_t>(n, 0)}, o, "arange", [=](int64_t i) { return start + step * i; });
}

Tensor linspace(double start, double end, int64_t steps, TensorOptions o) {
  FG_CHECK(steps >= 0, ValueError, "linspace: number of steps must be non-negative, got {}", steps);
  double step = steps > 1 ? (end - start) / static_cast<double>(steps - 1) : 0.0;
  // Fill from both ends as PyTorch does, so the last element is exactly `end`. A single step is `start`
  // (steps / 2 would be 0 and send element 0 down the `end` branch).
  int64_t half = steps == 1 ? 1 : steps / 2;
  return generate({steps}, o, "linspace",
                  [=](int64_t i) { return i < half ? start + step * i : end - step * (steps - 1 - i); });
}

Tensor eye(int64_t n, int64_t m, TensorOptions o) {
  if (m < 0) m = n;
  FG_CHECK(n >= 0, ValueError, "eye: n must be non-negative, got {}", n);
  return generate({n, m}, o, "eye", [m](int64_t i) { return (i / m) == (i % m) ? 1.0 : 0.0; });
}

template <class T>
Tensor from_vector(const std::vector<T>& values, const Shape& sizes, TensorOptions o) {
  FG_CHECK(static_cast<int64_t>(values.size()) == shape_numel(sizes), ShapeError,
           "from_vector: {} values cannot fill shape {} ({} elements)", values.size(), shape_str(sizes),
           shape_numel(sizes));
  return generate(sizes, o, "from_vector", [&](int64_t i) {
    if constexpr (std::is_same_v<T, bool>) return values[i] ? 1.0 : 0.0;
    else return static_cast<double>(static_cast<compute_t<T>>(values[i]));
  });
}
template Tensor from_vector(const std::vector<double>&, const Shape&, TensorOptions);
template Tensor from_vector(const std::vector<float>&, const Shape&, TensorOptions);
template Tensor from_vector(const std::vector<int64_t>&, const Shape&, TensorOptions);
template Tensor from_vector(const std::vector<int32_t>&, const Shape&, TensorOptions);
template Tensor from_vector(const std::vector<bool>&, const Shape&, TensorOptions);

Tensor from_blob(void* data, const Shape& sizes, const Shape& strides, DType dtype, Device device,
                 std::function<void(void*)> deleter) {
  int64_t extent = 1;
  for (size_t i = 0; i < sizes.size(); ++i) extent += (sizes[i] - 1) * strides[i];
  auto storage = std::make_shared<StorageImpl>(data, static_cast<size_t>(extent) * element_size(dtype), device,
                                               std::move(deleter));
  return Tensor(std::make_shared<TensorImpl>(std::move(storage), sizes, strides, 0, dtype));
}

}  // namespace fg
