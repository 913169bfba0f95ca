// The float32 tile kernels of the CPU FlexAttention (attention/cpu/tile_kernels.h), every instruction set
// this CPU can run, against plain float64 loops written here: GEMM in both A layouts over sizes that hit
// every register block and tail, the row max (NaN skipped), the exp-and-sum row pass (vec::expf's values
// without FMA, within 2 ulp of them with it; -inf -> 0, NaN kept) and its cheaper form below a row's max, the
// softcap pass, the softmax backward row, the 32-bit transpose and the bf16 pair kernels. AVX-512 and AVX2 must agree bit for bit.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "flexgrad/attention/cpu/tile_kernels.h"
#include "flexgrad/tensor/vec_math.h"
#include "tests/test_util.h"

namespace fg {
namespace {

using cpu::TileIsa;
using cpu::TileKernels;

std::vector<TileIsa> supported() {
  std::vector<TileIsa> r;
  for (TileIsa isa : {TileIsa::Generic, TileIsa::Avx2, TileIsa::Avx512, TileIsa::Avx512Bf16})
    if (cpu::cpu_supports(isa)) r.push_back(isa);
  return r;
}

std::vector<float> random_floats(size_t n, std::mt19937& rng) {
  std::uniform_real_distribution<float> d(-2.f, 2.f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

struct GemmCase {
  bool a_trans;
  int64_t m, n, k;
  float alpha;
  bool accumulate;
};

// Runs the kernel with padded leading dimensions (lda, ldb, ldc larger than the rows) and returns C.
std::vector<float> run_gemm(const TileKernels& tk, const GemmCase& c, const std::vector<float>& a, int64_t lda,
                            const std::vector<float>& b, int64_t ldb, std::vector<float> cmat, int64_t ldc) {
  tk.gemm(c.a_trans, c.m, c.n, c.k, c.alpha, a.data(), lda, b.data(), ldb, c.accumulate, cmat.data(), ldc);
  return cmat;
}

TEST(TileKernels, GemmMatchesFloat64LoopOnEverySizeAndLayout) {
  std::mt19937 rng(7);
  std::vector<GemmCase> cases;
  for (bool at : {false, true})
    for (int64_t m : {1, 5, 6, 7, 13, 128})
      for (int64_t n : {1, 3, 8, 15, 16, 17, 33, 64, 65, 128})
        for (int64_t k : {1, 7, 64, 128}) cases.push_back({at, m, n, k, (m + n) % 2 ? 0.125f : 1.0f, (m + k) % 2 == 0});
  for (TileIsa isa : supported()) {
    const TileKernels& tk = cpu::tile_kernels(isa);
    for (const GemmCase& c : cases) {
      const int64_t lda = (c.a_trans ? c.m : c.k) + 3, ldb = c.n + 5, ldc = c.n + 2;
      const auto a = random_floats((c.a_trans ? c.k : c.m) * lda, rng), b = random_floats(c.k * ldb, rng);
      const auto c0 = random_floats(c.m * ldc, rng);
      const auto got = run_gemm(tk, c, a, lda, b, ldb, c0, ldc);
      for (int64_t i = 0; i < c.m; ++i) {
        for (int64_t j = 0; j < ldc; ++j) {
          if (j >= c.n) {  // the padding stays untouched
            ASSERT_EQ(got[i * ldc + j], c0[i * ldc + j]);
            continue;
          }
          double s = 0, mag = 0;
          for (int64_t p = 0; p < c.k; ++p) {
            const double x = c.a_trans ? a[p * lda + i] : a[i * lda + p];
            s += x * b[p * ldb + j];
            mag += std::fabs(x * b[p * ldb + j]);
          }
          const double want = c.alpha * s + (c.accumulate ? c0[i * ldc + j] : 0.0);
          const double tol = 2e-7 * (c.k + 2) * (c.alpha * mag + std::fabs(c0[i * ldc + j]) + 1e-30);
          ASSERT_NEAR(got[i * ldc + j], want, tol) << tk.name << " a_trans " << c.a_trans << " m " << c.m << " n "
                                                   << c.n << " k " << c.k << " at (" << i << ", " << j << ")";
        }
      }
    }
  }
}

TEST(TileKernels, Avx512AndAvx2RoundIdentically) {
  if (!cpu::cpu_supports(TileIsa::Avx512)) GTEST_SKIP() << "no AVX-512 on this CPU";
  std::mt19937 rng(11);
  const TileKernels &x = cpu::tile_kernels(TileIsa::Avx512), &y = cpu::tile_kernels(TileIsa::Avx2);
  for (bool at : {false, true}) {
    for (int64_t n : {17, 64, 128}) {
      const GemmCase c{at, 13, n, 96, 0.3f, true};
      const int64_t lda = at ? c.m : c.k;
      const auto a = random_floats(std::max(c.m, c.k) * std::max(c.m, c.k), rng), b = random_floats(c.k * n, rng);
      const auto c0 = random_floats(c.m * n, rng);
      EXPECT_EQ(run_gemm(x, c, a, lda, b, n, c0, n), run_gemm(y, c, a, lda, b, n, c0, n)) << "n " << n << " at " << at;
    }
  }
  auto row = random_floats(77, rng);
  auto r1 = row, r2 = row;
  x.exp_sum(r1.data(), 77, 0.5f);  // the sums add lanes in another order; the values are the same
  y.exp_sum(r2.data(), 77, 0.5f);
  EXPECT_EQ(r1, r2);
  r1 = row, r2 = row;
  x.exp_sum_max(r1.data(), 77, 2.0f);
  y.exp_sum_max(r2.data(), 77, 2.0f);
  EXPECT_EQ(r1, r2);
}

TEST(TileKernels, RowMaxSkipsNaN) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  for (TileIsa isa : supported()) {
    const TileKernels& tk = cpu::tile_kernels(isa);
    for (int64_t n : {0, 1, 7, 16, 33, 128}) {
      std::vector<float> x(n);
      for (int64_t j = 0; j < n; ++j) x[j] = std::sin(0.7f * j) - (j % 5 == 0 ? 10 : 0);
      float want = -inf;
      for (float v : x) want = std::max(want, v);
      EXPECT_EQ(tk.row_max(x.data(), n), want) << tk.name << " n " << n;
      if (n == 0) continue;
      x[n - 1] = nan;  // in the scalar tail or the last vector
      x[0] = nan;
      float want2 = -inf;
      for (float v : x) want2 = v > want2 ? v : want2;
      EXPECT_EQ(tk.row_max(x.data(), n), want2) << tk.name << " n " << n;
      std::vector<float> empty(n, -inf);
      EXPECT_EQ(tk.row_max(empty.data(), n), -inf);
      std::vector<float> allnan(n, nan);
      EXPECT_EQ(tk.row_max(allnan.data(), n), -inf);
    }
  }
}

TEST(TileKernels, ExpSumIsVecExpfAndSumsIt) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::mt19937 rng(3);
  for (TileIsa isa : supported()) {
    const TileKernels& tk = cpu::tile_kernels(isa);
    for (int64_t n : {1, 5, 16, 31, 128}) {
      std::vector<float> x = random_floats(n, rng);
      for (float& v : x) v *= 40;  // down to exp(-80 - m): near the flush-to-zero edge
      x[0] = -inf;
      const float m = 3.0f;
      std::vector<float> got = x;
      const float sum = tk.exp_sum(got.data(), n, m);
      double want_sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        const float ref = vec::expf(x[j] - m);  // the same operations; fused multiply-adds with FMA
        if (isa == TileIsa::Generic) EXPECT_EQ(got[j], ref) << tk.name << " j " << j;
        else EXPECT_NEAR(got[j], ref, 2.5e-7 * ref) << tk.name << " j " << j;
        const double e = std::exp(static_cast<double>(x[j] - m));  // exp's accuracy at the float argument
        EXPECT_NEAR(got[j], e, 4e-7 * e + 1e-37) << tk.name << " j " << j;
        want_sum += e;
      }
      EXPECT_NEAR(sum, want_sum, 1e-6 * want_sum) << tk.name << " n " << n;
      x[n - 1] = nan;
      got = x;
      EXPECT_TRUE(std::isnan(tk.exp_sum(got.data(), n, m)));
      EXPECT_TRUE(std::isnan(got[n - 1]));
    }
  }
}

// The range edges and special values: each lane is what vec::expf gives (0 below -87.34, inf above 88.72).
TEST(TileKernels, ExpEdges) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> x0{-inf, -1000.f, -87.4f, -87.3f, -80.f, -1e-30f, 0.f, -0.f, 1e-30f, 1.f, 80.f, 88.7f,
                              88.8f, 1000.f, inf, -3.f, 2.5f};
  for (TileIsa isa : supported()) {
    const TileKernels& tk = cpu::tile_kernels(isa);
    std::vector<float> x = x0;
    const float sum = tk.exp_sum(x.data(), static_cast<int64_t>(x.size()), 0.f);
    EXPECT_EQ(sum, inf) << tk.name;
    for (size_t j = 0; j < x.size(); ++j) {
      const float ref = vec::expf(x0[j]);
      if (ref == 0 || std::isinf(ref) || ref == 1) EXPECT_EQ(x[j], ref) << tk.name << " exp(" << x0[j] << ")";
      else EXPECT_NEAR(x[j], ref, 2.5e-7 * ref) << tk.name << " exp(" << x0[j] << ")";
    }
  }
}

