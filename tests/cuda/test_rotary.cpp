// The fused rotary embedding (ops/rotary.h) on each device against a float64 formula written here: the
// rotate-half rotation of a strided [B, H, L, E] view (a transposed projection, read in place), in every
// float dtype, its gradient (the inverse rotation, checked by finite differences on the device) and its
// argument checks. Instantiated for the CPU and for CUDA (skipped visibly without a GPU).
#include <cmath>
#include <vector>

#include "flexgrad/autograd/gradcheck.h"
#include "flexgrad/ops/ops.h"
#include "flexgrad/ops/rotary.h"
#include "tests/test_util.h"

namespace fg {
namespace {

using fg::testing::close;

class Rotary : public ::testing::TestWithParam<DeviceType> {
 protected:
  void SetUp() override {
    if (device_count(GetParam()) == 0) GTEST_SKIP() << "no CUDA device present: skipping the CUDA rotary tests";
  }
  Device dev() const { return Device(GetParam(), 0); }
};

// Angles of positions offset..offset+L at E/2 frequencies, base 10000, in float64.
void tables(int64_t offset, int64_t L, int64_t E, std::vector<double>& c, std::vector<double>& s) {
  const int64_t half = E / 2;
  c.assign(L * half, 0);
  s.assign(L * half, 0);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t i = 0; i < half; ++i) {
      const double ang = static_cast<double>(offset + l) * std::pow(10000.0, -2.0 * i / E);
      c[l * half + i] = std::cos(ang);
      s[l * half + i] = std::sin(ang);
    }
  }
}

TEST_P(Rotary, StridedViewMatchesFloat64FormulaInEveryFloatDtype) {
  const int64_t B = 2, L = 13, H = 3, E = 10, half = E / 2, offset = 4;
  std::vector<double> xv(B * L * H * E);
  for (size_t i = 0; i < xv.size(); ++i) xv[i] = std::sin(0.37 * static_cast<double>(i)) * 2;
  std::vector<double> c, s;
  tables(offset, L, E, c, s);
  // want[b, h, l, :] from x[b, l, h, :] (the projection layout before the head transpose).
  std::vector<double> want(B * H * L * E);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t l = 0; l < L; ++l)
        for (int64_t i = 0; i < half; ++i) {
          const double x1 = xv[((b * L + l) * H + h) * E + i], x2 = xv[((b * L + l) * H + h) * E + i + half];
          const double cc = c[l * half + i], ss = s[l * half + i];
          want[((b * H + h) * L + l) * E + i] = x1 * cc - x2 * ss;
          want[((b * H + h) * L + l) * E + i + half] = x2 * cc + x1 * ss;
        }
  const struct { DType dt; double tol; } cases[] = {{kFloat64, 1e-12}, {kFloat32, 2e-6}, {kBFloat16, 2e-2}, {kFloat16, 4e-3}};
  for (const auto& k : cases) {
    SCOPED_TRACE(dtype_name(k.dt));
    Tensor x = transpose(from_vector(xv, {B, L, H, E}, k.dt).to(dev()), 1, 2);  // [B, H, L, E], strided
    ASSERT_FALSE(x.is_contiguous());
    const DType tdt = k.dt == kFloat64 ? kFloat64 : kFloat32;
    Tensor out = rotary_embedding(x, from_vector(c, {L, half}, tdt).to(dev()), from_vector(s, {L, half}, tdt).to(dev()));
    EXPECT_EQ(out.dtype(), k.dt);
    EXPECT_EQ(out.device(), dev());
    EXPECT_TRUE(out.is_contiguous());
    // Half types round the input once and the output once: twice the dtype's relative step.
    Tensor xr = x.to(kCPU).to(kFloat64);  // the rounded input, for the half cases' golden
    std::vector<double> want_r = want;
    if (k.dt == kBFloat16 || k.dt == kFloat16) {
      const auto xs = contiguous(transpose(xr, 1, 2)).to_vector();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t l = 0; l < L; ++l)
            for (int64_t i = 0; i < half; ++i) {
              const double x1 = xs[((b * L + l) * H + h) * E + i], x2 = xs[((b * L + l) * H + h) * E + i + half];
              const double cc = static_cast<float>(c[l * half + i]), ss = static_cast<float>(s[l * half + i]);
              want_r[((b * H + h) * L + l) * E + i] = x1 * cc - x2 * ss;
              want_r[((b * H + h) * L + l) * E + i + half] = x2 * cc + x1 * ss;
            }
    }
    EXPECT_TRUE(close(out.to(kCPU).to(kFloat64), from_vector(want_r, {B, H, L, E}, kFloat64), k.tol, k.tol));
  }
}

TEST_P(Rotary, GradientIsTheInverseRotationAndGradchecks) {
  const int64_t L = 6, E = 8, half = E / 2;
  std::vector<double> c, s;
  tables(0, L, E, c, s);
  const Tensor ct = from_vector(c, {L, half}, kFloat64).to(dev()), st = from_vector(s, {L, half}, kFloat64).to(dev());
  Generator gen(7);
  Tensor x = randn({2, 3, L, E}, TensorOptions().dtype(kFloat64), &gen).to(dev()).requires_grad_(true);
  auto r = gradcheck([&](const TensorList& in) { return TensorList{rotary_embedding(in[0], ct, st)}; }, {x});
  EXPECT_TRUE(r.ok) << r.report();
  // A rotation keeps norms: |R x| = |x| row by row (a property, independent of the formula above).
  Tensor y = rotary_embedding(x.detach(), ct, st);
  EXPECT_TRUE(close(sum(mul(y, y), Shape{-1}).to(kCPU), sum(mul(x.detach(), x.detach()), Shape{-1}).to(kCPU), 1e-12, 1e-12));
}

TEST_P(Rotary, BadArgumentsAreNamed) {
  const Tensor x = zeros({2, 5, 8}, TensorOptions().device(dev()));
  const Tensor t = zeros({5, 4}, TensorOptions().device(dev()));
  EXPECT_THROW_MSG(rotary_embedding(zeros({2, 5, 7}, TensorOptions().device(dev())), zeros({5, 3}, TensorOptions().device(dev())), zeros({5, 3}, TensorOptions().device(dev()))), ShapeError, "must be even", "[2, 5, 7]");
  EXPECT_THROW_MSG(rotary_embedding(x, zeros({4, 4}, TensorOptions().device(dev())), t), ShapeError, "[5, 4]", "[4, 4]");
  EXPECT_THROW_MSG(rotary_embedding(zeros({8}, TensorOptions().device(dev())), t, t), ShapeError, "2 to 4 dims");
  EXPECT_THROW_MSG(rotary_embedding(x, t.detach().requires_grad_(true), t), NotImplementedError, "constants");
  EXPECT_THROW_MSG(rotary_embedding(zeros({2, 5, 8}, TensorOptions().dtype(kInt64).device(dev())), t, t), DTypeError,
                   "floating");
  if (GetParam() == DeviceType::CUDA) {
    EXPECT_THROW_MSG(rotary_embedding(x, zeros({5, 4}), zeros({5, 4})), DeviceError, "cuda:0", "cpu");
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, Rotary, ::testing::Values(DeviceType::CPU, DeviceType::CUDA),
                         [](const auto& info) { return info.param == DeviceType::CPU ? "CPU" : "CUDA"; });

}  // namespace
}  // namespace fg
