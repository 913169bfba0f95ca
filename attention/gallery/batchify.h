// Batchify: one long sequence cut into independent consecutive chunks of n tokens, any mask inside each.
#pragma once
#include <cstdint>

#include "flexgrad/attention/expr.h"

namespace fg {

// q // n == kv // n and inner(b, h, q % n, kv % n): `inner` sees chunk-local positions, so several short
// sequences of equal length n run as one (batchify(causal, n) is block-diagonal causal).
// Source: attention-gym attn_gym/masks/batchify.py (batchify_mask_mod); Llama 4's chunked attention is
// batchify(causal, chunk). ValueError when n < 1 or inner is empty.
MaskMod batchify_mask(int64_t n, MaskMod inner);

}  // namespace fg
