// The op table (attention/op_semantics.h) is the one definition of every op; this fuzz test checks that
// everything derived from it agrees on random programs (tests/attention/random_mods.h):
//   the scalar evaluator (exact ints)  ==  the tile evaluator in float64 (bit for bit)
//                                      ~=  the reference path on float64 tensors (1e-12)
// including which error each raises, and that mod_grad's derivatives (d/d score and d/d captured
// tensors) match central finite differences of the scalar evaluator wherever the program is smooth.
// Plus direct checks of the semantics the issue called out (Python indexing everywhere, pow's zero
// guards, integer edge cases).
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>
#include <set>

#include "flexgrad/attention/flex_reference.h"
#include "flexgrad/attention/mod_grad.h"
#include "flexgrad/attention/mod_program.h"
#include "flexgrad/attention/op_semantics.h"
#include "flexgrad/attention/tile_eval.h"
#include "tests/attention/random_mods.h"
#include "tests/test_util.h"

using namespace fg;
using fg::testing::random_mod;
using fg::testing::RandomModOptions;

namespace {

constexpr int64_t kB = 2, kH = 3, kLq = 5, kLkv = 7;
constexpr int64_t kPoints = kB * kH * kLq * kLkv;

std::vector<double> random_scores(uint64_t seed, bool edges) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> n(0, 2);
  std::vector<double> s(kPoints);
  const double special[] = {0.0, -0.0, INFINITY, -INFINITY, NAN, 1e300, -1e300, 1e-310, 1.0, -1.0};
  for (double& x : s) x = (edges && g() % 8 == 0) ? special[g() % 10] : n(g);
  return s;
}

size_t point(int64_t b, int64_t h, int64_t q, int64_t kv) {
  return static_cast<size_t>(((b * kH + h) * kLq + q) * kLkv + kv);
}

template <class F> std::string error_kind(F&& f) {
  try {
    f();
    return "";
  } catch (const IndexError&) {
    return "IndexError";
  } catch (const ValueError&) {
    return "ValueError";
  }
}

bool same_bits(double a, double b) {
  if (std::isnan(a) && std::isnan(b)) return true;
  return a == b && std::signbit(a) == std::signbit(b);
}
bool close12(double a, double b) {
  if (same_bits(a, b) || a == b) return true;
  if (std::isnan(a) || std::isnan(b) || std::isinf(a) || std::isinf(b)) return false;
  return std::abs(a - b) <= 1e-12 * std::max({1.0, std::abs(a), std::abs(b)});
}

// values[o][point] per output, and the error kinds any point raised.
struct Eval {
  std::vector<std::vector<double>> values;
  std::set<std::string> errors;
};

Eval eval_scalar(const ModProgram& p, const std::vector<double>& scores) {
  Eval r;
  r.values.assign(p.outputs().size(), std::vector<double>(kPoints, NAN));
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t h = 0; h < kH; ++h)
      for (int64_t q = 0; q < kLq; ++q)
        for (int64_t kv = 0; kv < kLkv; ++kv) {
          const size_t i = point(b, h, q, kv);
          std::string e = error_kind([&] {
            std::vector<ScalarValue> v = p.evaluate_exact(b, h, q, kv, scores[i]);
            for (size_t o = 0; o < v.size(); ++o) r.values[o][i] = v[o].as_double(p.instrs()[p.outputs()[o]].kind);
          });
          if (!e.empty()) r.errors.insert(e);
        }
  return r;
}

Eval eval_tile(const ModProgram& p, const std::vector<double>& scores) {
  Eval r;
  r.values.assign(p.outputs().size(), std::vector<double>(kPoints, NAN));
  TileEvaluator<double> ev(p);
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t h = 0; h < kH; ++h) {
      const size_t at = point(b, h, 0, 0);
      std::string e = error_kind([&] {
        ev.run(b, h, 0, kLq, 0, kLkv, scores.data() + at, kLkv);
        for (size_t o = 0; o < p.outputs().size(); ++o) ev.copy_output<double>(o, r.values[o].data() + at, kLkv);
      });
      if (!e.empty()) r.errors.insert(e);
    }
  return r;
}

