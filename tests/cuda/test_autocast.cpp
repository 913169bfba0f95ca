// Mixed precision (ops/autocast.h) on each device: which ops an AutocastGuard lowers, the guard's scoping,
// and the numbers — a bf16 product under autocast equals a float64 product of the bf16-rounded operands
// (rounded here by hand, not by the library) up to the output's own bf16 rounding, and gradients reach
// float32 parameters in float32. Instantiated for the CPU and for CUDA (skipped visibly without a GPU).
#include <cmath>
#include <cstring>
#include <vector>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/nn/nn.h"
#include "flexgrad/ops/ops.h"
#include "tests/test_util.h"

namespace fg {
namespace {

using fg::testing::close;

// Round-to-nearest-even of a float to bfloat16, returned as the float it represents (finite inputs).
double round_bf16(double x) {
  float f = static_cast<float>(x);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&f, &u, 4);
  return f;
}

class Autocast : public ::testing::TestWithParam<DeviceType> {
 protected:
  void SetUp() override {
    if (device_count(GetParam()) == 0) GTEST_SKIP() << "no CUDA device present: skipping the CUDA autocast tests";
  }
  Device dev() const { return Device(GetParam(), 0); }
  // Values on a grid of 1/64 in [-2, 2): exact in float32, most of them not in bfloat16's 8 bits.
  std::vector<double> values(int64_t n, uint64_t seed) {
    std::vector<double> v(n);
    for (int64_t i = 0; i < n; ++i) {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      v[i] = static_cast<double>(static_cast<int64_t>((seed >> 33) % 256) - 128) / 64.0 + 1.0 / 1024 * (i % 7);
    }
    return v;
  }
};

TEST_P(Autocast, GuardLowersProductsOnItsDeviceTypeOnlyAndRestoresOnExit) {
  const Tensor a = from_vector(values(12, 1), {3, 4}, kFloat32).to(dev());
  const Tensor b = from_vector(values(20, 2), {4, 5}, kFloat32).to(dev());
  const DeviceType other = GetParam() == DeviceType::CPU ? DeviceType::CUDA : DeviceType::CPU;
  {
    AutocastGuard amp(GetParam(), kBFloat16);
    EXPECT_EQ(autocast_dtype(GetParam()), kBFloat16);
    EXPECT_EQ(autocast_dtype(other), std::nullopt);
    EXPECT_EQ(matmul(a, b).dtype(), kBFloat16);
    EXPECT_EQ(mm(a, b).dtype(), kBFloat16);
    EXPECT_EQ(bmm(unsqueeze(a, 0), unsqueeze(b, 0)).dtype(), kBFloat16);
    EXPECT_EQ(linear(a, transpose(b, 0, 1)).dtype(), kBFloat16);
    // float64 is never lowered, nor are ops outside the list.
    EXPECT_EQ(matmul(a.to(kFloat64), b.to(kFloat64)).dtype(), kFloat64);
    EXPECT_EQ(add(a, a).dtype(), kFloat32);
    EXPECT_EQ(softmax(a, -1).dtype(), kFloat32);
    {
      AutocastGuard off(GetParam(), kBFloat16, /*enabled=*/false);  // an fp32 island
      EXPECT_EQ(matmul(a, b).dtype(), kFloat32);
    }
    EXPECT_EQ(matmul(a, b).dtype(), kBFloat16);
    {
      AutocastGuard half(GetParam(), kFloat16);
      EXPECT_EQ(matmul(a, b).dtype(), kFloat16);
    }
  }
  EXPECT_EQ(autocast_dtype(GetParam()), std::nullopt);
  EXPECT_EQ(matmul(a, b).dtype(), kFloat32);
  {
    AutocastGuard elsewhere(other, kBFloat16);  // a guard for the other device type changes nothing here
    EXPECT_EQ(matmul(a, b).dtype(), kFloat32);
  }
  EXPECT_THROW_MSG(AutocastGuard(GetParam(), kFloat32), DTypeError, "bfloat16 or float16", "float32");
}

TEST_P(Autocast, LinearEqualsFloat64ProductOfRoundedOperandsAndGradientsStayFloat32) {
  const int64_t n = 5, k = 67, m = 9;  // k long enough that accumulating in bf16 would show
  const std::vector<double> xv = values(n * k, 3), wv = values(m * k, 4), bv = values(m, 5);
  Tensor x = from_vector(xv, {n, k}, kFloat32).to(dev()).requires_grad_(true);
  Tensor w = from_vector(wv, {m, k}, kFloat32).to(dev()).requires_grad_(true);
  Tensor bias = from_vector(bv, {m}, kFloat32).to(dev()).requires_grad_(true);
  Tensor y;
  {
    AutocastGuard amp(GetParam(), kBFloat16);
    y = linear(x, w, bias);
  }
  ASSERT_EQ(y.dtype(), kBFloat16);
  ASSERT_EQ(y.device(), dev());
  // Golden: float64 sums of bf16-rounded operands; the kernel accumulates in float32 and rounds once to bf16.
  std::vector<double> want(n * m);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < m; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) s += round_bf16(xv[i * k + p]) * round_bf16(wv[j * k + p]);
      want[i * m + j] = s + round_bf16(bv[j]);
    }
  }
  // bf16 keeps 8 significant bits: the output rounding is at most 2^-8 relative (plus the bias add's).
  EXPECT_TRUE(close(y.to(kCPU).to(kFloat64), from_vector(want, {n, m}, kFloat64), 2e-2, 8e-3));

  // d(sum(y * g))/dw = g^T x in bf16 products, cast back to float32 for the float32 parameter.
  const std::vector<double> gv = values(n * m, 6);
  sum(mul(cast(y, kFloat32), from_vector(gv, {n, m}, kFloat32).to(dev()))).backward();
  ASSERT_TRUE(w.grad().defined());
  EXPECT_EQ(w.grad().dtype(), kFloat32);
  EXPECT_EQ(x.grad().dtype(), kFloat32);
  EXPECT_EQ(bias.grad().dtype(), kFloat32);
  std::vector<double> dw(m * k), dx(n * k), db(m, 0);
  for (int64_t j = 0; j < m; ++j) {
    for (int64_t p = 0; p < k; ++p) {
      double s = 0;
      for (int64_t i = 0; i < n; ++i) s += round_bf16(gv[i * m + j]) * round_bf16(xv[i * k + p]);
      dw[j * k + p] = s;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t p = 0; p < k; ++p) {
      double s = 0;
      for (int64_t j = 0; j < m; ++j) s += round_bf16(gv[i * m + j]) * round_bf16(wv[j * k + p]);
      dx[i * k + p] = s;
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < m; ++j) db[j] += gv[i * m + j];
  }
  EXPECT_TRUE(close(w.grad().to(kCPU).to(kFloat64), from_vector(dw, {m, k}, kFloat64), 2e-2, 8e-3));
  EXPECT_TRUE(close(x.grad().to(kCPU).to(kFloat64), from_vector(dx, {n, k}, kFloat64), 2e-2, 8e-3));
  EXPECT_TRUE(close(bias.grad().to(kCPU).to(kFloat64), from_vector(db, {m}, kFloat64), 2e-2, 8e-3));
}

