// The op table (see op_semantics.h). One row per ExprOp, in enum order.
#include "flexgrad/attention/op_semantics.h"

#include <algorithm>
#include <functional>
#include <numbers>

#include "flexgrad/attention/mod_program.h"

namespace fg {

[[noreturn]] void throw_int_division_by_zero(ExprOp op, int64_t dividend) {
  FG_FAIL(ValueError, "flex_attention mod: integer {} by zero ({} {} 0)",
          op == ExprOp::Mod ? "remainder" : "floor division", dividend, op == ExprOp::Mod ? "%" : "//");
}

[[noreturn]] void throw_negative_int_power(int64_t base, int64_t exponent) {
  FG_FAIL(ValueError, "flex_attention mod: integers to negative integer powers are not allowed ({} ** {})", base,
          exponent);
}

namespace {

using VK = ValueKind;
using SV = ScalarValue;
using EvalFn = SV (*)(VK, VK, const SV*);
using GradFn = void (*)(GradContext&);

// ---- evaluation helpers: one lambda per op; F = float operands, I = int/bool operands.
#define FG_FLOAT1(expr) [](VK, VK, const SV* x) { const double a = x[0].f; return SV::of_float(expr); }
#define FG_NUM1(fexpr, iexpr)                                                     \
  [](VK, VK k, const SV* x) {                                                     \
    if (k == VK::Float) { const double a = x[0].f; return SV::of_float(fexpr); }  \
    const int64_t a = x[0].i;                                                     \
    return SV::of_int(iexpr);                                                     \
  }
#define FG_NUM2(fexpr, iexpr)                                                                       \
  [](VK, VK k, const SV* x) {                                                                       \
    if (k == VK::Float) { const double a = x[0].f, b = x[1].f; return SV::of_float(fexpr); }        \
    const int64_t a = x[0].i, b = x[1].i;                                                           \
    return SV::of_int(iexpr);                                                                       \
  }
#define FG_CMP(op)                                                                      \
  [](VK, VK k, const SV* x) {                                                           \
    return SV::of_bool(k == VK::Float ? (x[0].f op x[1].f) : (x[0].i op x[1].i));       \
  }

SV eval_cast(VK to, VK from, const SV* x) {
  const SV& a = x[0];
  switch (to) {
    case VK::Float: return SV::of_float(from == VK::Float ? a.f : static_cast<double>(a.i));
    case VK::Int: return SV::of_int(from == VK::Float ? sem::to_int(a.f) : a.i);
    case VK::Bool: return SV::of_bool(from == VK::Float ? a.f != 0 : a.i != 0);
  }
  return a;
}

SV eval_floordiv(VK, VK k, const SV* x) {
  if (k == VK::Float) return SV::of_float(sem::floordiv_f(x[0].f, x[1].f));
  if (x[1].i == 0) throw_int_division_by_zero(ExprOp::FloorDiv, x[0].i);
  return SV::of_int(sem::floordiv_nz(x[0].i, x[1].i));
}
SV eval_mod(VK, VK k, const SV* x) {
  if (k == VK::Float) return SV::of_float(sem::mod_f(x[0].f, x[1].f));
  if (x[1].i == 0) throw_int_division_by_zero(ExprOp::Mod, x[0].i);
  return SV::of_int(sem::mod_nz(x[0].i, x[1].i));
}
SV eval_pow(VK, VK k, const SV* x) {
  if (k == VK::Float) return SV::of_float(std::pow(x[0].f, x[1].f));
  if (x[1].i < 0) throw_negative_int_power(x[0].i, x[1].i);
  return SV::of_int(sem::pow_nn(x[0].i, x[1].i));
}
SV eval_where(VK, VK, const SV* x) { return x[0].i ? x[1] : x[2]; }

// ---- derivative helpers
int32_t C(GradContext& c, double v) { return c.pb.constant_float(v); }
int32_t F1(GradContext& c, ExprOp op, int32_t a) { return c.pb.emit(op, VK::Float, {a}); }
int32_t cmp(GradContext& c, ExprOp op, int32_t a, int32_t b) { return c.pb.emit(op, VK::Bool, {a, b}); }
int32_t sel(GradContext& c, int32_t cond, int32_t a, int32_t b) { return c.pb.emit(ExprOp::Where, VK::Float, {cond, a, b}); }

void grad_minmax(GradContext& c, ExprOp wins) {
  // As torch.minimum/maximum: the gradient goes to the selected operand, split in half on ties.
  auto& pb = c.pb;
  const int32_t a = c.x[0], b = c.x[1], tie = cmp(c, ExprOp::Eq, a, b), half = pb.mul(C(c, 0.5), c.g);
  c.dx[0] = sel(c, tie, half, sel(c, cmp(c, wins, a, b), c.g, C(c, 0)));
  c.dx[1] = sel(c, tie, half, sel(c, cmp(c, wins, b, a), c.g, C(c, 0)));
}

void grad_pow(GradContext& c) {
  // The op-level autograd's guards (ops/elementwise.cpp): d/da is 0 where b == 0 (even at a == 0, where
  // b * a^(b-1) would be 0 * inf); d/db = a^b log a is 0 where a == 0 and b >= 0.
  auto& pb = c.pb;
  const int32_t a = c.x[0], b = c.x[1];
  const int32_t da = pb.mul(c.g, pb.mul(b, pb.emit(ExprOp::Pow, VK::Float, {a, pb.sub(b, C(c, 1))})));
  c.dx[0] = sel(c, cmp(c, ExprOp::Eq, b, C(c, 0)), C(c, 0), da);
  if (!pb.is_const(b)) {
    const int32_t db = pb.mul(c.g, pb.mul(c.y, F1(c, ExprOp::Log, a)));
    const int32_t guard = pb.emit(ExprOp::And, VK::Bool, {cmp(c, ExprOp::Eq, a, C(c, 0)), cmp(c, ExprOp::Ge, b, C(c, 0))});
    c.dx[1] = sel(c, guard, C(c, 0), db);
  }
}

// ---- interval rules (OpInfo::int_range / float_range): x.i holds the operands' int ranges, x.f their float ranges.

// [lo, hi] where it fits int64, else unknown (the op wraps there: its value could be anything).
IntRange range_of(__int128 lo, __int128 hi) {
  if (lo < INT64_MIN || hi > INT64_MAX) return {};
  return {true, static_cast<int64_t>(lo), static_cast<int64_t>(hi)};
}
// For an op monotone in each operand: its values at the operands' corners bound it.
IntRange range_of_corners(__int128 c0, __int128 c1, __int128 c2, __int128 c3) {
  return range_of(std::min({c0, c1, c2, c3}), std::max({c0, c1, c2, c3}));
}
// Python's floor division for d > 0.
__int128 floor_div_pos(__int128 n, __int128 d) { return n >= 0 ? n / d : -((-n + d - 1) / d); }
bool both_known(const OperandRanges& x) { return x.i[0].known && x.i[1].known; }

IntRange int_range_add(const OperandRanges& x) {
  if (!both_known(x)) return {};
  return range_of(static_cast<__int128>(x.i[0].lo) + x.i[1].lo, static_cast<__int128>(x.i[0].hi) + x.i[1].hi);
}
IntRange int_range_sub(const OperandRanges& x) {
  if (!both_known(x)) return {};
  return range_of(static_cast<__int128>(x.i[0].lo) - x.i[1].hi, static_cast<__int128>(x.i[0].hi) - x.i[1].lo);
}
IntRange int_range_mul(const OperandRanges& x) {
  if (!both_known(x)) return {};
  const IntRange &a = x.i[0], &b = x.i[1];
  return range_of_corners(static_cast<__int128>(a.lo) * b.lo, static_cast<__int128>(a.lo) * b.hi,
                          static_cast<__int128>(a.hi) * b.lo, static_cast<__int128>(a.hi) * b.hi);
}
IntRange int_range_floor_div(const OperandRanges& x) {
  // Only positive divisors: floor(n / d) is then monotone in n and in d, so the corners bound it.
  if (!both_known(x) || x.i[1].lo <= 0) return {};
  const IntRange &n = x.i[0], &d = x.i[1];
  return range_of_corners(floor_div_pos(n.lo, d.lo), floor_div_pos(n.lo, d.hi), floor_div_pos(n.hi, d.lo),
                          floor_div_pos(n.hi, d.hi));
}
IntRange int_range_mod(const OperandRanges& x) {
  // Python's % takes the divisor's sign: in [0, d) for d > 0 (and n itself when 0 <= n < d).
  if (!both_known(x) || x.i[1].lo <= 0) return {};
  const IntRange &n = x.i[0], &d = x.i[1];
  return (n.lo >= 0 && n.hi < d.lo) ? n : IntRange{true, 0, d.hi - 1};
}
IntRange int_range_neg(const OperandRanges& x) {
  if (!x.i[0].known) return {};
  return range_of(-static_cast<__int128>(x.i[0].hi), -static_cast<__int128>(x.i[0].lo));
}
IntRange int_range_abs(const OperandRanges& x) {
  const IntRange& a = x.i[0];
  if (!a.known || a.lo == INT64_MIN) return {};  // abs(INT64_MIN) wraps: only ranges without it
  return a.lo >= 0 ? a : a.hi <= 0 ? IntRange{true, -a.hi, -a.lo} : IntRange{true, 0, std::max(-a.lo, a.hi)};
}
// An unknown operand of min / max is still some int64: min(x, 3) <= 3 and max(x, 0) >= 0 whatever x is (clamp).
IntRange known_or_any_int64(const IntRange& r) { return r.known ? r : IntRange{true, INT64_MIN, INT64_MAX}; }
IntRange int_range_min(const OperandRanges& x) {
  const IntRange a = known_or_any_int64(x.i[0]), b = known_or_any_int64(x.i[1]);
  return {true, std::min(a.lo, b.lo), std::min(a.hi, b.hi)};
}
IntRange int_range_max(const OperandRanges& x) {
  const IntRange a = known_or_any_int64(x.i[0]), b = known_or_any_int64(x.i[1]);
  return {true, std::max(a.lo, b.lo), std::max(a.hi, b.hi)};
}
IntRange int_range_where(const OperandRanges& x) {
  const IntRange &a = x.i[1], &b = x.i[2];
  if (!a.known || !b.known) return {};
  return {true, std::min(a.lo, b.lo), std::max(a.hi, b.hi)};
}
IntRange int_range_cast(const OperandRanges& x) {
  switch (x.kind[0]) {
    case VK::Bool: return {true, 0, 1};
    case VK::Int: return x.i[0];
    case VK::Float: return {};  // unknown: the int analysis does not bound floats
  }
  return {};
}

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

FloatRange float_range_cast(const OperandRanges& x) {
  if (x.kind[0] == VK::Float) return x.f[0];
  // From an int or a bool: finite whatever it is (|int64| < 9.3e18).
  const IntRange& a = x.i[0];
  return a.known ? FloatRange{static_cast<double>(a.lo), static_cast<double>(a.hi), false, false}
                 : FloatRange{-9.3e18, 9.3e18, false, false};
}
FloatRange float_range_neg(const OperandRanges& x) {
  const FloatRange& a = x.f[0];
  return FloatRange{-a.hi, -a.lo, a.may_nan, a.nan_on_nan_score};
}
FloatRange float_range_abs(const OperandRanges& x) {
  const FloatRange& a = x.f[0];
  const double m = std::max(std::fabs(a.lo), std::fabs(a.hi));
  return FloatRange{contains_zero(a) ? 0.0 : std::min(std::fabs(a.lo), std::fabs(a.hi)), m, a.may_nan,
                    a.nan_on_nan_score};
}
FloatRange float_range_exp(const OperandRanges& x) {  // exp(-inf) = 0, exp(inf) = inf: monotone
  const FloatRange& a = x.f[0];
  return FloatRange{std::exp(a.lo), std::exp(a.hi), a.may_nan, a.nan_on_nan_score};
}
// a + b (add) or a - b.
FloatRange float_range_add_or_sub(const OperandRanges& x, bool add) {
  const FloatRange &a = x.f[0], &b = x.f[1];
  // inf - inf is NaN: only where both may be infinite.
  const bool nan = a.may_nan || b.may_nan || (!a.finite() && !b.finite());
  const bool non = a.nan_on_nan_score || b.nan_on_nan_score;
  return a.finite() && b.finite() ? bounded(add ? a.lo + b.lo : a.lo - b.hi, add ? a.hi + b.hi : a.hi - b.lo, nan, non)
                                  : FloatRange{-kInf, kInf, nan, non};
}
FloatRange float_range_add(const OperandRanges& x) { return float_range_add_or_sub(x, true); }
FloatRange float_range_sub(const OperandRanges& x) { return float_range_add_or_sub(x, false); }
FloatRange float_range_mul(const OperandRanges& x) {
  const FloatRange &a = x.f[0], &b = x.f[1];
  // inf * 0 is NaN.
  const bool nan = a.may_nan || b.may_nan || (!a.finite() && contains_zero(b)) || (!b.finite() && contains_zero(a));
  const bool non = a.nan_on_nan_score || b.nan_on_nan_score;
  return a.finite() && b.finite() ? corners(a, b, std::multiplies<double>(), nan, non)
                                  : FloatRange{-kInf, kInf, nan, non};
}
FloatRange float_range_div(const OperandRanges& x) {
  const FloatRange &a = x.f[0], &b = x.f[1];
  // 0 / 0 and inf / inf are NaN; x / 0 is infinite.
  const bool nan = a.may_nan || b.may_nan || (contains_zero(a) && contains_zero(b)) || (!a.finite() && !b.finite());
  const bool non = a.nan_on_nan_score || b.nan_on_nan_score;
  return a.finite() && b.finite() && !contains_zero(b) ? corners(a, b, std::divides<double>(), nan, non)
                                                       : FloatRange{-kInf, kInf, nan, non};
}
FloatRange float_range_where(const OperandRanges& x) {
  const FloatRange &a = x.f[1], &b = x.f[2];
  return FloatRange{std::min(a.lo, b.lo), std::max(a.hi, b.hi), a.may_nan || b.may_nan,
                    a.nan_on_nan_score && b.nan_on_nan_score};
}
// An op whose result lies in [lo, hi] for every operand and is NaN only from a NaN operand (tanh, sigmoid).
FloatRange float_range_within(double lo, double hi, const FloatRange& a) {
  return FloatRange{lo, hi, a.may_nan, a.nan_on_nan_score};
}

constexpr GradFn kNoGrad = nullptr;
constexpr EvalFn kNoEval = nullptr;

#define LEAF(op, name, rule) \
  { ExprOp::op, name, 0, KindRule::rule, "a leaf", kNoEval, kNoGrad, nullptr, nullptr, nullptr, nullptr }

// The table, in ExprOp order (op_info checks it).
const OpInfo kOps[] = {
    LEAF(Const, "const", Leaf),
    LEAF(Score, "score", Leaf),
    LEAF(Batch, "b", Leaf),
    LEAF(Head, "h", Leaf),
    LEAF(QIdx, "q_idx", Leaf),
    LEAF(KVIdx, "kv_idx", Leaf),
    {ExprOp::Index, "index", -1, KindRule::Leaf,
     "captured read: [-n, n) valid, negative wraps, else IndexError (GPU: FgError flag 1, reads element 0)",
     kNoEval, kNoGrad, nullptr, nullptr, nullptr, nullptr},
    // ---- unary
    {ExprOp::Neg, "neg", 1, KindRule::SameNumber, "ints wrap (-INT64_MIN == INT64_MIN)",
     FG_NUM1(-a, sem::wrap_neg(a)), [](GradContext& c) { c.dx[0] = c.pb.neg(c.g); },
     "(-{0})", "(-{0})", "fg_neg_i({0})", nullptr, nullptr, "NEG", /*int_may_raise=*/false, /*float_steps=*/false,
     /*int_range=*/int_range_neg, /*float_range=*/float_range_neg},
    {ExprOp::Not, "logical_not", 1, KindRule::Logical, "bools only",
     [](VK, VK, const SV* x) { return SV::of_bool(x[0].i == 0); }, kNoGrad,
     nullptr, nullptr, nullptr, "(!{0})", nullptr, "LOGICAL_NOT"},
    {ExprOp::Abs, "abs", 1, KindRule::SameNumber, "abs(INT64_MIN) wraps to INT64_MIN; d/dx at 0 is 0",
     FG_NUM1(std::fabs(a), sem::wrap_abs(a)),
     [](GradContext& c) {
       const int32_t a = c.x[0];
       const int32_t sign = sel(c, cmp(c, ExprOp::Gt, a, C(c, 0)), C(c, 1),
                                sel(c, cmp(c, ExprOp::Lt, a, C(c, 0)), C(c, -1), C(c, 0)));
       c.dx[0] = c.pb.mul(c.g, sign);
     },
     "fabsf({0})", "fabs({0})", "fg_abs_i({0})", nullptr, nullptr, "ABS", /*int_may_raise=*/false,
     /*float_steps=*/false, /*int_range=*/int_range_abs, /*float_range=*/float_range_abs},
    {ExprOp::Exp, "exp", 1, KindRule::FloatMath, "IEEE (overflow inf, exp(-inf) 0, NaN stays NaN)",
     FG_FLOAT1(std::exp(a)), [](GradContext& c) { c.dx[0] = c.pb.mul(c.g, c.y); },
     "expf({0})", "exp({0})", nullptr, nullptr, nullptr, "EXP", /*int_may_raise=*/false, /*float_steps=*/false,
     /*int_range=*/nullptr, /*float_range=*/float_range_exp},
    {ExprOp::Exp2, "exp2", 1, KindRule::FloatMath, "IEEE",
     FG_FLOAT1(std::exp2(a)),
     [](GradContext& c) { c.dx[0] = c.pb.mul(c.g, c.pb.mul(C(c, std::numbers::ln2), c.y)); },
     "exp2f({0})", "exp2({0})", nullptr, nullptr},
    {ExprOp::Log, "log", 1, KindRule::FloatMath, "log(0) = -inf, log(x < 0) = NaN",
     FG_FLOAT1(std::log(a)), [](GradContext& c) { c.dx[0] = c.pb.div(c.g, c.x[0]); },
     "logf({0})", "log({0})", nullptr, nullptr, nullptr, "LOG"},
    {ExprOp::Log2, "log2", 1, KindRule::FloatMath, "log2(0) = -inf, log2(x < 0) = NaN",
     FG_FLOAT1(std::log2(a)),
     [](GradContext& c) { c.dx[0] = c.pb.div(c.g, c.pb.mul(C(c, std::numbers::ln2), c.x[0])); },
     "log2f({0})", "log2({0})", nullptr, nullptr},
    {ExprOp::Sqrt, "sqrt", 1, KindRule::FloatMath, "sqrt(x < 0) = NaN, sqrt(-0) = -0; d/dx at 0 is inf",
     FG_FLOAT1(std::sqrt(a)), [](GradContext& c) { c.dx[0] = c.pb.div(c.pb.mul(C(c, 0.5), c.g), c.y); },
     "__fsqrt_rn({0})", "__dsqrt_rn({0})", nullptr, nullptr, nullptr, "SQRT"},
    {ExprOp::Rsqrt, "rsqrt", 1, KindRule::FloatMath, "1 / sqrt(x) (correctly rounded sqrt and division)",
     FG_FLOAT1(1.0 / std::sqrt(a)),
     [](GradContext& c) {
       c.dx[0] = c.pb.mul(c.pb.mul(C(c, -0.5), c.g), c.pb.mul(c.pb.mul(c.y, c.y), c.y));
     },
     "__fdiv_rn(1.0f, __fsqrt_rn({0}))", "__ddiv_rn(1.0, __dsqrt_rn({0}))", nullptr, nullptr, nullptr,
     "RSQRT"},
    {ExprOp::Sin, "sin", 1, KindRule::FloatMath, "sin(±inf) = NaN",
     FG_FLOAT1(std::sin(a)), [](GradContext& c) { c.dx[0] = c.pb.mul(c.g, F1(c, ExprOp::Cos, c.x[0])); },
     "sinf({0})", "sin({0})", nullptr, nullptr, nullptr, "SIN"},
    {ExprOp::Cos, "cos", 1, KindRule::FloatMath, "cos(±inf) = NaN",
     FG_FLOAT1(std::cos(a)),
     [](GradContext& c) { c.dx[0] = c.pb.neg(c.pb.mul(c.g, F1(c, ExprOp::Sin, c.x[0]))); },
     "cosf({0})", "cos({0})", nullptr, nullptr, nullptr, "COS"},
    {ExprOp::Tan, "tan", 1, KindRule::FloatMath, "tan(±inf) = NaN",
     FG_FLOAT1(std::tan(a)),
     [](GradContext& c) { c.dx[0] = c.pb.mul(c.g, c.pb.add(C(c, 1), c.pb.mul(c.y, c.y))); },
     "tanf({0})", "tan({0})", nullptr, nullptr, nullptr, "TAN"},
    {ExprOp::Tanh, "tanh", 1, KindRule::FloatMath, "tanh(±inf) = ±1",
     FG_FLOAT1(std::tanh(a)),
     [](GradContext& c) { c.dx[0] = c.pb.mul(c.g, c.pb.sub(C(c, 1), c.pb.mul(c.y, c.y))); },
     "tanhf({0})", "tanh({0})", nullptr, nullptr, "fg_tanh_approx({0})", "TANH_FWD", /*int_may_raise=*/false,
     /*float_steps=*/false, /*int_range=*/nullptr,
     /*float_range=*/[](const OperandRanges& x) { return float_range_within(-1, 1, x.f[0]); }},
    {ExprOp::Sigmoid, "sigmoid", 1, KindRule::FloatMath, "1 / (1 + exp(-x)): sigmoid(-inf) = 0, sigmoid(inf) = 1",
     FG_FLOAT1(sem::sigmoid(a)),
     [](GradContext& c) { c.dx[0] = c.pb.mul(c.g, c.pb.mul(c.y, c.pb.sub(C(c, 1), c.y))); },
     "__fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-{0})))", "__ddiv_rn(1.0, __dadd_rn(1.0, exp(-{0})))", nullptr, nullptr,
     nullptr, "SIGMOID_FWD", /*int_may_raise=*/false, /*float_steps=*/false, /*int_range=*/nullptr,
     /*float_range=*/[](const OperandRanges& x) { return float_range_within(0, 1, x.f[0]); }},
    {ExprOp::Floor, "floor", 1, KindRule::SameNumber, "ints unchanged; derivative 0",
     FG_NUM1(std::floor(a), a), kNoGrad, "floorf({0})", "floor({0})", "{0}", nullptr, nullptr, "FLOOR",
     /*int_may_raise=*/false, /*float_steps=*/true},
    {ExprOp::Ceil, "ceil", 1, KindRule::SameNumber, "ints unchanged; derivative 0",
     FG_NUM1(std::ceil(a), a), kNoGrad, "ceilf({0})", "ceil({0})", "{0}", nullptr, nullptr, "CEIL",
     /*int_may_raise=*/false, /*float_steps=*/true},
    {ExprOp::Cast, "cast", 1, KindRule::Cast,
     "float -> int truncates, saturates to the int64 range, NaN -> 0; -> bool is != 0 (NaN is true)",
     eval_cast, [](GradContext& c) { if (c.kind[0] == VK::Float) c.dx[0] = c.g; },
     nullptr, nullptr, nullptr, nullptr, nullptr, "IDENTITY",  // spelled by cuda_spelling (depends on both kinds)
     /*int_may_raise=*/false, /*float_steps=*/false, /*int_range=*/int_range_cast, /*float_range=*/float_range_cast},
    // ---- binary
    {ExprOp::Add, "add", 2, KindRule::Arithmetic, "ints wrap",
     FG_NUM2(a + b, sem::wrap_add(a, b)), [](GradContext& c) { c.dx[0] = c.g; c.dx[1] = c.g; },
     "__fadd_rn({0}, {1})", "__dadd_rn({0}, {1})", "fg_add_i({0}, {1})", nullptr, "({0} + {1})", "ADD",
     /*int_may_raise=*/false, /*float_steps=*/false, /*int_range=*/int_range_add, /*float_range=*/float_range_add},
    {ExprOp::Sub, "sub", 2, KindRule::Arithmetic, "ints wrap",
     FG_NUM2(a - b, sem::wrap_sub(a, b)), [](GradContext& c) { c.dx[0] = c.g; c.dx[1] = c.pb.neg(c.g); },
     "__fsub_rn({0}, {1})", "__dsub_rn({0}, {1})", "fg_sub_i({0}, {1})", nullptr, "({0} - {1})", "SUB",
     /*int_may_raise=*/false, /*float_steps=*/false, /*int_range=*/int_range_sub, /*float_range=*/float_range_sub},
    {ExprOp::Mul, "mul", 2, KindRule::Arithmetic, "ints wrap",
     FG_NUM2(a * b, sem::wrap_mul(a, b)),
     [](GradContext& c) { c.dx[0] = c.pb.mul(c.g, c.x[1]); c.dx[1] = c.pb.mul(c.g, c.x[0]); },
     "__fmul_rn({0}, {1})", "__dmul_rn({0}, {1})", "fg_mul_i({0}, {1})", nullptr, "({0} * {1})", "MUL",
     /*int_may_raise=*/false, /*float_steps=*/false, /*int_range=*/int_range_mul, /*float_range=*/float_range_mul},
    {ExprOp::Div, "div", 2, KindRule::TrueDiv, "true division in float: x/0 = ±inf, 0/0 = NaN",
     [](VK, VK, const SV* x) { return SV::of_float(x[0].f / x[1].f); },
     [](GradContext& c) {
       c.dx[0] = c.pb.div(c.g, c.x[1]);
       c.dx[1] = c.pb.neg(c.pb.div(c.pb.mul(c.g, c.y), c.x[1]));
     },
     "__fdiv_rn({0}, {1})", "__ddiv_rn({0}, {1})", nullptr, nullptr, "fg_fdiv_full({0}, {1})", "DIV",
     /*int_may_raise=*/false, /*float_steps=*/false, /*int_range=*/nullptr, /*float_range=*/float_range_div},
    {ExprOp::FloorDiv, "floor_div", 2, KindRule::Arithmetic,
     "Python floor; floats as torch.floor_divide (x // 0 = x / 0); int // 0 is a ValueError "
     "(GPU: FgError flag 2, yields 0); INT64_MIN // -1 wraps; derivative 0",
     eval_floordiv, kNoGrad, "fg_floordiv_f({0}, {1})", "fg_floordiv_f({0}, {1})", "fg_floordiv_i(a, {0}, {1})",
     nullptr, nullptr, nullptr, /*int_may_raise=*/true, /*float_steps=*/true, /*int_range=*/int_range_floor_div},
    {ExprOp::Mod, "remainder", 2, KindRule::Arithmetic,
     "Python remainder (the divisor's sign); floats: x % 0 = NaN; int % 0 is a ValueError (GPU: FgError flag 2, "
     "yields 0)",
     eval_mod,
     [](GradContext& c) {  // a - (a // b) * b, as torch.remainder's backward
       c.dx[0] = c.g;
       c.dx[1] = c.pb.neg(c.pb.mul(c.g, c.pb.emit(ExprOp::FloorDiv, VK::Float, {c.x[0], c.x[1]})));
     },
     "fg_mod_f({0}, {1})", "fg_mod_f({0}, {1})", "fg_mod_i(a, {0}, {1})", nullptr, nullptr, nullptr,
     /*int_may_raise=*/true, /*float_steps=*/true, /*int_range=*/int_range_mod},
    {ExprOp::Pow, "pow", 2, KindRule::Arithmetic,
     "floats as C pow (pow(x, 0) = 1 even for NaN); int ** negative is a ValueError (GPU: FgError flag 3, "
     "yields 0); ints wrap; derivative guarded at b == 0 and at a == 0, b >= 0",
     eval_pow, grad_pow, "powf({0}, {1})", "pow({0}, {1})", "fg_pow_i(a, {0}, {1})", nullptr, nullptr, "POW",
     /*int_may_raise=*/true},
    {ExprOp::Min, "min", 2, KindRule::Arithmetic, "NaN propagates; ties split the gradient",
     FG_NUM2(sem::min_f(a, b), a < b ? a : b), [](GradContext& c) { grad_minmax(c, ExprOp::Lt); },
     "fg_min_f({0}, {1})", "fg_min_f({0}, {1})", "fg_min_i({0}, {1})", nullptr, nullptr, "MIN", /*int_may_raise=*/false,
     /*float_steps=*/false, /*int_range=*/int_range_min},
    {ExprOp::Max, "max", 2, KindRule::Arithmetic, "NaN propagates; ties split the gradient",
     FG_NUM2(sem::max_f(a, b), a > b ? a : b), [](GradContext& c) { grad_minmax(c, ExprOp::Gt); },
     "fg_max_f({0}, {1})", "fg_max_f({0}, {1})", "fg_max_i({0}, {1})", nullptr, nullptr, "MAX", /*int_may_raise=*/false,
     /*float_steps=*/false, /*int_range=*/int_range_max},
    {ExprOp::Eq, "eq", 2, KindRule::Compare, "NaN == x is false", FG_CMP(==), kNoGrad,
     "({0} == {1})", "({0} == {1})", "({0} == {1})", "({0} == {1})", nullptr, "CMP_EQ"},
    {ExprOp::Ne, "ne", 2, KindRule::Compare, "NaN != x is true", FG_CMP(!=), kNoGrad,
     "({0} != {1})", "({0} != {1})", "({0} != {1})", "({0} != {1})", nullptr, "CMP_NEQ"},
    {ExprOp::Lt, "lt", 2, KindRule::Compare, "false with NaN", FG_CMP(<), kNoGrad,
     "({0} < {1})", "({0} < {1})", "({0} < {1})", nullptr, nullptr, "CMP_LT"},
    {ExprOp::Le, "le", 2, KindRule::Compare, "false with NaN", FG_CMP(<=), kNoGrad,
     "({0} <= {1})", "({0} <= {1})", "({0} <= {1})", nullptr, nullptr, "CMP_LE"},
    {ExprOp::Gt, "gt", 2, KindRule::Compare, "false with NaN", FG_CMP(>), kNoGrad,
     "({0} > {1})", "({0} > {1})", "({0} > {1})", nullptr, nullptr, "CMP_GT"},
    {ExprOp::Ge, "ge", 2, KindRule::Compare, "false with NaN", FG_CMP(>=), kNoGrad,
     "({0} >= {1})", "({0} >= {1})", "({0} >= {1})", nullptr, nullptr, "CMP_GE"},
    {ExprOp::And, "logical_and", 2, KindRule::Logical, "bools only; both operands are evaluated",
     [](VK, VK, const SV* x) { return SV::of_bool(x[0].i != 0 && x[1].i != 0); }, kNoGrad,
     nullptr, nullptr, nullptr, "({0} & {1})", nullptr, "LOGICAL_AND"},
    {ExprOp::Or, "logical_or", 2, KindRule::Logical, "bools only; both operands are evaluated",
     [](VK, VK, const SV* x) { return SV::of_bool(x[0].i != 0 || x[1].i != 0); }, kNoGrad,
     nullptr, nullptr, nullptr, "({0} | {1})", nullptr, "LOGICAL_OR"},
    // ---- ternary
    {ExprOp::Where, "where", 3, KindRule::Select, "both branches are evaluated (an error in either raises)",
     eval_where,
     [](GradContext& c) {
       c.dx[1] = sel(c, c.x[0], c.g, C(c, 0));
       c.dx[2] = sel(c, c.x[0], C(c, 0), c.g);
     },
     "({0} ? {1} : {2})", "({0} ? {1} : {2})", "({0} ? {1} : {2})", "({0} ? {1} : {2})", nullptr, "BINARY_SELECT",
     /*int_may_raise=*/false, /*float_steps=*/false, /*int_range=*/int_range_where, /*float_range=*/float_range_where},
};
#undef LEAF
#undef FG_FLOAT1
#undef FG_NUM1
#undef FG_NUM2
#undef FG_CMP

constexpr size_t kNumOps = static_cast<size_t>(ExprOp::Where) + 1;
static_assert(sizeof(kOps) / sizeof(kOps[0]) == kNumOps, "one op_semantics row per ExprOp");

std::string substitute(const char* pattern, const std::vector<std::string>& args) {
  std::string out;
  for (const char* p = pattern; *p; ++p) {
    if (p[0] == '{' && p[1] >= '0' && p[1] <= '2' && p[2] == '}') {
      out += args.at(static_cast<size_t>(p[1] - '0'));
      p += 2;
    } else {
      out += *p;
    }
  }
  return out;
}

}  // namespace

const OpInfo& op_info(ExprOp op) {
  const size_t i = static_cast<size_t>(op);
  FG_CHECK(i < kNumOps, ValueError, "op_info: unknown ExprOp {}", i);
  FG_ASSERT(kOps[i].op == op);  // rows follow the ExprOp order
  return kOps[i];
}

std::string cuda_spelling(ExprOp op, ValueKind result, ValueKind operand, bool dbl,
                          const std::vector<std::string>& args, bool approx) {
  const char* T = dbl ? "double" : "float";
  if (op == ExprOp::Cast) {
    const std::string& a = args.at(0);
    if (result == operand) return a;
    switch (result) {
      case VK::Float: return fmt::format("(({}){})", T, a);
      case VK::Int: return operand == VK::Float ? fmt::format("fg_f2i({})", a) : fmt::format("((fg_i64){})", a);
      case VK::Bool: return fmt::format("({} != 0)", a);
    }
  }
  const OpInfo& r = op_info(op);
  const char* pattern = operand == VK::Float ? (dbl ? r.cuda_f64 : approx && r.cuda_f32_approx ? r.cuda_f32_approx : r.cuda_f32)
                        : operand == VK::Int ? r.cuda_i64
                                             : r.cuda_bool;
  FG_CHECK(pattern != nullptr, ValueError, "cuda_spelling: {} has no CUDA spelling for {} operands", r.name,
           value_kind_name(operand));
  return substitute(pattern, args);
}

}  // namespace fg
