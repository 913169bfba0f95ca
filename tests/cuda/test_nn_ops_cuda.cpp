// The ops behind nn's layers on the GPU: layer_norm / rms_norm, the fused cross_entropy, gelu_fused and
// embedding's backward have CUDA kernels of their own (ops/cuda/*), so each is checked here against a
// float64 golden written in this file with plain loops (not the CPU kernels), over awkward sizes, and by
// float64 gradcheck on the GPU. Composite layers (SwiGLU MLP, RoPE, dropout) are compared with the CPU path.
// Skipped, visibly, without a GPU.
//
// Tolerances: float32 kernels vs the float64 golden |got - want| <= atol + rtol |want| with rtol 1e-5..1e-4
// and atol 1e-5 for O(1) values; sums over R rows (norm weight/bias grads) get atol 1e-5 + 2e-7 R (the
// float32 rounding of an R-term sum); float64 kernels 1e-10; bf16 inputs (upcast to float32 by the op) 1e-2.
#include <cmath>
#include <cstring>
#include <numbers>
#include <vector>

#include "flexgrad/autograd/gradcheck.h"
#include "flexgrad/nn/dropout.h"
#include "flexgrad/nn/mlp.h"
#include "flexgrad/nn/rotary.h"
#include "flexgrad/ops/activation.h"
#include "flexgrad/ops/loss.h"
#include "flexgrad/ops/norm.h"
#include "flexgrad/ops/ops.h"
#include "flexgrad/tensor/random.h"
#include "tests/gelu_golden.h"
#include "tests/test_util.h"

