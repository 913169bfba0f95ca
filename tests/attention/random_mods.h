// Random well-typed score_mod / mask_mod programs for the op-semantics fuzz tests (CPU evaluators in
// tests/attention/test_op_semantics.cpp, the generated CUDA in tests/cuda/test_mod_codegen_cuda.cpp).
//
// A program is grown through the Expr API (so promotion is the user's), mixing every op, every kind,
// edge constants (0, -0, ±inf, NaN, 1e300, 2^53 + 1, INT64_MIN/MAX) and reads of captured tensors of
// several dtypes and ranks. Divisors of integer // and %, integer exponents and captured indices are
// made safe (nonzero, non-negative, in [-n, n)) unless `errors` asks for the raw (possibly failing) forms.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "flexgrad/attention/mod_program.h"
#include "flexgrad/ops/ops.h"

namespace fg::testing {

struct RandomMod {
  ModProgram score;  // Type::Score
  ModProgram mask;   // Type::Mask
  std::vector<Tensor> captures;
  Expr score_expr = 0.0, mask_expr = false;  // what `score` / `mask` were lowered from (to pass as mods)
};

struct RandomModOptions {
  int steps = 24;       // ops grown per program
  bool errors = false;  // allow raw divisors / exponents / indices (programs that may raise)
  bool float_captures_are_f64 = false;  // float captures in float64 only (finite-difference checks)
};

class ModGenerator {
 public:
  ModGenerator(uint64_t seed, RandomModOptions o) : rng_(seed), o_(o) { make_captures(); }

  RandomMod make() {
    RandomMod r;
    r.score_expr = grow(true);
    r.mask_expr = grow(false);
    r.score = lower_expr(r.score_expr, ModProgram::Type::Score);
    r.mask = lower_expr(r.mask_expr, ModProgram::Type::Mask);
    r.captures = tensors_;
    return r;
  }

 private:
  std::mt19937_64 rng_;
  RandomModOptions o_;
  std::vector<Tensor> tensors_;
  std::vector<Captured> caps_;
  std::vector<Expr> F_, I_, B_;

  int64_t uniform(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng_); }
  bool chance(double p) { return std::uniform_real_distribution<double>(0, 1)(rng_) < p; }
  template <class V> const auto& pick(const V& v) {
    return v[static_cast<size_t>(uniform(0, static_cast<int64_t>(std::size(v)) - 1))];
  }

  void make_captures() {
    const DType float_types[] = {kFloat32, kFloat64};
    const DType int_types[] = {kInt32, kInt64};
    const int n = static_cast<int>(uniform(1, 3));
    for (int c = 0; c < n; ++c) {
      const int rank = static_cast<int>(uniform(1, 3));
      Shape shape;
      for (int d = 0; d < rank; ++d) shape.push_back(uniform(2, 5));
      const int64_t numel = shape_numel(shape);
      const int kind = static_cast<int>(uniform(0, 2));  // float, int, bool
      std::vector<double> v(static_cast<size_t>(numel));
      for (double& x : v)
        x = kind == 0 ? std::uniform_real_distribution<double>(-2, 2)(rng_) : kind == 1 ? uniform(-9, 9) : uniform(0, 1);
      DType dt = kind == 0 ? (o_.float_captures_are_f64 ? kFloat64 : float_types[uniform(0, 1)])
                 : kind == 1 ? int_types[uniform(0, 1)]
                             : kBool;
      Tensor t = from_vector(v, shape, dt);
      if (rank >= 2 && chance(0.5)) t = t.transpose(0, rank - 1).contiguous().transpose(0, rank - 1);  // strided
      tensors_.push_back(t);
      caps_.emplace_back(t, "cap" + std::to_string(c));
    }
  }

  Expr float_const() {
    static const double vals[] = {0.0, -0.0, 1.0, -1.5, 0.1, 2.0, 0.5, 3.0, 1e300, -1e-300,
                                  INFINITY, -INFINITY, NAN, 7.25, -0.75};
    return Expr(pick(vals));
  }
  Expr int_const() {
    static const int64_t vals[] = {0, 1, -1, 2, 3, -7, 5, 16, (int64_t(1) << 53) + 1, int64_t(1) << 62,
                                   std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min()};
    return Expr(static_cast<long long>(pick(vals)));
  }
  Expr number() { return chance(0.5) || I_.empty() ? pick(F_) : pick(I_); }
  Expr any() {
    const int k = static_cast<int>(uniform(0, 2));
    return k == 0 ? pick(F_) : k == 1 ? pick(I_) : (B_.empty() ? pick(I_) : pick(B_));
  }
  Expr integer() { return chance(0.1) && !B_.empty() ? pick(B_) : pick(I_); }  // bools count as ints
  Expr boolean() {
    if (B_.empty() || chance(0.2)) return pick(I_) < pick(I_);
    return pick(B_);
  }
  // Nonzero int divisor: |x| + 1 is never 0, even when |INT64_MIN| wraps.
  Expr safe_divisor() { return o_.errors && chance(0.3) ? integer() : abs(integer()) + 1; }
  Expr index_for(int64_t n) {
    Expr i = integer();
    if (o_.errors && chance(0.3)) return i;  // raw: may be out of range
    return (i % (2 * n)) - n;                // in [-n, n): negative ones wrap
  }

