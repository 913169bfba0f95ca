// Interval arithmetic over ModPrograms (see int_ranges.h).
#include "flexgrad/attention/int_ranges.h"

#include <algorithm>

namespace fg {

namespace {

using VK = ValueKind;

IntRange range_of(__int128 lo, __int128 hi) {
  if (lo < INT64_MIN || hi > INT64_MAX) return {};
  return {true, static_cast<int64_t>(lo), static_cast<int64_t>(hi)};
}

IntRange index_input(int64_t bound) { return {true, 0, std::max<int64_t>(bound, 1) - 1}; }

// Python's floor division for d > 0.
__int128 floor_div_pos(__int128 n, __int128 d) { return n >= 0 ? n / d : -((-n + d - 1) / d); }

}  // namespace

std::vector<IntRange> int_ranges(const ModProgram& p, const IndexBounds& bounds) {
  const auto& ins = p.instrs();
  std::vector<IntRange> r(ins.size());
  for (size_t i = 0; i < ins.size(); ++i) {
    const Instr& in = ins[i];
    if (in.kind == VK::Bool) {
      r[i] = {true, 0, 1};
      continue;
    }
    if (in.kind != VK::Int) continue;
    auto arg = [&](int k) { return r[in.args[k]]; };
    const bool both = in.args.size() >= 2 && arg(0).known && arg(1).known;
    switch (in.op) {
      case ExprOp::Const: r[i] = {true, in.ivalue, in.ivalue}; break;
      case ExprOp::Batch: r[i] = index_input(bounds.batch); break;
      case ExprOp::Head: r[i] = index_input(bounds.head); break;
      case ExprOp::QIdx: r[i] = index_input(bounds.q); break;
      case ExprOp::KVIdx: r[i] = index_input(bounds.kv); break;
      case ExprOp::Index: {
        const DType dt = p.captures()[in.capture].tensor.dtype();
        if (dt == kInt32) r[i] = {true, INT32_MIN, INT32_MAX};
        if (dt == kBool) r[i] = {true, 0, 1};
        break;
      }
      case ExprOp::Cast:
        if (ins[in.args[0]].kind == VK::Bool) r[i] = {true, 0, 1};
        if (ins[in.args[0]].kind == VK::Int) r[i] = arg(0);
        break;
      case ExprOp::Add:
        if (both) r[i] = range_of(static_cast<__int128>(arg(0).lo) + arg(1).lo, static_cast<__int128>(arg(0).hi) + arg(1).hi);
        break;
      case ExprOp::Sub:
        if (both) r[i] = range_of(static_cast<__int128>(arg(0).lo) - arg(1).hi, static_cast<__int128>(arg(0).hi) - arg(1).lo);
        break;
      case ExprOp::Mul:
        if (both) {
          const __int128 c[4] = {static_cast<__int128>(arg(0).lo) * arg(1).lo, static_cast<__int128>(arg(0).lo) * arg(1).hi,
                                 static_cast<__int128>(arg(0).hi) * arg(1).lo, static_cast<__int128>(arg(0).hi) * arg(1).hi};
          r[i] = range_of(std::min({c[0], c[1], c[2], c[3]}), std::max({c[0], c[1], c[2], c[3]}));
        }
        break;
      case ExprOp::FloorDiv:
        // Only positive divisors: floor(n / d) is then monotone in n and in d, so the corners bound it.
        if (both && arg(1).lo > 0) {
          const __int128 c[4] = {floor_div_pos(arg(0).lo, arg(1).lo), floor_div_pos(arg(0).lo, arg(1).hi),
                                 floor_div_pos(arg(0).hi, arg(1).lo), floor_div_pos(arg(0).hi, arg(1).hi)};
          r[i] = range_of(std::min({c[0], c[1], c[2], c[3]}), std::max({c[0], c[1], c[2], c[3]}));
        }
        break;
      case ExprOp::Mod:
        // Python's % takes the divisor's sign: in [0, d) for d > 0 (and n itself when 0 <= n < d).
        if (both && arg(1).lo > 0) {
          r[i] = (arg(0).lo >= 0 && arg(0).hi < arg(1).lo) ? arg(0) : IntRange{true, 0, arg(1).hi - 1};
        }
        break;
      case ExprOp::Neg:
        if (arg(0).known) r[i] = range_of(-static_cast<__int128>(arg(0).hi), -static_cast<__int128>(arg(0).lo));
        break;
      case ExprOp::Abs:  // abs(INT64_MIN) wraps: only ranges without it
        if (arg(0).known && arg(0).lo > INT64_MIN) {
          const IntRange a = arg(0);
          r[i] = a.lo >= 0 ? a : a.hi <= 0 ? IntRange{true, -a.hi, -a.lo} : IntRange{true, 0, std::max(-a.lo, a.hi)};
        }
        break;
      case ExprOp::Min:
      case ExprOp::Max: {
        // An unknown operand is still some int64: min(x, 3) <= 3 and max(x, 0) >= 0 whatever x is (clamp).
        const IntRange a = arg(0).known ? arg(0) : IntRange{true, INT64_MIN, INT64_MAX};
        const IntRange c = arg(1).known ? arg(1) : IntRange{true, INT64_MIN, INT64_MAX};
        r[i] = in.op == ExprOp::Min ? IntRange{true, std::min(a.lo, c.lo), std::min(a.hi, c.hi)}
                                    : IntRange{true, std::max(a.lo, c.lo), std::max(a.hi, c.hi)};
        break;
      }
      case ExprOp::Where:
        if (arg(1).known && arg(2).known) r[i] = {true, std::min(arg(1).lo, arg(2).lo), std::max(arg(1).hi, arg(2).hi)};
        break;
      default: break;  // unknown
    }
  }
  return r;
}

bool can_fail(const ModProgram* p, const IndexBounds& bounds) {
  if (!p) return false;
  const std::vector<IntRange> r = int_ranges(*p, bounds);
  const auto& ins = p->instrs();
  for (const Instr& in : ins) {
    if (in.op == ExprOp::Index) {
      const Tensor& t = p->captures()[in.capture].tensor;
      for (size_t d = 0; d < in.args.size(); ++d) {
        const IntRange& x = r[in.args[d]];
        const int64_t n = t.size(static_cast<int64_t>(d));
        if (!x.known || x.lo < -n || x.hi >= n) return true;  // also every read of an empty dim
      }
    } else if (in.kind != VK::Float && (in.op == ExprOp::FloorDiv || in.op == ExprOp::Mod)) {
      const IntRange& d = r[in.args[1]];
      if (!d.known || (d.lo <= 0 && d.hi >= 0)) return true;
    } else if (in.kind != VK::Float && in.op == ExprOp::Pow) {
      const IntRange& e = r[in.args[1]];
      if (!e.known || e.lo < 0) return true;
    }
  }
  return false;
}

}  // namespace fg
