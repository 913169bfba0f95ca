// Symbolic derivatives of a score_mod program, for the FlexAttention backward.
//
// The backward needs, per (b, h, q, kv):
//   dS_in = dS_out * d score_mod / d score                      (the "dscore factor")
//   grad_cap[idx(b,h,q,kv)] += dS_out * d score_mod / d cap[idx]  (for each read of a float capture)
// derive_score_mod() builds both by reverse-mode differentiation of the SSA list, emitting through
// ProgramBuilder (so the result is folded and CSE'd: `s * s` gives `2.0 * score`, the softcap
// `20 * tanh(s / 20)` gives `1.0 - tanh(score / 20.0) * tanh(score / 20.0)`), into ONE multi-output
// program that a TileEvaluator evaluates in a single pass:
//   output 0                          d score_mod / d score
//   per term t: outputs index_output .. index_output + ndim - 1  the int index of each dim
//               output  deriv_output                            d score_mod / d cap[index]
#pragma once
#include <vector>

#include "flexgrad/attention/mod_program.h"

namespace fg {

// One read of a float captured tensor (an Index node); several reads of one tensor are several terms.
struct CaptureGradTerm {
  int32_t capture;       // slot in ScoreModBackward::captures (= the forward program's captures)
  int32_t ndim;          // number of index outputs
  int32_t index_output;  // first index output of `program`
  int32_t deriv_output;  // derivative output of `program`
};

struct ScoreModBackward {
  ModProgram program;                 // outputs as described above
  // The score_mod and d score_mod / d score as one program (outputs "score_mod", "d_score"): built in the same
  // builder, so the derivative reuses the forward's instructions (softcap's tanh(score / 20) is one instruction),
  // for evaluators that need both at an entry (the cuDNN backward graph, the generated fg_score_elem_dscore).
  // Output 0's instructions are the forward's, in the forward's order (re-emitting a builder's own output folds
  // nothing further), so it computes the forward's value exactly; output 1 is `program`'s output 0 exactly.
  ModProgram value_and_dscore;
  std::vector<CaptureGradTerm> terms;
  // The forward's captured tensors; terms index this (the derivative program may not read all of them:
  // `score + bias[h]` has derivative 1 and only needs h as the index).
  std::vector<CaptureRef> captures;
  // True when d score_mod / d score does not depend on the tile (e.g. `score + bias`: 1), so a kernel can
  // skip evaluating it.
  bool dscore_is_constant = false;
  double dscore_constant = 0;  // its value when constant
};

// ValueError if `forward` is not a score_mod program.
ScoreModBackward derive_score_mod(const ModProgram& forward);

}  // namespace fg
