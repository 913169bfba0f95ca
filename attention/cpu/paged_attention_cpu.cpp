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
  const int64_t nKV = a.src_idx.size(3), n_pages = a.table.size(1), ps = a.page_size;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t* table_row = a.table.data<int64_t>() + a.slots.data<int64_t>()[n] * n_pages;
    const int64_t len = a.lens.data<int64_t>()[n];
    for (int64_t h = 0; h < H; ++h)
      for (int64_t r = 0; r < nQ; ++r) {
        const int64_t src_row = ((Bm == 1 ? 0 : n) * H + h) * nQ + r, dst_row = (n * H + h) * nQ + r;
        int32_t* di = a.idx.data<int32_t>() + dst_row * n_pages;
        int32_t dn = 0;
        const int32_t* si = a.src_idx.data<int32_t>() + src_row * nKV;
        for (int32_t k = 0; k < a.src_num.data<int32_t>()[src_row]; ++k) {
          const int64_t page = paged_block_page(table_row, n_pages, ps, len, si[k]);
          if (page >= 0) di[dn++] = static_cast<int32_t>(page);
        }
        if (a.has_full) {
          int32_t* fi = a.fidx.data<int32_t>() + dst_row * n_pages;
          int32_t fn = 0;
          const int32_t* sfi = a.src_fidx.data<int32_t>() + src_row * nKV;
          for (int32_t k = 0; k < a.src_fnum.data<int32_t>()[src_row]; ++k) {
            const int64_t page = paged_block_page(table_row, n_pages, ps, len, sfi[k]);
            if (page < 0) continue;
            if (paged_full_block_cut(sfi[k], ps, len)) di[dn++] = static_cast<int32_t>(page);
            else fi[fn++] = static_cast<int32_t>(page);
          }
          a.fnum.data<int32_t>()[dst_row] = fn;
        }
        a.num.data<int32_t>()[dst_row] = dn;
      }
  }
}

}  // namespace

FG_REGISTER_KERNEL(paged_scatter_stub, CPU, &scatter_cpu);
FG_REGISTER_KERNEL(paged_convert_stub, CPU, &convert_cpu);

}  // namespace fg