// The softmax's exp pass (every x <= m, the row's finite max): e^(x - m) within about an ulp of float64's
// exp (and of vec::expf), exactly 1 at the max, 0 for -inf and below e^-87.34, NaN kept; the sum of the values.
TEST(TileKernels, ExpSumMaxIsExpBelowTheMax) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::mt19937 rng(29);
  for (TileIsa isa : supported()) {
    const TileKernels& tk = cpu::tile_kernels(isa);
    for (int64_t n : {1, 5, 16, 31, 128}) {
      std::vector<float> x = random_floats(n, rng);
      for (float& v : x) v *= 45;  // down to e^-90: past the flush-to-zero edge
      if (n > 2) x[1] = -inf;
      float m = -inf;
      for (float v : x) m = std::max(m, v);
      std::vector<float> got = x;
      const float sum = tk.exp_sum_max(got.data(), n, m);
      double want_sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        const float d = x[j] - m;
        const double e = std::exp(static_cast<double>(d));
        if (x[j] == m) {
          EXPECT_EQ(got[j], 1.0f) << tk.name;
        }
        if (d < -87.33654f) EXPECT_EQ(got[j], 0.0f) << tk.name << " exp(" << d << ")";
        else EXPECT_NEAR(got[j], e, 1.25e-7 * e) << tk.name << " exp(" << d << ")";  // 1.01 ulp at worst
        EXPECT_NEAR(got[j], vec::expf(d), 1.25e-7 * e) << tk.name << " exp(" << d << ")";
        want_sum += got[j];
      }
      EXPECT_NEAR(sum, want_sum, 1e-6 * want_sum) << tk.name << " n " << n;
      x[n - 1] = nan;
      got = x;
      EXPECT_TRUE(std::isnan(tk.exp_sum_max(got.data(), n, m))) << tk.name;
      EXPECT_TRUE(std::isnan(got[n - 1])) << tk.name;
    }
    std::vector<float> edges{-inf, -1000.f, -87.4f, -87.3f, -80.f, -1e-30f, -0.f, 0.f, -3.f, -0.5f, -1e-4f};
    const std::vector<float> x0 = edges;
    tk.exp_sum_max(edges.data(), static_cast<int64_t>(edges.size()), 0.f);
    for (size_t j = 0; j < x0.size(); ++j) {
      const double e = std::exp(static_cast<double>(x0[j]));
      if (x0[j] < -87.33654f) EXPECT_EQ(edges[j], 0.0f) << tk.name << " exp(" << x0[j] << ")";
      else EXPECT_NEAR(edges[j], e, 1.25e-7 * e) << tk.name << " exp(" << x0[j] << ")";
    }
  }
}

