#include "flexgrad/attention/kv_band.h"

#include <algorithm>
#include <limits>

#include <fmt/format.h>

namespace fg {
namespace {

// A value known to equal q_coef * q + kv_coef * kv + offset exactly. The bounds keep every such value, and
// every sum or difference of two of them, far inside int64 for q, kv < 2^31: no operation can wrap.
struct Affine {
  int64_t q = 0, kv = 0, offset = 0;
};
constexpr int64_t kMaxCoef = int64_t{1} << 16;
constexpr int64_t kMaxOffset = int64_t{1} << 40;
bool within(int64_t x, int64_t m) { return x >= -m && x <= m; }  // (no std::abs: INT64_MIN has no absolute value)
bool bounded(const Affine& a) {
  return within(a.q, kMaxCoef) && within(a.kv, kMaxCoef) && within(a.offset, kMaxOffset);
}

// The affine value of every Int instruction that has one.
std::vector<std::optional<Affine>> affine_values(const ModProgram& p) {
  const std::vector<Instr>& in = p.instrs();
  std::vector<std::optional<Affine>> v(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    const Instr& x = in[i];
    if (x.kind != ValueKind::Int) continue;
    auto arg = [&](int k) -> const std::optional<Affine>& { return v[x.args[k]]; };
    std::optional<Affine> r;
    switch (x.op) {
      case ExprOp::QIdx: r = Affine{1, 0, 0}; break;
      case ExprOp::KVIdx: r = Affine{0, 1, 0}; break;
      case ExprOp::Const: r = Affine{0, 0, x.ivalue}; break;
      case ExprOp::Neg:
        if (arg(0)) r = Affine{-arg(0)->q, -arg(0)->kv, -arg(0)->offset};
        break;
      case ExprOp::Add:
      case ExprOp::Sub:
        if (arg(0) && arg(1)) {
          const int64_t s = x.op == ExprOp::Add ? 1 : -1;
          r = Affine{arg(0)->q + s * arg(1)->q, arg(0)->kv + s * arg(1)->kv, arg(0)->offset + s * arg(1)->offset};
        }
        break;
      case ExprOp::Mul:  // by a constant only (a product of two indices is not affine)
        for (int k = 0; k < 2 && !r; ++k) {
          const std::optional<Affine>& c = arg(k);
          const std::optional<Affine>& o = arg(1 - k);
          if (c && o && c->q == 0 && c->kv == 0 && within(c->offset, kMaxCoef))
            r = Affine{c->offset * o->q, c->offset * o->kv, c->offset * o->offset};
        }
        break;
      default: break;
    }
    if (r && bounded(*r)) v[i] = r;
  }
  return v;
}

// Adds `d OP 0` (d = a - b of a comparison) to the band; false when it is not a band constraint.
bool add_constraint(KvBand& band, ExprOp op, Affine d) {
  // Normalise to d >= 0 or d == 0 over integers: d < 0 <=> -d - 1 >= 0; d <= 0 <=> -d >= 0; d > 0 <=> d - 1 >= 0.
  auto neg = [](Affine a) { return Affine{-a.q, -a.kv, -a.offset}; };
  std::vector<Affine> ge0;  // each: value >= 0
  switch (op) {
    case ExprOp::Ge: ge0 = {d}; break;
    case ExprOp::Gt: ge0 = {Affine{d.q, d.kv, d.offset - 1}}; break;
    case ExprOp::Le: ge0 = {neg(d)}; break;
    case ExprOp::Lt: ge0 = {Affine{-d.q, -d.kv, -d.offset - 1}}; break;
    case ExprOp::Eq: ge0 = {d, neg(d)}; break;
    default: return false;  // Ne keeps two intervals
  }
  for (const Affine& a : ge0) {
    // a.q q + a.kv kv + a.offset >= 0
    if (a.kv == 0) band.row_conditions.push_back({a.q, a.offset});
    else if (a.kv == 1) band.lower.push_back({-a.q, -a.offset});   // kv >= -a.q q - a.offset
    else if (a.kv == -1) band.upper.push_back({a.q, a.offset});    // kv <= a.q q + a.offset
    else return false;  // kv's coefficient beyond +-1: the bound would need a division
  }
  return true;
}

ExprOp flipped(ExprOp op) {  // a OP b <=> b flipped(OP) a
  switch (op) {
    case ExprOp::Le: return ExprOp::Ge;
    case ExprOp::Lt: return ExprOp::Gt;
    case ExprOp::Ge: return ExprOp::Le;
    case ExprOp::Gt: return ExprOp::Lt;
    default: return op;
  }
}

std::string describe(const ModProgram& p, int32_t id) {
  return fmt::format("instruction {} ({})", id, expr_op_name(p.instrs()[id].op));
}

// `abs(A) OP B` with OP <= or < (B on the right after flipping): A OP B and -A OP B, a band when A and B are affine.
// abs(A) >= B is a union of two intervals: no band.
bool add_abs_bound(const ModProgram& p, const std::vector<std::optional<Affine>>& aff, int32_t abs_id, ExprOp op,
                   const std::optional<Affine>& b, KvBand& band, std::string& why) {
  const std::optional<Affine>& a = aff[p.instrs()[abs_id].args[0]];
  if (op != ExprOp::Le && op != ExprOp::Lt) {
    why = fmt::format("{} bounds abs() from below (two intervals per row)", describe(p, abs_id));
    return false;
  }
  if (!a || !b) {
    why = fmt::format("{} compares values that are not integer combinations of q_idx and kv_idx", describe(p, abs_id));
    return false;
  }
  const Affine neg_a{-a->q, -a->kv, -a->offset};
  auto diff = [&](const Affine& x) { return Affine{x.q - b->q, x.kv - b->kv, x.offset - b->offset}; };
  if (!add_constraint(band, op, diff(*a)) || !add_constraint(band, op, diff(neg_a))) {
    why = fmt::format("{}: kv_idx's coefficient is beyond +-1", describe(p, abs_id));
    return false;
  }
  return true;
}

// Walks the And tree under `id`, adding each conjunct; false (with the reason) when one is not a band constraint.
bool collect(const ModProgram& p, const std::vector<std::optional<Affine>>& aff, int32_t id, KvBand& band,
             std::string& why) {
  const Instr& x = p.instrs()[id];
  switch (x.op) {
    case ExprOp::And: return collect(p, aff, x.args[0], band, why) && collect(p, aff, x.args[1], band, why);
    case ExprOp::Const:
      if (x.kind != ValueKind::Bool) break;
      if (x.ivalue == 0) band.never = true;
      return true;
    case ExprOp::Ge:
    case ExprOp::Gt:
    case ExprOp::Le:
    case ExprOp::Lt:
    case ExprOp::Eq: {
      if (p.instrs()[x.args[0]].kind != ValueKind::Int) break;
      for (int side = 0; side < 2; ++side) {
        if (p.instrs()[x.args[side]].op == ExprOp::Abs) {
          return add_abs_bound(p, aff, x.args[side], side == 0 ? x.op : flipped(x.op), aff[x.args[1 - side]], band,
                               why);
        }
      }
      const std::optional<Affine>& a = aff[x.args[0]];
      const std::optional<Affine>& b = aff[x.args[1]];
      if (!a || !b) {
        why = fmt::format("{} compares values that are not integer combinations of q_idx and kv_idx (reads b, h, a "
                          "captured tensor or uses a non-linear op)", describe(p, id));
        return false;
      }
      if (!add_constraint(band, x.op, Affine{a->q - b->q, a->kv - b->kv, a->offset - b->offset})) {
        why = fmt::format("{}: kv_idx's coefficient is beyond +-1 (the bound would need a division)", describe(p, id));
        return false;
      }
      return true;
    }
    default: break;
  }
  why = fmt::format("{} is not a comparison of integer combinations of q_idx and kv_idx or an & of them", describe(p, id));
  return false;
}

}  // namespace

void KvBand::row(int64_t q, int64_t& lo, int64_t& hi) const {
  lo = std::numeric_limits<int64_t>::min();
  hi = std::numeric_limits<int64_t>::max();
  bool none = never;
  for (const AffineBound& c : row_conditions) none = none || c.at(q) < 0;
  if (none) {
    lo = 1;
    hi = 0;
    return;
  }
  for (const AffineBound& b : lower) lo = std::max(lo, b.at(q));
  for (const AffineBound& b : upper) hi = std::min(hi, b.at(q));
}

std::optional<KvBand> kv_band(const ModProgram* mask, std::string* why) {
  std::string reason;
  auto fail = [&](std::string r) -> std::optional<KvBand> {
    if (why) *why = fmt::format("mask_mod: {} (formula: {})", r, mask ? mask->to_string() : "none");
    return std::nullopt;
  };
  if (mask == nullptr || mask->outputs().size() != 1) return fail("not a single-output mask program");
  if (!mask->captures().empty() || (mask->uses() & (kUsesBatch | kUsesHead | kUsesScore)) != 0) {
    return fail("compares values that are not integer combinations of q_idx and kv_idx (reads b, h, a captured tensor "
                "or the score)");
  }
  const std::vector<std::optional<Affine>> aff = affine_values(*mask);
  KvBand band;
  if (!collect(*mask, aff, mask->output(), band, reason)) return fail(reason);
  return band;
}

}  // namespace fg
