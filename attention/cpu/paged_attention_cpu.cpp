// PagedAttention::assign's scatter on the CPU (attention/paged_attention_kernels.h).
#include <cstring>

#include "flexgrad/attention/paged_attention_kernels.h"

namespace fg {
namespace {

void scatter_cpu(const Tensor& val, const Tensor& addr, const Tensor& cache) {
  const int64_t B = val.size(0), H = val.size(1), S = val.size(2), L = cache.size(2);
  const size_t row_bytes = static_cast<size_t>(val.size(3)) * val.element_size();
  const auto* in = static_cast<const char*>(val.data_ptr());
  auto* out = static_cast<char*>(cache.data_ptr());
  const int64_t* a = addr.data<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t s = 0; s < S; ++s)
        std::memcpy(out + static_cast<size_t>(h * L + a[b * S + s]) * row_bytes,
                    in + static_cast<size_t>((b * H + h) * S + s) * row_bytes, row_bytes);
}

}  // namespace

FG_REGISTER_KERNEL(paged_scatter_stub, CPU, &scatter_cpu);

}  // namespace fg
