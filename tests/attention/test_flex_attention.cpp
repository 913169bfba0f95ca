// flex_attention against PyTorch's test families, with its golden / reference / implementation rule:
// the fused kernel's error against the float64 golden is at most (1 + fudge) times the error of the
// reference path in the same dtype (fudge 10 for fp32, 1.1 for bf16/fp16), plus 1e-7.
#include <cmath>
#include <functional>
#include <limits>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/mask_mods.h"
#include "tests/test_util.h"

namespace fg {
namespace {

double mean_abs_err(const Tensor& golden, const Tensor& x) {
  Tensor g = golden.to(kFloat64), v = x.to(kFloat64);
  Tensor finite = logical_not(isinf(g));
  EXPECT_TRUE(equal(isinf(g), isinf(v))) << "-inf entries differ";
  EXPECT_FALSE(any(isnan(v)).item<bool>()) << "NaN in result";
  double n = sum(finite.to(kFloat64)).item();
  return n == 0 ? 0 : sum(where(finite, abs(g - where(finite, v, 0.0)), 0.0)).item() / n;
}

struct Run {
  Tensor out, lse, dq, dk, dv;
};

// q, k, v, dout given in float64; they are cast to `dt` and laid out by `layout` before the call.
Run run(const Tensor& q64, const Tensor& k64, const Tensor& v64, const Tensor& do64, DType dt, FlexBackend backend,
        FlexAttentionOptions o, const std::function<Tensor(const Tensor&)>& layout = {}) {
  auto prep = [&](const Tensor& t) {
    Tensor x = t.to(dt);
    if (layout) x = layout(x);
    return x.detach().requires_grad_(true);
  };
  Tensor q = prep(q64), k = prep(k64), v = prep(v64);
  o.return_lse = true;
  o.kernel.backend = backend;
  FlexAttentionResult r = flex_attention(q, k, v, o);
  Tensor dout = layout ? layout(do64.to(dt)) : do64.to(dt);
  (r.out.to(kFloat64) * dout.to(kFloat64)).sum().backward();
  return {r.out, r.lse, q.grad(), k.grad(), v.grad()};
}

// The same score_mod and mask_mod as plain C++ functions of (score, b, h, q, kv): the independent golden.
struct Native {
  std::function<double(double, int64_t, int64_t, int64_t, int64_t)> mod;  // empty: identity
  std::function<bool(int64_t, int64_t, int64_t, int64_t)> mask;          // empty: every key allowed
};

// Attention in plain float64 loops, sharing no code with flexgrad: scores = scale q.k, the native mod,
// -inf where the native mask is false, softmax (a row with no allowed key: output 0, lse -inf), then P V.
// GQA: q head h reads kv head h / (Hq / Hkv); a kv batch of 1 is broadcast.
void native_attention(const Tensor& q_t, const Tensor& k_t, const Tensor& v_t, double scale, const Native& n,
                      std::vector<double>& out, std::vector<double>& lse) {
  const int64_t B = q_t.size(0), Hq = q_t.size(1), Lq = q_t.size(2), E = q_t.size(3);
  const int64_t Bkv = k_t.size(0), Hkv = k_t.size(1), Lkv = k_t.size(2), Ev = v_t.size(3);
  const std::vector<double> q = q_t.contiguous().to_vector(), k = k_t.contiguous().to_vector(),
                            v = v_t.contiguous().to_vector();
  out.assign(B * Hq * Lq * Ev, 0.0);
  lse.assign(B * Hq * Lq, 0.0);
  std::vector<double> s(Lkv);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < Lq; ++i) {
        const int64_t kb = Bkv == 1 ? 0 : b, kh = h / (Hq / Hkv);
        const double* qi = &q[((b * Hq + h) * Lq + i) * E];
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < Lkv; ++j) {
          const double* kj = &k[((kb * Hkv + kh) * Lkv + j) * E];
          double dot = 0;
          for (int64_t e = 0; e < E; ++e) dot += qi[e] * kj[e];
          s[j] = scale * dot;
          if (n.mod) s[j] = n.mod(s[j], b, h, i, j);
          if (n.mask && !n.mask(b, h, i, j)) s[j] = -std::numeric_limits<double>::infinity();
          mx = std::max(mx, s[j]);
        }
        const int64_t row = (b * Hq + h) * Lq + i;
        if (mx == -std::numeric_limits<double>::infinity()) {
          lse[row] = mx;
          continue;
        }
        double sum = 0;
        for (int64_t j = 0; j < Lkv; ++j) sum += std::exp(s[j] - mx);
        lse[row] = mx + std::log(sum);
        for (int64_t j = 0; j < Lkv; ++j) {
          const double pj = std::exp(s[j] - mx) / sum;
          const double* vj = &v[((kb * Hkv + kh) * Lkv + j) * Ev];
          for (int64_t e = 0; e < Ev; ++e) out[row * Ev + e] += pj * vj[e];
        }
      }
}

