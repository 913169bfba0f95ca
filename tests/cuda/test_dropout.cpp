// The fused dropout op (ops/dropout.h) on each device: its mask follows the documented Philox mapping (word
// i % 4 of the block of counter base + i / 4, computed here from tensor/philox.h; the generator advances by
// ceil(n / 4)), kept elements are x * (1 / (1 - p)) rounded once, the backward applies the same mask to the gradient (finite differences, float64), NaN stays
// NaN under a dropped element (as x * mask), and bad p is named. CPU and CUDA (skipped without a GPU).
#include <cmath>
#include <vector>

#include "flexgrad/autograd/gradcheck.h"
#include "flexgrad/ops/dropout.h"
#include "flexgrad/ops/ops.h"
#include "flexgrad/tensor/philox.h"
#include "tests/test_util.h"

namespace fg {
namespace {

class Dropout : public ::testing::TestWithParam<DeviceType> {
 protected:
  void SetUp() override {
    if (device_count(GetParam()) == 0) GTEST_SKIP() << "no CUDA device present: skipping the CUDA dropout tests";
  }
  Device dev() const { return Device(GetParam(), 0); }
};

TEST_P(Dropout, MaskFollowsThePhiloxMappingAndKeptValuesAreScaledOnce) {
  const int64_t n = 10007;
  const double p = 0.3;
  std::vector<double> xv(n);
  for (int64_t i = 0; i < n; ++i) xv[i] = std::sin(0.1 * static_cast<double>(i)) * 3;
  for (DType dt : {kFloat32, kBFloat16, kFloat64}) {
    SCOPED_TRACE(dtype_name(dt));
    const Tensor x = from_vector(xv, {n}, dt).to(dev());  // n is not a multiple of 4
    Generator g(42);
    const uint64_t base = g.advance(5) + 5;
    const auto yv = dropout(x, p, &g).to(kCPU).to(kFloat64).to_vector();
    EXPECT_EQ(g.advance(0), base + (n + 3) / 4) << "dropout takes one counter per four elements";
    const auto xr = x.to(kCPU).to(kFloat64).to_vector();
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i) {
      uint32_t w[4];
      Philox4x32::generate(42, base + static_cast<uint64_t>(i / 4), w);
      const bool keep = static_cast<double>(w[i % 4]) / 4294967296.0 < 1 - p;
      // Kept: x * scale in the compute type (float, double for float64), rounded once to the dtype.
      const double scale = dt == kFloat64 ? 1 / (1 - p) : static_cast<double>(static_cast<float>(1 / (1 - p)));
      const double prod = dt == kFloat64 ? xr[i] * scale : static_cast<double>(static_cast<float>(xr[i] * scale));
      const double want = keep ? from_vector(std::vector<double>{prod}, {1}, dt).to(kFloat64).item<double>() : 0.0;
      ASSERT_EQ(yv[i], want) << "element " << i;
      kept += keep;
    }
    EXPECT_NEAR(static_cast<double>(kept) / n, 1 - p, 0.02);
  }
}

TEST_P(Dropout, BackwardAppliesTheSameMaskAndGradchecks) {
  Tensor x = randn({5, 9}, TensorOptions().dtype(kFloat64)).to(dev()).requires_grad_(true);
  auto fn = [](const TensorList& in) {
    Generator g(9);  // the same mask on every call, as gradcheck perturbs and re-runs
    return TensorList{dropout(in[0], 0.4, &g)};
  };
  auto r = gradcheck(fn, {x});
  EXPECT_TRUE(r.ok) << r.report();
  // d(sum(y * w))/dx = w * mask * scale: zero exactly where y is zero (x has no zeros).
  Tensor w = randn({5, 9}, TensorOptions().dtype(kFloat64)).to(dev());
  Tensor y = fn({x})[0];
  sum(mul(y, w)).backward();
  const auto yv = y.to(kCPU).to_vector(), gv = x.grad().to(kCPU).to_vector(), wv = w.to(kCPU).to_vector();
  for (size_t i = 0; i < yv.size(); ++i) {
    if (yv[i] == 0) EXPECT_EQ(gv[i], 0.0) << i;
    else EXPECT_NEAR(gv[i], wv[i] / 0.6, 1e-12) << i;
  }
}

TEST_P(Dropout, NanStaysNanAndBadPIsNamed) {
  Tensor x = full({4096}, std::nan(""), TensorOptions().device(dev()));
  Generator g(1);
  const auto yv = dropout(x, 0.5, &g).to(kCPU).to_vector();
  for (double v : yv) ASSERT_TRUE(std::isnan(v));
  Tensor ones_x = ones({3}, TensorOptions().device(dev()));
  EXPECT_TRUE(fg::testing::close(dropout(ones_x, 0.0, &g).to(kCPU), ones({3}), 0, 0));
  EXPECT_THROW_MSG(dropout(ones_x, 1.0, &g), ValueError, "p must be in [0, 1)", "1");
  EXPECT_THROW_MSG(dropout(ones_x, -0.1, &g), ValueError, "-0.1");
  EXPECT_THROW_MSG(dropout(ones({3}, TensorOptions().dtype(kInt64).device(dev())), 0.1, &g), DTypeError, "floating");
}

INSTANTIATE_TEST_SUITE_P(Devices, Dropout, ::testing::Values(DeviceType::CPU, DeviceType::CUDA),
                         [](const auto& info) { return info.param == DeviceType::CPU ? "CPU" : "CUDA"; });

}  // namespace
}  // namespace fg