TEST_P(Autocast, FlexAttentionRunsInBfloat16AndMatchesAFloat64Softmax) {
  const int64_t B = 1, H = 2, L = 37, E = 16;
  const std::vector<double> qv = values(B * H * L * E, 7), kv = values(B * H * L * E, 8), vv = values(B * H * L * E, 9);
  auto make = [&](const std::vector<double>& v) {
    return from_vector(v, {B, H, L, E}, kFloat32).to(dev()).requires_grad_(true);
  };
  Tensor q = make(qv), k = make(kv), v = make(vv);
  FlexAttentionOptions o;
  o.block_mask = create_block_mask([](Expr, Expr, Expr qi, Expr ki) { return qi >= ki; }, std::nullopt, std::nullopt,
                                   L, L, 128, dev());
  Tensor out;
  {
    AutocastGuard amp(GetParam(), kBFloat16);
    out = flex_attention(q, k, v, o).out;
  }
  ASSERT_EQ(out.dtype(), kBFloat16);
  // Golden: causal softmax(q k^T / sqrt(E)) v in float64 on the bf16-rounded inputs.
  std::vector<double> want(B * H * L * E, 0);
  const double scale = 1 / std::sqrt(static_cast<double>(E));
  for (int64_t h = 0; h < H; ++h) {
    const int64_t base = h * L * E;
    for (int64_t i = 0; i < L; ++i) {
      std::vector<double> s(i + 1);
      double mx = -INFINITY, z = 0;
      for (int64_t j = 0; j <= i; ++j) {
        double d = 0;
        for (int64_t e = 0; e < E; ++e) d += round_bf16(qv[base + i * E + e]) * round_bf16(kv[base + j * E + e]);
        s[j] = d * scale;
        mx = std::max(mx, s[j]);
      }
      for (int64_t j = 0; j <= i; ++j) z += (s[j] = std::exp(s[j] - mx));
      for (int64_t e = 0; e < E; ++e) {
        double acc = 0;
        for (int64_t j = 0; j <= i; ++j) acc += s[j] / z * round_bf16(vv[base + j * E + e]);
        want[base + i * E + e] = acc;
      }
    }
  }
  EXPECT_TRUE(close(out.to(kCPU).to(kFloat64), from_vector(want, {B, H, L, E}, kFloat64), 2e-2, 2e-2));
  sum(cast(out, kFloat32)).backward();
  for (const Tensor* t : {&q, &k, &v}) {
    ASSERT_TRUE(t->grad().defined());
    EXPECT_EQ(t->grad().dtype(), kFloat32);
    EXPECT_EQ(t->grad().device(), dev());
  }
}