Eval eval_reference(const ModProgram& p, const std::vector<double>& scores) {
  Eval r;
  std::string e = error_kind([&] {
    Tensor s = p.uses(kUsesScore) ? from_vector(scores, {kB, kH, kLq, kLkv}, kFloat64) : Tensor();
    Tensor out = evaluate_program_on_tensors(p, s, kB, kH, kLq, kLkv, kFloat64, Device(DeviceType::CPU, 0));
    r.values.push_back(out.to(kFloat64).expand({kB, kH, kLq, kLkv}).contiguous().to_vector());
  });
  if (!e.empty()) r.errors.insert(e);
  return r;
}

// Compares `got` with the scalar `want` (output `o` of both); `exact` demands identical bits.
::testing::AssertionResult agree(const Eval& want, const Eval& got, size_t outputs, bool exact, const char* what) {
  if (!want.errors.empty()) {
    if (got.errors.empty()) return ::testing::AssertionFailure() << what << " raised nothing, the scalar evaluator "
                                                                 << *want.errors.begin();
    for (const std::string& e : got.errors)
      if (!want.errors.count(e)) return ::testing::AssertionFailure() << what << " raised " << e << ", the scalar evaluator did not";
    return ::testing::AssertionSuccess();
  }
  if (!got.errors.empty()) return ::testing::AssertionFailure() << what << " raised " << *got.errors.begin();
  for (size_t o = 0; o < outputs; ++o)
    for (size_t i = 0; i < static_cast<size_t>(kPoints); ++i) {
      const double a = want.values[o][i], b = got.values[o][i];
      if (exact ? !same_bits(a, b) : !close12(a, b))
        return ::testing::AssertionFailure() << what << " output " << o << " point " << i << ": scalar " << a
                                             << " vs " << b;
    }
  return ::testing::AssertionSuccess();
}

void check_evaluators(const ModProgram& p, const std::vector<double>& scores, const std::string& label) {
  const Eval s = eval_scalar(p, scores);
  EXPECT_TRUE(agree(s, eval_tile(p, scores), p.outputs().size(), true, "tile evaluator"))
      << label << "\n" << p.to_string_all();
  EXPECT_TRUE(agree(s, eval_reference(p, scores), 1, false, "reference path")) << label << "\n" << p.to_string_all();
}

// Central difference of g at x with step e, and a finer one: "smooth" when both are finite and agree.
// Also demands that rounding cannot hide the slope: |g| / step must stay small (a 1e300 added to the score
// absorbs it, and the differences see 0 while the derivative is exactly 1).
template <class G> bool smooth_derivative(G&& g, double x, double& fd) {
  const double e = 1e-5 * std::max(1.0, std::abs(x));
  const double a = g(x + e), b = g(x - e), c = g(x + e / 4), d = g(x - e / 4);
  const double d1 = (a - b) / (2 * e);
  const double d2 = (c - d) / (e / 2);
  fd = d2;
  const double resolution = 4e-16 * std::max({std::abs(a), std::abs(b), std::abs(c), std::abs(d)}) / (e / 2);
  return std::isfinite(d1) && std::isfinite(d2) && resolution < 1e-7 && std::abs(d1 - d2) <= 1e-6 * (1 + std::abs(d2));
}

struct GradStats {
  int64_t score_checked = 0, cap_checked = 0;
};