// The float64 reference path against native_attention: a tracing, folding or promotion bug in the
// reference would otherwise be shared by the golden and the path it judges.
void expect_reference_matches_native(const Run& golden, const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                                     const Native& n) {
  std::vector<double> out, lse;
  native_attention(q, k, v, scale, n, out, lse);
  const std::vector<double> got_out = golden.out.contiguous().to_vector(), got_lse = golden.lse.contiguous().to_vector();
  ASSERT_EQ(got_out.size(), out.size());
  ASSERT_EQ(got_lse.size(), lse.size());
  double worst = 0;
  for (size_t i = 0; i < out.size(); ++i) worst = std::max(worst, std::abs(got_out[i] - out[i]));
  for (size_t i = 0; i < lse.size(); ++i) {
    if (std::isinf(lse[i])) {
      EXPECT_EQ(got_lse[i], lse[i]) << "lse row " << i;
    } else {
      worst = std::max(worst, std::abs(got_lse[i] - lse[i]) / std::max(1.0, std::abs(lse[i])));
    }
  }
  EXPECT_LT(worst, 1e-10) << "the float64 reference path differs from the plain float64 golden";
}

// PyTorch's _check_equal over out, lse and the gradients; the float64 golden is itself checked against
// the plain native golden of `native` (which must describe o's score_mod and block_mask's mask_mod).
void check_rule(int64_t B, int64_t Hq, int64_t Lq, int64_t E, int64_t Bkv, int64_t Hkv, int64_t Lkv, int64_t Ev, DType dt,
                const FlexAttentionOptions& o, const Native& native,
                const std::function<Tensor(const Tensor&)>& layout = {}) {
  Generator gen(1234);
  Tensor q = randn({B, Hq, Lq, E}, kFloat64, &gen), k = randn({Bkv, Hkv, Lkv, E}, kFloat64, &gen);
  Tensor v = randn({Bkv, Hkv, Lkv, Ev}, kFloat64, &gen), dout = randn({B, Hq, Lq, Ev}, kFloat64, &gen);
  // The golden is computed from the inputs already rounded to dt, as PyTorch upcasts its inputs.
  Tensor qr = q.to(dt).to(kFloat64), kr = k.to(dt).to(kFloat64), vr = v.to(dt).to(kFloat64), dr = dout.to(dt).to(kFloat64);
  Run golden = run(qr, kr, vr, dr, kFloat64, FlexBackend::Reference, o, layout);  // a layout may change values
  auto laid = [&](const Tensor& t) { return layout ? layout(t) : t; };
  expect_reference_matches_native(golden, laid(qr), laid(kr), laid(vr), o.scale ? *o.scale : 1.0 / std::sqrt(double(E)),
                                  native);
  Run ref = run(q, k, v, dout, dt, FlexBackend::Reference, o, layout);
  Run impl = run(q, k, v, dout, dt, FlexBackend::Fused, o, layout);
  const double fudge = dt == kFloat32 || dt == kFloat64 ? 10.0 : 1.1;
  const char* names[] = {"out", "lse", "dq", "dk", "dv"};
  Tensor Run::*fields[] = {&Run::out, &Run::lse, &Run::dq, &Run::dk, &Run::dv};
  for (int i = 0; i < 5; ++i) {
    double e_ref = mean_abs_err(golden.*fields[i], ref.*fields[i]);
    double e_impl = mean_abs_err(golden.*fields[i], impl.*fields[i]);
    EXPECT_LE(e_impl, (1 + fudge) * e_ref + 1e-7)
        << names[i] << " " << dtype_name(dt) << ": fused error " << e_impl << " vs reference error " << e_ref;
  }
}

