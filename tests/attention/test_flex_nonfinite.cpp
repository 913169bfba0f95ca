// flex_attention with NaN and +-inf scores: the fused kernel and the reference path give what PyTorch's
// flex_attention gives (eager math: softmax over the modified scores, logsumexp for lse, NaN-propagating
// max), written out by hand below:
//   a NaN score anywhere in a row          -> that row's output, lse and max_scores are NaN
//   every score -inf (fully masked)        -> output 0, lse -inf, max_scores -inf
//   a +inf score (and no NaN)              -> output NaN (inf - inf in the softmax), lse +inf, max +inf
//   -inf entries next to finite ones       -> weight 0
// Small kv blocks put the special values in the first or the second kv tile of a row, where the
// online softmax takes different steps.
#include <cmath>
#include <limits>

#include "flexgrad/attention/flex_attention.h"
#include "tests/test_util.h"

namespace fg {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

enum class Row { Finite, NaN, Empty, PlusInf };

struct Expectation {
  Row kind;
  std::vector<double> bias;  // added to scale * q.k for this row (over Lkv = 4)
};

// Rows of the score bias and what PyTorch gives for each (tiles of two keys: {0, 1} then {2, 3}).
const std::vector<Expectation>& rows() {
  static const std::vector<Expectation> r{
      {Row::Finite, {0, 0.5, -1, 2}},
      {Row::NaN, {0, 1, 2, kNaN}},              // NaN in the second tile after a finite first tile
      {Row::NaN, {kNaN, 0, 1, 2}},              // NaN in the first tile, finite scores after it
      {Row::Empty, {-kInf, -kInf, -kInf, -kInf}},
      {Row::NaN, {-kInf, -kInf, kNaN, -kInf}},  // NaN among -inf only: NaN, not an empty row
      {Row::NaN, {kNaN, kNaN, kNaN, kNaN}},
      {Row::PlusInf, {0, kInf, 1, 2}},
      {Row::NaN, {kInf, 0, 1, kNaN}},           // +inf then a NaN: NaN wins, as torch.amax
      {Row::Finite, {-kInf, -kInf, 1, -2}},     // an all -inf first tile, then finite scores
      {Row::PlusInf, {-kInf, kInf, -kInf, -kInf}},
      {Row::Finite, {3, -kInf, -kInf, -kInf}},
  };
  return r;
}

struct Inputs {
  Tensor q, k, v, bias;
};

Inputs inputs() {
  const int64_t Lq = static_cast<int64_t>(rows().size()), Lkv = 4, E = 3;
  Generator gen(11);
  Inputs in;
  in.q = randn({1, 1, Lq, E}, kFloat64, &gen);
  in.k = randn({1, 1, Lkv, E}, kFloat64, &gen);
  in.v = randn({1, 1, Lkv, E}, kFloat64, &gen);
  std::vector<double> b;
  for (const Expectation& e : rows()) b.insert(b.end(), e.bias.begin(), e.bias.end());
  in.bias = from_vector(b, {Lq, Lkv}, kFloat64);
  return in;
}

// The finite rows' golden, in plain float64: softmax(scale q.k + bias) @ v and its logsumexp.
void finite_golden(const Inputs& in, double scale, int64_t i, std::vector<double>& out, double& lse, double& mx) {
  const int64_t Lkv = in.k.size(2), E = in.q.size(3);
  std::vector<double> s(Lkv);
  mx = -kInf;
  for (int64_t j = 0; j < Lkv; ++j) {
    double dot = 0;
    for (int64_t e = 0; e < E; ++e) dot += in.q.at({0, 0, i, e}) * in.k.at({0, 0, j, e});
    s[j] = scale * dot + in.bias.at({i, j});
    mx = std::max(mx, s[j]);
  }
  double sum = 0;
  for (int64_t j = 0; j < Lkv; ++j) sum += std::exp(s[j] - mx);
  lse = mx + std::log(sum);
  out.assign(E, 0.0);
  for (int64_t j = 0; j < Lkv; ++j)
    for (int64_t e = 0; e < E; ++e) out[e] += std::exp(s[j] - mx) / sum * in.v.at({0, 0, j, e});
}

class FlexNonFinite : public ::testing::TestWithParam<std::tuple<DType, FlexBackend>> {};

TEST_P(FlexNonFinite, ScoresFollowPyTorchRowByRow) {
  const auto [dt, backend] = GetParam();
  Inputs in = inputs();
  const double scale = 0.7;
  FlexAttentionOptions o;
  o.scale = scale;
  o.return_lse = o.return_max_scores = true;
  o.kernel.backend = backend;
  o.kernel.block_q = 4;
  o.kernel.block_kv = 2;
  o.score_mod = [b = Captured(in.bias)](Expr s, Expr, Expr, Expr q, Expr kv) { return s + b[q][kv]; };
  auto r = flex_attention(in.q.to(dt), in.k.to(dt), in.v.to(dt), o);
  const double tol = dt == kFloat64 ? 1e-12 : 1e-5;
  const int64_t E = in.q.size(3);
  for (int64_t i = 0; i < static_cast<int64_t>(rows().size()); ++i) {
    SCOPED_TRACE(::testing::Message() << "row " << i);
    const double lse = r.lse.at({0, 0, i}), mx = r.max_scores.at({0, 0, i});
    switch (rows()[i].kind) {
      case Row::Finite: {
        std::vector<double> want;
        double want_lse, want_mx;
        finite_golden(in, scale, i, want, want_lse, want_mx);
        for (int64_t e = 0; e < E; ++e) EXPECT_NEAR(r.out.at({0, 0, i, e}), want[e], tol);
        EXPECT_NEAR(lse, want_lse, tol);
        EXPECT_NEAR(mx, want_mx, tol);
        break;
      }
      case Row::NaN:
        for (int64_t e = 0; e < E; ++e) EXPECT_TRUE(std::isnan(r.out.at({0, 0, i, e})));
        EXPECT_TRUE(std::isnan(lse)) << lse;
        EXPECT_TRUE(std::isnan(mx)) << mx;
        break;
      case Row::Empty:
        for (int64_t e = 0; e < E; ++e) EXPECT_EQ(r.out.at({0, 0, i, e}), 0.0);
        EXPECT_EQ(lse, -kInf);
        EXPECT_EQ(mx, -kInf);
        break;
      case Row::PlusInf:
        for (int64_t e = 0; e < E; ++e) EXPECT_TRUE(std::isnan(r.out.at({0, 0, i, e})));
        EXPECT_EQ(lse, kInf);
        EXPECT_EQ(mx, kInf);
        break;
    }
  }
}

// A NaN in q makes its row's scores NaN: that row is NaN (not a fully masked row), the others are intact.
TEST_P(FlexNonFinite, NaNInQueryGivesANaNRow) {
  const auto [dt, backend] = GetParam();
  Generator gen(5);
  Tensor q = randn({1, 2, 6, 4}, kFloat64, &gen), k = randn({1, 2, 6, 4}, kFloat64, &gen), v = randn({1, 2, 6, 4}, kFloat64, &gen);
  FlexAttentionOptions o;
  o.return_lse = true;
  o.kernel.backend = backend;
  auto clean = flex_attention(q.to(dt), k.to(dt), v.to(dt), o);
  Tensor qn = q.clone();
  qn.set_at({0, 1, 2, 0}, kNaN);
  auto r = flex_attention(qn.to(dt), k.to(dt), v.to(dt), o);
  EXPECT_TRUE(all(isnan(r.out.narrow(1, 1, 1).narrow(2, 2, 1))).item<bool>());
  EXPECT_TRUE(std::isnan(r.lse.at({0, 1, 2})));
  EXPECT_EQ(sum(isnan(r.out).to(kInt64)).item<int64_t>(), 4);  // only that row
  EXPECT_EQ(sum(isnan(r.lse).to(kInt64)).item<int64_t>(), 1);
  Tensor other = r.out.narrow(1, 0, 1);
  EXPECT_TRUE(testing::close(other, clean.out.narrow(1, 0, 1), 0, 0));
}

// scale = NaN: every score is NaN, so every row is NaN; a row the BlockMask masks entirely stays empty
// (the mask replaces its scores by -inf before the softmax, as in PyTorch).
TEST_P(FlexNonFinite, NaNScaleGivesNaNExceptFullyMaskedRows) {
  const auto [dt, backend] = GetParam();
  Generator gen(6);
  Tensor q = randn({1, 1, 8, 4}, kFloat64, &gen), k = randn({1, 1, 8, 4}, kFloat64, &gen), v = randn({1, 1, 8, 4}, kFloat64, &gen);
  FlexAttentionOptions o;
  o.return_lse = true;
  o.kernel.backend = backend;
  o.scale = kNaN;
  auto r = flex_attention(q.to(dt), k.to(dt), v.to(dt), o);
  EXPECT_TRUE(all(isnan(r.out)).item<bool>());
  EXPECT_TRUE(all(isnan(r.lse)).item<bool>());
  o.block_mask = create_block_mask([](Expr, Expr, Expr q, Expr kv) { return (q >= 2) & (kv <= q); }, std::nullopt,
                                   std::nullopt, 8, 8, 4);
  r = flex_attention(q.to(dt), k.to(dt), v.to(dt), o);
  EXPECT_EQ(amax(abs(r.out.narrow(2, 0, 2))).item(), 0.0);
  EXPECT_EQ(r.lse.at({0, 0, 0}), -kInf);
  EXPECT_EQ(r.lse.at({0, 0, 1}), -kInf);
  EXPECT_TRUE(all(isnan(r.out.narrow(2, 2, 6))).item<bool>());
  EXPECT_TRUE(all(isnan(r.lse.narrow(2, 2, 6))).item<bool>());
}

INSTANTIATE_TEST_SUITE_P(, FlexNonFinite,
                         ::testing::Combine(::testing::Values(kFloat32, kFloat64),
                                            ::testing::Values(FlexBackend::Fused, FlexBackend::Reference)),
                         [](const auto& info) {
                           return std::string(dtype_name(std::get<0>(info.param))) +
                                  (std::get<1>(info.param) == FlexBackend::Fused ? "_fused" : "_reference");
                         });

}  // namespace
}  // namespace fg
