// Tests of the mod IR: promotion, Python integer semantics, printing, hashing, folding/CSE, the tile
// evaluator against the scalar evaluator, symbolic derivatives against finite differences, and errors.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <functional>
#include <map>
#include <random>

#include "flexgrad/attention/mask_mods.h"
#include "flexgrad/attention/mod_grad.h"
#include "flexgrad/attention/mod_program.h"
#include "flexgrad/attention/tile_eval.h"
#include "flexgrad/tensor/vec_math.h"
#include "tests/attention/random_mods.h"

using namespace fg;

namespace {

Expr S() { return Expr::score(); }
Expr Q() { return Expr::q_idx(); }
Expr KV() { return Expr::kv_idx(); }

int count_op(const ModProgram& p, ExprOp op) {
  int n = 0;
  for (const Instr& in : p.instrs()) n += in.op == op;
  return n;
}

Tensor random_floats(const Shape& shape, uint32_t seed, double lo = -1, double hi = 1, DType dt = kFloat32) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<double> d(lo, hi);
  std::vector<float> v(static_cast<size_t>(shape_numel(shape)));
  for (float& x : v) x = static_cast<float>(d(g));
  return from_vector(v, shape, dt);
}

}  // namespace

TEST(Expr, PromotionRules) {
  EXPECT_EQ((Q() + KV()).kind(), ValueKind::Int);
  EXPECT_EQ((Q() * 8.0).kind(), ValueKind::Float);
  EXPECT_EQ((Q() / 2).kind(), ValueKind::Float);  // true division
  EXPECT_EQ(floor_div(Q(), 2).kind(), ValueKind::Int);
  EXPECT_EQ((Q() % 3).kind(), ValueKind::Int);
  EXPECT_EQ((Q() % 2.5).kind(), ValueKind::Float);
  EXPECT_EQ((Q() < KV()).kind(), ValueKind::Bool);
  EXPECT_EQ(((Q() < KV()) & (Q() > 3)).kind(), ValueKind::Bool);
  EXPECT_EQ(floor(Q()).kind(), ValueKind::Int);
  EXPECT_EQ(floor(S()).kind(), ValueKind::Float);
  EXPECT_EQ(exp(Q()).kind(), ValueKind::Float);
  EXPECT_EQ((S() * 2).kind(), ValueKind::Float);
  EXPECT_EQ((2.0 - Q()).kind(), ValueKind::Float);
  EXPECT_EQ(where(Q() < KV(), Q(), 1.0).kind(), ValueKind::Float);
  EXPECT_EQ(where(Q() < KV(), Q(), KV()).kind(), ValueKind::Int);
  EXPECT_EQ(((Q() < 1) + (KV() < 1)).kind(), ValueKind::Int);  // bools add as ints
  EXPECT_EQ(abs(Q() - KV()).kind(), ValueKind::Int);
  EXPECT_EQ(pow(Q(), 2).kind(), ValueKind::Int);
  EXPECT_EQ(to_float(Q()).kind(), ValueKind::Float);
  EXPECT_EQ(to_bool(Q()).kind(), ValueKind::Bool);
  EXPECT_EQ(Expr(-INFINITY).kind(), ValueKind::Float);
  EXPECT_THROW(Q() & KV(), ValueError);
  EXPECT_THROW(!S(), ValueError);
  EXPECT_THROW(where(Q(), S(), S()), ValueError);
  EXPECT_THROW(-(Q() < KV()), ValueError);
}

TEST(Expr, PythonIntegerSemantics) {
  // floor division and remainder follow Python: floor, remainder takes the divisor's sign.
  auto prog = trace_score_mod([](Expr, Expr, Expr, Expr q, Expr kv) { return to_float(floor_div(q - kv, 3)); });
  EXPECT_EQ(prog.evaluate(0, 0, 0, 7), -3);  // -7 // 3
  EXPECT_EQ(prog.evaluate(0, 0, 7, 0), 2);
  auto rem = trace_score_mod([](Expr, Expr, Expr, Expr q, Expr kv) { return to_float((q - kv) % 3); });
  EXPECT_EQ(rem.evaluate(0, 0, 0, 7), 2);  // -7 % 3
  EXPECT_EQ(rem.evaluate(0, 0, 7, 0), 1);
  auto rem_neg = trace_score_mod([](Expr, Expr, Expr, Expr q, Expr kv) { return to_float((q - kv) % -3); });
  EXPECT_EQ(rem_neg.evaluate(0, 0, 7, 0), -2);  // 7 % -3
  EXPECT_EQ(rem_neg.evaluate(0, 0, 0, 7), -1);  // -7 % -3
  auto fdiv_neg = trace_score_mod([](Expr, Expr, Expr, Expr q, Expr kv) { return to_float(floor_div(q - kv, -2)); });
  EXPECT_EQ(fdiv_neg.evaluate(0, 0, 7, 0), -4);  // 7 // -2
  auto frem = trace_score_mod([](Expr s, Expr, Expr, Expr, Expr) { return s % 2.0; });
  EXPECT_DOUBLE_EQ(frem.evaluate(0, 0, 0, 0, -7.5), 0.5);
  EXPECT_DOUBLE_EQ(frem.evaluate(0, 0, 0, 0, 7.5), 1.5);
  // constant folding uses the same semantics
  auto folded = trace_score_mod([](Expr s, Expr, Expr, Expr, Expr) { return s + (floor_div(Expr(-7), 2) + Expr(-7) % 2); });
  EXPECT_EQ(folded.to_string(), "score + -3.0");
  // truncating cast as .to(torch.int64)
  auto trunc = trace_score_mod([](Expr s, Expr, Expr, Expr, Expr) { return to_float(to_int(s)); });
  EXPECT_EQ(trunc.evaluate(0, 0, 0, 0, -2.7), -2);
  // tile evaluator agrees on negatives
  TileEvaluator<float> ev(rem);
  ev.run(0, 0, 0, 4, 0, 9, nullptr);
  std::vector<float> out(36);
  ev.copy_output(0, out.data());
  for (int q = 0; q < 4; ++q)
    for (int kv = 0; kv < 9; ++kv) EXPECT_EQ(out[q * 9 + kv], rem.evaluate(0, 0, q, kv));
}

