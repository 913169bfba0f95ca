// The reference path of flex_attention: the traced mods evaluated over materialised [B, H, Lq, Lkv]
// scores with differentiable ops. It is the float64 golden of the tests and the eager reference in low
// precision; its memory is O(B * H * Lq * Lkv).
#pragma once
#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/mod_program.h"

namespace fg {

struct FlexReferenceInputs {
  Tensor q, k, v;  // as given by the user (any layout), same dtype
  double scale = 1.0;
  const ModProgram* score_mod = nullptr;  // null: identity
  const BlockMask* block_mask = nullptr;  // null: every key allowed
};

// Returns out, lse and max_scores (all differentiable where float).
FlexAttentionResult flex_attention_reference(const FlexReferenceInputs& in);

// Evaluates a program over tensors: inputs broadcast as b [B,1,1,1], h [1,H,1,1], q [1,1,Lq,1],
// kv [1,1,1,Lkv] (int64) and `score`; float values computed in `float_dtype`.
Tensor evaluate_program_on_tensors(const ModProgram& program, const Tensor& score, int64_t B, int64_t H, int64_t Lq,
                                   int64_t Lkv, DType float_dtype, Device device);

}  // namespace fg