  void add(const Expr& e) {
    if (e.is_float()) F_.push_back(e);
    else if (e.is_int()) I_.push_back(e);
    else B_.push_back(e);
  }

  void step() {
    const int choice = static_cast<int>(uniform(0, 20));
    switch (choice) {
      case 0: add(-number()); break;
      case 1: add(abs(number())); break;
      case 2: add(chance(0.5) ? floor(number()) : ceil(number())); break;
      case 3: {
        static Expr (*const fns[])(const Expr&) = {exp, exp2, log, log2, sqrt, rsqrt, sin, cos, tan, tanh, sigmoid};
        add(pick(fns)(number()));
        break;
      }
      case 4: add(cast(any(), static_cast<ValueKind>(uniform(0, 2)))); break;
      case 5: add(number() + any()); break;
      case 6: add(any() - number()); break;
      case 7: add(number() * number()); break;
      case 8: add(number() / number()); break;
      case 9: case 10: {
        const bool ints = chance(0.6);
        Expr a = ints ? integer() : number(), b = ints ? safe_divisor() : number();
        add(choice == 9 ? floor_div(a, b) : a % b);
        break;
      }
      case 11: {
        if (chance(0.5)) add(pow(pick(F_), number()));
        else add(pow(integer(), o_.errors && chance(0.3) ? integer() : abs(integer()) % 5));
        break;
      }
      case 12: add(chance(0.5) ? min(number(), number()) : max(number(), number())); break;
      case 13: {
        static Expr (*const cmps[])(const Expr&, const Expr&) = {
            [](const Expr& a, const Expr& b) { return a == b; }, [](const Expr& a, const Expr& b) { return a != b; },
            [](const Expr& a, const Expr& b) { return a < b; }, [](const Expr& a, const Expr& b) { return a <= b; },
            [](const Expr& a, const Expr& b) { return a > b; }, [](const Expr& a, const Expr& b) { return a >= b; }};
        add(pick(cmps)(number(), number()));
        break;
      }
      case 14: add(boolean() == boolean()); break;
      case 15: add(chance(0.5) ? (boolean() & boolean()) : (boolean() | boolean())); break;
      case 16: add(!boolean()); break;
      case 17: add(where(boolean(), any(), any())); break;
      default: {  // 18..20: a captured read
        const size_t c = static_cast<size_t>(uniform(0, static_cast<int64_t>(caps_.size()) - 1));
        Captured r = caps_[c];
        for (int64_t d = 0; d < tensors_[c].dim(); ++d) r = r[index_for(tensors_[c].size(d))];
        add(r);
      }
    }
  }

  Expr grow(bool with_score) {
    F_.clear();
    I_.clear();
    B_.clear();
    if (with_score) {
      F_.push_back(Expr::score());
      F_.push_back(Expr::score());
    }
    F_.push_back(float_const());
    for (Expr e : {Expr::batch(), Expr::head(), Expr::q_idx(), Expr::kv_idx()}) I_.push_back(e);
    I_.push_back(Expr::q_idx());
    I_.push_back(Expr::kv_idx());
    I_.push_back(int_const());
    for (int i = 0; i < o_.steps; ++i) {
      if (chance(0.1)) add(chance(0.5) ? float_const() : int_const());
      step();
    }
    // Combine the newest values of every kind so most of the program is live.
    const Expr f = F_.back(), i = I_.back();
    const Expr b = B_.empty() ? (Expr::q_idx() >= Expr::kv_idx()) : B_.back();
    if (!with_score) return b | (to_float(i) > f) | (chance(0.5) ? boolean() : Expr(false));
    return f + where(b, to_float(i), pick(F_)) + (chance(0.5) ? Expr::score() : pick(F_));
  }
};

// Programs whose constant parts fold to an error (e.g. `7 // 0` in `errors` mode) are skipped: the next
// attempt uses a derived seed.
inline RandomMod random_mod(uint64_t seed, RandomModOptions o = {}) {
  for (uint64_t attempt = 0;; ++attempt) {
    try {
      return ModGenerator(seed + attempt * 0x9e3779b97f4a7c15ULL, o).make();
    } catch (const ValueError&) {
      if (attempt > 100) throw;
    } catch (const IndexError&) {
      if (attempt > 100) throw;
    }
  }
}