TEST(Expr, Printing) {
  const int H = 4;
  auto alibi = trace_score_mod(
      [&](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + (kv - q) * exp2(-((h + 1) * 8.0 / H)); });
  // (h + 1) * 8.0 / 4 is folded to (h + 1) * 2.0 in the IR.
  EXPECT_EQ(alibi.to_string(), "score + (kv_idx - q_idx) * exp2(-((h + 1) * 2.0))");
  auto causal = trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return q >= kv; });
  EXPECT_EQ(causal.to_string(), "q_idx >= kv_idx");
  auto win = trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return ((q >= kv) & !(q - kv > 64)) | (kv < 4); });
  EXPECT_EQ(win.to_string(), "q_idx >= kv_idx & !(q_idx - kv_idx > 64) | kv_idx < 4");
  Captured doc(from_vector(std::vector<int64_t>{0, 0, 1}, {3}, kInt64), "doc");
  auto dm = trace_mask_mod([&](Expr, Expr, Expr q, Expr kv) { return doc[q] == doc[kv]; });
  EXPECT_EQ(dm.to_string(), "doc[q_idx] == doc[kv_idx]");
  auto sub = trace_score_mod([](Expr s, Expr, Expr, Expr q, Expr kv) { return s - (q - kv) - to_float(q) * -INFINITY; });
  EXPECT_EQ(sub.to_string(), "score - (q_idx - kv_idx) - to_float(q_idx) * -inf");
  auto calls = trace_score_mod([](Expr s, Expr, Expr, Expr q, Expr) { return where(q < 3, max(s, 0.5), tanh(s)); });
  EXPECT_EQ(calls.to_string(), "where(q_idx < 3, max(score, 0.5), tanh(score))");
}

TEST(Expr, HashAndStructuralEquality) {
  auto mk = [](double c) {
    return trace_score_mod([c](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + (kv - q) * c + h; });
  };
  EXPECT_EQ(mk(0.5).hash(), mk(0.5).hash());
  EXPECT_TRUE(mk(0.5).structurally_equal(mk(0.5)));
  EXPECT_NE(mk(0.5).hash(), mk(0.25).hash());
  EXPECT_FALSE(mk(0.5).structurally_equal(mk(0.25)));
  // captured values do not matter, dtype and rank do
  auto with = [](const Tensor& t) {
    Captured c(t);
    return trace_score_mod([c](Expr s, Expr, Expr h, Expr, Expr) { return s + c[h]; });
  };
  auto a = with(from_vector(std::vector<float>{1, 2, 3, 4}, {4}));
  auto b = with(from_vector(std::vector<float>{5, 6, 7, 8}, {4}));
  auto c = with(from_vector(std::vector<double>{1, 2, 3, 4}, {4}, kFloat64));
  EXPECT_EQ(a.hash(), b.hash());
  EXPECT_TRUE(a.structurally_equal(b));
  EXPECT_NE(a.hash(), c.hash());
  EXPECT_FALSE(a.structurally_equal(c));
  // score vs mask programs differ
  auto m1 = trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return q >= kv; });
  auto m2 = trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return q > kv; });
  EXPECT_NE(m1.hash(), m2.hash());
  // structure_key (a code generator memo's key): equal exactly where the structure, the captures' dtype and rank and
  // the names the generated text prints are equal
  EXPECT_EQ(mk(0.5).structure_key(), mk(0.5).structure_key());
  EXPECT_NE(mk(0.5).structure_key(), mk(0.25).structure_key());
  EXPECT_EQ(a.structure_key(), b.structure_key());
  EXPECT_NE(a.structure_key(), c.structure_key());
  EXPECT_NE(m1.structure_key(), m2.structure_key());
  Captured named(from_vector(std::vector<float>{1, 2, 3, 4}, {4}), "bias");
  EXPECT_NE(a.structure_key(), trace_score_mod([named](Expr s, Expr, Expr h, Expr, Expr) { return s + named[h]; })
                                   .structure_key());
  Captured rank2(from_vector(std::vector<float>{1, 2, 3, 4}, {2, 2}));
  EXPECT_NE(a.structure_key(), trace_score_mod([rank2](Expr s, Expr, Expr h, Expr, Expr) { return s + rank2[h][h]; })
                                   .structure_key());
}