// ---- PyTorch's builtin score mods
ScoreMod identity_mod() { return [](Expr s, Expr, Expr, Expr, Expr) { return s; }; }
ScoreMod times_two() { return [](Expr s, Expr, Expr, Expr, Expr) { return s * 2; }; }
ScoreMod squared() { return [](Expr s, Expr, Expr, Expr, Expr) { return s * s; }; }
ScoreMod causal_mod() {
  return [](Expr s, Expr, Expr, Expr q, Expr kv) { return where(q >= kv, s, Expr(-std::numeric_limits<double>::infinity())); };
}
ScoreMod inverse_causal() {
  return [](Expr s, Expr, Expr, Expr q, Expr kv) { return where(q <= kv, s, Expr(-std::numeric_limits<double>::infinity())); };
}
ScoreMod rel_bias() { return [](Expr s, Expr, Expr, Expr q, Expr kv) { return s + (q - kv); }; }
ScoreMod rel_causal() {
  return [](Expr s, Expr, Expr, Expr q, Expr kv) {
    return where(q <= kv, s + (q - kv), Expr(-std::numeric_limits<double>::infinity()));
  };
}
ScoreMod alibi(int64_t H) {
  return [H](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + (kv - q) * exp2(-((h + 1) * 8.0 / H)); };
}
Expr causal_mask(Expr, Expr, Expr q, Expr kv) { return q >= kv; }

// The same rules in plain C++ (the independent golden's).
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
Native native_mod(std::function<double(double, int64_t, int64_t, int64_t, int64_t)> f) { return {std::move(f), {}}; }
double native_alibi(double s, int64_t h, int64_t q, int64_t kv, int64_t H) {
  return s + static_cast<double>(kv - q) * std::exp2(-((h + 1) * 8.0 / H));
}
bool native_causal(int64_t, int64_t, int64_t q, int64_t kv) { return q >= kv; }

struct NamedMod {
  const char* name;
  ScoreMod mod;
  Native native;
};
std::vector<NamedMod> builtin_mods() {
  using I = int64_t;
  return {{"identity", identity_mod(), {}},
          {"times_two", times_two(), native_mod([](double s, I, I, I, I) { return s * 2; })},
          {"squared", squared(), native_mod([](double s, I, I, I, I) { return s * s; })},
          {"causal", causal_mod(), native_mod([](double s, I, I, I q, I kv) { return q >= kv ? s : kNegInf; })},
          {"inverse_causal", inverse_causal(), native_mod([](double s, I, I, I q, I kv) { return q <= kv ? s : kNegInf; })},
          {"rel_bias", rel_bias(), native_mod([](double s, I, I, I q, I kv) { return s + double(q - kv); })},
          {"rel_causal", rel_causal(),
           native_mod([](double s, I, I, I q, I kv) { return q <= kv ? s + double(q - kv) : kNegInf; })},
          {"alibi", alibi(4), native_mod([](double s, I, I h, I q, I kv) { return native_alibi(s, h, q, kv, 4); })},
          // the two softcap forms the CPU float tiles run as one kernel pass (outer * tanh(s / c), s * c)
          {"softcap", [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); },
           native_mod([](double s, I, I, I, I) { return 20.0 * std::tanh(s / 20.0); })},
          {"softcap_tight", [](Expr s, Expr, Expr, Expr, Expr) { return tanh(s * 0.5) * 2.0; },
           native_mod([](double s, I, I, I, I) { return 2.0 * std::tanh(s * 0.5); })},
          // ALiBi's other form the CPU float tiles run as one pass (alibi above is the first): q - kv, the bias first
          {"distance_bias", [](Expr s, Expr, Expr h, Expr q, Expr kv) { return (q - kv) * (0.125 * (h + 1)) + s; },
           native_mod([](double s, I, I h, I q, I kv) { return s + double(q - kv) * (0.125 * double(h + 1)); })}};
}

