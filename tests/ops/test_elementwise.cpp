#include <cstring>
#include <limits>

#include "tests/test_util.h"

namespace fg {
namespace {
using testing::close;
using testing::tensor;

TEST(Elementwise, AddBroadcastsAndPromotes) {
  Tensor a = tensor({1, 2, 3}, {3, 1}, kFloat32);
  Tensor b = tensor({10, 20}, {2}, kInt64);
  Tensor c = a + b;
  EXPECT_EQ(c.dtype(), kFloat32);
  EXPECT_EQ(c.sizes(), (Shape{3, 2}));
  EXPECT_TRUE(close(c, tensor({11, 21, 12, 22, 13, 23}, {3, 2})));
}

TEST(Elementwise, TypePromotionFollowsPyTorch) {
  Tensor i32 = tensor({1, 2}, {2}, kInt32);
  EXPECT_EQ((i32 * 2).dtype(), kInt32);             // int tensor * python int stays int32
  EXPECT_EQ((i32 * 2.5).dtype(), kFloat32);         // int tensor * python float -> default float
  EXPECT_EQ((tensor({1}, {1}, kFloat16) * 2.5).dtype(), kFloat16);
  EXPECT_EQ((i32 / i32).dtype(), kFloat32);         // true division
  EXPECT_EQ(result_type(tensor({1}, {1}, kFloat16), tensor({1}, {1}, kBFloat16)), kFloat32);
  EXPECT_EQ(result_type(tensor({1}, {1}, kInt32), scalar_tensor(1.5, kFloat64)), kFloat64);  // 0-d float beats int
  EXPECT_EQ(result_type(tensor({1}, {1}, kFloat32), scalar_tensor(1.5, kFloat64)), kFloat32);  // 0-d same category loses
  EXPECT_EQ((tensor({1, 0}, {2}, kBool) + 1).dtype(), kInt64);
}

TEST(Elementwise, FloorDivideAndRemainderFollowPython) {
  Tensor a = tensor({7, -7, 7, -7}, {4}, kInt64), b = tensor({2, 2, -2, -2}, {4}, kInt64);
  EXPECT_TRUE(close(floor_divide(a, b), tensor({3, -4, -4, 3}, {4})));
  EXPECT_TRUE(close(remainder(a, b), tensor({1, 1, -1, -1}, {4})));
  Tensor af = a.to(kFloat64), bf = b.to(kFloat64);
  EXPECT_TRUE(close(floor_divide(af, bf), tensor({3, -4, -4, 3}, {4})));
  EXPECT_TRUE(close(remainder(af, bf), tensor({1, 1, -1, -1}, {4})));
  EXPECT_THROW_MSG(floor_divide(a, tensor({0, 1, 1, 1}, {4}, kInt64)), ValueError, "ZeroDivisionError");
}

// Integer overflow wraps (two's complement) as in PyTorch, instead of being undefined behaviour (UBSan found
// int_pow overflowing in the sanitizer run of the attention suite) or trapping: INT64_MIN // -1 and
// INT64_MIN % -1 raised SIGFPE on x86. The expected values are worked out by hand modulo 2^64.
TEST(Elementwise, IntegerOverflowWraps) {
  const int64_t kMin = std::numeric_limits<int64_t>::min(), kMax = std::numeric_limits<int64_t>::max();
  auto i64 = [](std::vector<int64_t> v) {  // bit-exact (from_vector goes through double)
    Tensor t = empty({static_cast<int64_t>(v.size())}, kInt64);
    std::memcpy(t.data_ptr(), v.data(), v.size() * sizeof(int64_t));
    return t;
  };
  auto values = [](const Tensor& t) {
    const Tensor c = t.contiguous();
    const auto* p = static_cast<const int64_t*>(c.data_ptr());
    return std::vector<int64_t>(p, p + c.numel());
  };
  const Tensor a = i64({kMax, kMin, int64_t(1) << 62, kMin});
  EXPECT_EQ(values(add(a, i64({1, -1, int64_t(1) << 62, kMin}))), (std::vector<int64_t>{kMin, kMax, kMin, 0}));
  EXPECT_EQ(values(sub(a, i64({-1, 1, -(int64_t(1) << 62), 0}))), (std::vector<int64_t>{kMin, kMax, kMin, kMin}));
  EXPECT_EQ(values(add(a, i64({1, 1, 1, 1}), 3)), (std::vector<int64_t>{kMin + 2, kMin + 3, (int64_t(1) << 62) + 3, kMin + 3}));
  EXPECT_EQ(values(mul(a, i64({2, -1, 4, 2}))), (std::vector<int64_t>{-2, kMin, 0, 0}));
  EXPECT_EQ(values(pow(i64({int64_t(1) << 62, 3, -2}), i64({2, 41, 63}))),
            (std::vector<int64_t>{0, -420491770248316829 /* 3^41 mod 2^64, below */, kMin}));
  EXPECT_EQ(values(neg(i64({kMin, kMax}))), (std::vector<int64_t>{kMin, kMin + 1}));
  EXPECT_EQ(values(abs(i64({kMin, -5}))), (std::vector<int64_t>{kMin, 5}));
  EXPECT_EQ(values(square(i64({int64_t(1) << 32, (int64_t(1) << 32) + 1}))), (std::vector<int64_t>{0, (int64_t(1) << 33) + 1}));
  EXPECT_EQ(values(floor_divide(i64({kMin, 7, -7}), i64({-1, -1, -1}))), (std::vector<int64_t>{kMin, -7, 7}));
  EXPECT_EQ(values(remainder(i64({kMin, 7, -7}), i64({-1, -1, -1}))), (std::vector<int64_t>{0, 0, 0}));
  // 3^41 = 36472996377170786403 = 2^64 + 18026252303461234787, and 18026252303461234787 - 2^64 = -420491770248316829
}

TEST(Elementwise, StridedAndExpandedInputs) {
  Tensor base = arange(0, 24, 1, kFloat64).view({2, 3, 4});
  Tensor t = base.transpose(0, 2);           // [4, 3, 2], non-contiguous
  Tensor s = base.slice(2, 1, 4, 2);         // step 2, offset 1
  Tensor e = tensor({100}, {1}).expand({4, 3, 2});
  Tensor r = t + e;
  EXPECT_DOUBLE_EQ(r.at({3, 2, 1}), base.at({1, 2, 3}) + 100);
  Tensor q = s * 2.0;
  EXPECT_EQ(q.sizes(), (Shape{2, 3, 2}));
  EXPECT_DOUBLE_EQ(q.at({1, 2, 1}), base.at({1, 2, 3}) * 2);
}

TEST(Elementwise, UnaryValues) {
  Tensor x = tensor({-1.5, 0, 2}, {3});
  EXPECT_TRUE(close(relu(x), tensor({0, 0, 2}, {3})));
  EXPECT_TRUE(close(exp2(x), tensor({std::exp2(-1.5), 1, 4}, {3})));
  EXPECT_TRUE(close(sigmoid(x), tensor({1 / (1 + std::exp(1.5)), 0.5, 1 / (1 + std::exp(-2.0))}, {3})));
  EXPECT_TRUE(close(gelu(x), tensor({-1.5 * 0.5 * (1 + std::erf(-1.5 / std::sqrt(2.0))), 0, 2 * 0.5 * (1 + std::erf(2 / std::sqrt(2.0)))}, {3})));
  EXPECT_EQ(exp(tensor({1}, {1}, kInt64)).dtype(), kFloat32);
  EXPECT_EQ(abs(tensor({-3}, {1}, kInt64)).item<int64_t>(), 3);
}

TEST(Elementwise, ComparisonsAndWhere) {
  Tensor a = tensor({1, 5, 3}, {3});
  Tensor m = a > 2.0;
  EXPECT_EQ(m.dtype(), kBool);
  EXPECT_TRUE(close(m, tensor({0, 1, 1}, {3})));
  EXPECT_TRUE(close(where(m, a, 0.0), tensor({0, 5, 3}, {3})));
  EXPECT_TRUE(close(logical_not(m), tensor({1, 0, 0}, {3})));
  EXPECT_THROW_MSG(where(a, a, a), DTypeError, "where", "bool");
}

TEST(Elementwise, BroadcastErrorNamesOpAndShapes) {
  EXPECT_THROW_MSG(zeros({2, 3}) + zeros({4}), ShapeError, "add", "[2, 3]", "[4]");
}

TEST(Elementwise, HalfPrecisionRoundsOncePerOp) {
  Tensor a = tensor({1.0, 1000.0}, {2}, kFloat16);
  Tensor b = tensor({0.0004, 0.4}, {2}, kFloat16);
  Tensor c = a + b;
  EXPECT_EQ(c.dtype(), kFloat16);
  EXPECT_DOUBLE_EQ(c.at({1}), 1000.5);  // f16 spacing at 1000 is 0.5
}

TEST(InPlace, AddMulFillCopyBumpVersions) {
  Tensor a = zeros({3});
  uint32_t v = a.version();
  a.add_(ones({3}));
  a.mul_(3.0);
  EXPECT_GT(a.version(), v);
  EXPECT_TRUE(close(a, full({3}, 3.0)));
  Tensor view = a.slice(0, 1, 3);
  view.fill_(7);
  EXPECT_TRUE(close(a, tensor({3, 7, 7}, {3})));
  a.copy_(tensor({1, 2, 3}, {3}, kInt64));
  EXPECT_TRUE(close(a, tensor({1, 2, 3}, {3})));
}

TEST(InPlace, LeafRequiringGradIsRejected) {
  Tensor w = ones({2}).requires_grad_();
  EXPECT_THROW_MSG(w.add_(1.0), AutogradError, "leaf");
  NoGradGuard g;
  w.add_(1.0);  // allowed under no_grad (optimizer updates)
  EXPECT_DOUBLE_EQ(w.at({0}), 2.0);
}

TEST(Autograd, MulAddBackwardWithBroadcast) {
  Tensor a = tensor({1, 2, 3}, {3, 1}).requires_grad_();
  Tensor b = tensor({4, 5}, {1, 2}).requires_grad_();
  Tensor y = (a * b + a).sum();
  y.backward();
  EXPECT_TRUE(close(a.grad(), tensor({11, 11, 11}, {3, 1})));  // sum_j b_j + 2 columns
  EXPECT_TRUE(close(b.grad(), tensor({6, 6}, {1, 2})));
}

TEST(Autograd, InPlaceOnSavedTensorIsDetected) {
  Tensor a = tensor({1, 2}, {2}).requires_grad_();
  Tensor b = a * 2.0;
  Tensor c = b * b;  // saves b
  b.add_(1.0);
  EXPECT_THROW_MSG(c.sum().backward(), AutogradError, "modified by an inplace operation");
}

TEST(Autograd, UnaryGradientsMatchFiniteDifferences) {
  for (UnaryOp op : {UnaryOp::Exp, UnaryOp::Exp2, UnaryOp::Log, UnaryOp::Sqrt, UnaryOp::Rsqrt, UnaryOp::Sin,
                     UnaryOp::Cos, UnaryOp::Tan, UnaryOp::Tanh, UnaryOp::Sigmoid, UnaryOp::Gelu, UnaryOp::GeluTanh,
                     UnaryOp::Silu, UnaryOp::Erf, UnaryOp::Reciprocal, UnaryOp::Square, UnaryOp::Abs, UnaryOp::Log2,
                     UnaryOp::Expm1, UnaryOp::Log1p, UnaryOp::Relu}) {
    Tensor x = tensor({0.3, 0.7, 1.9}, {3}).requires_grad_();
    unary(op, x).sum().backward();
    const double eps = 1e-6;
    for (int64_t i = 0; i < 3; ++i) {
      Tensor xp = x.detach().clone(), xm = x.detach().clone();
      xp.set_at({i}, x.at({i}) + eps);
      xm.set_at({i}, x.at({i}) - eps);
      double num = (unary(op, xp).sum().item() - unary(op, xm).sum().item()) / (2 * eps);
      EXPECT_NEAR(x.grad().at({i}), num, 1e-6 * (1 + std::abs(num))) << unary_op_name(op);
    }
  }
}

}  // namespace
}  // namespace fg
