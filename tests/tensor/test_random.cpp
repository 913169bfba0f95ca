// Seeded random factories: reproducibility, the documented element -> counter mapping, and statistics.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "flexgrad/tensor/philox.h"
#include "flexgrad/tensor/random.h"

namespace fg {
namespace {

std::vector<double> first(const std::vector<double>& v, size_t n) { return {v.begin(), v.begin() + n}; }
std::vector<double> last(const std::vector<double>& v, size_t n) { return {v.end() - n, v.end()}; }

// Random123's kat_vectors, the three "philox4x32 10" lines (counter[4] key[2] -> output[4]).
TEST(Random, PhiloxMatchesRandom123KnownAnswers) {
  struct Kat {
    uint32_t ctr[4], key[2], want[4];
  };
  const Kat kats[] = {
      {{0x00000000, 0x00000000, 0x00000000, 0x00000000}, {0x00000000, 0x00000000},
       {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
      {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
       {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
      {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
       {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
  };
  for (const Kat& k : kats) {
    uint32_t out[4];
    Philox4x32::block(k.ctr, k.key, out);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(out[i], k.want[i]) << std::hex << "word " << i << " of counter " << k.ctr[0];
  }
  // generate(seed, ctr) is the block with counter (ctr, 0) and key seed: the all-zero vector.
  uint32_t out[4];
  Philox4x32::generate(0, 0, out);
  EXPECT_EQ(out[0], 0x6627e8d5u);
  EXPECT_EQ(out[3], 0x9b00dbd8u);
}

TEST(Random, SameSeedSameValues) {
  Generator a(123), b(123), c(124);
  EXPECT_EQ(rand({50}, {}, &a).to_vector(), rand({50}, {}, &b).to_vector());
  EXPECT_EQ(randn({50}, kFloat64, &a).to_vector(), randn({50}, kFloat64, &b).to_vector());
  Generator a2(123);
  EXPECT_NE(rand({50}, {}, &a2).to_vector(), rand({50}, {}, &c).to_vector());
}

TEST(Random, ManualSeedResetsTheDefaultGenerator) {
  manual_seed(42);
  auto x = randn({8}).to_vector();
  auto y = randn({8}).to_vector();
  EXPECT_NE(x, y);  // the offset advanced between draws
  manual_seed(42);
  EXPECT_EQ(randn({8}).to_vector(), x);
  EXPECT_EQ(default_generator().offset(), 8u);
}

TEST(Random, DrawsConsumeConsecutiveCounters) {
  // Element i of a draw uses counter offset + i, so drawing 10 then 10 equals one draw of 20, whatever
  // the shapes.
  for (DType dt : {kFloat32, kFloat64, kFloat16, kBFloat16}) {
    Generator split(9), whole(9);
    auto a = rand({10}, dt, &split).to_vector();
    auto b = rand({2, 5}, dt, &split).to_vector();
    auto all = rand({4, 5}, dt, &whole).to_vector();
    EXPECT_EQ(a, first(all, 10)) << dtype_name(dt);
    EXPECT_EQ(b, last(all, 10)) << dtype_name(dt);
    EXPECT_EQ(split.offset(), 20u);
  }
  Generator split(5), whole(5);
  auto a = randn({10}, kFloat64, &split).to_vector();
  auto b = randn({10}, kFloat64, &split).to_vector();
  auto all = randn({20}, kFloat64, &whole).to_vector();
  EXPECT_EQ(a, first(all, 10));
  EXPECT_EQ(b, last(all, 10));
  // Starting a generator at offset 10 reproduces the second half.
  Generator mid(5);
  mid.set_offset(10);
  EXPECT_EQ(randn({10}, kFloat64, &mid).to_vector(), b);
}

TEST(Random, ValuesFollowTheDocumentedMapping) {
  Generator g(77);
  g.set_offset(1000);
  auto f32 = rand({3}, kFloat32, &g).to_vector();
  auto f64 = rand({3}, kFloat64, &g).to_vector();
  auto n64 = randn({3}, kFloat64, &g).to_vector();
  for (uint64_t i = 0; i < 3; ++i) {
    uint32_t w[4];
    Philox4x32::generate(77, 1000 + i, w);
    EXPECT_EQ(f32[i], static_cast<double>(Philox4x32::to_float(w[0])));
    Philox4x32::generate(77, 1003 + i, w);
    EXPECT_EQ(f64[i], Philox4x32::to_double(w[0], w[1]));
    Philox4x32::generate(77, 1006 + i, w);
    double u1 = 1.0 - Philox4x32::to_double(w[0], w[1]), u2 = Philox4x32::to_double(w[2], w[3]);
    EXPECT_EQ(n64[i], std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
  }
}

TEST(Random, ParallelFillMatchesSequentialCounters) {
  // Above 2^16 elements the fill runs on OpenMP threads; values must still be counter-addressed.
  Generator g(3), h(3);
  auto big = rand({1 << 17}, kFloat32, &g).to_vector();
  h.set_offset((1 << 17) - 5);
  EXPECT_EQ(rand({5}, kFloat32, &h).to_vector(), last(big, 5));
}

TEST(Random, UniformMoments) {
  Generator g(2024);
  for (DType dt : {kFloat32, kFloat64, kFloat16, kBFloat16}) {
    auto v = rand({100000}, dt, &g).to_vector();
    double mean = 0, var = 0;
    for (double x : v) {
      ASSERT_GE(x, 0.0);
      ASSERT_LT(x, 1.0);
      mean += x;
    }
    mean /= v.size();
    for (double x : v) var += (x - mean) * (x - mean);
    var /= v.size();
    EXPECT_NEAR(mean, 0.5, 0.005) << dtype_name(dt);       // sd of the mean ~ 0.0009
    EXPECT_NEAR(var, 1.0 / 12.0, 0.003) << dtype_name(dt);  // bf16 has only 256 levels: variance is 1/12 - ~1/256
  }
}

TEST(Random, NormalMoments) {
  Generator g(11);
  for (DType dt : {kFloat32, kFloat64}) {
    auto v = randn({100000}, dt, &g).to_vector();
    double mean = 0, var = 0, tail = 0;
    for (double x : v) { mean += x; tail += std::abs(x) > 1.96; }
    mean /= v.size();
    for (double x : v) var += (x - mean) * (x - mean);
    var /= v.size();
    EXPECT_NEAR(mean, 0.0, 0.015) << dtype_name(dt);
    EXPECT_NEAR(var, 1.0, 0.02) << dtype_name(dt);
    EXPECT_NEAR(tail / v.size(), 0.05, 0.005) << dtype_name(dt);  // two-sided 5% beyond 1.96
  }
  EXPECT_THROW(randn({2}, kInt64), DTypeError);
  EXPECT_THROW(rand({2}, kBool), DTypeError);
}

TEST(Random, RandintRange) {
  Generator g(1);
  Tensor t = randint(-3, 4, {20000}, kInt32, &g);
  EXPECT_EQ(t.dtype(), kInt32);
  std::vector<int> counts(7, 0);
  for (double x : t.to_vector()) {
    ASSERT_GE(x, -3);
    ASSERT_LT(x, 4);
    ++counts[static_cast<int>(x) + 3];
  }
  for (int c : counts) EXPECT_NEAR(c, 20000 / 7.0, 200);
  EXPECT_EQ(randint(5, 6, {10}, kInt64, &g).to_vector(), std::vector<double>(10, 5.0));
  auto big = randint(0, int64_t{1} << 40, {1000}, kInt64, &g).to_vector();
  EXPECT_GT(*std::max_element(big.begin(), big.end()), static_cast<double>(int64_t{1} << 39));
  EXPECT_THROW(randint(3, 3, {1}), ValueError);
}

TEST(Random, Bernoulli) {
  Generator g(8);
  auto v = bernoulli({100000}, 0.3, kFloat32, &g).to_vector();
  double ones = 0;
  for (double x : v) { ASSERT_TRUE(x == 0 || x == 1); ones += x; }
  EXPECT_NEAR(ones / v.size(), 0.3, 0.005);
  EXPECT_EQ(bernoulli({10}, 0.0, kBool, &g).to_vector(), std::vector<double>(10, 0.0));
  EXPECT_EQ(bernoulli({10}, 1.0, kBool, &g).to_vector(), std::vector<double>(10, 1.0));
  EXPECT_THROW(bernoulli({1}, 1.5), ValueError);
}

TEST(Random, LikeVariantsKeepShapeAndDType) {
  Tensor proto = zeros({3, 2}, kFloat64);
  Generator g(4), h(4);
  Tensor r = rand_like(proto, &g);
  EXPECT_EQ(r.sizes(), proto.sizes());
  EXPECT_EQ(r.dtype(), kFloat64);
  EXPECT_EQ(r.to_vector(), rand({3, 2}, kFloat64, &h).to_vector());
  EXPECT_EQ(randn_like(proto, &g).dtype(), kFloat64);
  EXPECT_TRUE(rand({2}, TensorOptions().requires_grad()).requires_grad());
}

TEST(Random, RandpermIsAPermutation) {
  Generator g(99);
  Tensor p = randperm(1000, kInt64, &g);
  auto v = p.to_vector();
  std::vector<double> sorted = v;
  std::sort(sorted.begin(), sorted.end());
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(sorted[i], i);
  std::vector<double> identity(sorted);
  EXPECT_NE(v, identity);
  Generator g2(99);
  EXPECT_EQ(randperm(1000, kInt64, &g2).to_vector(), v);
  EXPECT_EQ(randperm(0, kInt64, &g).numel(), 0);
  // Every position is equally likely to receive element 0.
  std::vector<int> where(4, 0);
  for (int trial = 0; trial < 8000; ++trial) {
    auto q = randperm(4, kInt32, &g).to_vector();
    ++where[std::find(q.begin(), q.end(), 0.0) - q.begin()];
  }
  for (int c : where) EXPECT_NEAR(c, 2000, 150);
  EXPECT_THROW(randperm(3000, kFloat16), DTypeError);
}

TEST(Random, MultinomialFrequencies) {
  Generator g(5);
  Tensor w = from_vector<double>({1, 0, 3, 6,   // row 0: p = .1 0 .3 .6
                                  0, 0, 0, 2},  // row 1: always 3
                                 {2, 4}, kFloat64);
  std::vector<double> counts(4, 0);
  for (int trial = 0; trial < 20000; ++trial) {
    Tensor s = multinomial(w, &g);
    ASSERT_EQ(s.sizes(), Shape{2});
    ASSERT_EQ(s.dtype(), kInt64);
    ++counts[static_cast<size_t>(s.at({0}))];
    ASSERT_EQ(s.at({1}), 3.0);
  }
  EXPECT_EQ(counts[1], 0);  // zero weight never chosen
  EXPECT_NEAR(counts[0] / 20000, 0.1, 0.01);
  EXPECT_NEAR(counts[2] / 20000, 0.3, 0.015);
  EXPECT_NEAR(counts[3] / 20000, 0.6, 0.015);
  EXPECT_THROW(multinomial(from_vector<double>({1, -1}, {2}), &g), ValueError);
  EXPECT_THROW(multinomial(zeros({2, 3}), &g), ValueError);
}

}  // namespace
}  // namespace fg