class BuiltinScoreMods : public ::testing::TestWithParam<DType> {};

TEST_P(BuiltinScoreMods, ForwardAndBackwardFollowTheRule) {
  for (const auto& m : builtin_mods()) {
    SCOPED_TRACE(m.name);
    FlexAttentionOptions o;
    o.score_mod = m.mod;
    check_rule(2, 4, 96, 16, 2, 4, 96, 16, GetParam(), o, m.native);
  }
}
INSTANTIATE_TEST_SUITE_P(Dtypes, BuiltinScoreMods, ::testing::Values(kFloat32, kBFloat16, kFloat16, kFloat64),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(FlexAttention, DifferentQueryAndKeyLengths) {
  FlexAttentionOptions o;
  o.score_mod = rel_bias();
  const Native n = builtin_mods()[5].native;  // rel_bias
  check_rule(1, 2, 70, 16, 1, 2, 200, 16, kFloat32, o, n);
  check_rule(1, 2, 200, 16, 1, 2, 70, 16, kFloat32, o, n);
}

TEST(FlexAttention, BlockSizes) {
  for (BlockSize bs : {BlockSize(128), BlockSize(256), BlockSize(128, 256), BlockSize(256, 128)}) {
    FlexAttentionOptions o;
    o.block_mask = create_block_mask(causal_mask, 1, 1, 384, 384, bs);
    check_rule(1, 2, 384, 16, 1, 2, 384, 16, kFloat32, o, Native{{}, native_causal});
  }
}

TEST(FlexAttention, SequenceShorterThanTheBlock) {
  for (int64_t block : {128, 256}) {
    FlexAttentionOptions o;
    o.block_mask = create_block_mask(causal_mask, std::nullopt, std::nullopt, 64, 64, block);
    o.score_mod = alibi(2);
    const Native n{[](double s, int64_t, int64_t h, int64_t q, int64_t kv) { return native_alibi(s, h, q, kv, 2); },
                   native_causal};
    check_rule(2, 2, 64, 16, 2, 2, 64, 16, kFloat32, o, n);
  }
}

TEST(FlexAttention, KvBatchBroadcast) {
  for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{4, 2}, {4, 1}}) {
    for (int64_t bq : {3, 4, 5}) {
      FlexAttentionOptions o;
      o.enable_gqa = true;
      o.score_mod = squared();
      check_rule(bq, hq, 64, 16, 1, hkv, 64, 16, kFloat32, o, builtin_mods()[2].native);  // squared
    }
  }
}

TEST(FlexAttention, GroupedQueryAttention) {
  FlexAttentionOptions o;
  o.enable_gqa = true;
  o.block_mask = create_block_mask(causal_mask, 1, 1, 32, 256, 64);
  check_rule(2, 8, 32, 16, 2, 2, 256, 16, kFloat32, o, Native{{}, native_causal});
}

TEST(FlexAttention, StridedLayoutsOfPyTorchsTests) {
  // The five layouts of test_strided_inputs: a storage offset of 997, dims transposed in memory, heads and
  // sequence swapped, padded rows (a narrow of a wider buffer) and a shared (expanded) batch dim.
  std::vector<std::pair<const char*, std::function<Tensor(const Tensor&)>>> layouts = {
      {"offset997", [](const Tensor& t) {
         Tensor buf = zeros({t.numel() + 997}, t.dtype());
         Tensor v = buf.narrow(0, 997, t.numel()).view(t.sizes());
         v.copy_(t);
         return v;
       }},
      {"transposed", [](const Tensor& t) { return t.transpose(1, 2).contiguous().transpose(1, 2); }},
      {"heads_seq_swapped", [](const Tensor& t) { return t.permute({0, 2, 1, 3}).contiguous().permute({0, 2, 1, 3}); }},
      {"padded", [](const Tensor& t) {
         Tensor buf = zeros({t.size(0), t.size(1), t.size(2), t.size(3) + 8}, t.dtype());
         Tensor v = buf.narrow(3, 0, t.size(3));
         v.copy_(t);
         return v;
       }},
      {"shared_batch", [](const Tensor& t) { return t.narrow(0, 0, 1).expand(t.sizes()); }},
  };
  for (const auto& [name, layout] : layouts) {
    SCOPED_TRACE(name);
    FlexAttentionOptions o;
    o.score_mod = rel_causal();
    check_rule(2, 2, 80, 16, 2, 2, 80, 16, kFloat32, o, builtin_mods()[6].native, layout);  // rel_causal
  }
}