// d score_mod / d score and d score_mod / d captures of derive_score_mod vs finite differences.
void check_gradients(const ModProgram& p, const std::vector<Tensor>& caps, uint64_t seed, GradStats& st,
                     const std::string& label) {
  ScoreModBackward g = derive_score_mod(p);
  const std::vector<double> scores = random_scores(seed, false);
  // the derivative program: scalar == tile, all outputs
  const Eval gs = eval_scalar(g.program, scores);
  EXPECT_TRUE(agree(gs, eval_tile(g.program, scores), g.program.outputs().size(), true, "tile (derivative)"))
      << label << "\n" << g.program.to_string_all();
  if (!gs.errors.empty()) return;

  std::mt19937_64 rng(seed);
  for (int k = 0; k < 12; ++k) {
    const int64_t b = rng() % kB, h = rng() % kH, q = rng() % kLq, kv = rng() % kLkv;
    const double s0 = scores[point(b, h, q, kv)];
    auto f = [&](double s) { return p.evaluate(b, h, q, kv, s); };
    const std::vector<ScalarValue> d = g.program.evaluate_exact(b, h, q, kv, s0);
    double fd = 0;
    if (std::isfinite(d[0].f) && smooth_derivative(f, s0, fd)) {
      EXPECT_NEAR(d[0].f, fd, 1e-4 * (1 + std::abs(fd))) << label << " d/dscore at " << s0 << "\n" << p.to_string()
                                                          << "\nderivative: " << g.program.to_string(0);
      ++st.score_checked;
    }
    // captured tensors: analytic sum per element vs perturbing that element in place
    std::map<std::pair<int32_t, int64_t>, double> analytic;
    for (const CaptureGradTerm& t : g.terms) {
      const Tensor& c = g.captures[t.capture].tensor;
      int64_t lin = 0;
      for (int32_t dd = 0; dd < t.ndim; ++dd) {
        int64_t i = d[t.index_output + dd].i;
        if (i < 0) i += c.size(dd);
        lin = lin * c.size(dd) + i;
      }
      analytic[{t.capture, lin}] += d[t.deriv_output].f;
    }
    for (const auto& [key, value] : analytic) {
      Tensor c = g.captures[key.first].tensor;
      if (c.dtype() != kFloat64 || !std::isfinite(value)) continue;
      int64_t off = 0, rest = key.second;
      for (int64_t dd = c.dim() - 1; dd >= 0; --dd) {
        off += (rest % c.size(dd)) * c.strides()[dd];
        rest /= c.size(dd);
      }
      double* elem = static_cast<double*>(c.data_ptr()) + off;
      const double saved = *elem;
      auto fc = [&](double x) {
        *elem = x;
        const double r = p.evaluate(b, h, q, kv, s0);
        *elem = saved;
        return r;
      };
      if (smooth_derivative(fc, saved, fd)) {
        EXPECT_NEAR(value, fd, 1e-4 * (1 + std::abs(fd))) << label << " d/d" << g.captures[key.first].name << "["
                                                          << key.second << "]\n" << p.to_string();
        ++st.cap_checked;
      }
    }
  }
  (void)caps;
}

}  // namespace

TEST(OpSemantics, TableCoversEveryOp) {
  for (int i = 0; i <= static_cast<int>(ExprOp::Where); ++i) {
    const ExprOp op = static_cast<ExprOp>(i);
    const OpInfo& r = op_info(op);
    EXPECT_EQ(r.op, op);
    EXPECT_STREQ(expr_op_name(op), r.name);
    if (op > ExprOp::Index) {
      EXPECT_NE(r.eval, nullptr) << r.name;
    }
  }
}

TEST(OpSemantics, FuzzEvaluatorsAgree) {
  int with_errors = 0, clean = 0;
  for (uint64_t seed = 1; seed <= 300; ++seed) {
    RandomModOptions o;
    o.errors = seed % 5 == 0;  // every fifth program may raise
    o.steps = 12 + static_cast<int>(seed % 24);
    const fg::testing::RandomMod m = random_mod(seed, o);
    const std::vector<double> scores = random_scores(seed * 7919, true);
    const std::string label = "seed " + std::to_string(seed);
    check_evaluators(m.score, scores, label + " score_mod");
    check_evaluators(m.mask, scores, label + " mask_mod");
    (eval_scalar(m.score, scores).errors.empty() ? clean : with_errors)++;
    if (::testing::Test::HasFailure()) break;  // one program's report is enough
  }
  std::cout << "[  INFO    ] " << clean << " programs evaluated cleanly, " << with_errors
            << " raised (the same error in every evaluator)\n";
  // the generator really produces both kinds of programs
  EXPECT_GT(clean, 150);
  EXPECT_GT(with_errors, 3);
}

