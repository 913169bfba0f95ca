// Tanh soft-capping of attention logits.
#pragma once

#include "flexgrad/attention/expr.h"

namespace fg {

// cap * tanh(score / cap): scores squashed smoothly into (-cap, cap).
// Source: Bello et al., "Neural Combinatorial Optimization with Reinforcement Learning", 2016 (logit
// clipping with tanh); Gemma Team, "Gemma 2: Improving Open Language Models at a Practical Size", 2024
// (attention soft-capping at 50); attention-gym attn_gym/mods/softcapping.py.
// ValueError unless cap is finite and > 0.
ScoreMod tanh_softcap_score_mod(double cap);

}  // namespace fg
