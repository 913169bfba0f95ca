// CPU softmax / log_softmax rows: max, sum of shifted exponentials (accumulated in double), then write.
#include <cmath>
#include <limits>

#include "flexgrad/ops/softmax_kernels.h"

namespace fg {
namespace {

template <class T>
void softmax_typed(const ReduceLayout& l, const T* in, T* out, bool log) {
  using C = compute_t<T>;
  const int64_t n = l.inner_size(), s = l.inner_in_stride(), os = l.inner_out_stride();
  FG_ASSERT(l.red_ndim <= 1);
#pragma omp parallel for schedule(static) if (l.n_out * n > 32768 && l.n_out > 1)
  for (int64_t o = 0; o < l.n_out; ++o) {
    const T* x = in + l.in_offset(o);
    T* y = out + l.out_offset(o);
    // NaN-sticky max (as PyTorch's): a row holding a NaN gives NaN everywhere, even when its other
    // entries are -inf, instead of being taken for an all -inf row.
    C m = -std::numeric_limits<C>::infinity();
    for (int64_t i = 0; i < n; ++i) {
      const C xi = static_cast<C>(x[i * s]);
      m = (xi > m || xi != xi) ? xi : m;
    }
    if (m == -std::numeric_limits<C>::infinity()) {
      // Every entry is -inf: there is no mass to normalise. Give 0 (log: -inf) rather than 0/0 = NaN
      // (torch.softmax gives NaN here; flexgrad keeps the masked-row convention of _safe_softmax).
      const C fill = log ? -std::numeric_limits<C>::infinity() : C(0);
      for (int64_t i = 0; i < n; ++i) y[i * os] = static_cast<T>(fill);
      continue;
    }
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(std::exp(static_cast<C>(x[i * s]) - m));
    if (log) {
      const C shift = m + static_cast<C>(std::log(sum));
      for (int64_t i = 0; i < n; ++i) y[i * os] = static_cast<T>(static_cast<C>(x[i * s]) - shift);
    } else {
      const C inv = static_cast<C>(1.0 / sum);
      for (int64_t i = 0; i < n; ++i) y[i * os] = static_cast<T>(std::exp(static_cast<C>(x[i * s]) - m) * inv);
    }
  }
}

void softmax_cpu(const ReduceLayout& l, const void* in, void* out, DType dtype, bool log) {
  FG_DISPATCH_FLOATING_TYPES(dtype, log ? "log_softmax" : "softmax", [&]<class T>() {
    softmax_typed<T>(l, static_cast<const T*>(in), static_cast<T*>(out), log);
  });
}

}  // namespace

FG_REGISTER_KERNEL(softmax_stub, CPU, softmax_cpu);

}  // namespace fg
