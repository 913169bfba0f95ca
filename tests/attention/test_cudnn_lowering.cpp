// lower_to_cudnn (attention/cudnn_lowering.h) on the CPU: each pattern cuDNN's fused SDPA expresses is accepted
// with the parameters written out by hand here, and each near miss is declined with the reason naming the part
// that does not lower. No GPU and no cuDNN are needed.
#include <gtest/gtest.h>

#include <cmath>

#include "flexgrad/attention/cudnn_lowering.h"
#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/gallery/alibi.h"
#include "flexgrad/attention/gallery/causal.h"
#include "flexgrad/attention/gallery/softcap.h"
#include "flexgrad/tensor/random.h"
#include "tests/test_util.h"

using namespace fg;

namespace {

struct Call {
  std::optional<ModProgram> score;
  std::optional<BlockMask> mask;
  CudnnLoweringInput in;
};

Call make_call(const ScoreMod& score_mod, const MaskMod& mask_mod, int64_t L = 256, int64_t H = 4,
               DType dt = kBFloat16, int64_t E = 64, int64_t Lkv = -1, BlockSize bs = 128) {
  Call c;
  if (Lkv < 0) Lkv = L;
  if (score_mod) c.score = trace_score_mod(score_mod);
  if (mask_mod) c.mask = create_block_mask(mask_mod, std::nullopt, std::nullopt, L, Lkv, bs);
  c.in.B = 2; c.in.Hq = H; c.in.Lq = L; c.in.E = E;
  c.in.Bkv = 2; c.in.Hkv = H; c.in.Lkv = Lkv; c.in.Ev = E;
  c.in.dtype = dt;
  return c;
}

CudnnLowering lower(Call& c) {
  c.in.score_mod = c.score ? &*c.score : nullptr;
  c.in.block_mask = c.mask ? &*c.mask : nullptr;
  return lower_to_cudnn(c.in);
}

CudnnSdpaSpec accepted(Call& c) {
  CudnnLowering r = lower(c);
  EXPECT_TRUE(r.lowers()) << "declined: " << r.declined;
  return r.spec.value_or(CudnnSdpaSpec{});
}

void declined(Call& c, const std::string& reason_part) {
  CudnnLowering r = lower(c);
  ASSERT_FALSE(r.lowers()) << "lowered to " << r.spec->describe();
  EXPECT_NE(r.declined.find(reason_part), std::string::npos) << "reason: " << r.declined;
}

TEST(CudnnLowering, NoModsIsPlainSdpa) {
  Call c = make_call(nullptr, nullptr);
  CudnnSdpaSpec s = accepted(c);
  EXPECT_FALSE(s.right_bound);
  EXPECT_FALSE(s.left_bound);
  EXPECT_EQ(s.bias, CudnnSdpaSpec::Bias::None);
  EXPECT_EQ(s.describe(), "no mask");
}

TEST(CudnnLowering, NoopMaskAndIdentityScore) {
  Call c = make_call([](Expr s, Expr, Expr, Expr, Expr) { return s; },
                     [](Expr, Expr, Expr, Expr) { return Expr(true); });
  EXPECT_EQ(accepted(c).describe(), "no mask");
}

TEST(CudnnLowering, CausalIsRightBoundZero) {
  Call c = make_call(nullptr, causal_mask());
  CudnnSdpaSpec s = accepted(c);
  EXPECT_EQ(s.right_bound, 0);
  EXPECT_FALSE(s.left_bound);
  EXPECT_TRUE(s.causal());
  // The same mask written the other way round, and over a 64-block BlockMask.
  Call c2 = make_call(nullptr, [](Expr, Expr, Expr q, Expr kv) { return kv <= q; }, 256, 4, kFloat16, 128, -1, 64);
  EXPECT_TRUE(accepted(c2).causal());
}

TEST(CudnnLowering, SlidingWindowIsABand) {
  // (q >= kv) & (q - kv <= 64): kv in [q - 64, q]: right bound 0, left bound 65 (kv > q - 65).
  Call c = make_call(nullptr, [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv <= 64); });
  CudnnSdpaSpec s = accepted(c);
  EXPECT_EQ(s.right_bound, 0);
  EXPECT_EQ(s.left_bound, 65);
  // abs(q - kv) <= 32: kv in [q - 32, q + 32].
  Call c2 = make_call(nullptr, [](Expr, Expr, Expr q, Expr kv) { return abs(q - kv) <= 32; });
  CudnnSdpaSpec s2 = accepted(c2);
  EXPECT_EQ(s2.right_bound, 32);
  EXPECT_EQ(s2.left_bound, 33);
  // kv - q < 8 and q - kv < 16 written with constants on either side: kv <= q + 7, kv > q - 16.
  Call c3 = make_call(nullptr, [](Expr, Expr, Expr q, Expr kv) { return (kv - q < 8) & (16 > q - kv); });
  CudnnSdpaSpec s3 = accepted(c3);
  EXPECT_EQ(s3.right_bound, 7);
  EXPECT_EQ(s3.left_bound, 16);
  // A left bound only: kv >= q - 10 (every kv after it allowed).
  Call c4 = make_call(nullptr, [](Expr, Expr, Expr q, Expr kv) { return kv + 10 >= q; });
  CudnnSdpaSpec s4 = accepted(c4);
  EXPECT_FALSE(s4.right_bound);
  EXPECT_EQ(s4.left_bound, 11);
}

