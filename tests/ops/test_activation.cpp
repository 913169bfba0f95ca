// gelu_fused on half types (CPU): one pass in x's dtype against a float64 golden written here, and bit-equal
// to the float32 path rounded once (ops/activation_kernels.h's contract).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numbers>
#include <vector>

#include "flexgrad/ops/activation.h"
#include "tests/gelu_golden.h"
#include "tests/test_util.h"

namespace fg {
namespace {

// Plain float64 gelu and its derivative (tests/gelu_golden.h).
constexpr auto gelu64 = fg::testing::gelu_golden;

// Spacing of dtype's representable values at magnitude a (bf16: 8 significant bits; f16: 11, subnormals
// below 2^-14 spaced 2^-24).
double ulp(double a, DType dt) {
  const int mant = dt == kBFloat16 ? 7 : 10;
  a = std::abs(a);
  if (a == 0) return dt == kBFloat16 ? std::ldexp(1.0, -133) : std::ldexp(1.0, -24);
  const int e = std::ilogb(a);
  const double u = std::ldexp(1.0, e - mant);
  return dt == kFloat16 ? std::max(u, std::ldexp(1.0, -24)) : u;
}

// n values of x: a sweep of [-8, 8] (both tails of tanh/erf) with exact zeros, tiny and huge magnitudes.
std::vector<double> inputs(int64_t n) {
  std::vector<double> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = 8 * std::sin(i * 0.7390851 + 0.3);
  const double special[] = {0.0, -0.0, 1e-6, -1e-6, 3e-5, 30000.0, -30000.0, 0.5, -0.5, 1.0};
  const int64_t every = n / static_cast<int64_t>(std::size(special));
  for (size_t k = 0; k < std::size(special) && static_cast<int64_t>(k) < n; ++k) v[k * every] = special[k];
  return v;
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes() || a.dtype() != b.dtype()) return false;
  Tensor x = a.contiguous(), y = b.contiguous();
  return std::memcmp(x.data_ptr(), y.data_ptr(), static_cast<size_t>(x.numel()) * element_size(x.dtype())) == 0;
}

// Bound: the half result is the float32 evaluation rounded once, so |got - golden| <= ulp/2 (one rounding
// to nearest, at the larger of |got|, |golden|) + the float32 evaluation's own error. That error is a few
// float ulps of the result plus, near the saturation of tanh/erf, the absolute error of 1 -+ t (~2^-23)
// times the factor multiplying it: 0.5|x| in the forward, |gy| 0.5 |x| beta (1 + 3 kappa x^2) in the
// backward. Both are under 2^-21 (|golden| + |x|) resp. 2^-21 (|golden| + |gy| (1 + |x| + |x|^3 / 8)),
// with |x| capped at 8 (beyond it t is exactly +-1 in float and the factor multiplies an exact 0). At |x| = 8
// this is 5e-5, a tenth of an f16 half-ulp of O(1) results, so the test checks the rounding, not the slack.
double f32_slack(double golden, double x, double gy_abs, bool backward) {
  const double ax = std::min(std::abs(x), 8.0);
  const double factor = backward ? gy_abs * (1 + ax + ax * ax * ax / 8) : ax;
  return std::ldexp(1.0, -21) * (std::abs(golden) + factor);
}

class GeluHalf : public ::testing::TestWithParam<DType> {};

TEST_P(GeluHalf, MatchesFloat64GoldenWithinOneRounding) {
  const DType dt = GetParam();
  for (int64_t n : {int64_t{1}, int64_t{513}, int64_t{200003}}) {  // one element, a block tail, threaded spans
    for (bool ta : {true, false}) {
      SCOPED_TRACE(::testing::Message() << dtype_name(dt) << " n " << n << (ta ? " tanh" : " erf"));
      std::vector<double> xs = inputs(n), gs(n);
      for (int64_t i = 0; i < n; ++i) gs[i] = 1.5 * std::cos(i * 1.3247);
      Tensor x = from_vector(xs, {n}, dt).requires_grad_(true), gy = from_vector(gs, {n}, dt);
      xs = x.detach().to_vector(), gs = gy.to_vector();  // the values the kernel sees (already rounded)
      Tensor y = gelu_fused(x, ta);
      ASSERT_EQ(y.dtype(), dt);
      EXPECT_EQ(y.grad_fn_name(), "GeluFusedBackward");  // no cast node: the op ran in dt
      y.backward(gy);
      ASSERT_EQ(x.grad().dtype(), dt);
      const std::vector<double> yv = y.detach().to_vector(), gv = x.grad().to_vector();
      int64_t bad_y = 0, bad_g = 0;
      for (int64_t i = 0; i < n; ++i) {
        double d = 0;
        const double want = gelu64(xs[i], ta, &d), want_g = gs[i] * d;
        const double by = 0.5 * ulp(std::max(std::abs(yv[i]), std::abs(want)), dt) + f32_slack(want, xs[i], 0, false);
        const double bg = 0.5 * ulp(std::max(std::abs(gv[i]), std::abs(want_g)), dt) +
                          f32_slack(want_g, xs[i], std::abs(gs[i]), true);
        if (!(std::abs(yv[i] - want) <= by) && bad_y++ < 3) {
          ADD_FAILURE() << "forward x " << xs[i] << ": got " << yv[i] << ", want " << want << " (bound " << by << ")";
        }
        if (!(std::abs(gv[i] - want_g) <= bg) && bad_g++ < 3) {
          ADD_FAILURE() << "backward x " << xs[i] << " gy " << gs[i] << ": got " << gv[i] << ", want " << want_g
                        << " (bound " << bg << ")";
        }
      }
      EXPECT_EQ(bad_y, 0);
      EXPECT_EQ(bad_g, 0);
    }
  }
}

// The half kernel runs the float32 kernel's code on the loaded values (exact in float) and rounds once,
// and its backward recomputes the very tanh expression the float32 forward keeps in aux (the library is
// built with -ffp-contract=off, so both evaluate identically): the results are equal bit for bit to
// cast(float32 path, dt), not merely within an ulp.
TEST_P(GeluHalf, EqualsFloat32PathRoundedOnceBitForBit) {
  const DType dt = GetParam();
  const int64_t n = 200003;
  std::vector<double> gs(n);
  for (int64_t i = 0; i < n; ++i) gs[i] = 1.5 * std::cos(i * 1.3247);
  for (bool ta : {true, false}) {
    SCOPED_TRACE(::testing::Message() << dtype_name(dt) << (ta ? " tanh" : " erf"));
    Tensor x = from_vector(inputs(n), {n}, dt).requires_grad_(true), gy = from_vector(gs, {n}, dt);
    Tensor xf = cast(x.detach(), kFloat32).requires_grad_(true);
    Tensor y = gelu_fused(x, ta), yf = gelu_fused(xf, ta);  // float32 with grad: the aux path
    EXPECT_TRUE(bitwise_equal(y.detach(), cast(yf.detach(), dt))) << "forward";
    y.backward(gy), yf.backward(cast(gy, kFloat32));
    EXPECT_TRUE(bitwise_equal(x.grad(), cast(xf.grad(), dt))) << "backward";
    NoGradGuard ng;
    EXPECT_TRUE(bitwise_equal(gelu_fused(x.detach(), ta), y.detach())) << "no-grad forward";
  }
}

// A strided half input goes through the contiguous copy and gives the same values.
TEST_P(GeluHalf, StridedInputMatchesContiguous) {
  const DType dt = GetParam();
  Tensor x = from_vector(inputs(6 * 37), {6, 37}, dt);
  Tensor xt = transpose(x, 0, 1);
  EXPECT_TRUE(bitwise_equal(gelu_fused(xt, true), transpose(gelu_fused(x, true), 0, 1).contiguous()));
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GeluHalf, ::testing::Values(kBFloat16, kFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(GeluFused, RejectsIntegerInput) {
  EXPECT_THROW_MSG(gelu_fused(from_vector(std::vector<double>{1, 2}, {2}, kInt64)), DTypeError, "gelu_fused", "int64");
}

}  // namespace
}  // namespace fg
