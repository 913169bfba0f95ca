// Property test of flex_attention over random cases: shapes (B, Hq, Hkv with GQA, Bkv broadcast,
// Lq != Lkv, E != Ev), float32 / float64, strided q, k, v (transposed, sliced, stepped views), random
// score_mod / mask_mod programs (tests/attention/random_mods.h) and BlockMasks of random block sizes.
// In every case the fused kernel, the reference path and a naive float64 attention written here agree.
// The naive golden evaluates the mods with ModProgram::evaluate (the scalar evaluator), not with the tile
// evaluator the fused kernel uses, and shares no attention code with flexgrad.
#include <cmath>
#include <limits>
#include <random>

#include "flexgrad/attention/flex_attention.h"
#include "tests/attention/random_mods.h"
#include "tests/test_util.h"

namespace fg {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

struct Case {
  int64_t B, Bkv, Hq, Hkv, Lq, Lkv, E, Ev;
  DType dt;
  double scale;
  bool has_score_mod, has_mask;
  BlockSize block{128};
  std::string describe() const {
    return fmt::format("B={} Bkv={} Hq={} Hkv={} Lq={} Lkv={} E={} Ev={} {} scale={} score_mod={} mask={} block=({}, {})",
                       B, Bkv, Hq, Hkv, Lq, Lkv, E, Ev, dtype_name(dt), scale, has_score_mod, has_mask, block.q,
                       block.kv);
  }
};

// The values of x (float64, contiguous) in dtype dt, laid out in one of several non-trivial ways.
Tensor lay_out(const Tensor& x, DType dt, int how) {
  const Tensor c = x.to(dt);
  switch (how) {
    case 1: return c.transpose(1, 2).contiguous().transpose(1, 2);  // storage [B, L, H, E]
    case 2: return c.transpose(2, 3).contiguous().transpose(2, 3);  // last dim strided
    case 3: {  // a slice of a wider buffer: storage offset, padded rows
      Tensor wide = zeros({c.size(0), c.size(1), c.size(2), c.size(3) + 3}, dt);
      Tensor view = wide.narrow(3, 2, c.size(3));
      view.copy_(c);
      return view;
    }
    case 4: {  // every other element of the sequence dim (stride 2 along L)
      Tensor wide = zeros({c.size(0), c.size(1), 2 * c.size(2), c.size(3)}, dt);
      Tensor view = wide.slice(2, 1, 2 * c.size(2), 2);
      view.copy_(c);
      return view;
    }
    default: return c;
  }
}

struct Golden {
  std::vector<double> out, lse;
  bool finite = true;  // every allowed modified score finite (NaN / inf scores are issue 10 item 4's, not drawn)
  double max_abs = 0;  // of the allowed modified scores
};

// softmax(scale QK^T + score_mod, masked) V in plain float64 loops; the mods by the scalar evaluator.
// `jitter` (with its rng) perturbs each score relatively before and after the mod, as rounding in the
// kernels' dtype does: the result's sensitivity to it tells whether a case is well-conditioned enough for a
// comparison at that dtype's tolerance.
Golden naive(const Case& c, const std::vector<double>& q, const std::vector<double>& k, const std::vector<double>& v,
             const fg::testing::RandomMod& m, double jitter, std::mt19937_64* rng) {
  Golden g;
  g.out.assign(static_cast<size_t>(c.B * c.Hq * c.Lq * c.Ev), 0.0);
  g.lse.assign(static_cast<size_t>(c.B * c.Hq * c.Lq), -kInf);
  std::vector<double> s(static_cast<size_t>(c.Lkv));
  std::uniform_real_distribution<double> u(-1, 1);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < c.Hq; ++h)
      for (int64_t i = 0; i < c.Lq; ++i) {
        const int64_t kb = c.Bkv == 1 ? 0 : b, kh = h / (c.Hq / c.Hkv), row = (b * c.Hq + h) * c.Lq + i;
        double mx = -kInf;
        for (int64_t j = 0; j < c.Lkv; ++j) {
          double dot = 0;
          for (int64_t e = 0; e < c.E; ++e) dot += q[row * c.E + e] * k[((kb * c.Hkv + kh) * c.Lkv + j) * c.E + e];
          double x = c.scale * dot;
          if (rng) x *= 1 + jitter * u(*rng);
          if (c.has_score_mod) x = m.score.evaluate(b, h, i, j, x);
          if (rng) x *= 1 + jitter * u(*rng);  // the rounding of the mod's result (large |x|: large steps)
          if (c.has_mask && m.mask.evaluate(b, h, i, j) == 0) x = -kInf;
          else if (!std::isfinite(x)) g.finite = false;
          else g.max_abs = std::max(g.max_abs, std::abs(x));
          s[j] = x;
          mx = std::max(mx, x);
        }
        if (!g.finite) return g;
        if (mx == -kInf) continue;  // no allowed key: out 0, lse -inf
        double sum = 0;
        for (int64_t j = 0; j < c.Lkv; ++j) sum += std::exp(s[j] - mx);
        g.lse[row] = mx + std::log(sum);
        for (int64_t j = 0; j < c.Lkv; ++j) {
          const double p = std::exp(s[j] - mx) / sum;
          for (int64_t e = 0; e < c.Ev; ++e) g.out[row * c.Ev + e] += p * v[((kb * c.Hkv + kh) * c.Lkv + j) * c.Ev + e];
        }
      }
  return g;
}

