// CPU backend of BlockMask (attention/block_mask_kernels.h): the mask_mod evaluated per block by the tile
// evaluator (OpenMP over (b, h, q block)), and the block lists built by a stable partition of each row.
#include <algorithm>
#include <exception>
#include <mutex>
#include <optional>
#include <tuple>

#include "flexgrad/attention/block_mask_kernels.h"
#include "flexgrad/attention/tile_eval.h"

namespace fg::cpu {
namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

Tensor eval_cpu(const ModProgram& program, int64_t B, int64_t H, int64_t Q_LEN, int64_t KV_LEN, BlockSize bs,
                Device) {
  const int64_t nQ = cdiv(Q_LEN, bs.q), nKV = cdiv(KV_LEN, bs.kv);
  // Masks that ignore b (or h) are evaluated for one b (h) and copied: most masks ignore both.
  const int64_t Be = program.uses(kUsesBatch) ? B : 1, He = program.uses(kUsesHead) ? H : 1;
  Tensor bits = empty({B, H, nQ, nKV}, kInt32);
  int32_t* out = bits.data<int32_t>();
  const int64_t block_area = bs.q * bs.kv;
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel
  {
    std::optional<TileEvaluator<float>> ev;
    try {
      ev.emplace(program);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
#pragma omp for schedule(dynamic)
    for (int64_t job = 0; job < Be * He * nQ; ++job) {
      if (!ev) continue;
      const int64_t qb = job % nQ, h = (job / nQ) % He, b = job / (nQ * He);
      const int64_t q0 = qb * bs.q, nq = std::min(bs.q, Q_LEN - q0);
      try {
        for (int64_t kb = 0; kb < nKV; ++kb) {
          const int64_t kv0 = kb * bs.kv, nkv = std::min(bs.kv, KV_LEN - kv0);
          ev->run(b, h, q0, nq, kv0, nkv);
          const int64_t count = ev->count_true();
          // Out-of-range entries of a block that sticks out count as masked: such a block is never full.
          out[((b * H + h) * nQ + qb) * nKV + kb] =
              count == block_area ? kBlockFullBit : count > 0 ? kBlockPartialBit : 0;
        }
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
  // Broadcast the evaluated (b, h) planes to the ones skipped above.
  const int64_t plane = nQ * nKV;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      if (b < Be && h < He) continue;
      const int64_t src = (std::min(b, Be - 1) * H + std::min(h, He - 1)) * plane;
      std::copy_n(out + src, plane, out + (b * H + h) * plane);
    }
  return bits;
}

Tensor bits_cpu(const Tensor& num, const Tensor& idx, const Tensor& full_num, const Tensor& full_idx) {
  const int64_t rows = num.numel(), C = idx.size(3);
  Tensor bits = zeros(idx.sizes(), kInt32);
  int32_t* out = bits.data<int32_t>();
  auto mark = [&](const Tensor& n, const Tensor& ix, int32_t bit) {
    const int32_t* pn = n.data<int32_t>();
    const int32_t* pi = ix.data<int32_t>();
    for (int64_t r = 0; r < rows; ++r)
      for (int32_t k = 0; k < pn[r]; ++k) out[r * C + pi[r * C + k]] |= bit;
  };
  mark(num, idx, kBlockPartialBit);
  if (full_num.defined()) mark(full_num, full_idx, kBlockFullBit);
  return bits;
}

// One list: rows of `bits` viewed as [P, R, C] (transposed: rows are the columns) -> num [P, rows],
// idx [P, rows, cols] with the blocks having `bit` ascending, then the others ascending.
std::pair<Tensor, Tensor> ordered(const Tensor& bits, int32_t bit, bool transposed) {
  const int64_t B = bits.size(0), H = bits.size(1), R = bits.size(2), C = bits.size(3);
  const int64_t rows = transposed ? C : R, cols = transposed ? R : C;
  const int64_t row_step = transposed ? 1 : C, col_step = transposed ? C : 1;
  Tensor num = empty({B, H, rows}, kInt32), idx = empty({B, H, rows, cols}, kInt32);
  const int32_t* in = bits.data<int32_t>();
  int32_t* n = num.data<int32_t>();
  int32_t* ix = idx.data<int32_t>();
  for (int64_t p = 0; p < B * H; ++p)
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t* d = in + p * R * C + r * row_step;
      int32_t* o = ix + (p * rows + r) * cols;
      int32_t k = 0;
      for (int64_t c = 0; c < cols; ++c)
        if (d[c * col_step] & bit) o[k++] = static_cast<int32_t>(c);
      n[p * rows + r] = k;
      for (int64_t c = 0; c < cols; ++c)
        if (!(d[c * col_step] & bit)) o[k++] = static_cast<int32_t>(c);
    }
  return {num, idx};
}

BlockLists8 lists_cpu(const Tensor& bits, bool with_full) {
  BlockLists8 l;
  std::tie(l.kv_num, l.kv_idx) = ordered(bits, kBlockPartialBit, false);
  std::tie(l.q_num, l.q_idx) = ordered(bits, kBlockPartialBit, true);
  if (with_full) {
    std::tie(l.full_kv_num, l.full_kv_idx) = ordered(bits, kBlockFullBit, false);
    std::tie(l.full_q_num, l.full_q_idx) = ordered(bits, kBlockFullBit, true);
  }
  return l;
}

std::shared_ptr<const VisitedBlocks> visited_cpu(const Tensor& num, const Tensor& full_num) {
  int64_t n = 0;
  for (const Tensor* t : {&num, &full_num}) {
    if (!t->defined()) continue;
    const int32_t* p = t->data<int32_t>();
    for (int64_t i = 0; i < t->numel(); ++i) n += p[i];
  }
  return VisitedBlocks::of(n);
}

}  // namespace

FG_REGISTER_KERNEL(block_mask_eval_stub, CPU, &eval_cpu);
FG_REGISTER_KERNEL(block_bits_stub, CPU, &bits_cpu);
FG_REGISTER_KERNEL(block_lists_stub, CPU, &lists_cpu);
FG_REGISTER_KERNEL(visited_blocks_stub, CPU, &visited_cpu);

}  // namespace fg::cpu
