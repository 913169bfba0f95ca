// affine_score_form (attention/affine_score.h): which score_mods read as out_factor * core(in_factor * score), and
// that the pieces put back together give the program's value (evaluated in double: the factors' products are the
// only difference, at double rounding).
#include <gtest/gtest.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "flexgrad/attention/affine_score.h"
#include "flexgrad/attention/mod_program.h"
#include "flexgrad/flexgrad.h"

using namespace fg;

namespace {

struct Case {
  const char* name;
  ScoreMod mod;
  bool has_form;
  double in_factor = 1, out_factor = 1;
  const char* core = "";  // the core's formula (ModProgram::to_string)
};

// p(s) against out_factor * core(in_factor * s) over scores and indices.
void expect_recomposes(const ModProgram& p, const AffineScoreForm& f) {
  for (double s : {-300.0, -7.25, -1.0, -0.0, 0.5, 3.0, 41.0, 1e4})
    for (int64_t h : {0, 3})
      for (int64_t q : {0, 5})
        for (int64_t kv : {0, 9}) {
          const double want = p.evaluate(1, h, q, kv, s);
          const double got = f.out_factor * f.core.evaluate(1, h, q, kv, f.in_factor * s);
          EXPECT_NEAR(got, want, 1e-13 * (1 + std::fabs(want))) << "s " << s << " h " << h << " q " << q << " kv " << kv;
        }
}

}  // namespace

TEST(AffineScoreForm, FactorsWhereTheProgramHasThem) {
  const std::vector<Case> cases = {
      {"softcap", [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); }, true, 0.05, 20, "tanh(score)"},
      {"the factor on the right", [](Expr s, Expr, Expr, Expr, Expr) { return tanh(s * 0.125) * 8.0; }, true, 0.125, 8,
       "tanh(score)"},
      {"a division at the output", [](Expr s, Expr, Expr, Expr, Expr) { return tanh(3.0 * s) / 4.0; }, true, 3, 0.25,
       "tanh(score)"},
      {"indices in the core", [](Expr s, Expr, Expr h, Expr, Expr) { return 30.0 * tanh(s / 30.0 + to_float(h)); }, true,
       1.0 / 30, 30, "tanh(score + to_float(h))"},
      {"no factor on the score", [](Expr s, Expr, Expr, Expr, Expr) { return 50.0 * tanh(s); }, true, 1, 50,
       "tanh(score)"},
      {"the score read twice", [](Expr s, Expr, Expr, Expr, Expr) { return 2.0 * (s * tanh(s / 20.0)); }, true, 1, 2,
       "score * tanh(score / 20.0)"},
      {"a scaled score alone", [](Expr s, Expr, Expr, Expr, Expr) { return s * 2.0; }, true, 1, 2, "score"},
      {"a sum at the output", [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0) + 1.0; }, false},
      {"a negative factor", [](Expr s, Expr, Expr, Expr, Expr) { return -20.0 * tanh(s / 20.0); }, false},
      {"no constant factor", [](Expr s, Expr, Expr, Expr, Expr) { return s * tanh(s / 20.0); }, false},
      {"the identity", [](Expr s, Expr, Expr, Expr, Expr) { return s; }, false},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const ModProgram p = trace_score_mod(c.mod);
    const std::optional<AffineScoreForm> f = affine_score_form(p);
    ASSERT_EQ(f.has_value(), c.has_form) << p.to_string();
    if (!f) continue;
    EXPECT_DOUBLE_EQ(f->in_factor, c.in_factor);
    EXPECT_DOUBLE_EQ(f->out_factor, c.out_factor);
    EXPECT_EQ(f->scaled_score >= 0, c.in_factor != 1) << p.to_string();
    if (f->scaled_score >= 0) {  // the program's instruction reading the score
      const Instr& in = p.instrs()[static_cast<size_t>(f->scaled_score)];
      EXPECT_TRUE(in.op == ExprOp::Mul || in.op == ExprOp::Div);
    }
    EXPECT_EQ(f->core.type(), ModProgram::Type::Score);
    EXPECT_EQ(f->core.to_string(), c.core);
    expect_recomposes(p, *f);
  }
}

TEST(AffineScoreForm, NoneForAMaskProgram) {
  const ModProgram m = trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return q >= kv; });
  EXPECT_FALSE(affine_score_form(m).has_value());
}

// The core keeps the program's captures (those it reads) and reads them at the same indices.
TEST(AffineScoreForm, CoreKeepsTheCaptures) {
  Captured bias(from_vector(std::vector<double>{0.5, -1.0, 2.0, 0.25}, {4}, kFloat32), "bias");
  const ModProgram p =
      trace_score_mod([bias](Expr s, Expr, Expr h, Expr, Expr) { return 10.0 * tanh(s / 10.0 + Expr(bias[h])); });
  const std::optional<AffineScoreForm> f = affine_score_form(p);
  ASSERT_TRUE(f.has_value());
  ASSERT_EQ(f->core.captures().size(), 1u);
  EXPECT_EQ(f->core.captures()[0].name, "bias");
  expect_recomposes(p, *f);
}