TEST(FlexAttention, OneDefinitionServesThreeShapes) {
  FlexAttentionOptions o;
  o.score_mod = alibi(4);
  uint64_t h = trace_score_mod(o.score_mod).hash();
  for (int64_t L : {32, 100, 257}) {
    check_rule(1, 4, L, 16, 1, 4, L, 16, kFloat32, o, builtin_mods()[7].native);  // alibi(4)
    EXPECT_EQ(trace_score_mod(o.score_mod).hash(), h);
  }
}

TEST(FlexAttention, CapturedHeadOffsetsAndLearnableTableGetGradients) {
  const int64_t H = 4, S = 48;
  Generator gen(7);
  Tensor table = (randn({H, 2 * S - 1}, kFloat64, &gen) * 0.5).requires_grad_();
  Tensor hoff = rand({H}, kFloat64, &gen).requires_grad_();
  FlexAttentionOptions o;
  o.score_mod = [table = Captured(table), hoff = Captured(hoff), S](Expr s, Expr, Expr h, Expr q, Expr kv) {
    return s * hoff[h] + table[h][q - kv + (S - 1)];
  };
  o.block_mask = create_block_mask(causal_mask, std::nullopt, std::nullopt, S, S, 16);
  Tensor q = randn({2, H, S, 8}, kFloat64, &gen).requires_grad_(), k = randn({2, H, S, 8}, kFloat64, &gen).requires_grad_();
  Tensor v = randn({2, H, S, 8}, kFloat64, &gen).requires_grad_();
  auto r = flex_attention(q, k, v, o);
  square(r.out).sum().backward();
  Tensor gt = table.grad().clone(), gh = hoff.grad().clone();
  table.mutable_grad() = Tensor();
  hoff.mutable_grad() = Tensor();
  o.kernel.backend = FlexBackend::Reference;
  square(flex_attention(q, k, v, o).out).sum().backward();
  EXPECT_TRUE(testing::close(gt, table.grad(), 1e-10, 1e-9));
  EXPECT_TRUE(testing::close(gh, hoff.grad(), 1e-10, 1e-9));
  EXPECT_GT(amax(abs(gt)).item(), 0.0);
}

TEST(FlexAttention, DocumentMaskFromCapturedIds) {
  std::vector<int64_t> ids(150);
  for (int64_t i = 0; i < 150; ++i) ids[i] = i < 40 ? 0 : i < 100 ? 1 : 2;
  Captured doc(from_vector(ids, {150}, kInt64));
  FlexAttentionOptions o;
  o.block_mask = create_block_mask([doc](Expr, Expr, Expr q, Expr kv) { return (Expr(doc[q]) == Expr(doc[kv])) & (q >= kv); },
                                   std::nullopt, std::nullopt, 150, 150, 32);
  const Native n{{}, [&ids](int64_t, int64_t, int64_t q, int64_t kv) { return ids[q] == ids[kv] && q >= kv; }};
  check_rule(1, 2, 150, 16, 1, 2, 150, 16, kFloat32, o, n);
  check_rule(1, 2, 150, 16, 1, 2, 150, 16, kBFloat16, o, n);
}