namespace fg {
namespace {

using fg::testing::close;

const Device kGpu(DeviceType::CUDA, 0);

#define SKIP_WITHOUT_CUDA()                                                                       \
  do {                                                                                            \
    if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device: skipping nn op tests"; \
  } while (0)

// Uniform values in [lo, hi) as a CPU tensor of dtype t (drawn in float64, then rounded).
Tensor uniform(const Shape& s, DType t, Generator& g, double lo = -2, double hi = 2) {
  return add(mul(rand(s, TensorOptions().dtype(kFloat64), &g), scalar_tensor(hi - lo, kFloat64)), scalar_tensor(lo, kFloat64))
      .to(t);
}

// got (any device) vs a float64 golden: |got - want| <= atol + rtol |want| element-wise.
::testing::AssertionResult near(const Tensor& got, const std::vector<double>& want, double atol, double rtol) {
  std::vector<double> g = got.to(kCPU).to_vector();
  if (g.size() != want.size()) return ::testing::AssertionFailure() << "sizes " << g.size() << " vs " << want.size();
  for (size_t i = 0; i < g.size(); ++i) {
    if (!(std::abs(g[i] - want[i]) <= atol + rtol * std::abs(want[i]))) {
      return ::testing::AssertionFailure() << "element " << i << " of " << g.size() << ": got " << g[i] << ", want "
                                           << want[i] << " (atol " << atol << ", rtol " << rtol << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

bool bitwise_equal(const Tensor& a, const Tensor& b) {
  if (!a.defined() || !b.defined()) return false;
  Tensor x = a.to(kCPU).contiguous(), y = b.to(kCPU).contiguous();
  if (x.sizes() != y.sizes() || x.dtype() != y.dtype()) return false;
  return std::memcmp(x.data_ptr(), y.data_ptr(), static_cast<size_t>(x.numel()) * element_size(x.dtype())) == 0;
}

GradcheckOptions strict() {
  GradcheckOptions o;
  o.raise_on_failure = true;
  return o;
}

// ---------------------------------------------------------------- layer_norm / rms_norm

struct NormGolden {
  std::vector<double> y, gx, gw, gb;
};

// Plain float64 layer norm / RMS norm and its backward for upstream gy (w, b may be empty).
NormGolden norm_golden(const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& b,
                       const std::vector<double>& gy, int64_t rows, int64_t n, double eps, bool rms) {
  NormGolden o;
  o.y.resize(rows * n), o.gx.resize(rows * n), o.gw.assign(n, 0.0), o.gb.assign(n, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const double* xr = &x[r * n];
    const double* g = &gy[r * n];
    double m = 0;
    if (!rms) {
      for (int64_t i = 0; i < n; ++i) m += xr[i];
      m /= static_cast<double>(n);
    }
    double v = 0;
    for (int64_t i = 0; i < n; ++i) v += (xr[i] - m) * (xr[i] - m);
    v /= static_cast<double>(n);
    const double rs = 1.0 / std::sqrt(v + eps);
    std::vector<double> xh(n), gh(n);
    double sg = 0, sgx = 0;
    for (int64_t i = 0; i < n; ++i) {
      xh[i] = (xr[i] - m) * rs;
      o.y[r * n + i] = xh[i] * (w.empty() ? 1.0 : w[i]) + (b.empty() ? 0.0 : b[i]);
      gh[i] = g[i] * (w.empty() ? 1.0 : w[i]);
      sg += gh[i];
      sgx += gh[i] * xh[i];
      o.gw[i] += g[i] * xh[i];
      o.gb[i] += g[i];
    }
    const double mg = rms ? 0.0 : sg / static_cast<double>(n), mgx = sgx / static_cast<double>(n);
    for (int64_t i = 0; i < n; ++i) o.gx[r * n + i] = rs * (gh[i] - mg - xh[i] * mgx);
  }
  return o;
}

struct NormCase {
  int64_t rows, n;
  bool rms, affine;
};

void check_norm_case(const NormCase& c, DType t, Generator& gen) {
  SCOPED_TRACE(::testing::Message() << (c.rms ? "rms_norm" : "layer_norm") << " rows " << c.rows << " n " << c.n
                                    << (c.affine ? " affine " : " plain ") << dtype_name(t));
  const double eps = 1e-5;
  // An offset mean so that layer norm's centring matters.
  Tensor x = uniform({c.rows, c.n}, t, gen, -1.5, 2.5), gy = uniform({c.rows, c.n}, t, gen);
  Tensor w = c.affine ? uniform({c.n}, t, gen, 0.5, 1.5) : Tensor();
  Tensor b = c.affine && !c.rms ? uniform({c.n}, t, gen) : Tensor();
  NormGolden gold = norm_golden(x.to_vector(), w.defined() ? w.to_vector() : std::vector<double>{},
                                b.defined() ? b.to_vector() : std::vector<double>{}, gy.to_vector(), c.rows, c.n, eps,
                                c.rms);
  Tensor dx = x.to(kGpu).requires_grad_(true);
  Tensor dw = w.defined() ? w.to(kGpu).requires_grad_(true) : Tensor();
  Tensor db = b.defined() ? b.to(kGpu).requires_grad_(true) : Tensor();
  Tensor y = c.rms ? rms_norm(dx, dw, eps) : layer_norm(dx, dw, db, eps);
  ASSERT_EQ(y.device(), kGpu);
  y.backward(gy.to(kGpu));
  const bool f32 = t == kFloat32;
  const double atol = f32 ? 1e-5 : 1e-10, rtol = f32 ? 1e-4 : 1e-10;
  EXPECT_TRUE(near(y, gold.y, atol, rtol)) << "forward";
  EXPECT_TRUE(near(dx.grad(), gold.gx, atol, rtol)) << "input grad";
  const double sum_atol = f32 ? 1e-5 + 2e-7 * static_cast<double>(c.rows) : 1e-10;
  if (dw.defined()) {
    EXPECT_TRUE(near(dw.grad(), gold.gw, sum_atol, f32 ? 1e-5 : 1e-10)) << "weight grad";
  }
  if (db.defined()) {
    EXPECT_TRUE(near(db.grad(), gold.gb, sum_atol, f32 ? 1e-5 : 1e-10)) << "bias grad";
  }
}

TEST(NnOpsCuda, NormsMatchFloat64GoldenAcrossSizes) {
  SKIP_WITHOUT_CUDA();
  Generator gen(11);
  // n = 1 (a constant row: layer norm gives the bias, zero input grad), odd widths, a width past one
  // block's stride (4097), the widest rows of the brief (8192), and one row up to 1000 rows.
  for (int64_t rows : {int64_t{1}, int64_t{3}, int64_t{1000}}) {
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{768}, int64_t{4097}}) {
      for (bool rms : {false, true}) check_norm_case({rows, n, rms, true}, kFloat32, gen);
    }
  }
  for (bool rms : {false, true}) {
    check_norm_case({2, 8192, rms, true}, kFloat32, gen);
    check_norm_case({5, 9000, rms, true}, kFloat32, gen);
    check_norm_case({37, 768, rms, false}, kFloat32, gen);  // no affine
    check_norm_case({300, 129, rms, true}, kFloat64, gen);
    check_norm_case({3, 4097, rms, false}, kFloat64, gen);
  }
}

TEST(NnOpsCuda, NormsBf16UpcastMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  Generator gen(12);
  for (bool rms : {false, true}) {
    SCOPED_TRACE(rms ? "rms_norm" : "layer_norm");
    Tensor x = uniform({64, 768}, kBFloat16, gen), w = uniform({768}, kBFloat16, gen, 0.5, 1.5);
    Tensor b = uniform({768}, kBFloat16, gen), gy = uniform({64, 768}, kBFloat16, gen);
    Tensor cx = x.clone().requires_grad_(true), cw = w.clone().requires_grad_(true), cb = b.clone().requires_grad_(true);
    Tensor gx = x.to(kGpu).requires_grad_(true), gw = w.to(kGpu).requires_grad_(true), gb = b.to(kGpu).requires_grad_(true);
    Tensor cy = rms ? rms_norm(cx, cw) : layer_norm(cx, cw, cb);
    Tensor yy = rms ? rms_norm(gx, gw) : layer_norm(gx, gw, gb);
    EXPECT_EQ(yy.dtype(), kBFloat16);
    EXPECT_TRUE(close(yy.to(kCPU), cy, 1e-2, 1e-2));
    cy.backward(gy), yy.backward(gy.to(kGpu));
    EXPECT_TRUE(close(gx.grad().to(kCPU), cx.grad(), 1e-2, 1e-2));
    // 64-row sums of bf16-rounded terms: the tolerance scales with the sum.
    EXPECT_TRUE(close(gw.grad().to(kCPU), cw.grad(), 1e-1, 1e-2));
    if (!rms) {
      EXPECT_TRUE(close(gb.grad().to(kCPU), cb.grad(), 1e-1, 1e-2));
    }
  }
}

TEST(NnOpsCuda, NormWeightGradIsBitwiseDeterministic) {
  SKIP_WITHOUT_CUDA();
  Generator gen(13);
  // 3000 rows: several 256-row chunks of partial sums.
  Tensor x = uniform({3000, 768}, kFloat32, gen).to(kGpu), gy = uniform({3000, 768}, kFloat32, gen).to(kGpu);
  Tensor w = uniform({768}, kFloat32, gen).to(kGpu), b = uniform({768}, kFloat32, gen).to(kGpu);
  for (bool rms : {false, true}) {
    SCOPED_TRACE(rms ? "rms_norm" : "layer_norm");
    Tensor grads[2][2];
    for (int run = 0; run < 2; ++run) {
      Tensor ww = w.detach().clone().requires_grad_(true), bb = b.detach().clone().requires_grad_(true);
      Tensor y = rms ? rms_norm(x, ww) : layer_norm(x, ww, bb);
      y.backward(gy);
      grads[run][0] = ww.grad();
      grads[run][1] = rms ? Tensor() : bb.grad();
    }
    EXPECT_TRUE(bitwise_equal(grads[0][0], grads[1][0]));
    if (!rms) {
      EXPECT_TRUE(bitwise_equal(grads[0][1], grads[1][1]));
    }
  }
}

TEST(NnOpsCuda, NormsGradcheckFloat64OnGpu) {
  SKIP_WITHOUT_CUDA();
  Generator gen(14);
  Tensor x = uniform({3, 5}, kFloat64, gen).to(kGpu).requires_grad_(true);
  Tensor w = uniform({5}, kFloat64, gen, 0.5, 1.5).to(kGpu).requires_grad_(true);
  Tensor b = uniform({5}, kFloat64, gen).to(kGpu).requires_grad_(true);
  EXPECT_TRUE(gradcheck([](const TensorList& v) { return TensorList{layer_norm(v[0], v[1], v[2])}; }, {x, w, b}, strict()).ok);
  EXPECT_TRUE(gradcheck([](const TensorList& v) { return TensorList{layer_norm(v[0], Tensor(), Tensor())}; }, {x}, strict()).ok);
  EXPECT_TRUE(gradcheck([](const TensorList& v) { return TensorList{rms_norm(v[0], v[1])}; }, {x, w}, strict()).ok);
  EXPECT_TRUE(gradcheck([](const TensorList& v) { return TensorList{rms_norm(v[0], Tensor())}; }, {x}, strict()).ok);
}

// ---------------------------------------------------------------- cross_entropy

struct CeGolden {
  std::vector<double> loss, grad;  // per-row loss (reduction None); grad of the Mean reduction
};

CeGolden ce_golden(const std::vector<double>& x, const std::vector<int64_t>& t, int64_t rows, int64_t C,
                   int64_t ignore, double s) {
  CeGolden o;
  o.loss.assign(rows, 0.0), o.grad.assign(rows * C, 0.0);
  int64_t count = 0;
  for (int64_t r = 0; r < rows; ++r) count += t[r] != ignore;
  for (int64_t r = 0; r < rows; ++r) {
    if (t[r] == ignore) continue;
    const double* xr = &x[r * C];
    double m = -INFINITY, sx = 0;
    for (int64_t c = 0; c < C; ++c) m = std::max(m, xr[c]), sx += xr[c];
    double se = 0;
    for (int64_t c = 0; c < C; ++c) se += std::exp(xr[c] - m);
    const double lse = m + std::log(se);
    o.loss[r] = lse - (1 - s) * xr[t[r]] - s * sx / static_cast<double>(C);
    for (int64_t c = 0; c < C; ++c) {
      const double target = (c == t[r] ? 1 - s : 0.0) + s / static_cast<double>(C);
      o.grad[r * C + c] = (std::exp(xr[c] - lse) - target) / static_cast<double>(count);
    }
  }
  return o;
}

void check_ce_case(int64_t rows, int64_t C, double smoothing, int64_t ignore, DType dt, Generator& gen) {
  SCOPED_TRACE(::testing::Message() << "cross_entropy rows " << rows << " classes " << C << " smoothing " << smoothing
                                    << " ignore_index " << ignore << " " << dtype_name(dt));
  Tensor x = uniform({rows, C}, dt, gen, -4, 4);
  std::vector<int64_t> t(rows);
  for (int64_t r = 0; r < rows; ++r) {
    t[r] = (r * 7919 + 13) % C;
    if (rows > 1 && r % 3 == 1) t[r] = ignore;  // every third row ignored (never all: row 0 counts)
  }
  CeGolden gold = ce_golden(x.to_vector(), t, rows, C, ignore, smoothing);
  Tensor tt = from_vector(t, {rows}, kInt64).to(kGpu);
  Tensor dx = x.to(kGpu).requires_grad_(true);
  CrossEntropyOptions o;
  o.ignore_index = ignore;
  o.label_smoothing = smoothing;
  o.reduction = Reduction::None;
  const bool f32 = dt == kFloat32;
  Tensor per_row = cross_entropy(dx, tt, o);
  ASSERT_EQ(per_row.device(), kGpu);
  EXPECT_TRUE(near(per_row, gold.loss, f32 ? 1e-5 : 1e-10, f32 ? 1e-5 : 1e-10)) << "per-row loss";
  o.reduction = Reduction::Mean;
  Tensor l = cross_entropy(dx, tt, o);
  double mean = 0, count = 0;
  for (int64_t r = 0; r < rows; ++r) mean += gold.loss[r], count += t[r] != ignore;
  EXPECT_NEAR(l.item<double>(), mean / count, f32 ? 1e-5 * (1 + std::abs(mean / count)) : 1e-10);
  l.backward();
  // Gradient entries are probabilities / count: relative 1e-4 (exp of a float32 difference x - lse).
  EXPECT_TRUE(near(dx.grad(), gold.grad, f32 ? 1e-7 : 1e-12, f32 ? 1e-4 : 1e-9)) << "logits grad";
}

TEST(NnOpsCuda, CrossEntropyMatchesFloat64Golden) {
  SKIP_WITHOUT_CUDA();
  Generator gen(21);
  for (int64_t rows : {int64_t{1}, int64_t{3}, int64_t{1000}}) {
    for (int64_t C : {int64_t{1}, int64_t{7}, int64_t{768}, int64_t{4097}}) {
      check_ce_case(rows, C, 0.0, -100, kFloat32, gen);
      check_ce_case(rows, C, 0.1, -100, kFloat32, gen);
    }
  }
  // The GPT-2 vocabulary; an ignore_index that is a valid class (its rows are still ignored).
  for (int64_t rows : {int64_t{1}, int64_t{3}, int64_t{64}}) check_ce_case(rows, 50257, 0.1, -100, kFloat32, gen);
  check_ce_case(40, 50257, 0.0, 5, kFloat32, gen);
  check_ce_case(17, 1000, 0.2, 3, kFloat64, gen);
  check_ce_case(5, 50257, 0.0, -100, kFloat64, gen);
}

TEST(NnOpsCuda, CrossEntropyBf16UpcastMatchesCpu) {
  SKIP_WITHOUT_CUDA();
  Generator gen(22);
  Tensor x = uniform({33, 1000}, kBFloat16, gen, -4, 4);
  std::vector<int64_t> t(33);
  for (int64_t r = 0; r < 33; ++r) t[r] = r % 5 == 2 ? -100 : (r * 31) % 1000;
  Tensor tc = from_vector(t, {33}, kInt64);
  CrossEntropyOptions o;
  o.label_smoothing = 0.05;
  Tensor cx = x.clone().requires_grad_(true), gx = x.to(kGpu).requires_grad_(true);
  Tensor cl = cross_entropy(cx, tc, o), gl = cross_entropy(gx, tc.to(kGpu), o);
  EXPECT_EQ(gl.dtype(), kBFloat16);
  EXPECT_TRUE(close(gl.to(kCPU), cl, 1e-2, 1e-2));
  cl.backward(), gl.backward();
  EXPECT_TRUE(close(gx.grad().to(kCPU), cx.grad(), 1e-4, 1e-2));
}

TEST(NnOpsCuda, CrossEntropyGradcheckFloat64OnGpu) {
  SKIP_WITHOUT_CUDA();
  Generator gen(23);
  Tensor x = uniform({4, 5}, kFloat64, gen).to(kGpu).requires_grad_(true);
  Tensor t = from_vector(std::vector<int64_t>{2, -100, 0, 4}, {4}, kInt64).to(kGpu);
  for (double s : {0.0, 0.1}) {
    for (Reduction red : {Reduction::Mean, Reduction::Sum, Reduction::None}) {
      CrossEntropyOptions o;
      o.label_smoothing = s;
      o.reduction = red;
      EXPECT_TRUE(gradcheck([&](const TensorList& v) { return TensorList{cross_entropy(v[0], t, o)}; }, {x}, strict()).ok);
    }
  }
}

TEST(NnOpsCuda, CrossEntropyOutOfRangeTargetRaisesOnGpu) {
  SKIP_WITHOUT_CUDA();
  Generator gen(24);
  Tensor x = uniform({4, 5}, kFloat32, gen).to(kGpu);
  Tensor high = from_vector(std::vector<int64_t>{1, 2, 7, 0}, {4}, kInt64).to(kGpu);
  EXPECT_THROW_MSG(cross_entropy(x, high), IndexError, "target 7", "row 2", "5 classes");
  Tensor neg = from_vector(std::vector<int64_t>{1, -3, 0, 9}, {4}, kInt64).to(kGpu);
  EXPECT_THROW_MSG(cross_entropy(x, neg), IndexError, "target -3", "row 1");  // the first bad row is named
  // -100 is the default ignore_index, so it is fine; with another ignore_index it is out of range.
  Tensor ign = from_vector(std::vector<int64_t>{1, -100, 0, 4}, {4}, kInt64).to(kGpu);
  EXPECT_NO_THROW(cross_entropy(x, ign));
  CrossEntropyOptions o;
  o.ignore_index = 0;
  EXPECT_THROW_MSG(cross_entropy(x, ign, o), IndexError, "target -100");
  // int32 targets are cast on the device and validated the same way.
  Tensor i32 = from_vector(std::vector<int32_t>{1, 5, 0, 0}, {4}, kInt32).to(kGpu);
  EXPECT_THROW_MSG(cross_entropy(x, i32), IndexError, "target 5");
}

// ---------------------------------------------------------------- gelu_fused

using fg::testing::gelu_golden;  // tests/gelu_golden.h

TEST(NnOpsCuda, GeluMatchesFloat64Golden) {
  SKIP_WITHOUT_CUDA();
  Generator gen(31);
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{4097}, int64_t{(1 << 20) + 3}}) {
    for (DType dt : {kFloat32, kFloat64}) {
      for (bool ta : {true, false}) {
        SCOPED_TRACE(::testing::Message() << "gelu n " << n << " " << dtype_name(dt) << (ta ? " tanh" : " erf"));
        // Tails included: tanh saturates, exp(-x^2/2) underflows.
        Tensor x = uniform({n}, dt, gen, -12, 12), gy = uniform({n}, dt, gen);
        std::vector<double> xv = x.to_vector(), gv = gy.to_vector(), y(n), gx(n);
        for (int64_t i = 0; i < n; ++i) {
          double d = 0;
          y[i] = gelu_golden(xv[i], ta, &d);
          gx[i] = gv[i] * d;
        }
        Tensor dx = x.to(kGpu).requires_grad_(true);
        Tensor out = gelu_fused(dx, ta);
        out.backward(gy.to(kGpu));
        const bool f32 = dt == kFloat32;
        // float32: tanh(u) is good to ~1e-7 absolute, and the derivative multiplies that by up to
        // v beta (1 + 3 kappa v^2) ~ 40 through 1 - t^2 (where t nears +-1): atol 1e-5 for the backward.
        const double fa = f32 ? 2e-6 : 1e-13, ba = f32 ? 1e-5 : 1e-13, rt = f32 ? 1e-5 : 1e-12;
        EXPECT_TRUE(near(out, y, fa, rt)) << "forward";
        EXPECT_TRUE(near(dx.grad(), gx, ba, rt)) << "backward";
        // Without grad the forward takes the no-aux path: same values.
        NoGradGuard ng;
        EXPECT_TRUE(near(gelu_fused(x.to(kGpu), ta), y, fa, rt)) << "no-grad forward";
      }
    }
  }
}

// Half types run natively on both devices (float math, one rounding into the dtype), so CUDA and CPU differ
// only by float-level differences in exp/erf and fma contraction, which move a result across a rounding
// boundary at most: within one ulp of the dtype (bf16 2^-7, f16 2^-10 relative), checked here as
// atol 1e-2 + rtol 1e-2 (bf16) / 2e-3 (f16), and against the float64 golden within one rounding plus the
// float32 evaluation error. The odd length covers the vector tail; the narrow view (offset 1 element)
// gives an unaligned pointer, so the scalar kernel runs too.
TEST(NnOpsCuda, GeluBf16UpcastMatchesCpuAndGradchecks) {
  SKIP_WITHOUT_CUDA();
  Generator gen(32);
  const int64_t n = 3 * 777;
  for (DType dt : {kBFloat16, kFloat16}) {
    const double tol = dt == kBFloat16 ? 1e-2 : 2e-3, half_ulp = dt == kBFloat16 ? 0x1p-8 : 0x1p-11;
    for (bool ta : {true, false}) {
      for (int64_t off : {0, 1}) {
        SCOPED_TRACE(::testing::Message() << dtype_name(dt) << (ta ? " tanh" : " erf") << " offset " << off);
        // The input is a view at element `off` of a leaf: off 1 makes its data pointer unaligned.
        Tensor base = uniform({n + 1}, dt, gen, -5, 5);
        Tensor cb = base.clone().requires_grad_(true), gb = base.to(kGpu).requires_grad_(true);
        Tensor cx = reshape(narrow(cb, 0, off, n), {3, 777}), gx = reshape(narrow(gb, 0, off, n), {3, 777});
        Tensor cy = gelu_fused(cx, ta), gy = gelu_fused(gx, ta);
        ASSERT_EQ(gy.dtype(), dt);
        EXPECT_TRUE(close(gy.to(kCPU), cy, tol, tol)) << "forward vs CPU";
        Tensor up = uniform({3, 777}, dt, gen);
        cy.backward(up), gy.backward(up.to(kGpu));
        ASSERT_EQ(gb.grad().dtype(), dt);
        Tensor cg = narrow(cb.grad(), 0, off, n), gg = narrow(gb.grad(), 0, off, n).to(kCPU);
        EXPECT_TRUE(close(gg, cg, tol, tol)) << "backward vs CPU";
        std::vector<double> xv = narrow(base, 0, off, n).to_vector(), uv = up.to_vector(), y(n), g(n);
        for (int64_t i = 0; i < n; ++i) {
          double d = 0;
          y[i] = gelu_golden(xv[i], ta, &d);
          g[i] = uv[i] * d;
        }
        // |x| <= 5, |up| <= 2: the float32 evaluation's error is under 2^-21 (|y| + 2 (1 + 5 + 125 / 8)) < 3e-5
        // (see tests/ops/test_activation.cpp), the rounding under half an ulp of the dtype.
        EXPECT_TRUE(near(reshape(gy, {n}), y, 3e-5, half_ulp * 1.01)) << "forward vs float64 golden";
        EXPECT_TRUE(near(gg, g, 3e-5, half_ulp * 1.01)) << "backward vs float64 golden";
      }
      Tensor d = uniform({4, 6}, kFloat64, gen, -3, 3).to(kGpu).requires_grad_(true);
      EXPECT_TRUE(gradcheck([ta](const TensorList& v) { return TensorList{gelu_fused(v[0], ta)}; }, {d}, strict()).ok);
    }
  }
}

// ---------------------------------------------------------------- embedding

// Token ids with long runs of one id (longer than a block's scan step), ids that never occur, and spread.
std::vector<int64_t> skewed_ids(int64_t tokens, int64_t vocab) {
  std::vector<int64_t> ids(tokens);
  for (int64_t i = 0; i < tokens; ++i) {
    if (i % 3 == 0) ids[i] = 7 % vocab;                     // one very frequent id
    else if (i % 3 == 1) ids[i] = (i * i + 3) % 97 % vocab;  // a few hundred repeats each
    else ids[i] = (i * 2654435761LL) % vocab;               // spread
  }
  return ids;
}

TEST(NnOpsCuda, EmbeddingBackwardMatchesGoldenAndCpuBitwise) {
  SKIP_WITHOUT_CUDA();
  Generator gen(41);
  struct Case {
    int64_t tokens, vocab, dim;
  };
  for (Case c : {Case{1, 10, 5}, Case{7, 3, 1}, Case{1000, 50, 130}, Case{16384, 1000, 768}, Case{4097, 50257, 64}}) {
    for (DType dt : {kFloat32, kFloat64}) {
      SCOPED_TRACE(::testing::Message() << "embedding tokens " << c.tokens << " vocab " << c.vocab << " dim " << c.dim
                                        << " " << dtype_name(dt));
      std::vector<int64_t> ids = skewed_ids(c.tokens, c.vocab);
      Tensor idx = from_vector(ids, {c.tokens}, kInt64);
      Tensor w = uniform({c.vocab, c.dim}, dt, gen), gy = uniform({c.tokens, c.dim}, dt, gen);
      std::vector<double> gv = gy.to_vector(), want(c.vocab * c.dim, 0.0), abs_sum(c.vocab * c.dim, 0.0);
      for (int64_t t = 0; t < c.tokens; ++t) {
        for (int64_t j = 0; j < c.dim; ++j) {
          want[ids[t] * c.dim + j] += gv[t * c.dim + j];
          abs_sum[ids[t] * c.dim + j] += std::abs(gv[t * c.dim + j]);
        }
      }
      Tensor cw = w.clone().requires_grad_(true), gw = w.to(kGpu).requires_grad_(true);
      Tensor gout = embedding(gw, idx.to(kGpu)), cout = embedding(cw, idx);
      EXPECT_TRUE(bitwise_equal(gout, cout)) << "forward rows";
      gout.backward(gy.to(kGpu)), cout.backward(gy);
      // Golden: each element within float rounding of its own sum of |terms|.
      std::vector<double> got = gw.grad().to(kCPU).to_vector();
      const double u = dt == kFloat32 ? 6e-8 : 1.2e-16;
      int64_t bad = 0;
      for (size_t i = 0; i < got.size(); ++i) {
        const double n_terms = static_cast<double>(c.tokens);
        if (!(std::abs(got[i] - want[i]) <= u * n_terms * abs_sum[i] + 1e-30) && bad++ < 3) {
          ADD_FAILURE() << "element " << i << ": got " << got[i] << ", want " << want[i];
        }
      }
      EXPECT_EQ(bad, 0);
      // Both paths sum each id's rows in token order: float32/float64 results equal bit for bit.
      EXPECT_TRUE(bitwise_equal(gw.grad(), cw.grad())) << "GPU grad differs from the CPU index_add path";
    }
  }
}

TEST(NnOpsCuda, EmbeddingBackwardDeterministicAndGradchecks) {
  SKIP_WITHOUT_CUDA();
  Generator gen(42);
  std::vector<int64_t> ids = skewed_ids(16384, 5000);
  Tensor idx = from_vector(ids, {16, 1024}, kInt64).to(kGpu);
  Tensor w = uniform({5000, 768}, kFloat32, gen).to(kGpu), gy = uniform({16, 1024, 768}, kFloat32, gen).to(kGpu);
  Tensor grads[2];
  for (int run = 0; run < 2; ++run) {
    Tensor ww = w.detach().clone().requires_grad_(true);
    embedding(ww, idx).backward(gy);
    grads[run] = ww.grad();
  }
  EXPECT_TRUE(bitwise_equal(grads[0], grads[1]));
  // bf16 table: accumulates in float32 and rounds once.
  Tensor wb = uniform({50, 24}, kBFloat16, gen).to(kGpu).requires_grad_(true);
  std::vector<int64_t> few = skewed_ids(300, 50);
  Tensor gb = uniform({300, 24}, kBFloat16, gen);
  embedding(wb, from_vector(few, {300}, kInt64).to(kGpu)).backward(gb.to(kGpu));
  std::vector<double> gbv = gb.to_vector(), want(50 * 24, 0.0);
  for (int64_t t = 0; t < 300; ++t)
    for (int64_t j = 0; j < 24; ++j) want[few[t] * 24 + j] += gbv[t * 24 + j];
  EXPECT_TRUE(near(wb.grad(), want, 1e-2, 1e-2));
  // Gradcheck in float64 on the GPU, int32 indices with repeats.
  Tensor d = uniform({6, 3}, kFloat64, gen).to(kGpu).requires_grad_(true);
  Tensor i32 = from_vector(std::vector<int32_t>{1, 4, 1, 1, 0, 5, 4}, {7}, kInt32).to(kGpu);
  EXPECT_TRUE(gradcheck([&](const TensorList& v) { return TensorList{embedding(v[0], i32)}; }, {d}, strict()).ok);
  // Bad indices are a typed error on the GPU as well.
  Tensor bad = from_vector(std::vector<int64_t>{1, 6}, {2}, kInt64).to(kGpu);
  EXPECT_THROW_MSG(embedding(d, bad), IndexError, "index 6", "size 6");
}

// ---------------------------------------------------------------- layers built from generic ops

TEST(NnOpsCuda, DropoutMaskOnGpuEqualsCpuForOneSeed) {
  SKIP_WITHOUT_CUDA();
  // dropout draws the same Philox counters on both devices (ops/dropout_kernels.h), so one seed gives one mask.
  Generator gen(51);
  Tensor x = uniform({33, 1025}, kFloat32, gen);
  nn::Dropout cpu_drop(0.3, 1234), gpu_drop(0.3, 1234);
  for (int step = 0; step < 2; ++step) {  // the generators advance alike
    SCOPED_TRACE(step);
    Tensor cx = x.detach().clone().requires_grad_(true), gx = x.detach().to(kGpu).requires_grad_(true);
    Tensor cy = cpu_drop(cx), gy = gpu_drop(gx);
    ASSERT_EQ(gy.device(), kGpu);
    EXPECT_TRUE(bitwise_equal(gy, cy));
    sum(cy).backward(), sum(gy).backward();
    EXPECT_TRUE(bitwise_equal(gx.grad(), cx.grad()));
    const double kept = sum(ne(cy, scalar_tensor(0.0, kFloat32))).item<double>() / static_cast<double>(x.numel());
    EXPECT_NEAR(kept, 0.7, 0.02);
  }
}

TEST(NnOpsCuda, SwiGluMlpAndRopeMatchCpu) {
  SKIP_WITHOUT_CUDA();
  for (nn::Activation act : {nn::Activation::SwiGLU, nn::Activation::GELU}) {
    SCOPED_TRACE(act == nn::Activation::SwiGLU ? "SwiGLU" : "GELU");
    Generator g1(61), g2(61), gx(62);
    nn::MLP cpu(48, 96, act, true, &g1), gpu(48, 96, act, true, &g2);
    gpu.to(kGpu);
    Tensor x = uniform({2, 5, 48}, kFloat32, gx);
    Tensor cxx = x.clone().requires_grad_(true), gxx = x.to(kGpu).requires_grad_(true);
    Tensor cy = cpu(cxx), gy = gpu(gxx);
    EXPECT_TRUE(close(gy.to(kCPU), cy, 1e-5, 1e-4));
    sum(mul(cy, cy)).backward(), sum(mul(gy, gy)).backward();
    EXPECT_TRUE(close(gxx.grad().to(kCPU), cxx.grad(), 1e-4, 1e-4));
    TensorList cp = cpu.parameters(), gp = gpu.parameters();
    ASSERT_EQ(cp.size(), gp.size());
    for (size_t i = 0; i < cp.size(); ++i) EXPECT_TRUE(close(gp[i].grad().to(kCPU), cp[i].grad(), 1e-4, 1e-4)) << i;
  }
  nn::RotaryEmbedding cpu_rope(16, 64), gpu_rope(16, 64);
  gpu_rope.to(kGpu);
  Generator g(63);
  Tensor q = uniform({2, 3, 10, 16}, kFloat32, g);
  Tensor cq = q.clone().requires_grad_(true), gq = q.to(kGpu).requires_grad_(true);
  Tensor cr = cpu_rope.forward(cq, 5), gr = gpu_rope.forward(gq, 5);
  EXPECT_TRUE(close(gr.to(kCPU), cr, 1e-6, 1e-5));
  Tensor up = uniform({2, 3, 10, 16}, kFloat32, g);
  cr.backward(up), gr.backward(up.to(kGpu));
  EXPECT_TRUE(close(gq.grad().to(kCPU), cq.grad(), 1e-6, 1e-5));
}

}  // namespace
}  // namespace fg
