// fg_exp2_fma (attention/cuda/kernels/flex_mma.cuh), the softmax's 2^x on the FMA pipe, against std::exp2 in
// double: its relative error over every exponent the softmax meets (x <= 0 down to the flush at 2^-126), the
// values it must give exactly (2^0 = 1, whole powers of two), and the special inputs (-inf -> 0, below -127 -> 0,
// NaN -> NaN). Then the forward kernels with FLEXGRAD_FLEX_EXP2_FMA=4 (every probability on the FMA pipe) against
// a float64 softmax written here, through softcap's tanh and a mask. Skips visibly without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/attention/cuda/jit.h"
#endif
#include "flexgrad/attention/block_mask.h"
#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/ops/ops.h"
#include "flexgrad/tensor/random.h"
#include "tests/test_util.h"

namespace fg {
namespace {

#ifdef FLEXGRAD_WITH_CUDA

using testing::ScopedEnv;

const char* kKernel = R"(
#include "flex_abi.cuh"
#include "flex_mma.cuh"
extern "C" __global__ void fg_test_exp2_fma(const float* x, float* out3, float* out4, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    out3[i] = fg_exp2_fma<3>(x[i]);
    out4[i] = fg_exp2_fma<4>(x[i]);
  }
}
)";

struct Exp2Results {
  std::vector<float> deg3, deg4;
};

Exp2Results run_exp2_fma(const std::vector<float>& xs) {
  const Device gpu(DeviceType::CUDA, 0);
  const int64_t n = static_cast<int64_t>(xs.size());
  std::vector<double> xd(xs.begin(), xs.end());
  Tensor x = from_vector(xd, {n}, kFloat64).to(kFloat32).to(gpu);
  Tensor o3 = zeros({n}, TensorOptions().device(gpu)), o4 = zeros({n}, TensorOptions().device(gpu));
  cuda::jit::JitSource src;
  src.name = "test_exp2_fma";
  src.code = kKernel;
  src.kernels = {"fg_test_exp2_fma"};
  auto mod = cuda::jit::get_module(src, 0);
  const void* px = x.data_ptr();
  void* p3 = o3.data_ptr();
  void* p4 = o4.data_ptr();
  int ni = static_cast<int>(n);
  void* args[] = {&px, &p3, &p4, &ni};
  cuda::jit::launch(mod->function("fg_test_exp2_fma"), {static_cast<unsigned>((n + 255) / 256)}, {256}, 0, args, 0);
  Exp2Results r;
  for (double v : o3.to(kCPU).to(kFloat64).to_vector()) r.deg3.push_back(static_cast<float>(v));
  for (double v : o4.to(kCPU).to(kFloat64).to_vector()) r.deg4.push_back(static_cast<float>(v));
  return r;
}

TEST(Exp2Fma, RelativeErrorOverTheSoftmaxRange) {
  if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present";
  // Every float32 step of one binade's worth of fractions at several integer parts, plus a dense sweep of
  // [-126, 0]: the fractions near +-1/2 (where rounding to j switches) included.
  std::vector<float> xs;
  for (int i = 0; i <= 200000; ++i) xs.push_back(static_cast<float>(-126.0 * i / 200000.0));
  for (float j : {0.f, -1.f, -7.f, -60.f, -125.f})
    for (int i = 0; i <= 4096; ++i) xs.push_back(j - static_cast<float>(i) / 4096.f);
  for (float h : {-0.5f, -1.5f, -2.5f, -100.5f}) {
    xs.push_back(std::nextafter(h, 0.f));
    xs.push_back(h);
    xs.push_back(std::nextafter(h, -1000.f));
  }
  const Exp2Results r = run_exp2_fma(xs);
  double worst3 = 0, worst4 = 0;
  float at3 = 0, at4 = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    const double ref = std::exp2(static_cast<double>(xs[i]));
    double e3 = std::abs(r.deg3[i] / ref - 1), e4 = std::abs(r.deg4[i] / ref - 1);
    if (std::isnan(e3)) e3 = INFINITY;  // a NaN result counts as the worst
    if (std::isnan(e4)) e4 = INFINITY;
    if (e3 > worst3) worst3 = e3, at3 = xs[i];
    if (e4 > worst4) worst4 = e4, at4 = xs[i];
  }
  // The fit's error in float32 Horner form was 1.01e-4 and 2.9e-6 (flex_mma.cuh); a little room for FMA rounding.
  EXPECT_LT(worst3, 1.1e-4) << "degree 3 at x = " << at3;
  EXPECT_LT(worst4, 4e-6) << "degree 4 at x = " << at4;
  // And not so good that the sweep missed the polynomial (ex2.approx is ~1e-7).
  EXPECT_GT(worst3, 5e-5);
  EXPECT_GT(worst4, 1e-6);
}

TEST(Exp2Fma, ExactValuesAndSpecialInputs) {
  if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present";
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> xs = {0.f, -1.f, -2.f, -10.f, -126.f, -inf, -127.f, -200.f, -1e30f, nan, -0.f};
  const Exp2Results r = run_exp2_fma(xs);
  for (const auto* v : {&r.deg3, &r.deg4}) {
    const std::vector<float>& o = *v;
    // p(0) = 1: a whole exponent gives the power of two exactly (the row maximum gives exactly 1).
    EXPECT_EQ(o[0], 1.f);
    EXPECT_EQ(o[1], 0.5f);
    EXPECT_EQ(o[2], 0.25f);
    EXPECT_EQ(o[3], std::ldexp(1.f, -10));
    EXPECT_EQ(o[4], std::ldexp(1.f, -126));  // the smallest normal
    for (int i = 5; i <= 8; ++i) EXPECT_EQ(o[i], 0.f) << "x = " << xs[i];  // masked entries and underflow
    EXPECT_TRUE(std::isnan(o[9])) << "NaN in, " << o[9] << " out";
    EXPECT_EQ(o[10], 1.f);
  }
}