TEST(Expr, FoldingAndCseReduceNodes) {
  // constants fold away entirely
  auto p = trace_score_mod([](Expr s, Expr, Expr, Expr, Expr) { return s * (Expr(2) * 3 - 5) + (Expr(1.5) - 1.5); });
  EXPECT_EQ(p.size(), 1u);
  EXPECT_EQ(p.to_string(), "score");
  // identical subexpressions built twice are computed once
  auto sq = trace_score_mod([](Expr s, Expr, Expr, Expr q, Expr kv) { return s + (q - kv) * (q - kv) + (kv - q); });
  EXPECT_EQ(count_op(sq, ExprOp::Sub), 2);  // q - kv once, kv - q once
  EXPECT_EQ(count_op(sq, ExprOp::Cast), 2);
  // commutative ops are matched in either order; and_masks(noop, m) is m
  auto comm = trace_score_mod([](Expr s, Expr, Expr, Expr q, Expr kv) { return to_float(q + kv) * to_float(kv + q); });
  EXPECT_EQ(count_op(comm, ExprOp::Add), 1);
  auto m = trace_mask_mod(and_masks(noop_mask, [](Expr, Expr, Expr q, Expr kv) { return q >= kv; }));
  EXPECT_EQ(m.size(), 3u);
  // the inputs used are recorded
  EXPECT_TRUE(m.uses(kUsesQ));
  EXPECT_FALSE(m.uses(kUsesScore));
  EXPECT_FALSE(m.uses(kUsesHead));
  // folding eliminates dead branches
  auto w = trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return where(Expr(true), q >= kv, q < kv); });
  EXPECT_EQ(w.to_string(), "q_idx >= kv_idx");
}

namespace {

struct ModCase {
  std::string name;
  ScoreMod mod;
};

std::vector<ModCase> score_cases(const Captured& bias, const Captured& table, const Captured& doc, int64_t S) {
  return {
      {"alibi", [](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + (kv - q) * exp2(-((h + 1) * 8.0 / 4)); }},
      {"softcap", [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); }},
      {"relbias", [](Expr s, Expr, Expr, Expr q, Expr kv) { return s + (q - kv); }},
      {"square", [](Expr s, Expr, Expr, Expr, Expr) { return s * s; }},
      {"head_bias", [bias](Expr s, Expr, Expr h, Expr, Expr) { return s * bias[h]; }},
      {"table", [table, S](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + table[h][q - kv + S - 1]; }},
      {"doc_mask_score",
       [doc](Expr s, Expr, Expr, Expr q, Expr kv) { return where(doc[q] == doc[kv], s, -INFINITY); }},
      {"math", [](Expr s, Expr b, Expr, Expr q, Expr) {
         return sigmoid(s) + log(1.0 + abs(s)) + sqrt(abs(s) + 1) * rsqrt(2.0 + b) + sin(s) * cos(s) + tan(s / 4);
       }},
      {"minmax", [](Expr s, Expr, Expr, Expr q, Expr kv) { return clamp(s, -0.5, to_float(q - kv) / 10) + max(s, 0.0); }},
      {"pow_floor", [](Expr s, Expr, Expr, Expr q, Expr kv) {
         return pow(abs(s) + 1, 1.5) + floor(s * 3) + ceil(s) + to_float(floor_div(q, 3) % 5) + exp(-s) + log2(3.0 + abs(s));
       }},
      {"dilated", [](Expr s, Expr, Expr, Expr q, Expr kv) { return where((q - kv) % 3 == 0, s, s - 5); }},
      {"int_pow", [](Expr s, Expr, Expr, Expr q, Expr kv) { return s + to_float(pow(q - kv, 2)) / 100; }},
  };
}

}  // namespace

template <class T>
void check_tile_vs_scalar() {
  const int64_t S = 40;
  Captured bias(random_floats({4}, 1, 0.5, 1.5), "bias");
  Captured table(random_floats({4, 2 * S - 1}, 2), "table");
  std::vector<int64_t> d(S);
  for (int64_t i = 0; i < S; ++i) d[i] = i / 13;
  Captured doc(from_vector(d, {S}, kInt64), "doc");
  std::mt19937 g(7);
  std::uniform_real_distribution<double> u(-3, 3);
  for (const auto& c : score_cases(bias, table, doc, S)) {
    SCOPED_TRACE(c.name);
    ModProgram p = trace_score_mod(c.mod);
    TileEvaluator<T> ev(p);
    for (int trial = 0; trial < 3; ++trial) {
      const int64_t nq = 1 + trial * 7, nkv = 3 + trial * 9, q0 = trial * 5, kv0 = trial * 3, ld = nkv + 2;
      std::vector<T> score(static_cast<size_t>(nq * ld)), out(static_cast<size_t>(nq * nkv));
      for (T& x : score) x = static_cast<T>(u(g));
      const int64_t b = trial % 2, h = trial;
      ev.score_tile(b, h, q0, nq, kv0, nkv, score.data(), out.data(), ld);
      for (int64_t i = 0; i < nq; ++i)
        for (int64_t j = 0; j < nkv; ++j) {
          const double ref = p.evaluate(b, h, q0 + i, kv0 + j, static_cast<double>(score[i * ld + j]));
          const double got = out[i * nkv + j];
          if (std::isinf(ref)) {
            EXPECT_EQ(got, ref);
          } else {
            const double tol = std::is_same_v<T, float> ? 2e-5 * (1 + std::fabs(ref)) : 1e-12 * (1 + std::fabs(ref));
            EXPECT_NEAR(got, ref, tol) << "at " << i << "," << j;
          }
        }
    }
  }
}

TEST(TileEvaluator, MatchesScalarEvaluatorFloat) { check_tile_vs_scalar<float>(); }
TEST(TileEvaluator, MatchesScalarEvaluatorDouble) { check_tile_vs_scalar<double>(); }