TEST(CudnnLowering, AlibiFromTheGalleryGivesThePapersSlopes) {
  const int64_t H = 8;
  Call c = make_call(alibi_score_mod(H), causal_mask(), 256, H);
  CudnnSdpaSpec s = accepted(c);
  ASSERT_EQ(s.bias, CudnnSdpaSpec::Bias::Alibi);
  EXPECT_EQ(s.alibi_capture, -1);
  ASSERT_EQ(s.alibi_slopes.size(), static_cast<size_t>(H));
  for (int64_t h = 0; h < H; ++h) EXPECT_DOUBLE_EQ(s.alibi_slopes[h], std::pow(2.0, -8.0 * (h + 1) / H)) << h;
}

TEST(CudnnLowering, AlibiWithCapturedSlopes) {
  Tensor slopes = from_vector<float>({0.5f, 0.25f, 0.125f, 0.0625f}, {4});
  Call c = make_call([sl = Captured(slopes)](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + sl[h] * (kv - q); },
                     causal_mask());
  CudnnSdpaSpec s = accepted(c);
  ASSERT_EQ(s.bias, CudnnSdpaSpec::Bias::Alibi);
  EXPECT_EQ(s.alibi_capture, 0);
  // (q - kv) * c[h] with a CPU capture: the slopes of (kv - q) are -c[h], read from the program.
  Call c2 = make_call([sl = Captured(slopes)](Expr s, Expr, Expr h, Expr q, Expr kv) { return (q - kv) * sl[h] + s; },
                      causal_mask());
  CudnnSdpaSpec s2 = accepted(c2);
  ASSERT_EQ(s2.bias, CudnnSdpaSpec::Bias::Alibi);
  ASSERT_EQ(s2.alibi_slopes.size(), 4u);
  EXPECT_DOUBLE_EQ(s2.alibi_slopes[2], -0.125);
}

TEST(CudnnLowering, ConstantScoreScalesFoldIntoTheScale) {
  Call twice = make_call([](Expr s, Expr, Expr, Expr, Expr) { return s * 2; }, nullptr);
  EXPECT_DOUBLE_EQ(accepted(twice).score_scale, 2.0);
  Call left = make_call([](Expr s, Expr, Expr, Expr, Expr) { return 0.5 * s; }, causal_mask());
  CudnnSdpaSpec s = accepted(left);
  EXPECT_DOUBLE_EQ(s.score_scale, 0.5);
  EXPECT_TRUE(s.causal());
  Call div = make_call([](Expr s, Expr, Expr, Expr, Expr) { return s / 4.0; }, nullptr);
  EXPECT_DOUBLE_EQ(accepted(div).score_scale, 0.25);
  Call zero = make_call([](Expr s, Expr, Expr, Expr, Expr) { return s * 0.0; }, nullptr);
  CudnnLowering z = lower(zero);
  // s * 0 may fold to a constant 0 (then it is not score + bias); either way it does not lower.
  EXPECT_FALSE(z.lowers());
}

