// Sliding-window masks: local attention over a band around the diagonal, its dilated form and Longformer's
// global tokens on top of it.
#pragma once
#include <cstdint>

#include "flexgrad/attention/expr.h"

namespace fg {

// q >= kv and q - kv <= window: causal, at most `window` tokens back (window + 1 keys per query).
// Source: Child et al., "Generating Long Sequences with Sparse Transformers", 2019 (local attention);
// Jiang et al., "Mistral 7B", 2023 (sliding-window attention); attention-gym attn_gym/masks/sliding_window.py.
// ValueError when window < 0.
MaskMod sliding_window_mask(int64_t window);

// |q - kv| <= window and |q - kv| % dilation == 0: a bidirectional band that keeps every dilation-th key.
// Source: Beltagy, Peters, Cohan, "Longformer: The Long-Document Transformer", 2020, section 3.1 ("dilated
// sliding window"). ValueError when window < 0 or dilation < 1.
MaskMod dilated_sliding_window_mask(int64_t window, int64_t dilation);

// |q - kv| <= window or is_global[q] or is_global[kv]: a bidirectional band plus global tokens that see and
// are seen by every position. is_global is a 1-D bool tensor over the positions (captured, read in place, on
// any device); a position past its end is an IndexError when the mask is evaluated.
// Source: Beltagy, Peters, Cohan, "Longformer: The Long-Document Transformer", 2020, section 3.1 ("global
// attention"). ValueError when window < 0; ShapeError / DTypeError for an is_global that is not a 1-D bool tensor.
MaskMod global_sliding_window_mask(int64_t window, const Tensor& is_global);

}  // namespace fg
