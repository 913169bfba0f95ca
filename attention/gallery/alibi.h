// ALiBi: a linear penalty on the query-key distance, one slope per head, instead of position embeddings.
#pragma once
#include <cstdint>

#include "flexgrad/attention/expr.h"

namespace fg {

// score + (kv - q) * 2^(-8 (h + 1) / heads): the slopes 2^(-8/H), 2^(-16/H), ... of the paper, computed in
// the mod (no table). Source: Press, Smith, Lewis, "Train Short, Test Long: Attention with Linear Biases
// Enables Input Length Extrapolation", ICLR 2022; attention-gym attn_gym/mods/alibi.py.
// ValueError when heads < 1.
ScoreMod alibi_score_mod(int64_t heads);

}  // namespace fg
