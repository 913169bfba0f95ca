// Views share storage with their input (writes through one are seen by the other), map gradients back,
// and reject impossible layouts with messages naming the op and the shapes.
#include "tests/test_util.h"

namespace fg {
namespace {
using testing::close;
using testing::tensor;

Tensor iota(const Shape& s, DType dt = kFloat64) { return arange(0, static_cast<double>(shape_numel(s)), 1, dt).view(s); }

TEST(View, WritesThroughViewsAreSeenByTheBase) {
  Tensor base = iota({2, 3, 4});
  base.transpose(0, 2).select(0, 1).fill_(-1);          // base[:, :, 1] = -1
  EXPECT_DOUBLE_EQ(base.at({1, 2, 1}), -1);
  base.slice(2, 0, 4, 2).narrow(1, 1, 1).fill_(7);       // base[:, 1, 0::2] = 7
  EXPECT_DOUBLE_EQ(base.at({0, 1, 2}), 7);
  base.view({6, 4})[5].copy_(tensor({9, 9, 9, 9}, {4}));
  EXPECT_DOUBLE_EQ(base.at({1, 2, 3}), 9);
  EXPECT_TRUE(base.view({24}).shares_storage(base));
  EXPECT_GT(base.version(), 0u);
}

TEST(View, LayoutsMatchPyTorch) {
  Tensor t = iota({2, 3, 4});
  EXPECT_EQ(t.permute({2, 0, 1}).strides(), (Shape{1, 12, 4}));
  EXPECT_EQ(t.unsqueeze(1).sizes(), (Shape{2, 1, 3, 4}));
  EXPECT_EQ(t.unsqueeze(-1).strides(), (Shape{12, 4, 1, 1}));
  EXPECT_EQ(iota({1, 3, 1}).squeeze().sizes(), (Shape{3}));
  EXPECT_EQ(iota({1, 3, 1}).squeeze(0).sizes(), (Shape{3, 1}));
  Tensor s = t.slice(2, 1, 100, 2);  // Python clamping of the end
  EXPECT_EQ(s.sizes(), (Shape{2, 3, 2}));
  EXPECT_EQ(s.storage_offset(), 1);
  EXPECT_EQ(s.strides(), (Shape{12, 4, 2}));
  EXPECT_EQ(t.slice(1, -2, 3).sizes(), (Shape{2, 2, 4}));
  Tensor e = tensor({1, 2, 3}, {3, 1}).expand({2, 3, 4});
  EXPECT_EQ(e.strides(), (Shape{0, 1, 0}));
  EXPECT_EQ(t.flatten(1).sizes(), (Shape{2, 12}));
  EXPECT_EQ(t.unflatten(2, {2, -1}).sizes(), (Shape{2, 3, 2, 2}));
  auto parts = t.split(2, 2);
  ASSERT_EQ(parts.size(), 2u);
  EXPECT_EQ(parts[1].storage_offset(), 2);
  auto ch = iota({7}).chunk(3);
  ASSERT_EQ(ch.size(), 3u);
  EXPECT_EQ(ch[2].sizes(), (Shape{1}));
  Tensor as = iota({6}).as_strided({2, 2}, {1, 2}, 1);
  EXPECT_TRUE(close(as, tensor({1, 3, 2, 4}, {2, 2})));
}

TEST(View, ReshapeIsAViewWhenPossibleAndACopyOtherwise) {
  Tensor t = iota({4, 6});
  EXPECT_TRUE(t.reshape({2, 12}).shares_storage(t));
  EXPECT_TRUE(t.t().reshape({6, 2, 2}).shares_storage(t));      // splitting a strided dim is still a view
  EXPECT_TRUE(t.slice(1, 0, 6, 2).reshape({12}).shares_storage(t));  // strides [6, 2] merge into [2]
  EXPECT_FALSE(t.t().reshape({24}).shares_storage(t));
  EXPECT_FALSE(t.narrow(1, 0, 4).reshape({16}).shares_storage(t));
  EXPECT_TRUE(t.view({2, 2, 6}).view({4, -1}).shares_storage(t));
  EXPECT_TRUE(close(t.t().reshape({24}), t.t().contiguous().view({24})));
  EXPECT_THROW_MSG(t.t().view({24}), ShapeError, "view", "[6, 4]", "reshape");
}

TEST(View, ErrorsNameOpAndShapes) {
  Tensor t = iota({2, 3});
  EXPECT_THROW_MSG(t.view({5}), ShapeError, "view", "[5]", "6");
  EXPECT_THROW_MSG(t.view({-1, -1}), ShapeError, "only one dimension");
  EXPECT_THROW_MSG(t.permute({0}), ShapeError, "permute");
  EXPECT_THROW_MSG(t.permute({0, 0}), ShapeError, "repeated");
  EXPECT_THROW_MSG(t.transpose(0, 2), IndexError, "dimension out of range");
  EXPECT_THROW_MSG(t.select(1, 3), IndexError, "select", "index 3");
  EXPECT_THROW_MSG(t.narrow(1, 2, 2), IndexError, "narrow");
  EXPECT_THROW_MSG(t.expand({4, 3}), ShapeError, "expand", "[4, 3]");
  EXPECT_THROW_MSG(t.as_strided({10}, {1}), ShapeError, "as_strided", "out of bounds");
  EXPECT_THROW_MSG(t.split_with_sizes({1, 1}, 1), ShapeError, "split_with_sizes");
}

TEST(View, GradientsFlowBackThroughEveryView) {
  Tensor x = iota({2, 3, 4}).requires_grad_();
  Tensor y = x.permute({2, 0, 1}).slice(0, 1, 4, 2).select(2, 1).unsqueeze(0).expand({3, 2, 2}).reshape({12});
  (y * arange(0, 12, 1, kFloat64)).sum().backward();
  // Each selected element x[b, 1, k] (k in {1, 3}) is used 3 times (the expand) with weights i, i+4, i+8.
  Tensor expected = zeros({2, 3, 4}, kFloat64);
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t kk = 0; kk < 2; ++kk)
      for (int64_t b = 0; b < 2; ++b) {
        int64_t i = r * 4 + kk * 2 + b;
        expected.set_at({b, 1, 1 + 2 * kk}, expected.at({b, 1, 1 + 2 * kk}) + static_cast<double>(i));
      }
  EXPECT_TRUE(close(x.grad(), expected));
  auto r = gradcheck([](const TensorList& in) {
    const Tensor& t = in[0];
    return TensorList{t.transpose(0, 1).flatten(), t.narrow(2, 1, 2).squeeze(), t.chunk(2, 2)[1] * 2.0,
                      t.as_strided({2, 2}, {3, 1}, 2), t.unflatten(2, {2, 2}).sum()};
  }, {randn({2, 3, 4}, kFloat64).requires_grad_()});
  EXPECT_TRUE(r.ok) << r.report();
}

TEST(Elementwise, GradcheckOfBinaryOpsWithBroadcasting) {
  Generator gen(11);
  Tensor a = (rand({3, 1, 4}, kFloat64, &gen) + 0.5).requires_grad_();
  Tensor b = (rand({2, 4}, kFloat64, &gen) + 0.5).requires_grad_();
  auto r = gradcheck([](const TensorList& in) {
    const Tensor& x = in[0];
    const Tensor& y = in[1];
    return TensorList{x + y, x - y * 2.0, x * y, x / y, pow(x, y), pow(x, 2.5), maximum(x, y), minimum(x, y),
                      clamp(x, 0.7, 1.2), where(x > y, x, y * 3.0), remainder(x, y)};
  }, {a, b});
  EXPECT_TRUE(r.ok) << r.report();
}

TEST(Elementwise, GradcheckOfCastsAndInPlaceOnNonLeaves) {
  auto r = gradcheck([](const TensorList& in) {
    Tensor y = in[0] * 1.0;
    y.add_(in[0] * in[0]);
    y.mul_(in[0]);
    return TensorList{y};
  }, {randn({5}, kFloat64).requires_grad_()});
  EXPECT_TRUE(r.ok) << r.report();
  Tensor x = tensor({1, 2}, {2}).requires_grad_();
  (x.to(kFloat32) * 3.0).sum().backward();  // the cast's backward casts the gradient back
  EXPECT_EQ(x.grad().dtype(), kFloat64);
  EXPECT_TRUE(close(x.grad(), tensor({3, 3}, {2})));
}

}  // namespace
}  // namespace fg
