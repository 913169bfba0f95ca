// Interval arithmetic over float values (see float_ranges.h).
#include "flexgrad/attention/float_ranges.h"

#include <cmath>
#include <limits>

#include "flexgrad/attention/int_ranges.h"
#include "flexgrad/attention/op_semantics.h"

namespace fg {

namespace {

using VK = ValueKind;
constexpr double kInf = std::numeric_limits<double>::infinity();

}  // namespace

std::vector<FloatRange> float_ranges(const ModProgram& p) {
  const auto& ins = p.instrs();
  const std::vector<IntRange> ints = int_ranges(p);
  std::vector<FloatRange> r(ins.size());
  for (size_t i = 0; i < ins.size(); ++i) {
    const Instr& in = ins[i];
    if (in.kind != VK::Float) {
      r[i].may_nan = false;
      continue;
    }
    switch (in.op) {
      case ExprOp::Const:  // an infinite or NaN one: unbounded
        r[i] = std::isfinite(in.value) ? FloatRange{in.value, in.value, false, false}
                                       : FloatRange{-kInf, kInf, std::isnan(in.value), false};
        break;
      case ExprOp::Score:
        r[i] = FloatRange{-kInf, kInf, false, true};
        break;
      default:  // the op table's rule (unknown without one: a float captured read, floor, pow, ...)
        if (const auto rule = op_info(in.op).float_range) r[i] = rule(operand_ranges(p, in, ints, &r));
        break;
    }
  }
  return r;
}

bool dscore_needs_no_zero_test(const ModProgram& value_and_dscore) {
  if (value_and_dscore.outputs().size() < 2) return false;
  const std::vector<FloatRange> r = float_ranges(value_and_dscore);
  const FloatRange& value = r[static_cast<size_t>(value_and_dscore.outputs()[0])];
  const FloatRange& d = r[static_cast<size_t>(value_and_dscore.outputs()[1])];
  return d.finite() && !d.may_nan && value.nan_on_nan_score;
}

}  // namespace fg