// Largest difference: absolute for outputs (values of order 1), relative past 1 for lse (scores may be huge);
// -inf lse entries must match exactly (infinity when they do not).
double max_diff(const std::vector<double>& a, const std::vector<double>& b, bool relative) {
  if (a.size() != b.size()) return kInf;
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(a[i]) || std::isinf(b[i]) || std::isnan(a[i]) || std::isnan(b[i])) {
      if (!(a[i] == b[i])) return kInf;
      continue;
    }
    const double d = std::abs(a[i] - b[i]);
    worst = std::max(worst, relative ? d / std::max(1.0, std::abs(b[i])) : d);
  }
  return worst;
}

Case draw_case(std::mt19937_64& rng) {
  auto uniform = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  Case c;
  c.B = uniform(1, 2);
  c.Bkv = uniform(0, 2) == 0 ? 1 : c.B;  // K/V broadcast over the batch
  c.Hkv = uniform(1, 2);
  c.Hq = c.Hkv * uniform(1, 3);  // GQA groups of 1 to 3 heads
  c.Lq = uniform(1, 13);
  c.Lkv = uniform(1, 17);
  c.E = uniform(1, 9);
  c.Ev = uniform(1, 9);
  c.dt = uniform(0, 1) ? kFloat32 : kFloat64;
  c.scale = uniform(0, 2) == 0 ? std::uniform_real_distribution<double>(0.05, 2.0)(rng) : 1.0 / std::sqrt(double(c.E));
  c.has_score_mod = uniform(0, 4) != 0;
  c.has_mask = uniform(0, 3) != 0;
  static const int64_t blocks[] = {1, 2, 3, 4, 5, 8, 16, 128};
  c.block = BlockSize(blocks[uniform(0, 7)], blocks[uniform(0, 7)]);
  return c;
}