TEST(CudnnLowering, CapturedBiasTensors) {
  const int64_t L = 256, H = 4;
  Tensor full = randn({2, H, L, L});
  Call c = make_call([b = Captured(full)](Expr s, Expr bb, Expr h, Expr q, Expr kv) { return s + b[bb][h][q][kv]; },
                     causal_mask(), L, H);
  CudnnSdpaSpec s = accepted(c);
  ASSERT_EQ(s.bias, CudnnSdpaSpec::Bias::Tensor);
  EXPECT_EQ(s.bias_dim, (std::array<int, 4>{0, 1, 2, 3}));
  EXPECT_FALSE(s.bias_learnable);
  // Broadcast over the batch, learnable: dBias.
  Tensor per_head = randn({H, L, L}).requires_grad_();
  Call c2 = make_call([b = Captured(per_head)](Expr s, Expr, Expr h, Expr q, Expr kv) { return b[h][q][kv] + s; },
                      nullptr, L, H);
  CudnnSdpaSpec s2 = accepted(c2);
  EXPECT_EQ(s2.bias_dim, (std::array<int, 4>{-1, 0, 1, 2}));
  EXPECT_TRUE(s2.bias_learnable);
  EXPECT_EQ(s2.describe(), "no mask + bias cap0[h, q, kv] (learnable)");
  // A per-key bias, broadcast over b, h and q.
  Tensor per_key = randn({L});
  Call c3 = make_call([b = Captured(per_key)](Expr s, Expr, Expr, Expr, Expr kv) { return s + b[kv]; }, nullptr, L, H);
  EXPECT_EQ(accepted(c3).bias_dim, (std::array<int, 4>{-1, -1, -1, 0}));
}

TEST(CudnnLowering, DeclinesUnsupportedDtypesShapesAndBroadcasts) {
  Call f32 = make_call(nullptr, causal_mask(), 256, 4, kFloat32);
  declined(f32, "dtype float32");
  Call e12 = make_call(nullptr, causal_mask(), 256, 4, kBFloat16, 12);
  declined(e12, "head dims E=12");
  Call e512 = make_call(nullptr, nullptr, 256, 4, kBFloat16, 512);
  declined(e512, "up to 256");
  Call bcast = make_call(nullptr, nullptr);
  bcast.in.Bkv = 1;
  declined(bcast, "K/V batch 1 broadcast");
}

TEST(CudnnLowering, DeclinesMasksThatAreNotBands) {
  const int64_t L = 256;
  Tensor doc = zeros({L}, kInt64);
  Call document = make_call(nullptr, [d = Captured(doc)](Expr, Expr, Expr q, Expr kv) { return Expr(d[q]) == Expr(d[kv]); });
  declined(document, "not integer combinations of q_idx and kv_idx");
  Call prefix = make_call(nullptr, prefix_lm_mask(32));
  declined(prefix, "is not a comparison");
  Call steep = make_call(nullptr, [](Expr, Expr, Expr q, Expr kv) { return q * 2 >= kv; });
  declined(steep, "coefficients other than q_idx - kv_idx");
  Call per_head = make_call(nullptr, [](Expr, Expr h, Expr q, Expr kv) { return q - h >= kv; });
  declined(per_head, "not integer combinations");
  // Constants so large that the program's int64 arithmetic could wrap: no exact form, declined.
  Call huge = make_call(nullptr, [](Expr, Expr, Expr q, Expr kv) { return q * (int64_t{1} << 40) >= kv * (int64_t{1} << 40); });
  declined(huge, "not integer combinations");
  Call dilated = make_call(nullptr, [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & ((q - kv) % 2 == 0); });
  declined(dilated, "not integer combinations");
}

