// Float interval arithmetic over ModPrograms (attention/float_ranges.h): hand-checked derivatives that do and do
// not need the backward's zero test, and a fuzz check of soundness against the op table's scalar evaluator at
// scores from -inf to inf and NaN.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "flexgrad/attention/float_ranges.h"
#include "flexgrad/attention/mod_grad.h"
#include "flexgrad/ops/ops.h"
#include "random_mods.h"

namespace fg {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

bool no_zero_test(const ScoreMod& m) { return dscore_needs_no_zero_test(derive_score_mod(trace_score_mod(m)).value_and_dscore); }

TEST(FloatRanges, HandCheckedDerivatives) {
  // softcap: d = 1 - tanh(s / 20)^2 in [0, 2] whatever s; tanh(NaN) is NaN.
  EXPECT_TRUE(no_zero_test([](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); }));
  EXPECT_TRUE(no_zero_test([](Expr s, Expr, Expr, Expr, Expr) { return 30.0 * tanh(s * 0.05); }));
  // a core reading q and kv (ints: finite), and a sigmoid gate: bounded derivatives.
  EXPECT_TRUE(no_zero_test([](Expr s, Expr, Expr, Expr q, Expr kv) { return 10.0 * tanh(s / 10.0 + to_float(q - kv) * 0.01); }));
  EXPECT_TRUE(no_zero_test([](Expr s, Expr, Expr, Expr, Expr) { return 5.0 * sigmoid(s); }));
  // s^2: d = 2 s, unbounded; sqrt(|s|): d = 0.5 / sqrt(|s|), infinite at 0.
  EXPECT_FALSE(no_zero_test([](Expr s, Expr, Expr, Expr, Expr) { return s * s; }));
  EXPECT_FALSE(no_zero_test([](Expr s, Expr, Expr, Expr, Expr) { return sqrt(abs(s)); }));
  // s tanh(s): d = tanh(s) + s (1 - tanh(s)^2) is inf * 0 = NaN at s = inf.
  EXPECT_FALSE(no_zero_test([](Expr s, Expr, Expr, Expr, Expr) { return s * tanh(s); }));
  // where(s > 0, 2 s, s): d in {1, 2}, but the value is not NaN where s is (the comparison is false: s), so it
  // passes; where(s > 0, 2 s, 0) is 0 at a NaN score while its d may be anything: it must keep the test.
  EXPECT_TRUE(no_zero_test([](Expr s, Expr, Expr, Expr, Expr) { return where(s > 0.0, 2.0 * tanh(s), tanh(s)); }));
  EXPECT_FALSE(no_zero_test([](Expr s, Expr, Expr, Expr, Expr) { return where(s > 0.0, 2.0 * tanh(s), 0.0); }));
  // A captured float read may be anything: d = bias[h] is not provably finite.
  Tensor bias = ones({4});
  EXPECT_FALSE(no_zero_test([&](Expr s, Expr, Expr h, Expr, Expr) { return tanh(s) * Captured(bias)[h]; }));

  // The ranges themselves: tanh(s / 20) in [-1, 1]; 1 - t t in [0, 2]; s / 20 unbounded, not NaN.
  const ModProgram p = trace_score_mod([](Expr s, Expr, Expr, Expr, Expr) { return 1.0 - tanh(s / 20.0) * tanh(s / 20.0); });
  const std::vector<FloatRange> r = float_ranges(p);
  const FloatRange& out = r[static_cast<size_t>(p.output())];
  EXPECT_TRUE(out.finite());
  EXPECT_EQ(out.lo, 0.0);
  EXPECT_EQ(out.hi, 2.0);
  EXPECT_FALSE(out.may_nan);
  EXPECT_TRUE(out.nan_on_nan_score);
}

// Soundness: random score_mods and their merged score / d score programs, at scores from -inf to inf: every float
// value lies in its instruction's range and is NaN only where may_nan allows; at a NaN score every instruction
// marked nan_on_nan_score is NaN.
TEST(FloatRanges, FuzzRangesHoldAtEveryScore) {
  const double scores[] = {-kInf, -1e30, -37.5, -1.0, -0.0, 0.0, 1e-30, 0.5, 3.0, 1e6, 1e30, kInf};
  int64_t checked = 0, bounded_checked = 0, nan_checked = 0;
  for (uint64_t seed = 1; seed <= 200; ++seed) {
    testing::ModGenerator gen(seed, {.steps = 16});
    testing::RandomMod m;
    try {
      m = gen.make();
    } catch (const Error&) {
      continue;
    }
    std::vector<ModProgram> progs{m.score};
    try {
      progs.push_back(derive_score_mod(m.score).value_and_dscore);
    } catch (const Error&) {
    }
    for (const ModProgram& p : progs) {
      const std::vector<FloatRange> r = float_ranges(p);
      for (int64_t q : {0, 3})
        for (int64_t kv : {0, 2}) {
          for (double s : scores) {
            testing::RecordingVisitor v{p, 1, 1, q, kv, s};
            try {
              p.evaluate_with(v);
            } catch (const Error&) {
              continue;  // an int op that raises at this point
            }
            ASSERT_EQ(v.seen.size(), p.size());
            for (size_t i = 0; i < p.size(); ++i) {
              if (p.instrs()[i].kind != ValueKind::Float) continue;
              const double x = v.seen[i].f;
              ++checked;
              if (std::isnan(x)) {
                ASSERT_TRUE(r[i].may_nan) << "seed " << seed << " score " << s << " instruction " << i << " is NaN\n"
                                          << p.to_string();
                continue;
              }
              if (r[i].finite()) ++bounded_checked;
              ASSERT_TRUE(x >= r[i].lo && x <= r[i].hi)
                  << "seed " << seed << " score " << s << " instruction " << i << " = " << x << " outside ["
                  << r[i].lo << ", " << r[i].hi << "]\n" << p.to_string();
            }
          }
          testing::RecordingVisitor v{p, 1, 1, q, kv, std::nan("")};
          try {
            p.evaluate_with(v);
          } catch (const Error&) {
            continue;
          }
          for (size_t i = 0; i < p.size(); ++i) {
            if (p.instrs()[i].kind != ValueKind::Float || !r[i].nan_on_nan_score) continue;
            ++nan_checked;
            ASSERT_TRUE(std::isnan(v.seen[i].f)) << "seed " << seed << " instruction " << i << " = " << v.seen[i].f
                                                 << " at a NaN score\n" << p.to_string();
          }
        }
    }
  }
  EXPECT_GT(checked, 20000);
  EXPECT_GT(bounded_checked, 2000);  // finite ranges must be found, or this proves little
  EXPECT_GT(nan_checked, 2000);
}

}  // namespace
}  // namespace fg