// A scalar evaluation whose correctly-unrounded functions (exp, log, sin, pow, ...) return a result moved
// by up to `ulps` units in the last place, at random: several such runs bracket what another correct
// libm (CUDA's, accurate to a few ulp) may compute. Ill-conditioned programs (e.g. floor(exp(x) * 1e300))
// get a wide bracket, well-conditioned ones a tight one, so comparisons stay strict where they can be.
struct PerturbedVisitor {
  using Value = ScalarValue;
  const ModProgram& p;
  int64_t b, h, q, kv;
  double score;
  std::mt19937_64* rng;  // null: exact
  int ulps;
  ScalarValue constant(const Instr& in) const {
    return in.kind == ValueKind::Float ? ScalarValue::of_float(in.value) : ScalarValue::of_int(in.ivalue);
  }
  ScalarValue input(ExprOp leaf) const {
    switch (leaf) {
      case ExprOp::Score: return ScalarValue::of_float(score);
      case ExprOp::Batch: return ScalarValue::of_int(b);
      case ExprOp::Head: return ScalarValue::of_int(h);
      case ExprOp::QIdx: return ScalarValue::of_int(q);
      default: return ScalarValue::of_int(kv);
    }
  }
  ScalarValue index(const Instr& in, const CaptureRef& c, std::vector<ScalarValue> idx) const {
    Shape at(idx.size());
    int64_t off = 0;
    for (size_t d = 0; d < idx.size(); ++d) {
      at[d] = wrap_capture_index(c, static_cast<int64_t>(d), idx[d].i);
      off += at[d] * c.tensor.strides()[d];
    }
    if (in.kind == ValueKind::Float) return ScalarValue::of_float(c.tensor.at(at));
    switch (c.tensor.dtype()) {
      case DType::Int64: return ScalarValue::of_int(static_cast<const int64_t*>(c.tensor.data_ptr())[off]);
      case DType::Int32: return ScalarValue::of_int(static_cast<const int32_t*>(c.tensor.data_ptr())[off]);
      default: return ScalarValue::of_bool(static_cast<const bool*>(c.tensor.data_ptr())[off]);
    }
  }
  static bool inexact(ExprOp op) {
    switch (op) {
      case ExprOp::Exp: case ExprOp::Exp2: case ExprOp::Log: case ExprOp::Log2: case ExprOp::Sin: case ExprOp::Cos:
      case ExprOp::Tan: case ExprOp::Tanh: case ExprOp::Sigmoid: case ExprOp::Pow: return true;
      default: return false;
    }
  }
  ScalarValue apply(const Instr& in, std::vector<ScalarValue> args) const {
    const ValueKind ok = p.instrs()[in.args[in.op == ExprOp::Where ? 1 : 0]].kind;
    ScalarValue r = eval_op(in.op, in.kind, ok, args.data());
    if (rng && in.kind == ValueKind::Float && inexact(in.op) && std::isfinite(r.f)) {
      const int k = static_cast<int>((*rng)() % static_cast<uint64_t>(2 * ulps + 1)) - ulps;
      for (int i = 0; i < std::abs(k); ++i) r.f = std::nextafter(r.f, k > 0 ? INFINITY : -INFINITY);
    }
    return r;
  }
};

// Evaluates a program at one point recording every instruction's value in instruction order (the op table's eval_op,
// exact), for the range analyses' soundness tests (int_ranges.h, float_ranges.h). A captured index outside [-n, n)
// is clamped and counted in bad_indices (where a proof says no read can leave its tensor, there must be none).
struct RecordingVisitor {
  using Value = ScalarValue;
  const ModProgram& p;
  int64_t b, h, q, kv;
  double score = 0.5;
  std::vector<ScalarValue> seen = {};
  int bad_indices = 0;
  ScalarValue keep(ScalarValue v) {
    seen.push_back(v);
    return v;
  }
  ScalarValue constant(const Instr& in) {
    return keep(in.kind == ValueKind::Float ? ScalarValue::of_float(in.value) : ScalarValue::of_int(in.ivalue));
  }
  ScalarValue input(ExprOp leaf) {
    switch (leaf) {
      case ExprOp::Score: return keep(ScalarValue::of_float(score));
      case ExprOp::Batch: return keep(ScalarValue::of_int(b));
      case ExprOp::Head: return keep(ScalarValue::of_int(h));
      case ExprOp::QIdx: return keep(ScalarValue::of_int(q));
      default: return keep(ScalarValue::of_int(kv));
    }
  }
  ScalarValue index(const Instr& in, const CaptureRef& c, std::vector<ScalarValue> idx) {
    Shape at(idx.size());
    for (size_t d = 0; d < idx.size(); ++d) {
      const int64_t n = c.tensor.size(static_cast<int64_t>(d)), i = idx[d].i;
      if (i < -n || i >= n) ++bad_indices;
      at[d] = i < 0 ? std::max<int64_t>(i + n, 0) : std::min(i, n - 1);
    }
    const double x = c.tensor.at(at);
    return keep(in.kind == ValueKind::Float ? ScalarValue::of_float(x) : ScalarValue::of_int(static_cast<int64_t>(x)));
  }
  ScalarValue apply(const Instr& in, std::vector<ScalarValue> args) {
    const ValueKind operand = p.instrs()[in.args[in.op == ExprOp::Where ? 1 : 0]].kind;
    return keep(eval_op(in.op, in.kind, operand, args.data()));
  }
};

inline std::vector<ScalarValue> evaluate_perturbed(const ModProgram& p, int64_t b, int64_t h, int64_t q, int64_t kv,
                                                   double score, std::mt19937_64* rng, int ulps) {
  PerturbedVisitor v{p, b, h, q, kv, score, rng, ulps};
  return p.evaluate_with(v);
}

}  // namespace fg::testing
