// FlexBackend::Cudnn on the GPU: the conformance cases that lower pass PyTorch's rule in bf16 (the declined ones
// are printed with their reason), and causal, band, ALiBi, a learnable bias (dBias) and GQA match a plain float64
// softmax(Q K^T scale + bias) V written here (gradients by flexgrad's autograd over those float64 ops) in bf16
// and fp16, and agree with the fused CUDA kernel. Skips visibly without a GPU, without cuDNN in the build, or
// without libcudnn.so.9 on the machine.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/gallery/alibi.h"
#include "flexgrad/attention/gallery/causal.h"
#include "flexgrad/attention/gallery/softcap.h"
#include "flexgrad/ops/ops.h"
#include "flexgrad/tensor/random.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/test_util.h"
#include "tools/conformance/conformance.h"

namespace fg {
namespace {

using testing::device_arch;
using testing::ScopedEnv;

const Device kGpu(DeviceType::CUDA, 0);

// Empty when the cuDNN backend runs here, else why not (the skip message).
std::string cudnn_missing() {
  if (device_count(DeviceType::CUDA) == 0) return "no CUDA device present";
  try {
    Tensor x = randn({1, 1, 64, 64}).to(kGpu, kBFloat16);
    FlexAttentionOptions o;
    o.kernel.backend = FlexBackend::Cudnn;
    flex_attention(x, x, x, o);
  } catch (const NotImplementedError& e) {
    const std::string m = e.what();
    if (m.find("has no cuDNN") != std::string::npos || m.find("cannot load") != std::string::npos ||
        m.find("needs 9.10.2") != std::string::npos) {
      return m;
    }
    throw;
  }
  return {};
}
bool bits_equal(const Tensor& a, const Tensor& b) {
  return a.sizes() == b.sizes() && max(abs(a.cpu().to(kFloat64) - b.cpu().to(kFloat64))).item<double>() == 0.0;
}

#define SKIP_WITHOUT_CUDNN()                                     \
  do {                                                           \
    const std::string why_ = cudnn_missing();                    \
    if (!why_.empty()) GTEST_SKIP() << "cuDNN backend: " << why_; \
  } while (0)

// Every conformance case on the forced cuDNN backend in `dt`: the ones that lower pass PyTorch's rule.
void conformance_on_cudnn(const std::string& dir, const nlohmann::json& manifest, DType dt) {
  SCOPED_TRACE(dtype_name(dt));
  std::vector<std::string> ran, declined;
  for (const auto& entry : manifest) {
    const std::string name = entry.at("case").get<std::string>();
    ConformanceOptions o;
    o.dtype = dt;
    o.device = kGpu;
    o.backend = FlexBackend::Cudnn;
    o.only = {name};
    try {
      auto results = run_conformance(dir, o);
      ASSERT_EQ(results.size(), 1u);
      EXPECT_TRUE(results[0].passed()) << format_conformance(results);
      std::printf("%s", format_conformance(results).c_str());
      ran.push_back(name);
    } catch (const NotImplementedError& e) {
      // Only the lowering's "declines" count as declined; cuDNN finding no engine for a lowered graph is a failure.
      const std::string m = e.what();
      EXPECT_NE(m.find("cannot run this call"), std::string::npos) << name << ": " << m;
      std::printf("declined %s: %s\n", name.c_str(), e.what());
      declined.push_back(name);
    }
  }
  std::printf("cuDNN ran %zu cases in %s, declined %zu\n", ran.size(), dtype_name(dt), declined.size());
  // The patterns that lower must run: ALiBi under causal, GQA causal, a sliding window, a constant score scale, and
  // as pointwise ops softcap and score + (q_idx - kv_idx).
  for (const char* must : {"alibi_causal", "gqa_causal", "sliding64_blk64", "dv_differs", "softcap20", "relbias_diffseq"}) {
    EXPECT_NE(std::find(ran.begin(), ran.end(), must), ran.end()) << must << " was declined";
  }
}

TEST(FlexCudnn, ConformanceCasesThatLowerPassPyTorchsRule) {
  SKIP_WITHOUT_CUDNN();
  const std::string dir = fg::testing::conformance_dir();
  if (!std::filesystem::exists(dir + "/manifest.json")) GTEST_SKIP() << "no conformance data at " << dir;
  std::ifstream f(dir + "/manifest.json");
  const nlohmann::json manifest = nlohmann::json::parse(f);
  // bf16 only: the data holds PyTorch's bf16 and fp32 errors, no fp16 ones (fp16 runs in FlexCudnnGolden).
  conformance_on_cudnn(dir, manifest, kBFloat16);
}

// ---- float64 golden written here: softmax(Q K^T scale + bias, masked) V over materialised scores.
struct Case {
  std::string name;
  int64_t B = 2, Hq = 4, Hkv = 4, L = 200, E = 64;
  std::function<bool(int64_t q, int64_t kv)> allowed = [](int64_t, int64_t) { return true; };
  MaskMod mask_mod;
  ScoreMod score_mod;
  Tensor bias;  // [Hq, L, L] float32, learnable, the score_mod's capture (nullptr-equivalent when undefined)
  std::function<double(int64_t h, int64_t q, int64_t kv)> golden_bias;
  // A pointwise score_mod's float64 golden on the scaled scores s [B, H, L, L] with q_idx [L, 1] and kv_idx [1, L]
  // (float64): applied after golden_bias.
  std::function<Tensor(const Tensor& s, const Tensor& q_idx, const Tensor& kv_idx)> golden_mod;
};

struct Grads {
  Tensor out, dq, dk, dv, dbias;
};

Grads golden(const Case& c, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout) {
  Tensor q64 = q.cpu().to(kFloat64).detach().requires_grad_(), k64 = k.cpu().to(kFloat64).detach().requires_grad_(),
         v64 = v.cpu().to(kFloat64).detach().requires_grad_();
  const int64_t g = c.Hq / c.Hkv;
  std::vector<double> add(static_cast<size_t>(c.Hq * c.L * c.L));
  std::vector<bool> keep(static_cast<size_t>(c.L * c.L));
  for (int64_t i = 0; i < c.L; ++i)
    for (int64_t j = 0; j < c.L; ++j) keep[i * c.L + j] = c.allowed(i, j);
  Tensor bias64;
  if (c.bias.defined()) bias64 = c.bias.cpu().to(kFloat64).detach().requires_grad_();
  for (int64_t h = 0; h < c.Hq; ++h)
    for (int64_t i = 0; i < c.L; ++i)
      for (int64_t j = 0; j < c.L; ++j)
        add[(h * c.L + i) * c.L + j] = c.golden_bias && !c.bias.defined() ? c.golden_bias(h, i, j) : 0.0;
  Tensor kk = k64, vv = v64;
  if (g > 1) {  // q head h reads kv head h / g
    kk = k64.unsqueeze(2).expand({c.B, c.Hkv, g, c.L, c.E}).reshape({c.B, c.Hq, c.L, c.E});
    vv = v64.unsqueeze(2).expand({c.B, c.Hkv, g, c.L, c.E}).reshape({c.B, c.Hq, c.L, c.E});
  }
  Tensor s = matmul(q64, transpose(kk, 2, 3)) * (1.0 / std::sqrt(static_cast<double>(c.E)));
  s = s + from_vector<double>(add, {1, c.Hq, c.L, c.L}, kFloat64);
  if (bias64.defined()) s = s + bias64.unsqueeze(0);
  if (c.golden_mod) {
    const TensorOptions f64 = TensorOptions().dtype(kFloat64);
    s = c.golden_mod(s, arange(static_cast<double>(c.L), f64).view({c.L, 1}), arange(static_cast<double>(c.L), f64).view({1, c.L}));
  }
  std::vector<bool> masked(keep.size());
  for (size_t i = 0; i < keep.size(); ++i) masked[i] = !keep[i];
  s = masked_fill(s, from_vector<bool>(masked, {1, 1, c.L, c.L}, kBool), -INFINITY);
  Tensor out = matmul(softmax(s, 3), vv);
  (out * dout.cpu().to(kFloat64)).sum().backward();
  return {out.detach(), q64.grad(), k64.grad(), v64.grad(), bias64.defined() ? bias64.grad() : Tensor()};
}

double max_err(const Tensor& a, const Tensor& golden) {
  return max(abs(a.cpu().to(kFloat64) - golden)).item<double>();
}

Grads run(const Case& c, FlexBackend backend, const Tensor& q0, const Tensor& k0, const Tensor& v0, const Tensor& dout,
          DType dt, bool deterministic = true) {
  Tensor q = q0.to(kGpu, dt).detach().requires_grad_(), k = k0.to(kGpu, dt).detach().requires_grad_(),
         v = v0.to(kGpu, dt).detach().requires_grad_();
  Tensor bias;
  FlexAttentionOptions o;
  o.enable_gqa = c.Hq != c.Hkv;
  o.kernel.backend = backend;
  o.kernel.deterministic = deterministic;
  if (c.bias.defined()) {
    bias = c.bias.to(kGpu).detach().requires_grad_();
    o.score_mod = [b = Captured(bias)](Expr s, Expr, Expr h, Expr qi, Expr kv) { return s + b[h][qi][kv]; };
  } else {
    o.score_mod = c.score_mod;
  }
  if (c.mask_mod) o.block_mask = create_block_mask(c.mask_mod, std::nullopt, std::nullopt, c.L, c.L, 128, kGpu);
  Tensor out = flex_attention(q, k, v, o).out;
  (out.to(kFloat64) * dout.to(kGpu, kFloat64)).sum().backward();
  return {out.detach(), q.grad(), k.grad(), v.grad(), bias.defined() ? bias.grad() : Tensor()};
}

std::vector<Case> cases() {
  std::vector<Case> cs;
  Case causal;
  causal.name = "causal";
  causal.allowed = [](int64_t q, int64_t kv) { return kv <= q; };
  causal.mask_mod = causal_mask();
  cs.push_back(causal);
  Case band;
  band.name = "band";
  band.allowed = [](int64_t q, int64_t kv) { return std::abs(q - kv) <= 40; };
  band.mask_mod = [](Expr, Expr, Expr q, Expr kv) { return abs(q - kv) <= 40; };
  cs.push_back(band);
  Case alibi;
  alibi.name = "alibi";
  alibi.allowed = causal.allowed;
  alibi.mask_mod = causal_mask();
  alibi.score_mod = alibi_score_mod(4);
  alibi.golden_bias = [](int64_t h, int64_t q, int64_t kv) { return std::pow(2.0, -8.0 * (h + 1) / 4) * (kv - q); };
  cs.push_back(alibi);
  Case bias;
  bias.name = "bias_dbias";
  bias.bias = randn({4, 200, 200}) * 0.5;
  cs.push_back(bias);
  // The same case with GQA: 8 query heads on 2 K/V heads.
  auto gqa = [](Case c, const char* name) {
    c.name = name;
    c.Hq = 8;
    c.Hkv = 2;
    return c;
  };
  cs.push_back(gqa(causal, "gqa_causal"));
  // Pointwise score_mods (cuDNN's score-modifier graph; the backward multiplies dS by our derivative).
  Case softcap = causal;
  softcap.name = "softcap_causal";
  softcap.score_mod = tanh_softcap_score_mod(2.0);  // a small cap, so the tanh bends the scores
  softcap.golden_mod = [](const Tensor& s, const Tensor&, const Tensor&) { return tanh(s * 0.5) * 2.0; };
  cs.push_back(softcap);
  Case relpos = causal;
  relpos.name = "relative_position_where";
  relpos.score_mod = [](Expr s, Expr, Expr, Expr q, Expr kv) {
    return where(q - kv < 8, s * 1.5, s - to_float(q - kv) * 0.05);
  };
  relpos.golden_mod = [](const Tensor& s, const Tensor& qi, const Tensor& kvi) {
    return where((qi - kvi) < 8.0, s * 1.5, s - (qi - kvi) * 0.05);
  };
  cs.push_back(relpos);
  Case relbias = causal;  // integer index arithmetic, a constant derivative
  relbias.name = "relative_bias";
  relbias.score_mod = [](Expr s, Expr, Expr, Expr q, Expr kv) { return s - to_float(q - kv) * 0.05; };
  relbias.golden_mod = [](const Tensor& s, const Tensor& qi, const Tensor& kvi) { return s - (qi - kvi) * 0.05; };
  cs.push_back(relbias);
  Case saturating = causal;  // sigmoid and tanh bound what follows them (the derivative's lowering rule)
  saturating.name = "sigmoid_tanh";
  saturating.score_mod = [](Expr s, Expr, Expr, Expr q, Expr kv) {
    return sigmoid(s) * tanh(s / 4.0) * 3.0 + to_float(q - kv) * 0.01;
  };
  saturating.golden_mod = [](const Tensor& s, const Tensor& qi, const Tensor& kvi) {
    return sigmoid(s) * tanh(s / 4.0) * 3.0 + (qi - kvi) * 0.01;
  };
  cs.push_back(saturating);
  cs.push_back(gqa(softcap, "gqa_softcap"));
  return cs;
}

class FlexCudnnGolden : public ::testing::TestWithParam<DType> {};

TEST_P(FlexCudnnGolden, MatchesFloat64AndTheFusedKernel) {
  SKIP_WITHOUT_CUDNN();
  const DType dt = GetParam();
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    manual_seed(7);
    Tensor q = randn({c.B, c.Hq, c.L, c.E}), k = randn({c.B, c.Hkv, c.L, c.E}), v = randn({c.B, c.Hkv, c.L, c.E});
    Tensor dout = randn({c.B, c.Hq, c.L, c.E});
    // The golden sees the inputs rounded to the run's dtype, as the kernels do.
    Tensor qr = q.to(dt).to(kFloat32), kr = k.to(dt).to(kFloat32), vr = v.to(dt).to(kFloat32), dr = dout.to(dt).to(kFloat32);
    Grads gold = golden(c, qr, kr, vr, dr);
    Grads cud = run(c, FlexBackend::Cudnn, qr, kr, vr, dr, dt);
    Grads fused = run(c, FlexBackend::Fused, qr, kr, vr, dr, dt);
    // Tolerances: bf16 / fp16 rounding of the inputs of both products (P and dS are rounded as in any fused kernel).
    const double tol = dt == kBFloat16 ? 3e-2 : 6e-3, gtol = dt == kBFloat16 ? 1.5e-1 : 3e-2;
    EXPECT_LT(max_err(cud.out, gold.out), tol);
    EXPECT_LT(max_err(cud.dq, gold.dq), gtol);
    EXPECT_LT(max_err(cud.dk, gold.dk), gtol);
    EXPECT_LT(max_err(cud.dv, gold.dv), gtol);
    if (gold.dbias.defined()) {
      ASSERT_TRUE(cud.dbias.defined());
      EXPECT_LT(max_err(cud.dbias, gold.dbias), gtol);
    }
    // cuDNN and the fused kernel: each within the golden's tolerance of the other.
    EXPECT_LT(max_err(cud.out, fused.out.cpu().to(kFloat64)), tol);
    EXPECT_LT(max_err(cud.dq, fused.dq.cpu().to(kFloat64)), gtol);
    EXPECT_LT(max_err(cud.dk, fused.dk.cpu().to(kFloat64)), gtol);
    EXPECT_LT(max_err(cud.dv, fused.dv.cpu().to(kFloat64)), gtol);
  }
}

INSTANTIATE_TEST_SUITE_P(Dtypes, FlexCudnnGolden, ::testing::Values(kBFloat16, kFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

// kernel.deterministic (the default) promises bit-identical reruns of the backward: on cuDNN either two runs give the
// same dq, dk, dv (and dBias) bit for bit, or the call raises the documented NotImplementedError; with
// deterministic = false the backward runs and agrees with the deterministic one to the dtype's tolerance.
TEST(FlexCudnn, DeterministicBackwardIsBitIdenticalOrRaisesTheDocumentedError) {
  SKIP_WITHOUT_CUDNN();
  int identical = 0, declined = 0;
  for (Case c : cases()) {
    SCOPED_TRACE(c.name);
    c.L = 1000;  // several kv tiles per query tile, where an atomic dQ accumulation would reorder its sums
    if (c.bias.defined()) c.bias = randn({c.Hq, c.L, c.L}) * 0.5;
    manual_seed(11);
    Tensor q = randn({c.B, c.Hq, c.L, c.E}), k = randn({c.B, c.Hkv, c.L, c.E}), v = randn({c.B, c.Hkv, c.L, c.E});
    Tensor dout = randn({c.B, c.Hq, c.L, c.E});
    Grads fast = run(c, FlexBackend::Cudnn, q, k, v, dout, kBFloat16, /*deterministic=*/false);
    Grads a, b;
    try {
      a = run(c, FlexBackend::Cudnn, q, k, v, dout, kBFloat16, true);
      b = run(c, FlexBackend::Cudnn, q, k, v, dout, kBFloat16, true);
    } catch (const NotImplementedError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("no deterministic engine"), std::string::npos) << m;
      EXPECT_NE(m.find("kernel.deterministic = false"), std::string::npos) << m;
      std::printf("deterministic cuDNN backward declined for %s: %s\n", c.name.c_str(), m.c_str());
      ++declined;
      continue;
    }
    EXPECT_TRUE(bits_equal(a.out, b.out));
    EXPECT_TRUE(bits_equal(a.dq, b.dq));
    EXPECT_TRUE(bits_equal(a.dk, b.dk));
    EXPECT_TRUE(bits_equal(a.dv, b.dv));
    if (a.dbias.defined()) {
      EXPECT_TRUE(bits_equal(a.dbias, b.dbias));
    }
    EXPECT_LT(max_err(fast.dq, a.dq.cpu().to(kFloat64)), 1.5e-1);
    EXPECT_LT(max_err(fast.dk, a.dk.cpu().to(kFloat64)), 1.5e-1);
    EXPECT_LT(max_err(fast.dv, a.dv.cpu().to(kFloat64)), 1.5e-1);
    ++identical;
  }
  std::printf("deterministic cuDNN backward: %d cases bit-identical, %d declined\n", identical, declined);
}

// Auto's choice (flex_attention.cpp, auto_cudnn_call): cuDNN where the program lowers on sm_90a (or anywhere with
// FLEXGRAD_FLEX_CUDNN=1), the fused kernels with FLEXGRAD_FLEX_CUDNN=0, for programs that do not lower
// (exp2), and when max_scores are asked for. Told apart by the forward output's bits (cuDNN's and ours differ in rounding).
TEST(FlexCudnn, AutoPicksCudnnByTheRuleAndTheEnvironmentOverridesIt) {
  SKIP_WITHOUT_CUDNN();
  manual_seed(5);
  Tensor q = randn({2, 4, 256, 64}).to(kGpu, kBFloat16), k = randn({2, 4, 256, 64}).to(kGpu, kBFloat16),
         v = randn({2, 4, 256, 64}).to(kGpu, kBFloat16);
  auto out = [&](FlexBackend backend, const ScoreMod& mod, bool max_scores) {
    FlexAttentionOptions o;
    o.kernel.backend = backend;
    o.score_mod = mod;
    o.return_max_scores = max_scores;
    o.block_mask = create_block_mask(causal_mask(), std::nullopt, std::nullopt, 256, 256, 128, kGpu);
    FlexAttentionResult r = flex_attention(q, k, v, o);
    EXPECT_EQ(r.max_scores.defined(), max_scores);
    return r.out;
  };
  const Tensor cudnn = out(FlexBackend::Cudnn, {}, false), fused = out(FlexBackend::Fused, {}, false);
  ASSERT_FALSE(bits_equal(cudnn, fused)) << "cuDNN and the fused kernel agree bit for bit: the test cannot tell them apart";
  {
    ScopedEnv env("FLEXGRAD_FLEX_CUDNN", nullptr);
    EXPECT_TRUE(bits_equal(out(FlexBackend::Auto, {}, false), device_arch() == "sm_90a" ? cudnn : fused))
        << "arch " << device_arch();
  }
  {
    ScopedEnv env("FLEXGRAD_FLEX_CUDNN", "1");
    EXPECT_TRUE(bits_equal(out(FlexBackend::Auto, {}, false), cudnn));
    // max_scores: only the fused kernels give them.
    EXPECT_TRUE(bits_equal(out(FlexBackend::Auto, {}, true), out(FlexBackend::Fused, {}, true)));
    // exp2 has no cuDNN pointwise mode: the program does not lower, the fused kernels run.
    const ScoreMod two = [](Expr s, Expr, Expr, Expr, Expr) { return s + exp2(s * 0.125); };
    EXPECT_TRUE(bits_equal(out(FlexBackend::Auto, two, false), out(FlexBackend::Fused, two, false)));
    // softcap lowers as pointwise ops: cuDNN.
    const ScoreMod softcap = tanh_softcap_score_mod(20.0);
    EXPECT_TRUE(bits_equal(out(FlexBackend::Auto, softcap, false), out(FlexBackend::Cudnn, softcap, false)));
  }
  {
    ScopedEnv env("FLEXGRAD_FLEX_CUDNN", "0");
    EXPECT_TRUE(bits_equal(out(FlexBackend::Auto, {}, false), fused));
  }
  {
    ScopedEnv env("FLEXGRAD_FLEX_CUDNN", "yes");
    fg::testing::expect_error<ValueError>([&] { out(FlexBackend::Auto, {}, false); }, "FLEXGRAD_FLEX_CUDNN");
  }
}

// Auto on cuDNN with a gradient: the backward runs (deterministically by default, bit-identical reruns) and matches
// the forced cuDNN backend; asking for the lse while a gradient is needed keeps the fused kernels (cuDNN's backward
// takes no gradient through the lse, the fused one does).
TEST(FlexCudnn, AutoWithAGradientRunsTheBackwardOrKeepsTheFusedKernels) {
  SKIP_WITHOUT_CUDNN();
  ScopedEnv env("FLEXGRAD_FLEX_CUDNN", "1");
  manual_seed(6);
  const Tensor q0 = randn({1, 4, 256, 64}).to(kGpu, kBFloat16), k0 = randn({1, 4, 256, 64}).to(kGpu, kBFloat16),
               v0 = randn({1, 4, 256, 64}).to(kGpu, kBFloat16), dout = randn({1, 4, 256, 64}).to(kGpu, kBFloat16);
  auto grads = [&](FlexBackend backend, bool lse) {
    Tensor q = q0.detach().requires_grad_(), k = k0.detach().requires_grad_(), v = v0.detach().requires_grad_();
    FlexAttentionOptions o;
    o.kernel.backend = backend;
    o.return_lse = lse;
    o.block_mask = create_block_mask(causal_mask(), std::nullopt, std::nullopt, 256, 256, 128, kGpu);
    FlexAttentionResult r = flex_attention(q, k, v, o);
    Tensor loss = (r.out.to(kFloat32) * dout.to(kFloat32)).sum();
    if (lse) loss = loss + r.lse.sum();
    loss.backward();
    return std::vector<Tensor>{r.out, q.grad(), k.grad(), v.grad()};
  };
  std::vector<Tensor> forced;
  try {
    forced = grads(FlexBackend::Cudnn, false);
  } catch (const NotImplementedError& e) {
    // No deterministic engine: Auto must then keep the fused kernels (asked at forward time).
    EXPECT_NE(std::string(e.what()).find("no deterministic engine"), std::string::npos) << e.what();
    const auto a = grads(FlexBackend::Auto, false), f = grads(FlexBackend::Fused, false);
    for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(bits_equal(a[i], f[i])) << i;
    return;
  }
  const auto a = grads(FlexBackend::Auto, false);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(bits_equal(a[i], forced[i])) << i;
  const auto al = grads(FlexBackend::Auto, true), fl = grads(FlexBackend::Fused, true);
  for (size_t i = 0; i < al.size(); ++i) EXPECT_TRUE(bits_equal(al[i], fl[i])) << i;
}

// Auto on a sliding window whose gradient is deterministic: cuDNN's forward (its output bit for bit) and the fused
// kernels' backward node, from cuDNN's output and lse, within the float64 golden's tolerance; nondeterministic, or
// with a score_mod (ALiBi), the backward stays cuDNN's.
TEST(FlexCudnn, AutoRunsASlidingWindowsDeterministicBackwardOnTheFusedKernels) {
  SKIP_WITHOUT_CUDNN();
  ScopedEnv env("FLEXGRAD_FLEX_CUDNN", "1");
  Case c;
  c.name = "sliding64";
  c.L = 256;
  c.allowed = [](int64_t q, int64_t kv) { return kv <= q && q - kv < 64; };
  c.mask_mod = [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv < 64); };
  manual_seed(12);
  Tensor q0 = randn({c.B, c.Hq, c.L, c.E}), k0 = randn({c.B, c.Hkv, c.L, c.E}), v0 = randn({c.B, c.Hkv, c.L, c.E});
  Tensor d0 = randn({c.B, c.Hq, c.L, c.E});
  const DType dt = kBFloat16;
  Tensor qr = q0.to(dt).to(kFloat32), kr = k0.to(dt).to(kFloat32), vr = v0.to(dt).to(kFloat32), dr = d0.to(dt).to(kFloat32);
  const Grads gold = golden(c, qr, kr, vr, dr);
  auto call = [&](FlexBackend backend, bool deterministic, const ScoreMod& mod, std::string* node) {
    Tensor q = qr.to(kGpu, dt).detach().requires_grad_(), k = kr.to(kGpu, dt).detach().requires_grad_(),
           v = vr.to(kGpu, dt).detach().requires_grad_();
    FlexAttentionOptions o;
    o.kernel.backend = backend;
    o.kernel.deterministic = deterministic;
    o.score_mod = mod;
    o.block_mask = create_block_mask(c.mask_mod, std::nullopt, std::nullopt, c.L, c.L, 128, kGpu);
    Tensor out = flex_attention(q, k, v, o).out;
    if (node) *node = out.grad_fn() ? out.grad_fn()->name() : "none";
    (out.to(kFloat64) * dr.to(kGpu, kFloat64)).sum().backward();
    return Grads{out.detach(), q.grad(), k.grad(), v.grad(), Tensor()};
  };
  std::string node;
  const Grads a = call(FlexBackend::Auto, true, {}, &node);
  EXPECT_EQ(node, "FlexAttentionBackward");
  const Grads cud = call(FlexBackend::Cudnn, true, {}, nullptr);
  EXPECT_TRUE(bits_equal(a.out, cud.out)) << "Auto's forward is not cuDNN's";
  EXPECT_LT(max_err(a.out, gold.out), 3e-2);
  EXPECT_LT(max_err(a.dq, gold.dq), 1.5e-1);
  EXPECT_LT(max_err(a.dk, gold.dk), 1.5e-1);
  EXPECT_LT(max_err(a.dv, gold.dv), 1.5e-1);
  // Deterministic: a rerun gives the same bits.
  const Grads b = call(FlexBackend::Auto, true, {}, nullptr);
  EXPECT_TRUE(bits_equal(a.dq, b.dq) && bits_equal(a.dk, b.dk) && bits_equal(a.dv, b.dv));
  call(FlexBackend::Auto, false, {}, &node);
  EXPECT_EQ(node, "FlexAttentionCudnnBackward") << "nondeterministic";
  // ALiBi + window (not measured): cuDNN's backward where it has a deterministic engine for it.
  std::string forced;
  try {
    call(FlexBackend::Cudnn, true, alibi_score_mod(4), &forced);
  } catch (const NotImplementedError& e) {
    std::printf("ALiBi + window: cuDNN has no deterministic backward here: %s\n", e.what());
    return;
  }
  call(FlexBackend::Auto, true, alibi_score_mod(4), &node);
  EXPECT_EQ(node, "FlexAttentionCudnnBackward") << "ALiBi + window";
}

// A score_mod whose forward lowers but whose derivative may be infinite where cuDNN's scores are (padding; here
// where(q - kv < 8, 0.5 score, 1)): the forward runs on cuDNN and matches the fused kernel; a forced backward raises
// the lowering's reason; Auto with a gradient keeps the fused kernels.
TEST(FlexCudnn, ForwardOnlyWhenTheDerivativeCannotBeCudnnsBackwardChain) {
  SKIP_WITHOUT_CUDNN();
  ScopedEnv env("FLEXGRAD_FLEX_CUDNN", "1");
  manual_seed(9);
  const Tensor q0 = randn({1, 4, 200, 64}).to(kGpu, kBFloat16), k0 = randn({1, 4, 200, 64}).to(kGpu, kBFloat16),
               v0 = randn({1, 4, 200, 64}).to(kGpu, kBFloat16);
  auto run_with = [&](FlexBackend backend, bool grad) {
    Tensor q = q0.detach().requires_grad_(grad), k = k0.detach(), v = v0.detach();
    FlexAttentionOptions o;
    o.kernel.backend = backend;
    o.score_mod = [](Expr s, Expr, Expr, Expr qi, Expr kv) { return where(qi - kv < 8, s * s * 0.25, s); };
    o.block_mask = create_block_mask(causal_mask(), std::nullopt, std::nullopt, 200, 200, 128, kGpu);
    FlexAttentionResult r = flex_attention(q, k, v, o);
    if (grad) r.out.to(kFloat32).sum().backward();
    return std::vector<Tensor>{r.out, grad ? q.grad() : Tensor()};
  };
  const auto cud = run_with(FlexBackend::Cudnn, false), fused = run_with(FlexBackend::Fused, false);
  EXPECT_LT(max(abs(cud[0].to(kFloat32) - fused[0].to(kFloat32))).item<double>(), 3e-2);
  fg::testing::expect_error<NotImplementedError>([&] { run_with(FlexBackend::Cudnn, true); }, "may be inf or NaN");
  const auto a = run_with(FlexBackend::Auto, true), f = run_with(FlexBackend::Fused, true);
  EXPECT_TRUE(bits_equal(a[0], f[0]));
  EXPECT_TRUE(bits_equal(a[1], f[1]));
}

TEST(FlexCudnn, ForcedOnAProgramThatDoesNotLowerRaisesWithTheReason) {
  SKIP_WITHOUT_CUDNN();
  Tensor x = randn({1, 2, 128, 64}).to(kGpu, kBFloat16);
  FlexAttentionOptions o;
  o.kernel.backend = FlexBackend::Cudnn;
  o.block_mask = create_block_mask(prefix_lm_mask(16), std::nullopt, std::nullopt, 128, 128, 128, kGpu);
  fg::testing::expect_error<NotImplementedError>([&] { flex_attention(x, x, x, o); }, "is not a comparison");
  FlexAttentionOptions f32;
  f32.kernel.backend = FlexBackend::Cudnn;
  Tensor y = randn({1, 2, 128, 64}).to(kGpu);
  fg::testing::expect_error<NotImplementedError>([&] { flex_attention(y, y, y, f32); }, "dtype float32");
}

}  // namespace
}  // namespace fg