TEST(CudnnLowering, DeclinesBandsCudnnCannotRunOrThatLeaveRowsEmpty) {
  Call strict = make_call(nullptr, [](Expr, Expr, Expr q, Expr kv) { return q > kv; });
  declined(strict, "right bound would be -1");
  Call above = make_call(nullptr, [](Expr, Expr, Expr q, Expr kv) { return kv >= q + 3; });
  declined(above, "left bound would be -2");
  Call empty = make_call(nullptr, [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv > 300); });
  declined(empty, "keeps only kv_idx <= q_idx - 301");
  // A window that leaves the last rows without keys when Lkv < Lq.
  Call short_kv = make_call(nullptr, [](Expr, Expr, Expr q, Expr kv) { return (kv <= q + 4) & (kv + 4 >= q); }, 256, 4,
                            kBFloat16, 64, 64);
  declined(short_kv, "Lq 256 > Lkv 64");
}

TEST(CudnnLowering, DeclinesCapturedReadsThatAreNotABias) {
  Tensor bias = randn({256, 256});
  Call swapped = make_call([b = Captured(bias)](Expr s, Expr, Expr, Expr q, Expr kv) { return s + b[kv][q]; }, nullptr);
  declined(swapped, "in that order");
  declined(swapped, "a read of captured tensor");  // nor as pointwise ops
  Tensor short_bias = randn({4, 100, 256});
  Call too_short = make_call([b = Captured(short_bias)](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + b[h][q][kv]; },
                             nullptr);
  declined(too_short, "has 100 entries in dim 1 (indexed by q_idx) but 256 are read");
  Tensor learn_slopes = ones({4}).requires_grad_();
  Call learn = make_call([sl = Captured(learn_slopes)](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + sl[h] * (kv - q); },
                         causal_mask());
  declined(learn, "require grad");
}

// The pointwise score_mod: the program cuDNN evaluates gives the score_mod and its derivative, checked here against
// the formulas written out by hand at sample points.
void expect_pointwise(Call& c, const std::function<double(double s, int64_t h, int64_t q, int64_t kv)>& mod,
                      const std::function<double(double s, int64_t h, int64_t q, int64_t kv)>& dmod,
                      bool backward = true) {
  CudnnSdpaSpec spec = accepted(c);
  ASSERT_TRUE(spec.pointwise != nullptr) << spec.describe();
  if (backward) {
    EXPECT_EQ(spec.pointwise_backward_declined, "");
  } else {
    EXPECT_NE(spec.pointwise_backward_declined.find("may be inf or NaN at the infinite scores"), std::string::npos)
        << spec.pointwise_backward_declined;
  }
  EXPECT_EQ(spec.bias, CudnnSdpaSpec::Bias::None);
  EXPECT_NE(spec.describe().find("pointwise score_mod"), std::string::npos) << spec.describe();
  for (double s : {-7.5, -1.0, 0.0, 0.25, 3.0, 41.0})
    for (int64_t h : {0, 3})
      for (auto [q, kv] : {std::pair<int64_t, int64_t>{0, 0}, {5, 2}, {17, 200}}) {
        const std::vector<double> got = spec.pointwise->evaluate_all(1, h, q, kv, s);
        ASSERT_EQ(got.size(), 2u);
        EXPECT_NEAR(got[0], mod(s, h, q, kv), 1e-12 * (1 + std::fabs(mod(s, h, q, kv)))) << s << " " << h << " " << q;
        EXPECT_NEAR(got[1], dmod(s, h, q, kv), 1e-12 * (1 + std::fabs(dmod(s, h, q, kv)))) << s << " " << h << " " << q;
      }
}