TEST(OpSemantics, FuzzDerivativesMatchFiniteDifferences) {
  GradStats st;
  for (uint64_t seed = 1000; seed < 1200; ++seed) {
    RandomModOptions o;
    o.float_captures_are_f64 = true;
    o.steps = 10 + static_cast<int>(seed % 16);
    const fg::testing::RandomMod m = random_mod(seed, o);
    if (!eval_scalar(m.score, random_scores(seed, false)).errors.empty()) continue;
    check_gradients(m.score, m.captures, seed, st, "seed " + std::to_string(seed));
    if (::testing::Test::HasFailure()) break;
  }
  std::cout << "[  INFO    ] finite differences compared: " << st.score_checked << " d/dscore, " << st.cap_checked
            << " d/dcapture\n";
  // enough smooth points were compared for the test to mean something
  EXPECT_GT(st.score_checked, 500);
  EXPECT_GT(st.cap_checked, 100);
}

TEST(OpSemantics, CapturedIndicesFollowPythonRulesEverywhere) {
  Captured t(from_vector(std::vector<double>{10, 20, 30, 40}, {4}, kFloat64), "t");
  // kv - 4 is in [-4, 0) for kv < 4: wraps to kv; kv == 7 gives 3; q - 9 < -4 is out of range
  ModProgram p = trace_score_mod([t](Expr s, Expr, Expr, Expr, Expr kv) { return s + t[kv - 4]; });
  std::vector<double> scores(kPoints, 0.0);
  const Eval sc = eval_scalar(p, scores);
  ASSERT_TRUE(sc.errors.empty());
  EXPECT_EQ(sc.values[0][point(0, 0, 0, 1)], 20);
  EXPECT_EQ(sc.values[0][point(0, 0, 0, 6)], 30);  // 6 - 4 = 2
  check_evaluators(p, scores, "wrap");
  ModProgram bad = trace_score_mod([t](Expr s, Expr, Expr, Expr q, Expr) { return s + t[q - 9]; });
  EXPECT_THROW_MSG(bad.evaluate(0, 0, 0, 0), IndexError, "index -9", "dim 0 (size 4)", "'t'");
  EXPECT_THROW_MSG(bad.evaluate(0, 0, 4, 0), IndexError, "index -5");
  EXPECT_NO_THROW(bad.evaluate(0, 0, 5, 0));  // -4 wraps to 0
  check_evaluators(bad, scores, "out of range");
  // constant indices: -n is valid at trace time, -n - 1 is not
  EXPECT_NO_THROW(trace_score_mod([t](Expr s, Expr, Expr, Expr, Expr) { return s + t[-4]; }));
  EXPECT_THROW(trace_score_mod([t](Expr s, Expr, Expr, Expr, Expr) { return s + t[-5]; }), IndexError);
}

