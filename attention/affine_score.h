// A score_mod read as out_factor * core(in_factor * score): a constant factor where the program first reads the
// score and one on its result, as softcap's `20 * tanh(score / 20)` (in 1/20, out 20, core tanh).
//
// The tensor-core kernels already multiply every entry by constants of their own (the softmax scale on q.k, log2 e
// in the exponent): under FlexKernelOptions::approx_math (mod_codegen.h) the generated code hands them the form, and
// they fold in_factor into the scale and out_factor into the exponent's constant, so the factors cost no
// instruction an entry (softcap: two multiplications an entry fewer in the forward and in both backward kernels).
// The folded product rounds once where the program rounds twice: an approximation, taken only under approx_math.
#pragma once
#include <optional>

#include "flexgrad/attention/mod_program.h"

namespace fg {

struct AffineScoreForm {
  double in_factor = 1;       // finite, nonzero
  double out_factor = 1;      // finite, > 0: the softmax's running max of core values is out_factor times smaller
  int32_t scaled_score = -1;  // the instruction of the program that computes in_factor * score (-1: in_factor 1)
  ModProgram core;            // a score_mod program: core(x), x standing for in_factor * score
};

// The form of score_mod program `p`, when it has one: its output is `c * y`, `y * c` or `y / d` with c (1 / d) a
// positive finite float constant (nullopt otherwise: a sum at the output, a negative factor, a mask_mod program).
// in_factor is k where the score's one reader is `score * k`, `k * score` or `score / d` (k = 1 / d; finite and
// nonzero), else 1. core(x) is p with that reader replaced by the input x and the factor on the output dropped, so
// p(s) = out_factor * core(in_factor * s) up to the rounding of the factors' products.
std::optional<AffineScoreForm> affine_score_form(const ModProgram& p);

}  // namespace fg