TEST(FlexAttention, FullyMaskedRowsGiveZeroOutputMinusInfLseAndZeroGradients) {
  FlexAttentionOptions o;
  o.return_lse = true;
  o.block_mask = create_block_mask([](Expr, Expr, Expr q, Expr kv) { return (q >= 10) & (kv <= q); }, std::nullopt,
                                   std::nullopt, 64, 64, 32);
  Tensor q = randn({1, 1, 64, 8}).requires_grad_(), k = randn({1, 1, 64, 8}).requires_grad_(), v = randn({1, 1, 64, 8}).requires_grad_();
  auto r = flex_attention(q, k, v, o);
  r.out.sum().backward();
  EXPECT_EQ(amax(abs(r.out.narrow(2, 0, 10))).item(), 0.0);
  EXPECT_TRUE(all(isinf(r.lse.narrow(2, 0, 10))).item<bool>());
  EXPECT_EQ(amax(abs(q.grad().narrow(2, 0, 10))).item(), 0.0);
  EXPECT_FALSE(any(isnan(q.grad())).item<bool>());
  check_rule(1, 2, 64, 8, 1, 2, 64, 8, kFloat32, o, Native{{}, [](int64_t, int64_t, int64_t q, int64_t kv) {
               return q >= 10 && kv <= q;
             }});
}

TEST(FlexAttention, LseAndMaxScoresMatchTheirDefinitions) {
  Tensor q = randn({1, 2, 40, 8}, kFloat64), k = randn({1, 2, 40, 8}, kFloat64), v = randn({1, 2, 40, 8}, kFloat64);
  FlexAttentionOptions o;
  o.return_lse = o.return_max_scores = true;
  o.score_mod = times_two();
  auto r = flex_attention(q, k, v, o);
  Tensor s = matmul(q, k.transpose(-2, -1)) * (2.0 / std::sqrt(8.0));
  EXPECT_TRUE(testing::close(r.lse, logsumexp(s, {-1}), 1e-12));
  EXPECT_TRUE(testing::close(r.max_scores, amax(s, {-1}), 1e-12));
  EXPECT_TRUE(testing::close(r.out, matmul(softmax(s, -1), v), 1e-12));
}

TEST(FlexAttention, GradcheckOfTheFusedKernelInFloat64) {
  Generator gen(3);
  Tensor q = randn({1, 2, 12, 4}, kFloat64, &gen).requires_grad_(), k = randn({1, 1, 10, 4}, kFloat64, &gen).requires_grad_();
  Tensor v = randn({1, 1, 10, 3}, kFloat64, &gen).requires_grad_(), bias = randn({2}, kFloat64, &gen).requires_grad_();
  FlexAttentionOptions o;
  o.enable_gqa = true;
  o.kernel.backend = FlexBackend::Fused;
  o.score_mod = [b = Captured(bias)](Expr s, Expr, Expr h, Expr q, Expr kv) { return 20.0 * tanh(s / 20.0) + b[h] * (q - kv); };
  o.block_mask = create_block_mask([](Expr, Expr, Expr q, Expr kv) { return kv <= q + 2; }, std::nullopt, std::nullopt, 12, 10, 4);
  auto result = gradcheck([&](const TensorList& in) { return TensorList{flex_attention(in[0], in[1], in[2], o).out}; },
                          {q, k, v, bias});
  EXPECT_TRUE(result.ok) << result.report();
}