// A few AdamW steps of a small GPT under bf16 autocast track the float32 run (same init, same batches):
// the parameters and the optimizer state stay float32 on the device, and each step's loss is within bf16
// noise of the float32 loss (measured, not assumed: the bound is 3% of the loss, about eight bf16 ulps).
TEST_P(Autocast, GptTrainingUnderBfloat16TracksFloat32) {
  const int64_t V = 17, B = 4, L = 24;
  nn::GPTConfig gc{.vocab_size = V, .context = L, .d_model = 64, .n_layers = 2, .n_heads = 4};
  auto run = [&](bool bf16) {
    Generator init(3);
    auto model = std::make_shared<nn::GPT>(gc, &init);
    model->to(dev());
    nn::AdamW opt(model->parameters(), {.lr = 3e-3});
    nn::AttentionCall call;
    call.block_mask = nn::causal_block_mask(L, 16, dev());
    Generator data(4);
    std::vector<double> losses;
    for (int step = 0; step < 6; ++step) {
      // Rows count up by one from a random start (mod V): learnable within a few steps.
      Tensor start = randint(0, V, {B}, kInt64, &data);
      std::vector<int64_t> ids(B * (L + 1));
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t t = 0; t <= L; ++t) ids[b * (L + 1) + t] = (static_cast<int64_t>(start.at({b})) + t) % V;
      }
      Tensor seq = from_vector(ids, {B, L + 1}, kInt64).to(dev());
      Tensor loss;
      {
        AutocastGuard amp(GetParam(), kBFloat16, bf16);
        Tensor logits = model->forward(narrow(seq, 1, 0, L), call);
        if (bf16) { EXPECT_EQ(logits.dtype(), kBFloat16); }
        loss = cross_entropy(reshape(logits, {-1, V}), reshape(narrow(seq, 1, 1, L), {-1}));
      }
      opt.zero_grad();
      loss.backward();
      opt.step();
      losses.push_back(loss.item<double>());
    }
    for (const auto& [name, p] : model->named_parameters()) {
      EXPECT_EQ(p.dtype(), kFloat32) << name;
      EXPECT_EQ(p.device(), dev()) << name;
    }
    for (const auto& [name, t] : opt.state_dict()) {
      if (t.numel() > 1) { EXPECT_EQ(t.dtype(), kFloat32) << name; }
    }
    return losses;
  };
  const auto f32 = run(false), b16 = run(true);
  ASSERT_EQ(f32.size(), b16.size());
  for (size_t i = 0; i < f32.size(); ++i) EXPECT_NEAR(b16[i], f32[i], 0.03 * f32[i]) << "step " << i;
  EXPECT_LT(f32.back(), f32.front());  // the run learns at all (a sanity check of the comparison)
}

INSTANTIATE_TEST_SUITE_P(Devices, Autocast, ::testing::Values(DeviceType::CPU, DeviceType::CUDA),
                         [](const auto& info) { return info.param == DeviceType::CPU ? "CPU" : "CUDA"; });

}  // namespace
}  // namespace fg
