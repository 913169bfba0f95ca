// Internal to attention/cuda: the block-list half of BlockMask on CUDA (block_mask_lists.cu), kept
// apart from the host glue so that only the kernels go through nvcc. See attention/block_mask_kernels.h
// for the block bits and the list order.
#pragma once
#include "flexgrad/attention/block_mask_kernels.h"

namespace fg::cuda {

// Bits [B, H, R, C] -> the eight list fields: one warp per (list, row) does a stable partition of the row
// (ballot scans), so each row holds its blocks ascending, then the absent ones ascending.
BlockLists8 block_lists_cuda(const Tensor& bits, bool with_full);
// Lists -> bits: a scatter of each row's first num entries (atomicOr of the partial / full bit).
Tensor block_bits_cuda(const Tensor& num, const Tensor& idx, const Tensor& full_num, const Tensor& full_idx);

}  // namespace fg::cuda