// The softcap forms both softcap tests run: outer * tanh(x / inner) or outer * tanh(x * inner).
struct SoftcapForm {
  float inner;
  bool divide;
  float outer;
};
constexpr SoftcapForm kSoftcapForms[] = {{20.f, true, 20.f}, {0.5f, false, 2.f}, {3.f, true, -1.5f}};

// outer * tanh(x / inner) (or x * inner) against float64's tanh of the same float y, both sides of the
// polynomial/exp split at |y| = 0.625; +-inf -> +-outer, NaN kept, +-0 -> 0; AVX-512 and AVX2 agree bit for bit.
TEST(TileKernels, SoftcapIsOuterTimesTanh) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<std::vector<float>> per_isa;
  for (TileIsa isa : supported()) {
    const TileKernels& tk = cpu::tile_kernels(isa);
    std::mt19937 rng(31);  // the same inputs for every instruction set
    std::vector<float> all;
    for (const SoftcapForm& f : kSoftcapForms) {
      for (int64_t n : {1, 7, 16, 33, 128}) {
        std::vector<float> x = random_floats(n, rng);
        for (int64_t j = 0; j < n; ++j) x[j] *= std::ldexp(1.0f, static_cast<int>(j % 14) - 4) * f.inner;  // y to +-1024
        std::vector<float> got(n, 7.f);
        tk.softcap(x.data(), n, f.inner, f.divide, f.outer, got.data());
        for (int64_t j = 0; j < n; ++j) {
          const float y = f.divide ? x[j] / f.inner : x[j] * f.inner;
          const double want = f.outer * std::tanh(static_cast<double>(y));
          EXPECT_NEAR(got[j], want, 3.6e-7 * std::fabs(want) + 1e-37) << tk.name << " y " << y;  // 3 ulp
        }
        all.insert(all.end(), got.begin(), got.end());
        std::vector<float> inplace = x;  // out may be x
        tk.softcap(inplace.data(), n, f.inner, f.divide, f.outer, inplace.data());
        EXPECT_EQ(inplace, got) << tk.name;
      }
    }
    std::vector<float> sp{inf, -inf, nan, -0.f, 0.f};
    std::vector<float> out(sp.size());
    tk.softcap(sp.data(), static_cast<int64_t>(sp.size()), 20.f, true, 20.f, out.data());
    EXPECT_EQ(out[0], 20.f) << tk.name;
    EXPECT_EQ(out[1], -20.f) << tk.name;
    EXPECT_TRUE(std::isnan(out[2])) << tk.name;
    EXPECT_EQ(out[3], 0.f) << tk.name;
    EXPECT_EQ(out[4], 0.f) << tk.name;
    if (isa == TileIsa::Avx2 || isa == TileIsa::Avx512) per_isa.push_back(all);
  }
  if (per_isa.size() == 2) {
    EXPECT_EQ(per_isa[0], per_isa[1]);
  }
}

