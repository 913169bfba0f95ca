// PagedAttention's kernels on the CPU (attention/paged_attention_kernels.h): assign's scatter and
// convert_logical_block_mask's list rewrite.
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

void convert_cpu(const PagedConvertArgs& a) {
  const int64_t N = a.num.size(0), H = a.num.size(1), nQ = a.num.size(2), Bm = a.src_num.size(0);
  const int64_t nKV = a.src_idx.size(3), n_pages = a.table.size(1);
  const int64_t* slots = a.slots.data<int64_t>();
  const int64_t* lens = a.lens.data<int64_t>();
  auto ptr = [&](const Tensor& t) { return a.has_full ? t.data<int32_t>() : nullptr; };
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = 0; r < nQ; ++r) {
        const int64_t src_row = ((Bm == 1 ? 0 : n) * H + h) * nQ + r, dst_row = (n * H + h) * nQ + r;
        paged_convert_row(a.src_num.data<int32_t>(), a.src_idx.data<int32_t>(), ptr(a.src_fnum), ptr(a.src_fidx),
                          src_row, nKV, a.table.data<int64_t>() + slots[n] * n_pages, n_pages, a.page_size, lens[n],
                          a.num.data<int32_t>() + dst_row, a.idx.data<int32_t>() + dst_row * n_pages,
                          a.has_full ? a.fnum.data<int32_t>() + dst_row : nullptr,
                          a.has_full ? a.fidx.data<int32_t>() + dst_row * n_pages : nullptr, a.has_full);
      }
}

}  // namespace

FG_REGISTER_KERNEL(paged_scatter_stub, CPU, &scatter_cpu);
FG_REGISTER_KERNEL(paged_convert_stub, CPU, &convert_cpu);

}  // namespace fg