TEST(FlexAttention, ErrorsNameTheArgumentAndShapes) {
  Tensor q = randn({1, 4, 16, 8}), k = randn({1, 2, 16, 8}), v = randn({1, 2, 16, 8});
  EXPECT_THROW_MSG(flex_attention(q.view({4, 16, 8}), k, v), ShapeError, "4-D", "[4, 16, 8]");
  EXPECT_THROW_MSG(flex_attention(q, k, v), ShapeError, "Hq=4", "Hkv=2", "enable_gqa");
  FlexAttentionOptions gqa;
  gqa.enable_gqa = true;
  EXPECT_THROW_MSG(flex_attention(randn({1, 3, 16, 8}), k, v, gqa), ShapeError, "multiple", "Hq=3");
  EXPECT_THROW_MSG(flex_attention(q, randn({1, 2, 16, 4}), v, gqa), ShapeError, "head dim", "[1, 2, 16, 4]");
  EXPECT_THROW_MSG(flex_attention(q, k.to(kFloat64), v, gqa), DTypeError, "same dtype", "float64");
  EXPECT_THROW_MSG(flex_attention(randn({3, 4, 16, 8}), randn({2, 2, 16, 8}), randn({2, 2, 16, 8}), gqa), ShapeError, "batch");
  FlexAttentionOptions wrong_mask = gqa;
  wrong_mask.block_mask = create_block_mask(causal_mask, std::nullopt, std::nullopt, 32, 32, 16);
  EXPECT_THROW_MSG(flex_attention(q, k, v, wrong_mask), ShapeError, "(32, 32)", "Q_LEN=16");
  FlexAttentionOptions bad_mod = gqa;
  bad_mod.score_mod = [](Expr s, Expr, Expr, Expr q, Expr kv) { return q >= kv; };  // returns bool
  EXPECT_THROW(flex_attention(q, k, v, bad_mod), ValueError);
}

// No heads (or no batch, or no queries): empty results and empty / zero gradients on both paths, as
// PyTorch; H = 0 used to divide by zero (SIGFPE) computing the GQA group.
TEST(FlexAttention, NoHeadsNoBatchNoQueriesGiveEmptyResults) {
  for (FlexBackend backend : {FlexBackend::Fused, FlexBackend::Reference}) {
    for (Shape qs : {Shape{1, 0, 8, 4}, Shape{0, 2, 8, 4}, Shape{1, 2, 0, 4}}) {
      SCOPED_TRACE(::testing::Message() << (backend == FlexBackend::Fused ? "fused " : "reference ") << shape_str(qs));
      Shape ks{qs[0], qs[1], 8, 4};
      Tensor q = randn(qs).requires_grad_(), k = randn(ks).requires_grad_(), v = randn(ks).requires_grad_();
      Tensor bias = zeros({8}).requires_grad_();
      FlexAttentionOptions o;
      o.return_lse = true;
      o.kernel.backend = backend;
      o.score_mod = [b = Captured(bias)](Expr s, Expr, Expr, Expr, Expr kv) { return s + b[kv]; };
      if (qs[2] > 0) o.block_mask = create_block_mask(causal_mask, std::nullopt, std::nullopt, 8, 8, 4);
      auto r = flex_attention(q, k, v, o);
      EXPECT_EQ(r.out.sizes(), qs);
      EXPECT_EQ(r.lse.sizes(), (Shape{qs[0], qs[1], qs[2]}));
      r.out.sum().backward();
      EXPECT_EQ(q.grad().sizes(), qs);
      ASSERT_TRUE(k.grad().defined());
      EXPECT_EQ(k.grad().sizes(), ks);
      EXPECT_EQ(v.grad().sizes(), ks);
      if (k.numel() > 0) {
        EXPECT_EQ(amax(abs(k.grad())).item(), 0.0);
        EXPECT_EQ(amax(abs(v.grad())).item(), 0.0);
      }
      ASSERT_TRUE(bias.grad().defined());
      EXPECT_EQ(bias.grad().sizes(), Shape{8});
      EXPECT_EQ(amax(abs(bias.grad())).item(), 0.0);
    }
  }
  // GQA with no query heads: a group of 0 heads per kv head.
  FlexAttentionOptions gqa;
  gqa.enable_gqa = true;
  EXPECT_EQ(flex_attention(randn({1, 0, 8, 4}), randn({1, 2, 8, 4}), randn({1, 2, 8, 4}), gqa).out.sizes(),
            (Shape{1, 0, 8, 4}));
}

TEST(FlexAttention, DefaultConstructedBlockMaskIsRejected) {
  FlexAttentionOptions o;
  o.block_mask = BlockMask();
  Tensor q = randn({1, 1, 8, 4});
  EXPECT_THROW_MSG(flex_attention(q, q, q, o), ValueError, "block_mask", "default-constructed");
}

