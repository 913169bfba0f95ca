#include <cmath>
#include <limits>

#include <omp.h>

#include "tests/ops/fd_check.h"

namespace fg {
namespace {
using testing::close;
using testing::fd_check;
using testing::tensor;
constexpr double kInf = std::numeric_limits<double>::infinity();

// [2, 3, 4] float64 with values 0..23, and a transposed + step-sliced + offset view of a bigger tensor.
Tensor base() { return arange(0, 24, 1, kFloat64).view({2, 3, 4}); }
Tensor strided() {  // values of base().transpose(0, 2), but stored with steps and an offset
  Tensor big = zeros({3, 4, 6, 2}, kFloat64);
  Tensor v = big.select(0, 1).slice(1, 0, 6, 2).permute({2, 1, 0});  // [2, 3, 4] view, offset and steps
  v.copy_(base());
  return v.transpose(0, 2);  // [4, 3, 2]
}

TEST(Reduce, SumDimsKeepdimAndDtypes) {
  Tensor x = base();
  EXPECT_TRUE(close(sum(x, {1}), tensor({12, 15, 18, 21, 48, 51, 54, 57}, {2, 4})));
  EXPECT_EQ(sum(x, {0, 2}, true).sizes(), (Shape{1, 3, 1}));
  EXPECT_TRUE(close(sum(x, {0, -1}), tensor({60, 92, 124}, {3})));
  EXPECT_EQ(sum(x).item<double>(), 276);
  EXPECT_EQ(sum(tensor({1, 0, 1}, {3}, kBool)).dtype(), kInt64);
  EXPECT_EQ(sum(tensor({1, 2}, {2}, kInt32)).dtype(), kInt64);
  EXPECT_EQ(sum(x, {}, false, kFloat32).dtype(), kFloat32);
  EXPECT_THROW_MSG(sum(x, {1, -2}), IndexError, "sum", "multiple times");
  EXPECT_THROW_MSG(sum(x, {3}), IndexError, "sum", "out of range");
}

TEST(Reduce, StridedInputsMatchContiguous) {
  Tensor s = strided(), c = s.contiguous();
  ASSERT_FALSE(s.is_contiguous());
  for (Shape dims : {Shape{0}, Shape{1}, Shape{2}, Shape{0, 2}, Shape{}}) {
    EXPECT_TRUE(close(sum(s, dims), sum(c, dims)));
    EXPECT_TRUE(close(amax(s, dims, true), amax(c, dims, true)));
    EXPECT_TRUE(close(prod(s + 1, dims), prod(c + 1, dims)));
  }
  Tensor e = tensor({1, 2, 3}, {3, 1}).expand({3, 5});
  EXPECT_TRUE(close(sum(e, {1}), tensor({5, 10, 15}, {3})));
  EXPECT_TRUE(close(argmax(s, 0), argmax(c, 0)));
}

TEST(Reduce, LargeSumsAreAccurateAndDeterministic) {
  Tensor x = full({1 << 20}, 0.1, kFloat32);
  double got = sum(x).item<double>();
  EXPECT_NEAR(got, (1 << 20) * static_cast<double>(0.1f), 1e-3);
  EXPECT_EQ(sum(x).item<double>(), got);
  Tensor h = full({4096}, 1.0, kFloat16);
  EXPECT_EQ(sum(h).item<double>(), 4096);  // an f16 accumulator would stall at 2048
}

TEST(Reduce, ProdAndItsGradientWithZeros) {
  EXPECT_TRUE(close(prod(base() + 1, {2}), tensor({24, 1680, 11880, 43680, 116280, 255024}, {2, 3})));
  EXPECT_EQ(prod(tensor({2, 3}, {2}, kInt32)).dtype(), kInt64);
  auto f = [](const TensorList& in) { return prod(in[0], {1}); };
  EXPECT_TRUE(fd_check(f, {tensor({1, 2, 3, 0, 2, 3, 0, 0, 5, -1, 0.5, 2}, {4, 3})}));
}

TEST(Reduce, AmaxSplitsGradientAmongTies) {
  Tensor x = tensor({1, 3, 3, 2, 5, 5, 5, 0}, {2, 4}).requires_grad_(true);
  Tensor m = amax(x, {1});
  EXPECT_TRUE(close(m, tensor({3, 5}, {2})));
  m.sum().backward();
  EXPECT_TRUE(close(x.grad(), tensor({0, 0.5, 0.5, 0, 1. / 3, 1. / 3, 1. / 3, 0}, {2, 4})));
  EXPECT_TRUE(close(amin(x, {0}), tensor({1, 3, 3, 0}, {4})));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return amin(in[0], {0, 2}, true); }, {strided()}));
  EXPECT_TRUE(std::isnan(max(tensor({1, NAN, 3}, {3})).item<double>()));
  EXPECT_THROW_MSG(amax(zeros({2, 0}), {1}), IndexError, "amax", "[2, 0]");
}