TEST(CudnnLowering, OtherScoreModsLowerAsPointwiseOpsWithTheirDerivative) {
  Call softcap = make_call(tanh_softcap_score_mod(20.0), causal_mask());
  expect_pointwise(
      softcap, [](double s, int64_t, int64_t, int64_t) { return 20 * std::tanh(s / 20); },
      [](double s, int64_t, int64_t, int64_t) { return 1 - std::tanh(s / 20) * std::tanh(s / 20); });
  EXPECT_TRUE(accepted(softcap).causal());
  Call squared = make_call([](Expr s, Expr, Expr, Expr, Expr) { return s * s; }, nullptr);
  // 2 * score is infinite where cuDNN's scores are (padding): the forward lowers, the backward does not.
  expect_pointwise(
      squared, [](double s, int64_t, int64_t, int64_t) { return s * s; },
      [](double s, int64_t, int64_t, int64_t) { return 2 * s; }, /*backward=*/false);
  Call per_head = make_call([](Expr s, Expr, Expr h, Expr, Expr) { return s * to_float(h + 1); }, nullptr);
  expect_pointwise(
      per_head, [](double s, int64_t h, int64_t, int64_t) { return s * static_cast<double>(h + 1); },
      [](double, int64_t h, int64_t, int64_t) { return static_cast<double>(h + 1); });
  Call relbias = make_call([](Expr s, Expr, Expr, Expr q, Expr kv) { return s + to_float(q - kv); }, causal_mask());
  expect_pointwise(
      relbias, [](double s, int64_t, int64_t q, int64_t kv) { return s + static_cast<double>(q - kv); },
      [](double, int64_t, int64_t, int64_t) { return 1.0; });
  Call quadratic = make_call([](Expr s, Expr, Expr, Expr q, Expr kv) { return s + to_float((q - kv) * (q - kv)); }, nullptr);
  expect_pointwise(
      quadratic, [](double s, int64_t, int64_t q, int64_t kv) { return s + static_cast<double>((q - kv) * (q - kv)); },
      [](double, int64_t, int64_t, int64_t) { return 1.0; });
  // where() with a constant first branch, a constant minus the score, a division by a varying value.
  Call branches = make_call([](Expr s, Expr, Expr, Expr q, Expr kv) { return where(q >= kv, 0.5, 3.0 - s) / (1.0 + s * s); },
                            nullptr);
  expect_pointwise(
      branches,
      [](double s, int64_t, int64_t q, int64_t kv) { return (q >= kv ? 0.5 : 3.0 - s) / (1 + s * s); },
      [](double s, int64_t, int64_t q, int64_t kv) {
        const double num = q >= kv ? 0.5 : 3.0 - s, dnum = q >= kv ? 0.0 : -1.0, den = 1 + s * s;
        return (dnum * den - num * 2 * s) / (den * den);
      },
      /*backward=*/false);
  // A varying branch of a where() in the derivative: where(m, 0.5 * score, 1) is infinite with the score.
  Call square_near = make_call([](Expr s, Expr, Expr, Expr q, Expr kv) { return where(q - kv < 8, s * s * 0.25, s); },
                               causal_mask());
  expect_pointwise(
      square_near, [](double s, int64_t, int64_t q, int64_t kv) { return q - kv < 8 ? s * s * 0.25 : s; },
      [](double s, int64_t, int64_t q, int64_t kv) { return q - kv < 8 ? 0.5 * s : 1.0; }, /*backward=*/false);
  // Saturating functions bound what follows: sigmoid(score) * tanh(score / 4) + (q_idx - kv_idx) * 0.01.
  Call saturating = make_call([](Expr s, Expr, Expr, Expr q, Expr kv) {
    return sigmoid(s) * tanh(s / 4.0) * 3.0 + to_float(q - kv) * 0.01;
  }, nullptr);
  expect_pointwise(
      saturating,
      [](double s, int64_t, int64_t q, int64_t kv) {
        return 1 / (1 + std::exp(-s)) * std::tanh(s / 4) * 3 + static_cast<double>(q - kv) * 0.01;
      },
      [](double s, int64_t, int64_t, int64_t) {
        const double sg = 1 / (1 + std::exp(-s)), t = std::tanh(s / 4);
        return 3 * (sg * (1 - sg) * t + sg * (1 - t * t) / 4);
      });
}

