// Causal masks: the autoregressive mask and the prefix-LM mask built on it.
#pragma once
#include <cstdint>

#include "flexgrad/attention/expr.h"

namespace fg {

// q >= kv: each token sees itself and the past.
// Source: Vaswani et al., "Attention Is All You Need", NeurIPS 2017 (the decoder's masked self-attention);
// attention-gym attn_gym/masks/causal.py.
MaskMod causal_mask();

// kv < prefix_length or q >= kv: bidirectional over the first prefix_length tokens (the prompt), causal after.
// Source: Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
// (T5), JMLR 2020, section 3.2.3 ("prefix LM"); attention-gym attn_gym/masks/prefix_lm.py.
// ValueError when prefix_length < 0.
MaskMod prefix_lm_mask(int64_t prefix_length);

}  // namespace fg