TEST(Reduce, MaxMinAlongDimGiveFirstIndexOfTies) {
  Tensor x = tensor({1, 4, 4, 0, 7, 7}, {2, 3});
  auto [v, i] = max(x, 1);
  EXPECT_TRUE(close(v, tensor({4, 7}, {2})));
  EXPECT_TRUE(close(i, tensor({1, 1}, {2})));
  EXPECT_EQ(i.dtype(), kInt64);
  auto [v2, i2] = min(x, 0, true);
  EXPECT_EQ(v2.sizes(), (Shape{1, 3}));
  EXPECT_TRUE(close(i2, tensor({1, 0, 0}, {1, 3})));
  EXPECT_EQ(argmax(x).item<int64_t>(), 4);
  EXPECT_EQ(argmin(x).item<int64_t>(), 3);
  EXPECT_EQ(argmax(tensor({1, NAN, 5}, {3})).item<int64_t>(), 1);
  EXPECT_TRUE(fd_check([](const TensorList& in) { return max(in[0], 1).values; }, {strided()}));
}

TEST(Reduce, LogsumexpIsStableAndHandlesInfRows) {
  Tensor x = tensor({1000, 1000, -kInf, -kInf, 0, std::log(3.0)}, {3, 2}).requires_grad_(true);
  Tensor y = logsumexp(x, {1});
  EXPECT_TRUE(close(y, tensor({1000 + std::log(2.0), -kInf, std::log(4.0)}, {3})));
  y.sum().backward();
  EXPECT_TRUE(close(x.grad(), tensor({0.5, 0.5, 0, 0, 0.25, 0.75}, {3, 2})));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return logsumexp(in[0], {0, 2}); }, {strided() / 10}));
}

TEST(Reduce, VarStdNorm) {
  Tensor x = tensor({1, 2, 3, 4, 2, 2, 2, 2}, {2, 4});
  EXPECT_TRUE(close(var(x, {1}), tensor({5. / 3, 0}, {2})));
  EXPECT_TRUE(close(var(x, {1}, 0), tensor({1.25, 0}, {2})));
  EXPECT_TRUE(close(std(x, {1}, 1, true), tensor({std::sqrt(5. / 3), 0}, {2, 1})));
  EXPECT_TRUE(close(norm(x, 2, {1}), tensor({std::sqrt(30.0), 4}, {2})));
  EXPECT_TRUE(close(norm(x, 1), tensor({18}, {})));
  EXPECT_TRUE(close(norm(x, kInf, {0}), tensor({2, 2, 3, 4}, {4})));
  EXPECT_NEAR(norm(x, 3).item<double>(), std::cbrt(1 + 8 + 27 + 64 + 32.0), 1e-9);
  EXPECT_THROW_MSG(var(tensor({1, 2}, {2}, kInt64)), DTypeError, "var", "int64");
  Tensor z = zeros({3}, kFloat64).requires_grad_(true);
  norm(z).backward();
  EXPECT_TRUE(close(z.grad(), zeros({3}, kFloat64)));  // 0, not NaN, at the origin
  auto s = strided();
  EXPECT_TRUE(fd_check([](const TensorList& in) { return var(in[0], {1}); }, {s}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return std(in[0], {0, 2}, 0, true); }, {s}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return norm(in[0], 2, {1}); }, {s - 11.5}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return norm(in[0], 3, {2}); }, {s - 11.5}));
}