TEST(TileEvaluator, MaskTileAndBroadcastShapes) {
  std::vector<int64_t> d{0, 0, 0, 1, 1, 2, 2, 2, 2, 3};
  Captured doc(from_vector(d, {10}, kInt64), "doc");
  auto p = trace_mask_mod([doc](Expr, Expr, Expr q, Expr kv) { return (doc[q] == doc[kv]) & (q >= kv); });
  TileEvaluator<float> ev(p);
  std::vector<uint8_t> m(100);
  ev.mask_tile(0, 0, 0, 10, 0, 10, m.data());
  int64_t n = 0;
  for (int q = 0; q < 10; ++q)
    for (int kv = 0; kv < 10; ++kv) {
      EXPECT_EQ(m[q * 10 + kv], (d[q] == d[kv] && q >= kv) ? 1 : 0);
      n += m[q * 10 + kv];
    }
  EXPECT_EQ(ev.count_true(), n);
  // a q-only value is stored as a column, a kv-only value as a row, constants as scalars
  auto qonly = trace_mask_mod([](Expr, Expr, Expr q, Expr) { return q >= 3; });
  TileEvaluator<float> e2(qonly);
  e2.run(0, 0, 0, 5, 0, 7);
  TileValue v = e2.output(0);
  EXPECT_EQ(v.row_stride, 1);
  EXPECT_EQ(v.col_stride, 0);
  EXPECT_EQ(e2.count_true(), 2 * 7);
  TileEvaluator<float> e3(trace_mask_mod(noop_mask));
  e3.run(0, 0, 0, 5, 0, 7);
  EXPECT_EQ(e3.output(0).row_stride, 0);
  EXPECT_EQ(e3.count_true(), 35);
}

// reset() swaps the program and keeps the buffers (flex_cpu keeps one evaluator per thread across calls):
// a smaller program, a larger one, then the first again with new captured values, each read by hand.
TEST(TileEvaluator, ResetToAnotherProgramKeepsResultsRight) {
  std::vector<int64_t> d{0, 0, 1, 1, 1, 2};
  Captured doc(from_vector(d, {6}, kInt64), "doc");
  auto masked = trace_mask_mod([doc](Expr, Expr, Expr q, Expr kv) { return (doc[q] == doc[kv]) & (q >= kv); });
  auto small = trace_mask_mod([](Expr, Expr, Expr q, Expr) { return q >= 3; });
  TileEvaluator<float> ev(masked);
  std::vector<uint8_t> m(36);
  ev.mask_tile(0, 0, 0, 6, 0, 6, m.data());
  for (int q = 0; q < 6; ++q)
    for (int kv = 0; kv < 6; ++kv) ASSERT_EQ(m[q * 6 + kv], (d[q] == d[kv] && q >= kv) ? 1 : 0);
  ev.reset(small);
  ev.mask_tile(0, 0, 0, 6, 0, 6, m.data());
  for (int q = 0; q < 6; ++q)
    for (int kv = 0; kv < 6; ++kv) ASSERT_EQ(m[q * 6 + kv], q >= 3 ? 1 : 0);
  Captured bias(from_vector(std::vector<double>{0.5, -1.0, 2.0}, {3}, kFloat32), "bias");
  auto scored = trace_score_mod([bias, doc](Expr s, Expr, Expr, Expr q, Expr kv) {
    return s * 2.0 + Expr(bias[doc[kv]]) - to_float(q - kv);
  });
  ev.reset(scored);  // more instructions than the buffers held
  std::vector<float> score(36), out(36);
  for (int i = 0; i < 36; ++i) score[i] = 0.25f * i;
  ev.score_tile(0, 0, 0, 6, 0, 6, score.data(), out.data());
  const double bv[3] = {0.5, -1.0, 2.0};
  for (int q = 0; q < 6; ++q)
    for (int kv = 0; kv < 6; ++kv) ASSERT_FLOAT_EQ(out[q * 6 + kv], 0.5f * (q * 6 + kv) + bv[d[kv]] - (q - kv));
  std::vector<int64_t> d2{2, 2, 2, 0, 0, 1};
  Captured doc2(from_vector(d2, {6}, kInt64), "doc");
  ev.reset(trace_mask_mod([doc2](Expr, Expr, Expr q, Expr kv) { return (doc2[q] == doc2[kv]) & (q >= kv); }));
  ev.mask_tile(0, 0, 0, 6, 0, 6, m.data());
  for (int q = 0; q < 6; ++q)
    for (int kv = 0; kv < 6; ++kv) ASSERT_EQ(m[q * 6 + kv], (d2[q] == d2[kv] && q >= kv) ? 1 : 0);
  ev.release();
  EXPECT_EQ(ev.program().size(), 0u);
}

