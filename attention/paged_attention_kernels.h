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

// Where logical block `lb` of a row whose slot's page-table row is `table_row` and whose valid length is
// `len` goes: -1 when it holds nothing attendable (no page, or it starts at or past len), else its physical
// page. Shared by both devices' conversions (CPU: a loop per row; CUDA: a warp per row, compacted in order).
FG_HOST_DEVICE inline int64_t paged_block_page(const int64_t* table_row, int64_t n_pages, int64_t page_size,
                                               int64_t len, int64_t lb) {
  if (lb < 0 || lb >= n_pages || lb * page_size >= len) return -1;
  return table_row[lb];
}
// Whether a full logical block reaches past `len`: it is then only partly valid and becomes a partial block
// (listed after the partial ones, in order) so the mask_mod cuts it.
FG_HOST_DEVICE inline bool paged_full_block_cut(int64_t lb, int64_t page_size, int64_t len) {
  return (lb + 1) * page_size > len;
}

}  // namespace fg
