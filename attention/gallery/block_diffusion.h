// Block Diffusion (BD3-LM) training mask over the concatenation [x_t (noised) ; x_0 (clean)] of one sequence.
#pragma once
#include <cstdint>

#include "flexgrad/attention/expr.h"

namespace fg {

// Over 2 seq_len positions: noised = index < seq_len, block = (index % seq_len) // block_size;
// (same block and both noised or both clean)          block-diagonal within each half
// or (q block > kv block and q noised and kv clean)   noised tokens see the clean earlier blocks
// or (q block >= kv block and both clean)             the clean half is block-causal.
// Source: Arriola et al., "Block Diffusion: Interpolating Between Autoregressive and Diffusion Language
// Models", ICLR 2025 (arXiv:2503.09573); attention-gym attn_gym/masks/block_diffusion.py.
// ValueError when seq_len < 1 or block_size < 1.
MaskMod block_diffusion_mask(int64_t seq_len, int64_t block_size);

}  // namespace fg