namespace {

// Checks the ScoreModBackward of `mod` against central finite differences of the scalar evaluator,
// both through the scalar evaluation of the derived program and through the tile evaluator.
void check_derivative(const ScoreMod& mod, std::vector<Tensor> float_caps) {
  ModProgram f = trace_score_mod(mod);
  ScoreModBackward bw = derive_score_mod(f);
  std::mt19937 g(3);
  std::uniform_real_distribution<double> u(-2, 2);
  TileEvaluator<double> ev(bw.program);
  for (int trial = 0; trial < 20; ++trial) {
    const int64_t b = trial % 2, h = trial % 4, q = 3 + trial % 7, kv = trial % 5;
    const double s = u(g), eps = 1e-6;
    std::vector<double> outs = bw.program.evaluate_all(b, h, q, kv, s);
    const double fd = (f.evaluate(b, h, q, kv, s + eps) - f.evaluate(b, h, q, kv, s - eps)) / (2 * eps);
    EXPECT_NEAR(outs[0], fd, 1e-6 * (1 + std::fabs(fd))) << bw.program.to_string(0);
    if (bw.dscore_is_constant) {
      EXPECT_EQ(outs[0], bw.dscore_constant);
    }
    // the tile evaluator gives the same outputs
    double score_tile = s;
    ev.run(b, h, q, 1, kv, 1, &score_tile);
    for (size_t o = 0; o < outs.size(); ++o) {
      TileValue tv = ev.output(o);
      const double got = tv.kind == ValueKind::Float ? tv.as<double>()[0]
                         : tv.kind == ValueKind::Int ? static_cast<double>(tv.as<int64_t>()[0])
                                                     : tv.as<uint8_t>()[0];
      EXPECT_NEAR(got, outs[o], 1e-12 * (1 + std::fabs(outs[o])));
    }
    // capture terms: perturb the element the term reads
    std::map<std::vector<int64_t>, double> grads;  // accumulated per element (a tensor read twice)
    for (const CaptureGradTerm& t : bw.terms) {
      Shape idx;
      for (int d = 0; d < t.ndim; ++d) idx.push_back(static_cast<int64_t>(outs[t.index_output + d]));
      idx.insert(idx.begin(), t.capture);
      grads[idx] += outs[t.deriv_output];
    }
    for (auto& [key, grad] : grads) {
      const Tensor& cap = bw.captures[key[0]].tensor;
      Shape idx(key.begin() + 1, key.end());
      const double old = cap.at(idx);
      cap.set_at(idx, old + eps);
      const double up = f.evaluate(b, h, q, kv, s);
      cap.set_at(idx, old - eps);
      const double down = f.evaluate(b, h, q, kv, s);
      cap.set_at(idx, old);
      EXPECT_NEAR(grad, (up - down) / (2 * eps), 1e-6 * (1 + std::fabs(grad)));
    }
  }
  (void)float_caps;
}

}  // namespace

TEST(ModGrad, SymbolicFormsAreSimplified) {
  auto sq = derive_score_mod(trace_score_mod([](Expr s, Expr, Expr, Expr, Expr) { return s * s; }));
  EXPECT_EQ(sq.program.to_string(0), "2.0 * score");
  auto cap = derive_score_mod(trace_score_mod([](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); }));
  EXPECT_EQ(cap.program.to_string(0), "1.0 - tanh(score / 20.0) * tanh(score / 20.0)");
  auto add = derive_score_mod(trace_score_mod([](Expr s, Expr, Expr, Expr q, Expr kv) { return s + (q - kv); }));
  EXPECT_TRUE(add.dscore_is_constant);
  EXPECT_EQ(add.dscore_constant, 1.0);
  EXPECT_TRUE(add.terms.empty());
  Captured hoff(from_vector(std::vector<double>{0.5, 1, 2, 3}, {4}, kFloat64), "hoff");
  auto sc = derive_score_mod(trace_score_mod([hoff](Expr s, Expr, Expr h, Expr, Expr) { return s * hoff[h]; }));
  ASSERT_EQ(sc.terms.size(), 1u);
  EXPECT_EQ(sc.program.to_string(0), "hoff[h]");
  EXPECT_EQ(sc.program.to_string(sc.terms[0].index_output), "h");
  EXPECT_EQ(sc.program.to_string(sc.terms[0].deriv_output), "score");
}

TEST(ModGrad, MatchesFiniteDifferences) {
  const int64_t S = 12;
  Tensor bias = random_floats({4}, 11, 0.5, 1.5, kFloat64);
  Tensor table = zeros({4, 2 * S - 1}, kFloat64);
  for (int64_t i = 0; i < table.numel(); ++i) table.set_at({i / (2 * S - 1), i % (2 * S - 1)}, std::sin(i * 0.37));
  Captured cb(bias, "bias"), ct(table, "table");
  check_derivative([](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); }, {});
  check_derivative([](Expr s, Expr, Expr, Expr, Expr) { return s * s; }, {});
  check_derivative([cb](Expr s, Expr, Expr h, Expr, Expr) { return s * cb[h]; }, {bias});
  check_derivative([ct, S](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + ct[h][q - kv + S - 1]; }, {table});
  check_derivative([cb, ct, S](Expr s, Expr, Expr h, Expr q, Expr kv) {
    return exp(s * cb[h]) / (1.0 + ct[h][q - kv + S - 1] * ct[h][q - kv + S - 1]) + sigmoid(cb[h] - s) + cb[(h + 1) % 4];
  }, {bias, table});
  check_derivative([](Expr s, Expr, Expr, Expr q, Expr kv) {
    return sqrt(s * s + 1) + rsqrt(s * s + 2) + sin(s) - cos(2.0 * s) + tan(s / 3) + log(s * s + 1) + log2(s * s + 3) +
           exp2(s / 2) + pow(s * s + 1, 0.7) + pow(2.0, s) + abs(s) * 0.5 + s / (q + 1) - to_float(kv) / (s * s + 2);
  }, {});
  check_derivative([](Expr s, Expr, Expr, Expr q, Expr) {
    return min(s, 0.3) + max(2.0 * s, -0.1) + where(q > 5, s * 3, -s) + floor(s) + (s * 3) % 1.7;
  }, {});
}