TEST(CudnnLowering, DeclinesScoreModsWithoutACudnnPointwiseForm) {
  Call two = make_call([](Expr s, Expr, Expr, Expr, Expr) { return s + exp2(s); }, nullptr);
  declined(two, "exp2");
  Call bucket = make_call([](Expr s, Expr, Expr, Expr q, Expr kv) { return s + to_float(floor_div(q - kv, 16)); }, nullptr);
  declined(bucket, "floor_div");
  // q * kv * kv reaches 4096^3 > 2^31: cuDNN's int32 would wrap where the op table's int64 does not.
  Call wide = make_call([](Expr s, Expr, Expr, Expr q, Expr kv) { return s + to_float(q * kv * kv); }, nullptr, 4096);
  declined(wide, "int32");
  Call narrow = make_call([](Expr s, Expr, Expr, Expr q, Expr kv) { return s + to_float(q * kv * kv); }, nullptr, 256);
  EXPECT_TRUE(lower(narrow).lowers()) << lower(narrow).declined;
  Call power = make_call([](Expr s, Expr, Expr, Expr, Expr) { return pow(Expr(2.0), s); }, nullptr);
  declined(power, "a constant raised to a power");
  Call truncated = make_call([](Expr s, Expr, Expr, Expr, Expr) { return to_float(to_int(s)); }, nullptr);
  declined(truncated, "only int -> float casts");
}

TEST(CudnnLowering, DeclinesAlibiWithoutTheCausalDiagonal) {
  Call c = make_call(alibi_score_mod(4), nullptr);
  declined(c, "cuDNN's ALiBi requires the causal diagonal");
  Call w = make_call(alibi_score_mod(4), [](Expr, Expr, Expr q, Expr kv) { return abs(q - kv) <= 16; });
  declined(w, "requires the causal diagonal");
}

TEST(CudnnLowering, TheBlockMaskMustAgreeWithTheBand) {
  // Causal over 2 x 2 blocks of 128. A hand-built BlockMask that skips block (1, 0), where the causal mask
  // allows keys: flex_attention never visits it, cuDNN's band would.
  const int64_t L = 256;
  Tensor num = from_vector<int32_t>({1, 1}, {1, 1, 2}, kInt32);
  Tensor idx = from_vector<int32_t>({0, 1, 1, 0}, {1, 1, 2, 2}, kInt32);
  BlockMask sparse = BlockMask::from_kv_blocks(num, idx, Tensor(), Tensor(), 128, causal_mask(), std::make_pair(L, L));
  Call c = make_call(nullptr, nullptr, L);
  c.mask = sparse;
  declined(c, "skips block (b*h 0, q block 1, kv block 0)");
  // Block (0, 0) marked full: its upper triangle is masked by the mask_mod but a full block is not masked.
  Tensor full_num = from_vector<int32_t>({1, 0}, {1, 1, 2}, kInt32);
  Tensor full_idx = from_vector<int32_t>({0, 1, 0, 1}, {1, 1, 2, 2}, kInt32);
  Tensor pnum = from_vector<int32_t>({0, 2}, {1, 1, 2}, kInt32);
  Tensor pidx = from_vector<int32_t>({0, 1, 0, 1}, {1, 1, 2, 2}, kInt32);
  BlockMask dense = BlockMask::from_kv_blocks(pnum, pidx, full_num, full_idx, 128, causal_mask(), std::make_pair(L, L));
  Call d = make_call(nullptr, nullptr, L);
  d.mask = dense;
  declined(d, "marks block (b*h 0, q block 0, kv block 0) full");
  // The BlockMask create_block_mask builds for it agrees.
  Call ok = make_call(nullptr, causal_mask(), L);
  EXPECT_TRUE(lower(ok).lowers());
}

}  // namespace

namespace {

// The forced backend on the CPU: a typed error naming the device, never a silent run elsewhere.
TEST(CudnnBackend, ForcedOnTheCpuRaises) {
  Tensor x = randn({1, 2, 64, 64}).to(kBFloat16);
  FlexAttentionOptions o;
  o.kernel.backend = FlexBackend::Cudnn;
  fg::testing::expect_error<NotImplementedError>([&] { flex_attention(x, x, x, o); }, "runs on CUDA devices, got cpu");
}

}  // namespace