// The fused backward recomputes from q, k, v and the captured tensors: an in-place change between forward
// and backward must raise (as SavedTensor) before any kernel runs, never give a silently wrong gradient.
TEST(FlexAttention, InPlaceChangeOfQKVBeforeBackwardRaises) {
  for (const char* which : {"q", "k", "v"}) {
    SCOPED_TRACE(which);
    Generator gen(11);
    Tensor q = randn({1, 2, 40, 8}, kFloat32, &gen).requires_grad_(), k = randn({1, 2, 40, 8}, kFloat32, &gen).requires_grad_();
    Tensor v = randn({1, 2, 40, 8}, kFloat32, &gen).requires_grad_();
    FlexAttentionOptions o;
    o.kernel.backend = FlexBackend::Fused;
    Tensor loss = flex_attention(q, k, v, o).out.sum();
    {
      NoGradGuard g;
      Tensor& t = which[0] == 'q' ? q : which[0] == 'k' ? k : v;
      t.mul_(0.0);
    }
    const std::string named = std::string("flex_attention backward: ") + which + ",";
    EXPECT_THROW_MSG(loss.backward(), AutogradError, named, std::string("modified by an inplace operation"),
                     std::string("is at version 1; expected version 0"));
    EXPECT_FALSE(q.grad().defined());
  }
}

TEST(FlexAttention, InPlaceChangeOfACapturedTensorBeforeBackwardRaises) {
  Generator gen(12);
  Tensor q = randn({1, 2, 40, 8}, kFloat32, &gen).requires_grad_(), k = randn({1, 2, 40, 8}, kFloat32, &gen).requires_grad_();
  Tensor v = randn({1, 2, 40, 8}, kFloat32, &gen).requires_grad_();
  // A learnable bias stepped in place (as an optimizer would) between forward and backward.
  Tensor bias = randn({2}, kFloat32, &gen).requires_grad_();
  FlexAttentionOptions o;
  o.kernel.backend = FlexBackend::Fused;
  o.score_mod = [b = Captured(bias, "bias")](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + b[h] * (q - kv); };
  Tensor loss = flex_attention(q, k, v, o).out.sum();
  {
    NoGradGuard g;
    bias.add_(1.0);
  }
  EXPECT_THROW_MSG(loss.backward(), AutogradError, "the score_mod capture 'bias'", "modified by an inplace operation");
  EXPECT_FALSE(bias.grad().defined());

  // A captured tensor of the mask_mod (document ids): the BlockMask and the partial blocks depend on it.
  std::vector<int64_t> ids(40);
  for (int64_t i = 0; i < 40; ++i) ids[i] = i / 15;
  Tensor doc_ids = from_vector(ids, {40}, kInt64);
  Captured doc(doc_ids, "doc");
  FlexAttentionOptions m;
  m.kernel.backend = FlexBackend::Fused;
  m.block_mask = create_block_mask([doc](Expr, Expr, Expr q, Expr kv) { return Expr(doc[q]) == Expr(doc[kv]); },
                                   std::nullopt, std::nullopt, 40, 40, 16);
  Tensor loss2 = flex_attention(q, k, v, m).out.sum();
  doc_ids.fill_(0);
  EXPECT_THROW_MSG(loss2.backward(), AutogradError, "the mask_mod capture 'doc'", "modified by an inplace operation");
}

TEST(FlexAttention, UnchangedInputsBackwardAfterAnUnrelatedInPlaceOp) {
  // A version check must not fire on tensors the call does not read.
  Generator gen(13);
  Tensor q = randn({1, 1, 20, 8}, kFloat64, &gen).requires_grad_(), k = randn({1, 1, 20, 8}, kFloat64, &gen).requires_grad_();
  Tensor v = randn({1, 1, 20, 8}, kFloat64, &gen).requires_grad_();
  Tensor other = q.detach().clone();
  FlexAttentionOptions o;
  o.kernel.backend = FlexBackend::Fused;
  Tensor loss = flex_attention(q, k, v, o).out.sum();
  other.mul_(0.0);
  loss.backward();
  EXPECT_GT(amax(abs(k.grad())).item(), 0.0);
}

}  // namespace
}  // namespace fg
