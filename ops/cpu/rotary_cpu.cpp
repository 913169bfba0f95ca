// CPU rotary embedding (ops/rotary_kernels.h): one (a, b, l) row per iteration, split across OpenMP threads.
#include "flexgrad/ops/rotary_kernels.h"

namespace fg {
namespace {

template <class T, class C>
void rotary_typed(const RotaryArgs& a) {
  const int64_t A = a.sizes[0], B = a.sizes[1], L = a.sizes[2], E = a.sizes[3], half = E / 2;
  const auto* x = static_cast<const T*>(a.x);
  const auto* ct = static_cast<const C*>(a.cos);
  const auto* st = static_cast<const C*>(a.sin);
  auto* out = static_cast<T*>(a.out);
  const C sign = static_cast<C>(a.sign);
  const int64_t rows = A * B * L;
#pragma omp parallel for schedule(static) if (rows * E > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t l = r % L, b = (r / L) % B, i0 = r / (L * B);
    const T* xr = x + i0 * a.x_strides[0] + b * a.x_strides[1] + l * a.x_strides[2];
    T* o = out + r * E;
    for (int64_t i = 0; i < half; ++i) {
      const C c = ct[l * half + i], s = sign * st[l * half + i];
      const C x1 = static_cast<C>(xr[i]), x2 = static_cast<C>(xr[i + half]);
      o[i] = static_cast<T>(x1 * c - x2 * s);
      o[i + half] = static_cast<T>(x2 * c + x1 * s);
    }
  }
}

void rotary_cpu(const RotaryArgs& a) {
  switch (a.dtype) {
    case kFloat64: return rotary_typed<double, double>(a);
    case kFloat32: return rotary_typed<float, float>(a);
    case kBFloat16: return rotary_typed<BFloat16, float>(a);
    case kFloat16: return rotary_typed<Half, float>(a);
    default: break;
  }
  throw DTypeError(fmt::format("rotary_embedding: unsupported dtype {}", a.dtype));
}

}  // namespace

FG_REGISTER_KERNEL(rotary_stub, CPU, rotary_cpu);

}  // namespace fg
