// The backends of BlockMask, one implementation per device (DispatchStub): BlockMask's methods are
// device-agnostic and call these (CPU: attention/cpu/block_mask_cpu.cpp, CUDA:
// attention/cuda/block_mask_cuda.cpp).
//
// Between the steps a mask is held as "block bits", int32 [B, H, nQ, nKV] on the mask's device:
//   bit 0 (1)  the block is in the partial list (kv_indices)
//   bit 1 (2)  the block is in the full list (full_kv_indices)
// create_block_mask sets at most one bit per block; from_kv_blocks keeps whatever the caller listed, so a
// block given in both lists stays in both.
#pragma once
#include "flexgrad/attention/block_mask.h"
#include "flexgrad/attention/visited_blocks.h"
#include "flexgrad/ops/dispatch.h"

namespace fg {

inline constexpr int32_t kBlockPartialBit = 1;
inline constexpr int32_t kBlockFullBit = 2;

// The eight block-list fields of a BlockMask, int32 contiguous on the bits' device (the full ones
// undefined when the lists were built without full blocks).
struct BlockLists8 {
  Tensor kv_num, kv_idx, full_kv_num, full_kv_idx;  // rows = q blocks
  Tensor q_num, q_idx, full_q_num, full_q_idx;      // rows = kv blocks (the transposes)
};

// Evaluates `mask` over every (b, h, q block, kv block) on `device` and classifies the blocks: bits
// [B, H, nQ, nKV] with 0 (empty), kBlockPartialBit or kBlockFullBit. Padding past Q_LEN / KV_LEN counts
// as masked. Captured tensors are read on `device` (DeviceError otherwise).
using BlockMaskEvalFn = Tensor (*)(const ModProgram& mask, int64_t B, int64_t H, int64_t Q_LEN, int64_t KV_LEN,
                                   BlockSize block_size, Device device);
// Block lists -> bits. num [B, H, R] / idx [B, H, R, C] int32 contiguous, already validated; the full
// pair may be undefined.
using BlockBitsFn = Tensor (*)(const Tensor& num, const Tensor& idx, const Tensor& full_num, const Tensor& full_idx);
// Bits -> the eight list fields, in PyTorch's order: each row lists its blocks ascending, then the
// absent ones ascending (the stable descending argsort of the dense mask).
using BlockListsFn = BlockLists8 (*)(const Tensor& bits, bool with_full);
// The forward lists' visited-block count (visited_blocks.h): num [B, H, R] int32 contiguous, full_num the same or
// undefined. The CPU sums them at once; CUDA sums them on the GPU, queued behind the kernels that wrote them, and
// copies the count back without waiting for it.
using VisitedBlocksFn = std::shared_ptr<const VisitedBlocks> (*)(const Tensor& num, const Tensor& full_num);

FG_DECLARE_STUB(BlockMaskEvalFn, block_mask_eval_stub);
FG_DECLARE_STUB(BlockBitsFn, block_bits_stub);
FG_DECLARE_STUB(BlockListsFn, block_lists_stub);
FG_DECLARE_STUB(VisitedBlocksFn, visited_blocks_stub);

}  // namespace fg