TEST(FlexProperty, FusedEqualsReferenceEqualsNaiveFloat64) {
  int checked = 0, skipped = 0, with_mask = 0, f32 = 0;
  for (uint64_t seed = 1; seed <= 300; ++seed) {
    std::mt19937_64 rng(seed * 0x9e3779b97f4a7c15ULL);
    const Case c = draw_case(rng);
    fg::testing::RandomModOptions mo;
    mo.steps = 4 + static_cast<int>(seed % 9);
    const fg::testing::RandomMod m = fg::testing::random_mod(seed + 90000, mo);

    Generator gen(seed);
    const Tensor q64 = randn({c.B, c.Hq, c.Lq, c.E}, kFloat64, &gen);
    const Tensor k64 = randn({c.Bkv, c.Hkv, c.Lkv, c.E}, kFloat64, &gen);
    const Tensor v64 = randn({c.Bkv, c.Hkv, c.Lkv, c.Ev}, kFloat64, &gen);
    auto layout = [&] { return static_cast<int>(std::uniform_int_distribution<int>(0, 4)(rng)); };
    const Tensor q = lay_out(q64, c.dt, layout()), k = lay_out(k64, c.dt, layout()), v = lay_out(v64, c.dt, layout());

    // The golden from the inputs as rounded to dt (as PyTorch upcasts its inputs).
    const std::vector<double> qv = q.contiguous().to_vector(), kv = k.contiguous().to_vector(),
                              vv = v.contiguous().to_vector();
    Golden golden;
    try {
      golden = naive(c, qv, kv, vv, m, 0, nullptr);
    } catch (const ValueError&) {  // e.g. `0 % 0` in a mod (raising mods are test_op_semantics.cpp's subject)
      golden.finite = false;
    }
    if (!golden.finite) {
      ++skipped;
      continue;
    }
    // float32 evaluates the mod in float32 and accumulates q.k in float32: a case whose golden moves when the
    // scores move by a few float32 ulps (a floor, a comparison or a huge mod right at the edge) cannot be
    // compared at a float32 tolerance; such cases are skipped (counted below), well-conditioned ones compared.
    const bool single = c.dt == kFloat32;
    if (single && golden.max_abs > 1e30) {  // past float32's range (a 1e300 constant): inf in float32
      ++skipped;
      continue;
    }
    const double tol_out = single ? 2e-4 : 1e-9, tol_lse = single ? 2e-5 : 1e-10;
    std::mt19937_64 jitter_rng(seed);
    const Golden moved = naive(c, qv, kv, vv, m, single ? 5e-7 : 1e-14, &jitter_rng);
    if (!moved.finite || max_diff(moved.out, golden.out, false) > tol_out / 4 ||
        max_diff(moved.lse, golden.lse, true) > tol_lse / 4) {
      ++skipped;
      continue;
    }

    FlexAttentionOptions o;
    o.scale = c.scale;
    o.enable_gqa = c.Hq != c.Hkv;
    o.return_lse = true;
    if (c.has_score_mod) {
      const Expr e = m.score_expr;
      o.score_mod = [e](Expr, Expr, Expr, Expr, Expr) { return e; };  // the program's leaves are the inputs
    }
    if (c.has_mask) {
      const Expr e = m.mask_expr;
      o.block_mask = create_block_mask([e](Expr, Expr, Expr, Expr) { return e; }, c.B, c.Hq, c.Lq, c.Lkv, c.block);
      ++with_mask;
    }
    const std::string label = fmt::format("seed {}: {}\n  score_mod: {}\n  mask_mod: {}", seed, c.describe(),
                                          m.score.to_string(), m.mask.to_string());
    FlexAttentionResult ref, fused;
    o.kernel.backend = FlexBackend::Reference;
    ASSERT_NO_THROW(ref = flex_attention(q, k, v, o)) << label;
    if (single && (any(isnan(ref.out)).item<bool>() || any(isnan(ref.lse)).item<bool>())) {
      ++skipped;  // an intermediate of the mod overflowed float32 (e.g. 1e30 * 1e30 - 1e30 * 1e30 is NaN there)
      continue;
    }
    o.kernel.backend = FlexBackend::Fused;
    ASSERT_NO_THROW(fused = flex_attention(q, k, v, o)) << label;
    ASSERT_EQ(fused.out.sizes(), (Shape{c.B, c.Hq, c.Lq, c.Ev})) << label;
    ASSERT_EQ(fused.out.dtype(), c.dt) << label;

    const std::vector<double> ro = ref.out.contiguous().to_vector(), fo = fused.out.contiguous().to_vector();
    const std::vector<double> rl = ref.lse.contiguous().to_vector(), fl = fused.lse.contiguous().to_vector();
    EXPECT_LE(max_diff(ro, golden.out, false), tol_out) << "reference out vs naive, " << label;
    EXPECT_LE(max_diff(fo, golden.out, false), tol_out) << "fused out vs naive, " << label;
    EXPECT_LE(max_diff(fo, ro, false), tol_out) << "fused out vs reference, " << label;
    EXPECT_LE(max_diff(rl, golden.lse, true), tol_lse) << "reference lse vs naive, " << label;
    EXPECT_LE(max_diff(fl, golden.lse, true), tol_lse) << "fused lse vs naive, " << label;
    EXPECT_LE(max_diff(fl, rl, true), tol_lse) << "fused lse vs reference, " << label;
    if (::testing::Test::HasFailure()) break;  // one case's report is enough
    ++checked;
    f32 += single;
  }
  std::cout << "[  INFO    ] " << checked << " random cases compared (" << f32 << " float32, " << with_mask
            << " with a BlockMask), " << skipped << " skipped (raising mods, non-finite or ill-conditioned scores)\n";
  // most draws are compared, in both dtypes, with and without masks
  EXPECT_GE(checked, 150);
  EXPECT_GE(f32, 60);
  EXPECT_GE(checked - f32, 60);
  EXPECT_GE(with_mask, 100);
}