// softcap_grad: the same values as softcap, and the derivative against float64's
// d/dx outer * tanh(x / inner) = outer / inner * (1 - tanh^2) (or outer * inner * ...).
TEST(TileKernels, SoftcapGradIsSoftcapAndItsDerivative) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<std::vector<float>> per_isa;
  for (TileIsa isa : supported()) {
    const TileKernels& tk = cpu::tile_kernels(isa);
    std::mt19937 rng(37);
    std::vector<float> all;
    for (const SoftcapForm& f : kSoftcapForms) {
      for (int64_t n : {1, 7, 16, 33, 128}) {
        std::vector<float> x = random_floats(n, rng);
        for (int64_t j = 0; j < n; ++j) x[j] *= std::ldexp(1.0f, static_cast<int>(j % 8) - 4) * f.inner;  // y to +-16
        std::vector<float> value(n, 7.f), grad(n, 7.f), plain(n);
        tk.softcap_grad(x.data(), n, f.inner, f.divide, f.outer, value.data(), grad.data());
        tk.softcap(x.data(), n, f.inner, f.divide, f.outer, plain.data());
        EXPECT_EQ(value, plain) << tk.name;
        for (int64_t j = 0; j < n; ++j) {
          const double y = f.divide ? static_cast<double>(x[j]) / f.inner : static_cast<double>(x[j]) * f.inner;
          const double t = std::tanh(y), k = f.divide ? double(f.outer) / f.inner : double(f.outer) * f.inner;
          const double want = k * (1 - t * t);
          // 1 - t^2 cancels where t is near 1: the error is bounded by t's (a few ulp of 1) times 2 |k|
          EXPECT_NEAR(grad[j], want, 1e-6 * std::fabs(want) + 1.5e-6 * std::fabs(k)) << tk.name << " y " << y;
        }
        all.insert(all.end(), grad.begin(), grad.end());
        std::vector<float> inplace = x;  // grad may be x
        tk.softcap_grad(inplace.data(), n, f.inner, f.divide, f.outer, value.data(), inplace.data());
        EXPECT_EQ(inplace, grad) << tk.name;
      }
    }
    std::vector<float> sp{inf, -inf, nan, 0.f};
    std::vector<float> out(sp.size()), grad(sp.size());
    tk.softcap_grad(sp.data(), static_cast<int64_t>(sp.size()), 20.f, true, 20.f, out.data(), grad.data());
    EXPECT_EQ(out[0], 20.f) << tk.name;
    EXPECT_EQ(grad[0], 0.f) << tk.name;
    EXPECT_EQ(grad[1], 0.f) << tk.name;
    EXPECT_TRUE(std::isnan(grad[2])) << tk.name;
    EXPECT_EQ(grad[3], 1.f) << tk.name;
    if (isa == TileIsa::Avx2 || isa == TileIsa::Avx512) per_isa.push_back(all);
  }
  if (per_isa.size() == 2) {
    EXPECT_EQ(per_isa[0], per_isa[1]);
  }
}

