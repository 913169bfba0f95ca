// Block Diffusion mask (see block_diffusion.h).
#include "flexgrad/attention/gallery/block_diffusion.h"

namespace fg {

MaskMod block_diffusion_mask(int64_t seq_len, int64_t block_size) {
  FG_CHECK(seq_len >= 1, ValueError, "block_diffusion_mask: seq_len must be >= 1, got {}", seq_len);
  FG_CHECK(block_size >= 1, ValueError, "block_diffusion_mask: block_size must be >= 1, got {}", block_size);
  return [seq_len, block_size](Expr, Expr, Expr q, Expr kv) {
    Expr q_noised = q < seq_len, kv_noised = kv < seq_len;
    Expr q_clean = !q_noised, kv_clean = !kv_noised;
    Expr qb = floor_div(q % seq_len, block_size), kvb = floor_div(kv % seq_len, block_size);
    Expr diagonal = (qb == kvb) & ((q_noised & kv_noised) | (q_clean & kv_clean));
    Expr offset_causal = (qb > kvb) & q_noised & kv_clean;
    Expr clean_causal = (qb >= kvb) & q_clean & kv_clean;
    return diagonal | offset_causal | clean_causal;
  };
}

}  // namespace fg