// The forward kernels with every probability on the FMA pipe, against a float64 softmax: softcap (tanh, the
// score_mod the option is for) under a causal mask, bf16 (degree 3) and f16 (degree 4), the Tiled and (sm_90a)
// Wgmma kernels. The option must change the compiled module (else this would test ex2.approx again).
TEST(Exp2Fma, ForwardKernelsMatchAFloat64Softmax) {
  if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present";
  const Device gpu(DeviceType::CUDA, 0);
  const int64_t B = 1, H = 2, L = 300, E = 64;
  const double cap = 20.0, scale = 1.0 / 8.0;
  Generator gen(11);
  Tensor q = randn({B, H, L, E}, kFloat64, &gen) * 3.0, k = randn({B, H, L, E}, kFloat64, &gen) * 3.0,
         v = randn({B, H, L, E}, kFloat64, &gen);
  std::vector<FlexCudaForward> kernels = {FlexCudaForward::Tiled};
  if (cuda::jit::target_arch(0) == "sm_90a") kernels.push_back(FlexCudaForward::Wgmma);
  for (DType dt : {kBFloat16, kFloat16}) {
    Tensor qr = q.to(dt).to(kFloat64), kr = k.to(dt).to(kFloat64), vr = v.to(dt).to(kFloat64);
    // The golden: softmax(cap * tanh(q k^T * scale / cap)) v over kv <= q, in double, written out here.
    std::vector<double> gout(B * H * L * E), glse(B * H * L);
    const std::vector<double> qv = qr.to_vector(), kv = kr.to_vector(), vv = vr.to_vector();
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < L; ++i) {
        std::vector<double> s(i + 1);
        double m = -INFINITY;
        for (int64_t j = 0; j <= i; ++j) {
          double d = 0;
          for (int64_t e = 0; e < E; ++e) d += qv[(h * L + i) * E + e] * kv[(h * L + j) * E + e];
          s[j] = cap * std::tanh(d * scale / cap);
          m = std::max(m, s[j]);
        }
        double l = 0;
        for (double& x : s) l += (x = std::exp(x - m));
        glse[h * L + i] = m + std::log(l);
        for (int64_t e = 0; e < E; ++e) {
          double o = 0;
          for (int64_t j = 0; j <= i; ++j) o += s[j] * vv[(h * L + j) * E + e];
          gout[(h * L + i) * E + e] = o / l;
        }
      }
    for (FlexCudaForward kernel : kernels) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + (kernel == FlexCudaForward::Wgmma ? " wgmma" : " tiled"));
      FlexAttentionOptions o;
      o.scale = scale;
      o.return_lse = true;
      o.kernel.backend = FlexBackend::Fused;
      o.kernel.cuda_forward = kernel;
      o.score_mod = [cap](Expr s, Expr, Expr, Expr, Expr) { return cap * tanh(s / cap); };
      o.block_mask = create_block_mask([](Expr, Expr, Expr qi, Expr ki) { return qi >= ki; }, std::nullopt,
                                       std::nullopt, L, L, BlockSize(128), gpu);
      auto run = [&](const char* fma) {
        ScopedEnv env("FLEXGRAD_FLEX_EXP2_FMA", fma);
        return flex_attention(q.to(dt).to(gpu), k.to(dt).to(gpu), v.to(dt).to(gpu), o);
      };
      const FlexAttentionResult mufu = run("0");
      cuda::jit::clear_memory_cache();
      run("0");
      const cuda::jit::JitStats before = cuda::jit::stats();
      const FlexAttentionResult fma = run("4");
      const cuda::jit::JitStats after = cuda::jit::stats();
      EXPECT_GT(after.compiles + after.disk_hits, before.compiles + before.disk_hits)
          << "FLEXGRAD_FLEX_EXP2_FMA=4 ran the module of FLEXGRAD_FLEX_EXP2_FMA=0";
      // Errors against the golden: out within the dtype's rounding, and no worse than ex2.approx's by more than
      // the polynomial's share; lse (float32 throughout) within a few of the polynomial's 1e-4 / 3e-6.
      auto worst = [&](const FlexAttentionResult& r, double& out_err, double& lse_err) {
        const std::vector<double> out = r.out.to(kCPU).to(kFloat64).to_vector(), lse = r.lse.to(kCPU).to(kFloat64).to_vector();
        out_err = lse_err = 0;
        for (size_t i = 0; i < out.size(); ++i) out_err = std::max(out_err, std::abs(out[i] - gout[i]));
        for (size_t i = 0; i < lse.size(); ++i) lse_err = std::max(lse_err, std::abs(lse[i] - glse[i]));
        if (std::isnan(out_err) || std::isnan(lse_err)) out_err = lse_err = INFINITY;
      };
      double out0, lse0, out4, lse4;
      worst(mufu, out0, lse0);
      worst(fma, out4, lse4);
      const double out_tol = dt == kBFloat16 ? 1.6e-2 : 2e-3, lse_poly = dt == kBFloat16 ? 1.1e-4 : 4e-6;
      EXPECT_LT(out4, out_tol) << "ex2.approx: " << out0;
      EXPECT_LT(out4, 1.2 * out0 + 1e-4) << "ex2.approx: " << out0;
      EXPECT_LT(lse4, lse0 + lse_poly) << "ex2.approx: " << lse0;
      std::printf("[exp2 fma] %s: max |out error| %.3g (ex2.approx %.3g), max |lse error| %.3g (%.3g)\n",
                  dtype_name(dt), out4, out0, lse4, lse0);
    }
  }
}

#endif

}  // namespace
}  // namespace fg
