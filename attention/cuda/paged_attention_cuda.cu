// PagedAttention's kernels on CUDA (attention/paged_attention_kernels.h). assign's scatter: one CTA per
// source row (b, h, s) copies it to its physical cache row, 16 bytes at a time where rows are 16-byte
// aligned. convert_logical_block_mask: one warp per output row maps 32 list entries at a time
// (paged_block_page, the CPU's rule) and compacts the kept ones in order with a ballot, so a device mask is
// converted on the device in a few microseconds (a thread per row walked the lists with a dependent load
// per entry: 34 us for 8 rows of 128 blocks on the H200).
#include <cstdint>

#include "flexgrad/attention/paged_attention_kernels.h"
#include "flexgrad/tensor/cuda/cuda_check.h"

namespace fg::cuda {
namespace {

constexpr int kThreads = 128;

template <class W>
__global__ void __launch_bounds__(kThreads)
    paged_scatter_kernel(const W* __restrict__ src, W* __restrict__ dst, const int64_t* __restrict__ addr, int64_t H,
                         int64_t S, int64_t L, int64_t row_words) {
  const int64_t row = blockIdx.x;  // (b * H + h) * S + s
  const int64_t s = row % S, h = (row / S) % H, b = row / (S * H);
  const W* in = src + row * row_words;
  W* out = dst + (h * L + addr[b * S + s]) * row_words;
  for (int64_t i = threadIdx.x; i < row_words; i += kThreads) out[i] = in[i];
}

void scatter_cuda(const Tensor& val, const Tensor& addr, const Tensor& cache) {
  const int64_t B = val.size(0), H = val.size(1), S = val.size(2), L = cache.size(2);
  const int64_t rows = B * H * S;
  if (rows == 0) return;
  const int64_t row_bytes = val.size(3) * static_cast<int64_t>(val.element_size());
  const int dev = cache.device().index;
  DeviceGuard g(dev);
  const auto* a = static_cast<const int64_t*>(addr.data_ptr());
  const auto src = reinterpret_cast<uintptr_t>(val.data_ptr()), dst = reinterpret_cast<uintptr_t>(cache.data_ptr());
  const bool wide = row_bytes % 16 == 0 && src % 16 == 0 && dst % 16 == 0;
  if (wide) {
    paged_scatter_kernel<uint4><<<static_cast<unsigned>(rows), kThreads, 0, stream(dev)>>>(
        reinterpret_cast<const uint4*>(src), reinterpret_cast<uint4*>(dst), a, H, S, L, row_bytes / 16);
  } else {
    paged_scatter_kernel<unsigned char><<<static_cast<unsigned>(rows), kThreads, 0, stream(dev)>>>(
        reinterpret_cast<const unsigned char*>(src), reinterpret_cast<unsigned char*>(dst), a, H, S, L, row_bytes);
  }
  FG_CUDA_CHECK_LAUNCH();
}

struct ConvertPtrs {
  const int32_t *src_num, *src_idx, *src_fnum, *src_fidx;
  const int64_t *table, *slots, *lens;
  int32_t *num, *idx, *fnum, *fidx;
  int64_t N, H, nQ, Bm, nKV, n_pages, page_size;
  bool has_full;
};

// Appends the entries of `keep` (one per lane, in lane order) to list[*count ...]; *count is warp-uniform.
__device__ __forceinline__ void warp_append(bool keep, int32_t value, int32_t* list, int32_t& count) {
  const unsigned lane = threadIdx.x & 31, mask = __ballot_sync(0xffffffffu, keep);
  if (keep) list[count + __popc(mask & ((1u << lane) - 1))] = value;
  count += __popc(mask);
}

__global__ void __launch_bounds__(kThreads) paged_convert_kernel(const ConvertPtrs p) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;  // (n * H + h) * nQ + r
  if (row >= p.N * p.H * p.nQ) return;  // warp-uniform
  const int lane = threadIdx.x & 31;
  const int64_t r = row % p.nQ, h = (row / p.nQ) % p.H, n = row / (p.nQ * p.H);
  const int64_t src_row = ((p.Bm == 1 ? 0 : n) * p.H + h) * p.nQ + r;
  const int64_t* table_row = p.table + p.slots[n] * p.n_pages;
  const int64_t len = p.lens[n];
  int32_t* di = p.idx + row * p.n_pages;
  int32_t dn = 0;
  const int32_t cnt = p.src_num[src_row];
  for (int32_t k0 = 0; k0 < cnt; k0 += 32) {
    const int32_t k = k0 + lane;
    const int64_t page = k < cnt ? paged_block_page(table_row, p.n_pages, p.page_size, len, p.src_idx[src_row * p.nKV + k]) : -1;
    warp_append(page >= 0, static_cast<int32_t>(page), di, dn);
  }
  if (p.has_full) {
    int32_t* fi = p.fidx + row * p.n_pages;
    int32_t fn = 0;
    const int32_t fcnt = p.src_fnum[src_row];
    for (int32_t k0 = 0; k0 < fcnt; k0 += 32) {
      const int32_t k = k0 + lane;
      const int64_t lb = k < fcnt ? p.src_fidx[src_row * p.nKV + k] : -1;
      const int64_t page = k < fcnt ? paged_block_page(table_row, p.n_pages, p.page_size, len, lb) : -1;
      const bool cut = page >= 0 && paged_full_block_cut(lb, p.page_size, len);
      warp_append(cut, static_cast<int32_t>(page), di, dn);  // after the partial ones, in order
      warp_append(page >= 0 && !cut, static_cast<int32_t>(page), fi, fn);
    }
    if (lane == 0) p.fnum[row] = fn;
  }
  if (lane == 0) p.num[row] = dn;
}

void convert_cuda(const PagedConvertArgs& a) {
  auto i32 = [](const Tensor& t) { return t.defined() ? static_cast<int32_t*>(t.data_ptr()) : nullptr; };
  auto i64 = [](const Tensor& t) { return static_cast<const int64_t*>(t.data_ptr()); };
  ConvertPtrs p{i32(a.src_num), i32(a.src_idx), i32(a.src_fnum), i32(a.src_fidx), i64(a.table), i64(a.slots),
                i64(a.lens),    i32(a.num),     i32(a.idx),      i32(a.fnum),     i32(a.fidx),  a.num.size(0),
                a.num.size(1),  a.num.size(2),  a.src_num.size(0), a.src_idx.size(3), a.table.size(1), a.page_size,
                a.has_full};
  const int64_t rows = p.N * p.H * p.nQ, rows_per_cta = kThreads / 32;
  if (rows == 0) return;
  const int dev = a.num.device().index;
  DeviceGuard g(dev);
  paged_convert_kernel<<<static_cast<unsigned>((rows + rows_per_cta - 1) / rows_per_cta), kThreads, 0, stream(dev)>>>(p);
  FG_CUDA_CHECK_LAUNCH();
}

}  // namespace

FG_REGISTER_KERNEL(paged_scatter_stub, CUDA, &scatter_cuda);
FG_REGISTER_KERNEL(paged_convert_stub, CUDA, &convert_cuda);

}  // namespace fg::cuda
