// Interval arithmetic over float values (see float_ranges.h).
#include "flexgrad/attention/float_ranges.h"

#include <algorithm>
#include <cmath>
#include <functional>

#include "flexgrad/attention/int_ranges.h"
#include "flexgrad/attention/op_semantics.h"

namespace fg {

namespace {

using VK = ValueKind;
constexpr double kInf = std::numeric_limits<double>::infinity();

bool contains_zero(const FloatRange& r) { return r.lo <= 0 && r.hi >= 0; }

// A finite interval from its corner values, else unbounded.
FloatRange bounded(double lo, double hi, bool may_nan, bool nan_on_nan_score) {
  FloatRange r;
  r.may_nan = may_nan;
  r.nan_on_nan_score = nan_on_nan_score;
  if (std::isfinite(lo) && std::isfinite(hi)) {
    r.lo = lo;
    r.hi = hi;
  }
  return r;
}

// a op b over finite intervals where op is monotone in each operand on them (* anywhere, / away from 0): the
// corners bound it.
template <class Op>
FloatRange corners(const FloatRange& a, const FloatRange& b, Op op, bool may_nan, bool nan_on_nan_score) {
  const double c[4] = {op(a.lo, b.lo), op(a.lo, b.hi), op(a.hi, b.lo), op(a.hi, b.hi)};
  return bounded(std::min({c[0], c[1], c[2], c[3]}), std::max({c[0], c[1], c[2], c[3]}), may_nan, nan_on_nan_score);
}

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
    auto arg = [&](int k) -> const FloatRange& { return r[in.args[k]]; };
    const OpInfo& info = op_info(in.op);
    switch (in.op) {
      case ExprOp::Const:
        r[i] = bounded(in.value, in.value, std::isnan(in.value), false);  // (an infinite one: unbounded)
        break;
      case ExprOp::Score:
        r[i] = FloatRange{-kInf, kInf, false, true};
        break;
      case ExprOp::Cast: {  // from an int or a bool: finite whatever it is
        if (ins[in.args[0]].kind == VK::Float) {
          r[i] = arg(0);
          break;
        }
        const IntRange& a = ints[in.args[0]];
        r[i] = a.known ? FloatRange{static_cast<double>(a.lo), static_cast<double>(a.hi), false, false}
                       : FloatRange{-9.3e18, 9.3e18, false, false};
        break;
      }
      case ExprOp::Neg:
        r[i] = FloatRange{-arg(0).hi, -arg(0).lo, arg(0).may_nan, arg(0).nan_on_nan_score};
        break;
      case ExprOp::Abs: {
        const FloatRange& a = arg(0);
        const double m = std::max(std::fabs(a.lo), std::fabs(a.hi));
        r[i] = FloatRange{contains_zero(a) ? 0.0 : std::min(std::fabs(a.lo), std::fabs(a.hi)), m, a.may_nan,
                          a.nan_on_nan_score};
        break;
      }
      case ExprOp::Exp:  // exp(-inf) = 0, exp(inf) = inf: monotone
        r[i] = FloatRange{std::exp(arg(0).lo), std::exp(arg(0).hi), arg(0).may_nan, arg(0).nan_on_nan_score};
        break;
      case ExprOp::Add:
      case ExprOp::Sub: {
        const FloatRange &a = arg(0), &b = arg(1);
        // inf - inf is NaN: only where both may be infinite.
        const bool nan = a.may_nan || b.may_nan || (!a.finite() && !b.finite());
        const bool add = in.op == ExprOp::Add;
        r[i] = a.finite() && b.finite() ? bounded(add ? a.lo + b.lo : a.lo - b.hi, add ? a.hi + b.hi : a.hi - b.lo,
                                                  nan, a.nan_on_nan_score || b.nan_on_nan_score)
                                        : FloatRange{-kInf, kInf, nan, a.nan_on_nan_score || b.nan_on_nan_score};
        break;
      }
      case ExprOp::Mul: {
        const FloatRange &a = arg(0), &b = arg(1);
        // inf * 0 is NaN.
        const bool nan = a.may_nan || b.may_nan || (!a.finite() && contains_zero(b)) || (!b.finite() && contains_zero(a));
        const bool non = a.nan_on_nan_score || b.nan_on_nan_score;
        r[i] = a.finite() && b.finite() ? corners(a, b, std::multiplies<double>(), nan, non)
                                        : FloatRange{-kInf, kInf, nan, non};
        break;
      }
      case ExprOp::Div: {
        const FloatRange &a = arg(0), &b = arg(1);
        // 0 / 0 and inf / inf are NaN; x / 0 is infinite.
        const bool nan = a.may_nan || b.may_nan || (contains_zero(a) && contains_zero(b)) || (!a.finite() && !b.finite());
        const bool non = a.nan_on_nan_score || b.nan_on_nan_score;
        r[i] = a.finite() && b.finite() && !contains_zero(b) ? corners(a, b, std::divides<double>(), nan, non)
                                                             : FloatRange{-kInf, kInf, nan, non};
        break;
      }
      case ExprOp::Where: {
        const FloatRange &a = arg(1), &b = arg(2);
        r[i] = FloatRange{std::min(a.lo, b.lo), std::max(a.hi, b.hi), a.may_nan || b.may_nan,
                          a.nan_on_nan_score && b.nan_on_nan_score};
        break;
      }
      default:
        // An op whose result has bounds for every operand (the op table's range: tanh, sigmoid), NaN only from a
        // NaN operand; anything else: unknown.
        if (info.arity == 1 && std::isfinite(info.range_lo) && std::isfinite(info.range_hi)) {
          r[i] = FloatRange{info.range_lo, info.range_hi, arg(0).may_nan, arg(0).nan_on_nan_score};
        }
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