TEST(OpSemantics, IntegerEdgeCases) {
  const int64_t kMin = std::numeric_limits<int64_t>::min(), kMax = std::numeric_limits<int64_t>::max();
  auto I = [](int64_t v) { return ScalarValue::of_int(v); };
  auto run = [](ExprOp op, ScalarValue a, ScalarValue b) {
    ScalarValue x[2] = {a, b};
    return eval_op(op, ValueKind::Int, ValueKind::Int, x).i;
  };
  EXPECT_EQ(run(ExprOp::FloorDiv, I(kMin), I(-1)), kMin);  // wraps, no SIGFPE
  EXPECT_EQ(run(ExprOp::Mod, I(kMin), I(-1)), 0);
  EXPECT_EQ(run(ExprOp::Add, I(kMax), I(1)), kMin);
  EXPECT_EQ(run(ExprOp::Mul, I(int64_t(1) << 62), I(4)), 0);
  EXPECT_EQ(run(ExprOp::Pow, I(3), I(40)), static_cast<int64_t>(12157665459056928801ULL));  // 3^40 wraps
  EXPECT_EQ(run(ExprOp::FloorDiv, I(-7), I(2)), -4);
  EXPECT_EQ(run(ExprOp::Mod, I(-7), I(2)), 1);
  EXPECT_EQ(run(ExprOp::Mod, I(7), I(-2)), -1);
  EXPECT_THROW_MSG(run(ExprOp::FloorDiv, I(5), I(0)), ValueError, "floor division by zero", "5 // 0");
  EXPECT_THROW_MSG(run(ExprOp::Mod, I(5), I(0)), ValueError, "remainder by zero");
  EXPECT_THROW_MSG(run(ExprOp::Pow, I(2), I(-1)), ValueError, "negative integer powers");
  // float -> int: truncate, saturate, NaN -> 0
  auto to_i = [](double v) {
    ScalarValue x[1] = {ScalarValue::of_float(v)};
    return eval_op(ExprOp::Cast, ValueKind::Int, ValueKind::Float, x).i;
  };
  EXPECT_EQ(to_i(-2.7), -2);
  EXPECT_EQ(to_i(NAN), 0);
  EXPECT_EQ(to_i(INFINITY), kMax);
  EXPECT_EQ(to_i(-1e300), kMin);
  // int64 values past 2^53 stay exact through the scalar evaluator
  ModProgram p = trace_score_mod(
      [](Expr s, Expr, Expr, Expr q, Expr) { return to_float((q + 9007199254740993LL) % 1000 == 993) + s; });
  EXPECT_EQ(p.evaluate(0, 0, 0, 0), 1.0);
  // float floor division as torch.floor_divide (1.0 // 0.1 == 9 in Python), remainder with the divisor's sign
  EXPECT_EQ(sem::floordiv_f(1.0, 0.1), 9.0);
  EXPECT_EQ(sem::mod_f(-1.0, 3.0), 2.0);
  EXPECT_TRUE(std::isinf(sem::floordiv_f(1.0, 0.0)));
}

TEST(OpSemantics, PowDerivativeHasZeroGuards) {
  // d/da a^b at b == 0 is 0 (not 0 * a^-1 = NaN at a == 0); d/db a^b at a == 0, b >= 0 is 0 (not 0 * -inf)
  Captured e(from_vector(std::vector<double>{0.0, 2.0}, {2}, kFloat64), "e");
  ModProgram p = trace_score_mod([e](Expr s, Expr, Expr, Expr, Expr kv) { return pow(s, e[kv]); });
  ScoreModBackward g = derive_score_mod(p);
  ASSERT_EQ(g.terms.size(), 1u);
  std::vector<ScalarValue> at0 = g.program.evaluate_exact(0, 0, 0, 0, 0.0);  // s = 0, exponent 0
  EXPECT_EQ(at0[0].f, 0.0);
  EXPECT_EQ(at0[g.terms[0].deriv_output].f, 0.0);
  std::vector<ScalarValue> at1 = g.program.evaluate_exact(0, 0, 0, 1, 0.0);  // s = 0, exponent 2
  EXPECT_EQ(at1[0].f, 0.0);
  EXPECT_EQ(at1[g.terms[0].deriv_output].f, 0.0);
  std::vector<ScalarValue> at2 = g.program.evaluate_exact(0, 0, 0, 1, 3.0);  // 2 * 3, 9 * log 3
  EXPECT_DOUBLE_EQ(at2[0].f, 6.0);
  EXPECT_DOUBLE_EQ(at2[g.terms[0].deriv_output].f, 9.0 * std::log(3.0));
}