// ScoreModBackward::value_and_dscore (the one-pass program of the GPU backward's element): its two outputs
// against float64 formulas written here, at random points.
TEST(ModGrad, MergedScoreAndDerivativeMatchHandWrittenFormulas) {
  const std::vector<double> bias_v{0.5, -1.25, 2.0, 0.75};
  Captured bias(from_vector(bias_v, {4}, kFloat64), "bias");
  struct Case {
    const char* name;
    ScoreMod mod;
    std::function<double(double, int64_t, int64_t, int64_t)> f, df;  // (s, h, q, kv)
  };
  const std::vector<Case> cases{
      {"softcap", [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); },
       [](double s, int64_t, int64_t, int64_t) { return 20 * std::tanh(s / 20); },
       [](double s, int64_t, int64_t, int64_t) { return 1 - std::tanh(s / 20) * std::tanh(s / 20); }},
      {"square", [](Expr s, Expr, Expr, Expr, Expr) { return s * s; },
       [](double s, int64_t, int64_t, int64_t) { return s * s; },
       [](double s, int64_t, int64_t, int64_t) { return 2 * s; }},
      {"exp_ratio", [](Expr s, Expr, Expr, Expr, Expr) { return exp(s) / (1.0 + s * s); },
       [](double s, int64_t, int64_t, int64_t) { return std::exp(s) / (1 + s * s); },
       [](double s, int64_t, int64_t, int64_t) {
         return std::exp(s) / (1 + s * s) - 2 * s * std::exp(s) / ((1 + s * s) * (1 + s * s));
       }},
      {"captured_and_indices",
       [bias](Expr s, Expr, Expr h, Expr q, Expr kv) { return s * bias[h] + tanh(s) * to_float(q - kv) / 8.0; },
       [&](double s, int64_t h, int64_t q, int64_t kv) { return s * bias_v[h] + std::tanh(s) * double(q - kv) / 8; },
       [&](double s, int64_t h, int64_t q, int64_t kv) {
         return bias_v[h] + (1 - std::tanh(s) * std::tanh(s)) * double(q - kv) / 8;
       }},
      {"alibi",
       [](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + to_float(kv - q) * exp2(-8.0 * to_float(h + 1) / 4.0); },
       [](double s, int64_t h, int64_t q, int64_t kv) { return s + double(kv - q) * std::exp2(-8.0 * double(h + 1) / 4); },
       [](double, int64_t, int64_t, int64_t) { return 1.0; }},
  };
  std::mt19937_64 gen(7);
  std::normal_distribution<double> nd(0, 6);
  for (const Case& c : cases) {
    const ScoreModBackward g = derive_score_mod(trace_score_mod(c.mod));
    ASSERT_EQ(g.value_and_dscore.outputs().size(), 2u) << c.name;
    for (int i = 0; i < 500; ++i) {
      const int64_t b = static_cast<int64_t>(gen() % 2), h = static_cast<int64_t>(gen() % 4);
      const int64_t q = static_cast<int64_t>(gen() % 300), kv = static_cast<int64_t>(gen() % 300);
      const double s = nd(gen);
      const std::vector<double> v = g.value_and_dscore.evaluate_all(b, h, q, kv, s);
      const double f = c.f(s, h, q, kv), df = c.df(s, h, q, kv);
      ASSERT_NEAR(v[0], f, 1e-12 * (1 + std::fabs(f))) << c.name << " score at s=" << s << " h=" << h;
      ASSERT_NEAR(v[1], df, 1e-12 * (1 + std::fabs(df))) << c.name << " d/dscore at s=" << s << " h=" << h;
    }
  }
}

// The merged program is the forward and the derivative, not an approximation of them: its output 0 is the
// forward's instruction list unchanged (re-emitting a builder's output folds nothing further), its output 1
// gives the derivative program's value bit for bit, and shared work appears once (one tanh for the softcap).
TEST(ModGrad, MergedProgramIsTheForwardAndTheDerivativeExactly) {
  auto same = [](double a, double b) {
    return (std::isnan(a) && std::isnan(b)) || (a == b && std::signbit(a) == std::signbit(b));
  };
  auto check = [&](const ModProgram& fwd, const std::string& label) {
    const ScoreModBackward g = derive_score_mod(fwd);
    const ModProgram& m = g.value_and_dscore;
    ASSERT_EQ(m.outputs().size(), 2u);
    ASSERT_GE(m.size(), fwd.size()) << label;
    EXPECT_EQ(m.outputs()[0], fwd.output()) << label;
    for (size_t i = 0; i < fwd.size(); ++i) {
      const Instr &a = fwd.instrs()[i], &b = m.instrs()[i];
      ASSERT_TRUE(a.op == b.op && a.kind == b.kind && a.ivalue == b.ivalue &&
                  std::bit_cast<uint64_t>(a.value) == std::bit_cast<uint64_t>(b.value) && a.args == b.args)
          << label << "\ninstruction " << i;
      if (a.op == ExprOp::Index) {
        ASSERT_TRUE(fwd.captures()[a.capture].tensor.is_same(m.captures()[b.capture].tensor)) << label;
      }
    }
    std::mt19937_64 gen(fwd.hash());
    std::normal_distribution<double> nd(0, 3);
    for (int i = 0; i < 200; ++i) {
      const int64_t b = static_cast<int64_t>(gen() % 2), h = static_cast<int64_t>(gen() % 3);
      const int64_t q = static_cast<int64_t>(gen() % 9), kv = static_cast<int64_t>(gen() % 11);
      const double s = i % 17 == 0 ? 0.0 : nd(gen);
      std::vector<double> want;
      bool raised = false;
      try {
        want = {fwd.evaluate(b, h, q, kv, s), g.program.evaluate(b, h, q, kv, s)};
      } catch (const Error&) {
        raised = true;
      }
      if (raised) {
        EXPECT_THROW(m.evaluate_all(b, h, q, kv, s), Error) << label;
        continue;
      }
      const std::vector<double> got = m.evaluate_all(b, h, q, kv, s);
      ASSERT_TRUE(same(got[0], want[0])) << label << "\nscore " << got[0] << " vs " << want[0];
      ASSERT_TRUE(same(got[1], want[1])) << label << "\nd/dscore " << got[1] << " vs " << want[1];
    }
  };
  const ModProgram softcap = trace_score_mod([](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); });
  check(softcap, "softcap");
  EXPECT_EQ(count_op(derive_score_mod(softcap).value_and_dscore, ExprOp::Tanh), 1);
  EXPECT_EQ(derive_score_mod(softcap).value_and_dscore.to_string(1), "1.0 - tanh(score / 20.0) * tanh(score / 20.0)");
  for (uint64_t seed = 1; seed <= 40; ++seed) {
    fg::testing::RandomModOptions o;
    o.steps = 10 + static_cast<int>(seed % 20);
    o.errors = seed % 4 == 0;
    const fg::testing::RandomMod r = fg::testing::random_mod(seed + 9000, o);
    check(r.score, "seed " + std::to_string(seed + 9000) + ": " + r.score.to_string());
    if (::testing::Test::HasFailure()) break;
  }
}

