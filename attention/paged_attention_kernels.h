// The device kernels of PagedAttention, one implementation per device (DispatchStub): CPU in
// attention/cpu/paged_attention_cpu.cpp, CUDA in attention/cuda/paged_attention_cuda.cu. The caller
// (attention/paged_attention.cpp) has validated every argument, so a kernel never fails half-way.
#pragma once
#include <cstdint>

#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/host_device.h"
#include "flexgrad/tensor/tensor.h"

namespace fg {

// assign: copies row (b, h, s) of val [B, H, S, D] (contiguous) to row (h, addr[b * S + s]) of cache
// [1, H, L, D] (contiguous, same dtype and device). addr is int64 [B * S] on the cache's device, every entry
// in [0, L).
using PagedScatterFn = void (*)(const Tensor& val, const Tensor& addr, const Tensor& cache);
FG_DECLARE_STUB(PagedScatterFn, paged_scatter_stub);

// convert_logical_block_mask's lists. Every tensor on one device, contiguous. Sources (the logical mask,
// int32): num [Bm, H, nQ], idx [Bm, H, nQ, nKV], and the full-block pair when has_full. table: the page
// table, int64 [max_batch, n_pages]. slots, lens: int64 [N], slot in [0, max_batch) and valid logical length
// of each output batch entry. Outputs (int32, zero-filled): num [N, H, nQ], idx [N, H, nQ, n_pages], and the
// full pair when has_full.
struct PagedConvertArgs {
  Tensor src_num, src_idx, src_fnum, src_fidx;
  Tensor table, slots, lens;
  Tensor num, idx, fnum, fidx;
  int64_t page_size = 0;
  bool has_full = false;
};
using PagedConvertFn = void (*)(const PagedConvertArgs& a);
FG_DECLARE_STUB(PagedConvertFn, paged_convert_stub);

// One output row of the conversion, the same code on both devices: the logical blocks of source row
// `src_row` mapped to the physical pages of `slot`, dropping blocks with no page or starting at or past
// `len`; full blocks that reach past `len` become partial (after the partial ones, in order) so the
// mask_mod cuts them. Writes *dn / di (and *fn / fi when has_full) of the output row.
FG_HOST_DEVICE inline void paged_convert_row(const int32_t* src_num, const int32_t* src_idx, const int32_t* src_fnum,
                                             const int32_t* src_fidx, int64_t src_row, int64_t nKV,
                                             const int64_t* table_row, int64_t n_pages, int64_t page_size, int64_t len,
                                             int32_t* dn, int32_t* di, int32_t* fn, int32_t* fi, bool has_full) {
  auto page_of = [&](int64_t lb) -> int64_t {
    if (lb < 0 || lb >= n_pages || lb * page_size >= len) return -1;
    return table_row[lb];
  };
  int32_t n = 0;
  const int32_t cnt = src_num[src_row];
  for (int32_t k = 0; k < cnt; ++k) {
    const int64_t page = page_of(src_idx[src_row * nKV + k]);
    if (page >= 0) di[n++] = static_cast<int32_t>(page);
  }
  if (has_full) {
    int32_t nf = 0;
    const int32_t fcnt = src_fnum[src_row];
    for (int32_t k = 0; k < fcnt; ++k) {
      const int64_t lb = src_fidx[src_row * nKV + k], page = page_of(lb);
      if (page < 0) continue;
      if ((lb + 1) * page_size > len) di[n++] = static_cast<int32_t>(page);
      else fi[nf++] = static_cast<int32_t>(page);
    }
    *fn = nf;
  }
  *dn = n;
}

}  // namespace fg
