#include "tests/ops/fd_check.h"

namespace fg {
namespace {
using testing::close;
using testing::fd_check;
using testing::noise;
using testing::tensor;

// Reference product in double with explicit loops, any layout.
Tensor ref_mm(const Tensor& a, const Tensor& b) {
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  Tensor c = zeros({m, n}, kFloat64);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) s += a.at({i, p}) * b.at({p, j});
      c.set_at({i, j}, s);
    }
  return c;
}

TEST(Linalg, MmAllLayoutsAndDtypes) {
  Tensor a = noise({5, 7}, kFloat64, 1), b = noise({7, 3}, kFloat64, 2);
  Tensor ref = ref_mm(a, b);
  EXPECT_TRUE(close(mm(a, b), ref, 1e-12));
  EXPECT_TRUE(close(mm(a.t().contiguous().t(), b.t().contiguous().t()), ref, 1e-12));  // Trans operands
  Tensor big = noise({10, 14}, kFloat64, 3);
  Tensor as = big.slice(0, 0, 10, 2).slice(1, 0, 14, 2);  // [5, 7], no unit stride: copied
  EXPECT_TRUE(close(mm(as, b), ref_mm(as, b), 1e-12));
  Tensor ex = tensor({1, 2, 3, 4, 5, 6, 7}, {1, 7}).expand({5, 7});
  EXPECT_TRUE(close(mm(ex, b), ref_mm(ex, b), 1e-12));
  EXPECT_TRUE(close(mm(a.to(kFloat32), b.to(kFloat32)), ref, 1e-4, 1e-4));
  EXPECT_TRUE(close(mm(a.to(kBFloat16), b.to(kBFloat16)), ref_mm(a.to(kBFloat16), b.to(kBFloat16)), 0.1, 0.02));
  EXPECT_TRUE(close(mm(a.to(kFloat16), b.to(kFloat16)), ref, 0.05, 0.01));
  Tensor ai = tensor({1, 2, 3, 4}, {2, 2}, kInt64);
  EXPECT_TRUE(close(mm(ai, ai), tensor({7, 10, 15, 22}, {2, 2})));
  EXPECT_EQ(mm(ai, ai).dtype(), kInt64);
}

TEST(Linalg, MatmulRules) {
  Tensor v = tensor({1, 2, 3}, {3}), m = tensor({1, 0, 0, 1, 1, 1}, {3, 2});
  EXPECT_EQ(matmul(v, v).dim(), 0);
  EXPECT_EQ(matmul(v, v).item<double>(), 14);
  EXPECT_TRUE(close(matmul(v, m), tensor({4, 5}, {2})));
  EXPECT_TRUE(close(matmul(m.t(), v), tensor({4, 5}, {2})));
  Tensor a = noise({2, 1, 4, 3}, kFloat64, 4), b = noise({5, 3, 2}, kFloat64, 5);
  Tensor c = matmul(a, b);
  EXPECT_EQ(c.sizes(), (Shape{2, 5, 4, 2}));
  EXPECT_TRUE(close(c.select(0, 1).select(0, 3), ref_mm(a.select(0, 1).select(0, 0), b.select(0, 3)), 1e-12));
  Tensor x = noise({2, 3, 4}, kFloat64, 6), w = noise({4, 5}, kFloat64, 7);
  EXPECT_TRUE(close(matmul(x, w).select(0, 1), ref_mm(x.select(0, 1), w), 1e-12));
  EXPECT_TRUE(close(bmm(x, x.transpose(1, 2)).select(0, 0), ref_mm(x.select(0, 0), x.select(0, 0).t()), 1e-12));
  EXPECT_THROW_MSG(matmul(noise({2, 3}, kFloat32, 8), noise({4, 2}, kFloat32, 9)), ShapeError, "matmul", "[2, 3]", "[4, 2]");
  EXPECT_THROW_MSG(mm(noise({2, 3}, kFloat32, 10), noise({3}, kFloat32, 11)), ShapeError, "mm", "2-D");
  EXPECT_THROW_MSG(mm(noise({2, 3}, kFloat32, 12), noise({3, 2}, kFloat64, 13)), DTypeError, "mm", "float32", "float64");
  EXPECT_THROW_MSG(bmm(noise({2, 2, 3}, kFloat32, 14), noise({3, 3, 2}, kFloat32, 15)), ShapeError, "bmm", "batch");
}

TEST(Linalg, ManySmallBatchedProductsMatch) {
  Tensor a = noise({300, 4, 5}, kFloat32, 16), b = noise({300, 5, 3}, kFloat32, 17);
  Tensor c = bmm(a, b);
  for (int64_t i : {0, 123, 299})
    EXPECT_TRUE(close(c.select(0, i), ref_mm(a.select(0, i), b.select(0, i)), 1e-4, 1e-4));
}

TEST(Linalg, LinearAndGradients) {
  Tensor x = noise({2, 3, 4}, kFloat64, 18), w = noise({5, 4}, kFloat64, 19), bias = noise({5}, kFloat64, 20);
  Tensor y = linear(x, w, bias);
  EXPECT_EQ(y.sizes(), (Shape{2, 3, 5}));
  EXPECT_TRUE(close(y.select(0, 0), ref_mm(x.select(0, 0), w.t()) + bias, 1e-12));
  EXPECT_THROW_MSG(linear(x, noise({5, 3}, kFloat64, 21)), ShapeError, "linear", "in_features");
  EXPECT_TRUE(fd_check([](const TensorList& in) { return linear(in[0], in[1], in[2]); }, {x, w, bias}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return matmul(in[0], in[1]); },
                       {noise({2, 1, 4, 3}, kFloat64, 22), noise({5, 3, 2}, kFloat64, 23).transpose(1, 2).contiguous().transpose(1, 2)}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return matmul(in[0], in[1]); },
                       {noise({3}, kFloat64, 24), noise({2, 3, 4}, kFloat64, 25)}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return matmul(in[0], in[1]); },
                       {noise({4, 3}, kFloat64, 26).t(), noise({4}, kFloat64, 27)}));
}

}  // namespace
}  // namespace fg