// The generic visitor (what the tensor reference path implements with differentiable ops): here one
// that rebuilds the formula in prefix form, checking it sees every instruction with its operands.
TEST(ModProgram, VisitorEvaluation) {
  struct Prefix {
    using Value = std::string;
    std::string constant(const Instr& in) { return in.kind == ValueKind::Float ? fmt::format("{}", in.value)
                                                                               : fmt::format("{}", in.ivalue); }
    std::string input(ExprOp leaf) { return expr_op_name(leaf); }
    std::string index(const Instr&, const CaptureRef& c, std::vector<std::string> idx) {
      return fmt::format("{}[{}]", c.name, fmt::join(idx, ","));
    }
    std::string apply(const Instr& in, std::vector<std::string> args) {
      return fmt::format("({} {})", expr_op_name(in.op), fmt::join(args, " "));
    }
  };
  Captured bias(zeros({4}), "bias");
  auto p = trace_score_mod([bias](Expr s, Expr, Expr h, Expr q, Expr kv) { return s * bias[h] + (q - kv); });
  Prefix v;
  auto out = p.evaluate_with(v);
  ASSERT_EQ(out.size(), 1u);
  EXPECT_EQ(out[0], "(add (mul score bias[h]) (cast (sub q_idx kv_idx)))");
}

TEST(Expr, Errors) {
  // wrong return kinds, named
  try {
    trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return to_float(q - kv); }, "my_mask");
    FAIL();
  } catch (const ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("my_mask"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("float"), std::string::npos);
  }
  try {
    trace_score_mod([](Expr, Expr, Expr, Expr q, Expr kv) { return q < kv; });
    FAIL();
  } catch (const ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("score_mod"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("bool"), std::string::npos);
  }
  // the callable throwing
  EXPECT_THROW(trace_score_mod([](Expr, Expr, Expr, Expr, Expr) -> Expr { throw std::runtime_error("boom"); }),
               ValueError);
  EXPECT_THROW(trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return q & kv; }), ValueError);
  // captured tensors: rank, float index, dtype, out-of-range
  Captured t2(from_vector(std::vector<float>{1, 2, 3, 4, 5, 6}, {2, 3}), "t2");
  EXPECT_THROW(trace_score_mod([t2](Expr s, Expr, Expr h, Expr, Expr) { return s + t2[h]; }), ValueError);
  EXPECT_THROW((void)t2[Expr(1.5)], IndexError);
  EXPECT_THROW((void)t2[0][0][0], IndexError);
  EXPECT_THROW(Captured(empty({1}, kFloat16)), DTypeError);
  EXPECT_THROW(trace_score_mod([t2](Expr s, Expr, Expr, Expr, Expr) { return s + t2[5][0]; }), IndexError);
  auto p = trace_score_mod([t2](Expr s, Expr, Expr h, Expr, Expr kv) { return s + t2[h][kv]; });
  EXPECT_THROW(p.evaluate(0, 0, 0, 3), IndexError);
  EXPECT_THROW(p.evaluate(0, 2, 0, 0), IndexError);
  EXPECT_NO_THROW(p.evaluate(0, 1, 0, 2));
  TileEvaluator<float> ev(p);
  std::vector<float> score(8, 0.f), out(8);
  EXPECT_THROW(ev.score_tile(0, 1, 0, 2, 0, 4, score.data(), out.data()), IndexError);
  EXPECT_NO_THROW(ev.score_tile(0, 1, 0, 2, 0, 3, score.data(), out.data()));
  EXPECT_FLOAT_EQ(out[5], 6.f);  // q=1 row, kv=2: t2[1][2]
  // missing score tile
  EXPECT_THROW(ev.run(0, 0, 0, 1, 0, 1, nullptr), ValueError);
  // integer division by zero
  auto z = trace_score_mod([](Expr s, Expr, Expr, Expr q, Expr) { return s + to_float(floor_div(7, q)); });
  EXPECT_THROW(z.evaluate(0, 0, 0, 0), ValueError);
  // derive of a mask program
  EXPECT_THROW(derive_score_mod(trace_mask_mod(noop_mask)), ValueError);
}