// What the property test found in the reference path, as fixed probes. Both mods give every key of a row the
// same score, so the output is the mean of v over the keys (computed here in plain loops):
//   sin(q_idx) ignores the score: its values were broadcast only over (q), and the softmax ran over one key
//     (ShapeError from the matmul with GQA, a wrong output without);
//   score + 1e300 rounds every score to 1e300: exp(score - lse) lost the log(n) in lse's rounding and gave
//     every key weight 1 instead of 1/n.
TEST(FlexProperty, ReferenceHandlesModsIgnoringTheScoreAndHugeScores) {
  Generator gen(7);
  const int64_t B = 2, Hq = 3, Lq = 5, Lkv = 6, E = 4, Ev = 3;
  const Tensor q = randn({B, Hq, Lq, E}, kFloat64, &gen), k = randn({B, 1, Lkv, E}, kFloat64, &gen);
  const Tensor v = randn({B, 1, Lkv, Ev}, kFloat64, &gen);
  const std::vector<double> vv = v.to_vector();
  const ScoreMod mods[] = {[](Expr, Expr, Expr, Expr q_idx, Expr) { return sin(q_idx); },
                           [](Expr s, Expr, Expr, Expr, Expr) { return s + 1e300; }};
  for (const ScoreMod& mod : mods)
    for (FlexBackend backend : {FlexBackend::Reference, FlexBackend::Fused}) {
      FlexAttentionOptions o;
      o.score_mod = mod;
      o.enable_gqa = true;
      o.kernel.backend = backend;
      const std::vector<double> out = flex_attention(q, k, v, o).out.contiguous().to_vector();
      ASSERT_EQ(out.size(), static_cast<size_t>(B * Hq * Lq * Ev));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t e = 0; e < Ev; ++e) {
          double mean = 0;
          for (int64_t j = 0; j < Lkv; ++j) mean += vv[static_cast<size_t>((b * Lkv + j) * Ev + e)] / Lkv;
          for (int64_t h = 0; h < Hq; ++h)
            for (int64_t i = 0; i < Lq; ++i)
              EXPECT_NEAR(out[static_cast<size_t>(((b * Hq + h) * Lq + i) * Ev + e)], mean, 1e-12)
                  << (backend == FlexBackend::Reference ? "reference" : "fused") << " b " << b << " h " << h;
        }
    }
}

}  // namespace
}  // namespace fg
