// Interval arithmetic over ModPrograms (see int_ranges.h).
#include "flexgrad/attention/int_ranges.h"

#include <algorithm>

#include "flexgrad/attention/op_semantics.h"

namespace fg {

namespace {

using VK = ValueKind;

IntRange index_input(int64_t bound) { return {true, 0, std::max<int64_t>(bound, 1) - 1}; }

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
      default:  // the op table's rule (unknown without one); floats are not tracked here
        if (const auto rule = op_info(in.op).int_range) r[i] = rule(operand_ranges(p, in, r));
        break;
    }
  }
  return r;
}

OperandRanges operand_ranges(const ModProgram& p, const Instr& in, const std::vector<IntRange>& ints,
                             const std::vector<FloatRange>* floats) {
  FG_ASSERT(in.args.size() <= 3);
  OperandRanges x;
  for (size_t k = 0; k < in.args.size(); ++k) {
    const auto a = static_cast<size_t>(in.args[k]);
    x.kind[k] = p.instrs()[a].kind;
    x.i[k] = ints[a];
    if (floats) x.f[k] = (*floats)[a];
  }
  return x;
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