// The vectorisable float exp / exp2 / tanh / sigmoid of the tile evaluator against libm (in double).
TEST(TileEvaluator, VectorMathAccuracy) {
  auto ulps = [](float got, double ref) {
    const double r = static_cast<float>(ref);
    if (std::fabs(ref) < 1e-37) return 0.0;  // subnormal results flush to zero by design
    if (std::isinf(r) || r == 0) return got == r ? 0.0 : 1e9;
    return std::fabs(got - r) / std::fabs(std::nextafter(static_cast<float>(r), INFINITY) - static_cast<float>(r));
  };
  double worst_exp = 0, worst_exp2 = 0, worst_tanh = 0, worst_sig = 0;
  for (int i = -200000; i <= 200000; ++i) {
    const float x = static_cast<float>(i) * 4.4e-4f;  // [-88, 88]
    worst_exp = std::max(worst_exp, ulps(vec::expf(x), std::exp(static_cast<double>(x))));
    const float x2 = static_cast<float>(i) * 6.3e-4f;  // [-126, 126]
    worst_exp2 = std::max(worst_exp2, ulps(vec::exp2f(x2), std::exp2(static_cast<double>(x2))));
    const float t = static_cast<float>(i) * 1e-4f;  // [-20, 20]
    worst_tanh = std::max(worst_tanh, ulps(vec::tanhf(t), std::tanh(static_cast<double>(t))));
    worst_sig = std::max(worst_sig, ulps(vec::sigmoidf(t), 1.0 / (1.0 + std::exp(-static_cast<double>(t)))));
  }
  EXPECT_LE(worst_exp, 4);
  EXPECT_LE(worst_exp2, 4);
  EXPECT_LE(worst_tanh, 4);
  EXPECT_LE(worst_sig, 4);
  EXPECT_EQ(vec::expf(INFINITY), INFINITY);
  EXPECT_EQ(vec::expf(-INFINITY), 0.f);
  EXPECT_EQ(vec::expf(100.f), INFINITY);
  EXPECT_TRUE(std::isnan(vec::expf(NAN)));
  EXPECT_EQ(vec::exp2f(-INFINITY), 0.f);
  EXPECT_EQ(vec::exp2f(128.f), INFINITY);
  EXPECT_EQ(vec::tanhf(INFINITY), 1.f);
  EXPECT_EQ(vec::tanhf(-INFINITY), -1.f);
  EXPECT_TRUE(std::isnan(vec::tanhf(NAN)));
  EXPECT_EQ(vec::tanhf(1e-30f), 1e-30f);
  EXPECT_EQ(vec::sigmoidf(-INFINITY), 0.f);
  EXPECT_EQ(vec::sigmoidf(INFINITY), 1.f);
}

// Captures of every supported dtype and strided (non-contiguous, offset) layouts read correctly.
TEST(TileEvaluator, CaptureDtypesAndLayouts) {
  Tensor base = from_vector(std::vector<float>{0, 1, 2, 3, 4, 5, 6, 7}, {8});
  // a transposed [3, 2] view of elements 1..6 (storage offset 1): t[i][j] = 1 + i + 3 * j
  Tensor tr = base.alias_with_layout({3, 2}, {1, 3}, 1);
  Captured ct(tr, "tr");
  Captured ci32(from_vector(std::vector<int32_t>{10, 20, 30}, {3}, kInt32), "i32");
  Captured cb(from_vector(std::vector<bool>{true, false, true}, {3}, kBool), "flags");
  Captured c0(full({}, 2.5, kFloat64), "scalar");  // rank 0: no index needed
  auto p = trace_score_mod([&](Expr s, Expr, Expr, Expr q, Expr kv) {
    return where(cb[q], s * ct[q][kv] + to_float(ci32[q]), s - c0);
  });
  auto mask = trace_mask_mod([&](Expr, Expr, Expr q, Expr) { return cb[q]; });
  TileEvaluator<double> ev(p);
  TileEvaluator<float> em(mask);
  std::vector<double> score(6, 2.0);
  ev.score_tile(0, 0, 0, 3, 0, 2, score.data(), score.data());  // in place
  std::vector<uint8_t> m(6);
  em.mask_tile(0, 0, 0, 3, 0, 2, m.data());
  for (int q = 0; q < 3; ++q)
    for (int kv = 0; kv < 2; ++kv) {
      const double expect = (q != 1) ? 2.0 * (1 + q + 3 * kv) + 10 * (q + 1) : 2.0 - 2.5;
      EXPECT_DOUBLE_EQ(score[q * 2 + kv], expect);
      EXPECT_DOUBLE_EQ(p.evaluate(0, 0, q, kv, 2.0), expect);
      EXPECT_EQ(m[q * 2 + kv], q != 1);
    }
  // output into a wider destination (leading dimension)
  std::vector<float> s2(3 * 4, -1.f), o2(3 * 5, -7.f);
  TileEvaluator<float> ef(p);
  ef.score_tile(0, 0, 0, 3, 0, 2, s2.data(), o2.data(), 4, 5);
  EXPECT_FLOAT_EQ(o2[5 + 1], static_cast<float>(-1 - 2.5));
  EXPECT_FLOAT_EQ(o2[2], -7.f);  // untouched past the tile width
  // hash depends on capture rank
  Captured r1(zeros({6}), "r"), r2(zeros({2, 3}), "r");
  auto h1 = trace_score_mod([&](Expr s, Expr, Expr, Expr q, Expr) { return s + r1[q]; });
  auto h2 = trace_score_mod([&](Expr s, Expr, Expr, Expr q, Expr) { return s + r2[0][q]; });
  EXPECT_NE(h1.hash(), h2.hash());
}