TEST(TileKernels, Transpose32) {
  std::mt19937 rng(23);
  for (TileIsa isa : supported()) {
    const TileKernels& tk = cpu::tile_kernels(isa);
    for (int64_t rows : {1, 3, 4, 7, 8, 9, 16, 17, 64})
      for (int64_t cols : {1, 4, 5, 8, 12, 32, 33}) {
        const int64_t ldd = rows + 5;  // into columns of a wider matrix; the rest stays untouched
        std::vector<uint32_t> src(rows * cols), dst(cols * ldd, 7);
        for (uint32_t& x : src) x = static_cast<uint32_t>(rng());
        tk.transpose32(src.data(), rows, cols, dst.data(), ldd);
        for (int64_t c = 0; c < cols; ++c)
          for (int64_t r = 0; r < ldd; ++r)
            ASSERT_EQ(dst[c * ldd + r], r < rows ? src[r * cols + c] : 7u)
                << tk.name << " " << rows << " x " << cols << " at (" << r << ", " << c << ")";
      }
  }
}

TEST(TileKernels, SoftmaxGradRow) {
  std::mt19937 rng(5);
  for (TileIsa isa : supported()) {
    const TileKernels& tk = cpu::tile_kernels(isa);
    for (int64_t n : {1, 9, 64, 77}) {
      const auto p = random_floats(n, rng), dp0 = random_floats(n, rng);
      auto dp = dp0;
      tk.softmax_grad(dp.data(), p.data(), n, 0.25f);
      for (int64_t j = 0; j < n; ++j) EXPECT_EQ(dp[j], p[j] * (dp0[j] - 0.25f)) << tk.name << " j " << j;
    }
  }
}

// float -> bfloat16 bits, round to nearest even (finite inputs), written out here.
uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(TileKernels, Bf16PairsRoundToNearestEven) {
  if (!cpu::cpu_supports(TileIsa::Avx512Bf16)) GTEST_SKIP() << "no AVX-512 BF16 on this CPU";
  const TileKernels& tk = cpu::tile_kernels(TileIsa::Avx512Bf16);
  std::mt19937 rng(13);
  for (int64_t n : {1, 2, 7, 32, 33, 100}) {
    auto x = random_floats(n, rng);
    if (n > 3) x[3] = bf16_value(0x3f80) + std::ldexp(1.0f, -8);  // exactly halfway between two bf16: to even
    std::vector<uint32_t> got((n + 1) / 2, 0xdeadbeef);
    tk.to_bf16_pairs(x.data(), n, got.data());
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t half = static_cast<uint16_t>(j % 2 ? got[j / 2] >> 16 : got[j / 2] & 0xffffu);
      EXPECT_EQ(half, bf16_bits(x[j])) << "n " << n << " j " << j;
    }
    if (n % 2) {
      EXPECT_EQ(got[n / 2] >> 16, 0u) << "n " << n;
    }
  }
}