TEST(Reduce, CumsumSortTopk) {
  Tensor x = tensor({3, 1, 2, 1, 5, 0}, {2, 3});
  EXPECT_TRUE(close(cumsum(x, 1), tensor({3, 4, 6, 1, 6, 6}, {2, 3})));
  EXPECT_TRUE(close(cumsum(x.t(), 0), tensor({3, 1, 4, 6, 6, 6}, {3, 2})));
  EXPECT_EQ(cumsum(tensor({1, 2}, {2}, kInt32), 0).dtype(), kInt64);
  auto [sv, si] = sort(tensor({2, 1, 2, 0, 1}, {5}));
  EXPECT_TRUE(close(sv, tensor({0, 1, 1, 2, 2}, {5})));
  EXPECT_TRUE(close(si, tensor({3, 1, 4, 0, 2}, {5})));  // stable
  auto [dv, di] = sort(tensor({2, NAN, 1}, {3}), 0, true);
  EXPECT_TRUE(std::isnan(dv.at({0})));
  EXPECT_TRUE(close(di, tensor({1, 0, 2}, {3})));
  auto [tv, ti] = topk(x, 2, 1);
  EXPECT_TRUE(close(tv, tensor({3, 2, 5, 1}, {2, 2})));
  EXPECT_TRUE(close(ti, tensor({0, 2, 1, 0}, {2, 2})));
  auto [bv, bi] = topk(x, 1, 0, false);
  EXPECT_TRUE(close(bv, tensor({1, 1, 0}, {1, 3})));
  EXPECT_THROW_MSG(topk(x, 4, 1), IndexError, "topk", "k (4)", "size 3");
  Tensor s = strided();
  EXPECT_TRUE(fd_check([](const TensorList& in) { return cumsum(in[0], 1); }, {s}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return sort(in[0], 0, true).values; }, {s}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return topk(in[0], 2, -1).values; }, {s}));
}

TEST(Reduce, AnyAllAndMeanGradient) {
  EXPECT_TRUE(any(tensor({0, 0, 1}, {3})).item<bool>());
  EXPECT_FALSE(all(tensor({0, 2, 1}, {3})).item<bool>());
  EXPECT_TRUE(all(zeros({0})).item<bool>());
  EXPECT_FALSE(any(zeros({0})).item<bool>());
  EXPECT_TRUE(fd_check([](const TensorList& in) { return mean(in[0], {0, 1}, true); }, {strided()}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return sum(in[0], {1}); }, {strided()}));
}

// all/any of one long reduction split across threads: the chunk partials once lived in a vector<bool>,
// whose packed words threads overwrote concurrently, so all() of an all-true tensor sometimes said false
// (equal() of two big identical tensors too). Many threads and repetitions make the race show.
TEST(Reduce, AllAnyOfLongReductionsAreExactUnderThreads) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(8);
  const int64_t n = int64_t{4} << 20;
  Tensor t = ones({n}, kBool), f = zeros({n}, kBool);
  Tensor a = arange(0, static_cast<double>(n), 1, kFloat32), b = a.clone();
  for (int rep = 0; rep < 40; ++rep) {
    EXPECT_TRUE(all(t).item<bool>()) << rep;
    EXPECT_FALSE(any(f).item<bool>()) << rep;
    EXPECT_TRUE(equal(a, b)) << rep;
  }
  omp_set_num_threads(saved);
}

}  // namespace
}  // namespace fg
