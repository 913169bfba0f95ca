// Float value ranges of a ModProgram's instructions by interval arithmetic, for any score that is not NaN (±inf
// included) and any index / captured input. Two users: the backward's element step multiplies dS by d score_mod /
// d score without first testing dS for zero where that derivative is provably finite (dscore_needs_no_zero_test),
// since 0 * d can only differ from 0 where d is infinite or NaN; and the code generator bounds the affine form's core
// with its output's range (FG_SCORE_CORE_LO / _HI, mod_codegen.cpp) for the forward's bounded max.
// Ranges are sound: every value the op table's semantics (attention/op_semantics.h) can produce lies in [lo, hi],
// and is NaN only where may_nan says it may be; "unknown" (infinite bounds, may_nan) is always allowed. (The
// approximate spellings of FlexKernelOptions::approx_math may step an ulp or so outside a bound: finite() leaves
// room for that.) The analysis bounds the leaves (constants, the score) and every other instruction gets its op
// table row's rule (OpInfo::float_range, op_semantics.h), given its operands' float ranges and, for int and bool
// operands, their int_ranges.
#pragma once
#include <vector>

#include "flexgrad/attention/mod_program.h"
#include "flexgrad/attention/value_ranges.h"

namespace fg {

// The range of every Float instruction (other kinds: FloatRange{} with may_nan false; they are never NaN).
std::vector<FloatRange> float_ranges(const ModProgram& p);

// For ScoreModBackward::value_and_dscore (output 0: the score_mod, output 1: d score_mod / d score): whether the
// derivative is finite and not NaN for every score that is not NaN, and the score_mod NaN wherever the score is.
// Then dS * d equals the guarded `dS != 0 ? dS * d : 0` up to the sign of a zero: where the score is NaN, P and
// so dS are NaN already.
bool dscore_needs_no_zero_test(const ModProgram& value_and_dscore);

}  // namespace fg
