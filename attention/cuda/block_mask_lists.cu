// Block lists of a BlockMask on CUDA (block_mask_lists.h): bits -> ordered lists with a warp per row (ballot
// and popcount scans), lists -> bits with a scatter.
#include "flexgrad/attention/cuda/block_mask_lists.h"
#include "flexgrad/tensor/cuda/cuda_check.h"

namespace fg::cuda {
namespace {

constexpr int kListThreads = 128;
constexpr int kListWarps = kListThreads / 32;

struct ListOut {
  int32_t* num;  // [P, rows]
  int32_t* idx;  // [P, rows, cols]
};
// The four lists: forward partial / full (rows = q blocks), transposed partial / full (rows = kv blocks).
struct ListJobs {
  ListOut out[4];
};

// One warp per (p, row) of list v = first_list + blockIdx.y: the forward lists (first_list 0) read row r of
// bits [p, r, :], the transposed ones (first_list 2) column r, bits [p, :, r]. The row's columns holding the
// list's bit are written ascending, then the others ascending: present column c goes to (present before c),
// absent column c to count + (absent before c), 32 columns per ballot. A warp rather than a CTA per row:
// a paged decode step's converted mask has tens of thousands of one-column rows in its transposed lists
// (B=32, 2048 pages: 65536), which one 128-thread CTA each took 0.5 ms to write.
__global__ void __launch_bounds__(kListThreads)
    ordered_lists_kernel(const int32_t* __restrict__ bits, int64_t P, int R, int C, int first_list, ListJobs jobs) {
  const int v = first_list + static_cast<int>(blockIdx.y);
  const bool transposed = v >= 2;
  const int32_t bit = (v & 1) ? 2 : 1;
  const int rows = transposed ? C : R, cols = transposed ? R : C;
  const int64_t job = static_cast<int64_t>(blockIdx.x) * kListWarps + (threadIdx.x >> 5);
  if (job >= P * rows) return;  // a whole warp: the ballots below need all 32 lanes
  const int lane = threadIdx.x & 31;
  const int64_t p = job / rows;
  const int r = static_cast<int>(job - p * rows);
  const int32_t* src = bits + p * R * C + (transposed ? r : static_cast<int64_t>(r) * C);
  const int64_t step = transposed ? C : 1;
  int32_t* out = jobs.out[v].idx + job * cols;

  int count = 0;
  for (int base = 0; base < cols; base += 32) {
    const int c = base + lane;
    count += __popc(__ballot_sync(0xffffffffu, c < cols && (src[c * step] & bit)));
  }
  int before = 0;  // present columns before this chunk
  for (int base = 0; base < cols; base += 32) {
    const int c = base + lane;
    const bool present = c < cols && (src[c * step] & bit);
    const unsigned mask = __ballot_sync(0xffffffffu, present);
    if (c < cols) {
      const int present_before = before + __popc(mask & ((1u << lane) - 1u));
      out[present ? present_before : count + (c - present_before)] = c;
    }
    before += __popc(mask);
  }
  if (lane == 0) jobs.out[v].num[job] = count;
}

// One CTA per row: sets `bit` in bits[row, idx[row, k]] for k < num[row] (both lists in one pass).
__global__ void scatter_bits_kernel(const int32_t* __restrict__ num, const int32_t* __restrict__ idx,
                                    const int32_t* __restrict__ full_num, const int32_t* __restrict__ full_idx,
                                    int C, int32_t* __restrict__ bits) {
  const int64_t row = blockIdx.x;
  int32_t* out = bits + row * C;
  for (int k = threadIdx.x; k < num[row]; k += blockDim.x) atomicOr(out + idx[row * C + k], 1);
  if (full_num != nullptr)
    for (int k = threadIdx.x; k < full_num[row]; k += blockDim.x) atomicOr(out + full_idx[row * C + k], 2);
}

}  // namespace

BlockLists8 block_lists_cuda(const Tensor& bits, bool with_full) {
  const int64_t B = bits.size(0), H = bits.size(1), R = bits.size(2), C = bits.size(3), P = B * H;
  const Device dev = bits.device();
  const TensorOptions opt = TensorOptions().dtype(kInt32).device(dev);
  BlockLists8 l;
  l.kv_num = empty({B, H, R}, opt);
  l.kv_idx = empty({B, H, R, C}, opt);
  l.q_num = empty({B, H, C}, opt);
  l.q_idx = empty({B, H, C, R}, opt);
  if (with_full) {
    l.full_kv_num = empty({B, H, R}, opt);
    l.full_kv_idx = empty({B, H, R, C}, opt);
    l.full_q_num = empty({B, H, C}, opt);
    l.full_q_idx = empty({B, H, C, R}, opt);
  }
  if (bits.numel() == 0) return l;
  ListJobs jobs{};
  jobs.out[0] = {l.kv_num.data<int32_t>(), l.kv_idx.data<int32_t>()};
  jobs.out[2] = {l.q_num.data<int32_t>(), l.q_idx.data<int32_t>()};
  if (with_full) {
    jobs.out[1] = {l.full_kv_num.data<int32_t>(), l.full_kv_idx.data<int32_t>()};
    jobs.out[3] = {l.full_q_num.data<int32_t>(), l.full_q_idx.data<int32_t>()};
  }
  DeviceGuard guard(dev.index);
  const Tensor in = bits.contiguous();
  // The forward lists (P * R rows) and the transposed ones (P * C rows) in two launches sized to their rows.
  const unsigned n_lists = with_full ? 2 : 1;
  for (int first_list : {0, 2}) {
    const int64_t rows = P * (first_list == 0 ? R : C);
    const dim3 grid(static_cast<unsigned>((rows + kListWarps - 1) / kListWarps), n_lists);
    ordered_lists_kernel<<<grid, kListThreads, 0, stream(dev.index)>>>(in.data<int32_t>(), P, static_cast<int>(R),
                                                                       static_cast<int>(C), first_list, jobs);
    FG_CUDA_CHECK_LAUNCH();
  }
  return l;
}

Tensor block_bits_cuda(const Tensor& num, const Tensor& idx, const Tensor& full_num, const Tensor& full_idx) {
  const Device dev = idx.device();
  Tensor bits = zeros(idx.sizes(), TensorOptions().dtype(kInt32).device(dev));
  const int64_t rows = num.numel();
  if (rows == 0 || idx.size(3) == 0) return bits;
  DeviceGuard guard(dev.index);
  scatter_bits_kernel<<<static_cast<unsigned>(rows), kListThreads, 0, stream(dev.index)>>>(
      num.data<int32_t>(), idx.data<int32_t>(), full_num.defined() ? full_num.data<int32_t>() : nullptr,
      full_num.defined() ? full_idx.data<int32_t>() : nullptr, static_cast<int>(idx.size(3)), bits.data<int32_t>());
  FG_CUDA_CHECK_LAUNCH();
  return bits;
}

}  // namespace fg::cuda
