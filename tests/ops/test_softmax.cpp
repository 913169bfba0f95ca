#include <cmath>
#include <limits>

#include "tests/ops/fd_check.h"

namespace fg {
namespace {
using testing::close;
using testing::fd_check;
using testing::noise;
using testing::tensor;
constexpr double kInf = std::numeric_limits<double>::infinity();

TEST(Softmax, ValuesStableAndAlongAnyDim) {
  Tensor x = tensor({1, 2, 3, 1000, 1001, 1002}, {2, 3});
  double e = std::exp(1.0), z = 1 + e + e * e;
  Tensor ref = tensor({1 / z, e / z, e * e / z, 1 / z, e / z, e * e / z}, {2, 3});
  EXPECT_TRUE(close(softmax(x, 1), ref));
  EXPECT_TRUE(close(log_softmax(x, -1), tensor({-std::log(z), 1 - std::log(z), 2 - std::log(z),
                                                -std::log(z), 1 - std::log(z), 2 - std::log(z)}, {2, 3})));
  EXPECT_TRUE(close(softmax(x.t(), 0), ref.t()));  // strided input, reduced dim not innermost
  EXPECT_TRUE(close(sum(softmax(x, 0), {0}), ones({3}, kFloat64)));
}

TEST(Softmax, AllNegInfRowsGiveZeroAndNoNaN) {
  Tensor x = tensor({-kInf, -kInf, 0, -kInf}, {2, 2}).requires_grad_(true);
  Tensor y = softmax(x, 1);
  EXPECT_TRUE(close(y, tensor({0, 0, 1, 0}, {2, 2})));
  (y * tensor({1, 2, 3, 4}, {2, 2})).sum().backward();
  EXPECT_TRUE(close(x.grad(), zeros({2, 2}, kFloat64)));
  Tensor ly = log_softmax(x.detach(), 1);
  EXPECT_TRUE(close(ly, tensor({-kInf, -kInf, 0, -kInf}, {2, 2})));
}

// As torch.softmax: a NaN anywhere in a row makes the whole row NaN, also when the rest is -inf (it was
// taken for an all -inf row and gave zeros), and a +inf gives NaN (inf - inf). All -inf rows keep 0.
TEST(Softmax, NaNPropagatesAndPlusInfGivesNaN) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (DType dt : {kFloat32, kFloat64}) {
    Tensor x = tensor({nan, nan, nan, -kInf, nan, -kInf, 1, nan, 2, kInf, 0, 1, -kInf, -kInf, -kInf, 1, 2, 3}, {6, 3}, dt);
    for (bool log : {false, true}) {
      SCOPED_TRACE(::testing::Message() << dtype_name(dt) << (log ? " log_softmax" : " softmax"));
      Tensor y = log ? log_softmax(x, 1) : softmax(x, 1);
      for (int64_t r = 0; r < 4; ++r)
        for (int64_t c = 0; c < 3; ++c) EXPECT_TRUE(std::isnan(y.at({r, c}))) << r << ", " << c;
      for (int64_t c = 0; c < 3; ++c) EXPECT_EQ(y.at({4, c}), log ? -kInf : 0.0);
      const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0);
      for (int64_t c = 0; c < 3; ++c) {
        const double want = log ? (c + 1) - std::log(z) : std::exp(c + 1.0) / z;
        EXPECT_NEAR(y.at({5, c}), want, 1e-6);
      }
    }
  }
}

TEST(Softmax, DtypeOptionAndErrors) {
  Tensor x = tensor({1, 2, 3}, {3}, kInt64);
  EXPECT_EQ(softmax(x, 0, kFloat32).dtype(), kFloat32);
  EXPECT_THROW_MSG(softmax(x, 0), DTypeError, "softmax", "int64");
  EXPECT_THROW_MSG(log_softmax(tensor({1}, {1}), 2), IndexError, "log_softmax");
  Tensor h = softmax(tensor({1, 2, 3}, {3}, kBFloat16), 0);
  EXPECT_EQ(h.dtype(), kBFloat16);
  EXPECT_TRUE(close(h, softmax(tensor({1, 2, 3}, {3}), 0), 1e-2, 1e-2));
}

TEST(Softmax, Gradients) {
  Tensor x = noise({3, 4, 2}, kFloat64, 1).transpose(0, 2);  // [2, 4, 3], strided
  EXPECT_TRUE(fd_check([](const TensorList& in) { return softmax(in[0], 1); }, {x}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return log_softmax(in[0], 2); }, {x}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return softmax(in[0], 0, kFloat64); }, {x}));
}

}  // namespace
}  // namespace fg