// gemm_bf16 on bf16 operands against a float64 loop over the same (exactly representable) bf16 values.
TEST(TileKernels, Bf16GemmMatchesFloat64Loop) {
  if (!cpu::cpu_supports(TileIsa::Avx512Bf16)) GTEST_SKIP() << "no AVX-512 BF16 on this CPU";
  const TileKernels& tk = cpu::tile_kernels(TileIsa::Avx512Bf16);
  std::mt19937 rng(17);
  for (bool at : {false, true})
  for (int64_t m : {1, 5, 6, 13, 128})
    for (int64_t n : {1, 15, 16, 33, 64, 128})
      for (int64_t k2 : {1, 32, 64}) {
        const int64_t lda = (at ? m : k2) + 1, ldb = n + 3, ldc = n + 2;
        std::vector<uint32_t> a((at ? k2 : m) * lda), b(k2 * ldb);
        for (auto* buf : {&a, &b})
          for (uint32_t& w : *buf) {
            const auto f = random_floats(2, rng);
            w = bf16_bits(f[0]) | static_cast<uint32_t>(bf16_bits(f[1])) << 16;
          }
        const auto c0 = random_floats(m * ldc, rng);
        auto c = c0;
        const bool acc = (m + n) % 2 == 0;
        tk.gemm_bf16(at, m, n, k2, 0.5f, a.data(), lda, b.data(), ldb, acc, c.data(), ldc);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < n; ++j) {
            double sum = 0, mag = 0;
            for (int64_t p = 0; p < k2; ++p) {
              const uint32_t x = at ? a[p * lda + i] : a[i * lda + p], y = b[p * ldb + j];
              const double t0 = double(bf16_value(x & 0xffffu)) * bf16_value(y & 0xffffu);
              const double t1 = double(bf16_value(x >> 16)) * bf16_value(y >> 16);
              sum += t0 + t1;
              mag += std::fabs(t0) + std::fabs(t1);
            }
            const double want = 0.5 * sum + (acc ? c0[i * ldc + j] : 0.0);
            ASSERT_NEAR(c[i * ldc + j], want, 2e-7 * (2 * k2 + 2) * (mag + std::fabs(c0[i * ldc + j])) + 1e-30)
                << "a_trans " << at << " m " << m << " n " << n << " k2 " << k2 << " at (" << i << ", " << j << ")";
          }
      }
}

TEST(TileKernels, Bf16PairRows) {
  if (!cpu::cpu_supports(TileIsa::Avx512Bf16)) GTEST_SKIP() << "no AVX-512 BF16 on this CPU";
  const TileKernels& tk = cpu::tile_kernels(TileIsa::Avx512Bf16);
  std::mt19937 rng(19);
  for (int64_t rows : {1, 2, 7, 128})
    for (int64_t cols : {1, 16, 37, 64}) {
      const int64_t ldx = cols + 3, ld = cols + 1, pairs = (rows + 1) / 2;
      const auto x = random_floats(rows * ldx, rng);
      std::vector<uint16_t> xb(x.size());
      for (size_t i = 0; i < x.size(); ++i) xb[i] = bf16_bits(x[i]);
      std::vector<uint32_t> gf(pairs * ld), gb(pairs * ld);
      tk.pair_rows_f32(x.data(), ldx, rows, cols, gf.data(), ld);
      tk.pair_rows_bf16(xb.data(), ldx, rows, cols, gb.data(), ld);
      for (int64_t p = 0; p < pairs; ++p)
        for (int64_t j = 0; j < cols; ++j) {
          const uint32_t want =
              xb[2 * p * ldx + j] | (2 * p + 1 < rows ? static_cast<uint32_t>(xb[(2 * p + 1) * ldx + j]) << 16 : 0u);
          ASSERT_EQ(gf[p * ld + j], want) << "f32 rows " << rows << " cols " << cols << " p " << p << " j " << j;
          ASSERT_EQ(gb[p * ld + j], want) << "bf16 rows " << rows << " cols " << cols << " p " << p << " j " << j;
        }
    }
}

TEST(TileKernels, DefaultIsTheWidestSupportedOrTheForcedOne) {
  const std::string name = cpu::tile_kernels().name;
  if (const char* env = std::getenv("FLEXGRAD_CPU_ISA"); env && *env) {
    EXPECT_EQ(name, env);
  } else {
    const bool avx512 = cpu::cpu_supports(TileIsa::Avx512), avx2 = cpu::cpu_supports(TileIsa::Avx2);
    const bool bf16 = cpu::cpu_supports(TileIsa::Avx512Bf16);
    EXPECT_EQ(name, bf16 ? "avx512_bf16" : avx512 ? "avx512" : avx2 ? "avx2" : "generic");
  }
}

}  // namespace
}  // namespace fg
