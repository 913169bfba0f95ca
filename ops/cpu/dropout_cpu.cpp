// CPU dropout (ops/dropout_kernels.h): one Philox block per four elements.
#include "flexgrad/ops/dropout_kernels.h"
#include "flexgrad/tensor/philox.h"

namespace fg {
namespace {

template <class T>
void dropout_typed(const DropoutArgs& a) {
  using C = compute_t<T>;
  const auto* in = static_cast<const T*>(a.in);
  auto* out = static_cast<T*>(a.out);
  const C scale = static_cast<C>(a.scale);
  const int64_t groups = (a.n + 3) / 4;
#pragma omp parallel for schedule(static) if (a.n > 32768)
  for (int64_t k = 0; k < groups; ++k) {
    uint32_t w[4];
    Philox4x32::generate(a.seed, a.base + static_cast<uint64_t>(k), w);
    for (int64_t j = 0; j < 4 && 4 * k + j < a.n; ++j) {
      const int64_t i = 4 * k + j;
      const C m = w[j] * 0x1p-32 < a.keep_prob ? scale : C(0);
      out[i] = static_cast<T>(static_cast<C>(in[i]) * m);
    }
  }
}

void dropout_cpu(const DropoutArgs& a) {
  switch (a.dtype) {
    case kFloat64: return dropout_typed<double>(a);
    case kFloat32: return dropout_typed<float>(a);
    case kBFloat16: return dropout_typed<BFloat16>(a);
    case kFloat16: return dropout_typed<Half>(a);
    default: break;
  }
  throw DTypeError(fmt::format("dropout: unsupported dtype {}", a.dtype));
}

}  // namespace

FG_REGISTER_KERNEL(dropout_stub, CPU, dropout_cpu);

}  // namespace fg
