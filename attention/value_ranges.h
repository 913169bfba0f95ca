// The value ranges of a ModProgram's interval analyses (int_ranges.h, float_ranges.h) and what the op table's
// interval rules (OpInfo::int_range / float_range, op_semantics.h) take and give: the analyses handle the leaves
// (constants, inputs, captured reads), each op's row the rest.
#pragma once
#include <cstdint>
#include <limits>

#include "flexgrad/attention/expr.h"

namespace fg {

// The values an Int (or Bool: {0, 1}) instruction can take.
struct IntRange {
  bool known = false;
  int64_t lo = 0, hi = 0;  // inclusive, when known
};

// The values a Float instruction can take, for any score that is not NaN (see float_ranges.h).
struct FloatRange {
  double lo = -std::numeric_limits<double>::infinity();
  double hi = std::numeric_limits<double>::infinity();
  bool may_nan = true;            // may be NaN for a score that is not NaN
  bool nan_on_nan_score = false;  // is NaN whenever the score is NaN (whatever the other inputs)
  // Bounds far inside float's range (|x| <= 1e30), so that rounding, contraction into FMAs or float32
  // arithmetic cannot take a value in them to infinity.
  bool finite() const { return lo >= -1e30 && hi <= 1e30; }
};

// An instruction's operands as the interval rules see them: each one's kind, its IntRange (ints and bools;
// bools are {0, 1}) and its FloatRange (floats). An analysis that does not track a kind leaves it unknown.
struct OperandRanges {
  ValueKind kind[3] = {};
  IntRange i[3];
  FloatRange f[3];
};

}  // namespace fg
