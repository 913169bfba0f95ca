// The flex_attention test families on every device: CPU always, CUDA when a GPU is present (skipped with a
// visible message otherwise), forward and backward, every float dtype, through the default backend (Auto: the
// device's fused kernel).
//
// The golden is written here and shares nothing with flexgrad's tracing, reference path or kernels: plain
// float64 loops computing out = softmax(mod(scale * q.k)) v over the allowed entries, lse, max_scores, and the
// hand-written backward (dq, dk, dv and the gradients of learnable captured tensors), from the inputs rounded
// to the tested dtype. Errors are max |got - golden| relative to max |golden|, with a tolerance per dtype.
#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <utility>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/mask_mods.h"
#include "flexgrad/tensor/random.h"
#include "tests/test_util.h"

namespace fg {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
const DType kDtypes[] = {kFloat32, kBFloat16, kFloat16, kFloat64};

// ---- The golden: plain loops in double -------------------------------------------------------------------

using ScoreFn = std::function<double(double s, int64_t b, int64_t h, int64_t q, int64_t kv)>;
// Adds g * d mod / d cap into the gradient buffers of the learnable captures.
using CapGradFn = std::function<void(double s, int64_t b, int64_t h, int64_t q, int64_t kv, double g,
                                     std::vector<std::vector<double>>& dcaps)>;

// A score_mod (and mask) in plain C++, the golden's view of what the Expr version computes.
struct PlainMod {
  ScoreFn f = [](double s, int64_t, int64_t, int64_t, int64_t) { return s; };
  ScoreFn dfds = [](double, int64_t, int64_t, int64_t, int64_t) { return 1.0; };
  CapGradFn dcap;                                                  // null: no learnable capture
  std::function<bool(int64_t b, int64_t h, int64_t q, int64_t kv)> allowed;  // null: every entry
};

struct Dims {
  int64_t B, Hq, Lq, E, Bkv, Hkv, Lkv, Ev;
};

struct Golden {
  std::vector<double> out, lse, max_scores, dq, dk, dv;
  std::vector<std::vector<double>> dcaps;
};

// Loss = sum(out * dout) + sum(lse * dlse): dout and dlse are the gradients flowing into out and lse.
Golden golden(const Dims& d, double scale, const std::vector<double>& q, const std::vector<double>& k,
              const std::vector<double>& v, const std::vector<double>& dout, const std::vector<double>& dlse,
              const PlainMod& m, const std::vector<int64_t>& cap_sizes) {
  Golden g;
  g.out.assign(d.B * d.Hq * d.Lq * d.Ev, 0.0);
  g.lse.assign(d.B * d.Hq * d.Lq, -kInf);
  g.max_scores.assign(d.B * d.Hq * d.Lq, -kInf);
  g.dq.assign(q.size(), 0.0);
  g.dk.assign(k.size(), 0.0);
  g.dv.assign(v.size(), 0.0);
  for (int64_t n : cap_sizes) g.dcaps.emplace_back(n, 0.0);
  const int64_t G = d.Hq / d.Hkv;
  std::vector<double> s(d.Lkv), mod(d.Lkv), p(d.Lkv), dp(d.Lkv);
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t h = 0; h < d.Hq; ++h) {
      const int64_t bk = d.Bkv == 1 ? 0 : b, hk = h / G;
      for (int64_t i = 0; i < d.Lq; ++i) {
        const int64_t row = (b * d.Hq + h) * d.Lq + i;
        const double* qi = q.data() + row * d.E;
        auto krow = [&](int64_t j) { return ((bk * d.Hkv + hk) * d.Lkv + j); };
        double mx = -kInf;
        for (int64_t j = 0; j < d.Lkv; ++j) {
          double dot = 0;
          for (int64_t e = 0; e < d.E; ++e) dot += qi[e] * k[krow(j) * d.E + e];
          s[j] = scale * dot;
          mod[j] = !m.allowed || m.allowed(b, h, i, j) ? m.f(s[j], b, h, i, j) : -kInf;
          mx = std::max(mx, mod[j]);
        }
        if (mx == -kInf) continue;  // empty row: out 0, lse and max -inf, no gradient
        double l = 0;
        for (int64_t j = 0; j < d.Lkv; ++j) l += std::exp(mod[j] - mx);
        const double lse = mx + std::log(l);
        g.lse[row] = lse;
        g.max_scores[row] = mx;
        for (int64_t j = 0; j < d.Lkv; ++j) {
          p[j] = std::exp(mod[j] - lse);
          for (int64_t e = 0; e < d.Ev; ++e) g.out[row * d.Ev + e] += p[j] * v[krow(j) * d.Ev + e];
        }
        // Backward: dp = dout . v, dm = p (dp - sum p dp + dlse), ds = dm * mod'(s).
        double delta = 0;
        for (int64_t j = 0; j < d.Lkv; ++j) {
          dp[j] = 0;
          for (int64_t e = 0; e < d.Ev; ++e) {
            dp[j] += dout[row * d.Ev + e] * v[krow(j) * d.Ev + e];
            g.dv[krow(j) * d.Ev + e] += p[j] * dout[row * d.Ev + e];
          }
          delta += p[j] * dp[j];
        }
        const double dl = dlse.empty() ? 0.0 : dlse[row];
        for (int64_t j = 0; j < d.Lkv; ++j) {
          if (mod[j] == -kInf) continue;
          const double dm = p[j] * (dp[j] - delta + dl);
          const double ds = dm * m.dfds(s[j], b, h, i, j);
          for (int64_t e = 0; e < d.E; ++e) {
            g.dq[row * d.E + e] += scale * ds * k[krow(j) * d.E + e];
            g.dk[krow(j) * d.E + e] += scale * ds * qi[e];
          }
          if (m.dcap) m.dcap(s[j], b, h, i, j, dm, g.dcaps);
        }
      }
    }
  }
  return g;
}

// ---- Running flexgrad on a device and comparing ----------------------------------------------------------

// Outputs and gradients in dtype dt: P and dS go through dt on tensor cores.
double tolerance(DType dt) {
  switch (dt) {
    case kFloat64: return 1e-9;
    case kFloat32: return 1e-4;
    case kFloat16: return 1e-2;
    default: return 5e-2;  // bfloat16: 8 mantissa bits
  }
}
// lse and max_scores: float32 statistics of float32 scores (approximate exp/tanh allowed in bf16/f16 kernels).
double stat_tolerance(DType dt) { return dt == kFloat64 ? 1e-9 : dt == kFloat32 ? 1e-4 : 2e-3; }

// max |got - want| / max |want| over finite entries; -inf entries must agree, no NaN.
::testing::AssertionResult matches(const char* what, const Tensor& got_t, const std::vector<double>& want, double tol) {
  if (!got_t.defined()) return ::testing::AssertionFailure() << what << ": not produced";
  std::vector<double> got = got_t.cpu().to(kFloat64).to_vector();
  if (got.size() != want.size()) {
    return ::testing::AssertionFailure() << what << ": " << got.size() << " elements, golden has " << want.size();
  }
  double err = 0, mag = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isnan(got[i])) return ::testing::AssertionFailure() << what << ": NaN at " << i;
    if (std::isinf(want[i]) || std::isinf(got[i])) {
      if (got[i] != want[i]) return ::testing::AssertionFailure() << what << ": " << got[i] << " at " << i << ", golden " << want[i];
      continue;
    }
    err = std::max(err, std::abs(got[i] - want[i]));
    mag = std::max(mag, std::abs(want[i]));
  }
  const double rel = err / std::max(mag, 1e-6);
  if (rel > tol) {
    return ::testing::AssertionFailure() << what << ": max error " << err << " = " << rel << " of max |golden| " << mag
                                         << " > " << tol;
  }
  return ::testing::AssertionSuccess();
}

struct Case {
  Dims d;
  FlexAttentionOptions o;                         // score_mod, block_mask, enable_gqa, scale
  PlainMod m;                                     // the same mods, for the golden
  std::function<Tensor(const Tensor&)> layout;    // applied to q, k, v (and dout) on the device
  std::vector<Tensor> learnable;                  // captured tensors requiring grad; m.dcap fills them in order
};

struct Outputs {
  FlexAttentionResult r;
  Tensor dq, dk, dv;
};

// Runs the case in dtype `dt` on `dev` and checks out, lse, max_scores and every gradient against the golden.
Outputs check_case(const Case& c, DType dt, Device dev, uint64_t seed = 1234) {
  const Dims& d = c.d;
  Generator gen(seed);
  auto input = [&](Shape s) { return randn(s, kFloat64, &gen).to(dt).to(kFloat64); };  // rounded to dt
  Tensor q64 = input({d.B, d.Hq, d.Lq, d.E}), k64 = input({d.Bkv, d.Hkv, d.Lkv, d.E});
  Tensor v64 = input({d.Bkv, d.Hkv, d.Lkv, d.Ev}), do64 = input({d.B, d.Hq, d.Lq, d.Ev});
  Tensor dlse64 = randn({d.B, d.Hq, d.Lq}, kFloat64, &gen).to(kFloat32).to(kFloat64);
  auto place = [&](const Tensor& t) {
    Tensor x = t.to(dt).to(dev);
    return c.layout ? c.layout(x) : x;
  };
  Tensor q = place(q64).detach().requires_grad_(), k = place(k64).detach().requires_grad_();
  Tensor v = place(v64).detach().requires_grad_();
  for (const Tensor& t : c.learnable) t.mutable_grad() = Tensor();
  FlexAttentionOptions o = c.o;
  o.return_lse = o.return_max_scores = true;
  Outputs res;
  res.r = flex_attention(q, k, v, o);
  const DType stat = dt == kFloat64 ? kFloat64 : kFloat32;
  EXPECT_EQ(res.r.out.dtype(), dt);
  EXPECT_EQ(res.r.out.device(), dev);
  EXPECT_EQ(res.r.lse.dtype(), stat);
  EXPECT_EQ(res.r.max_scores.dtype(), stat);
  Tensor loss = (res.r.out.to(kFloat64) * place(do64).to(kFloat64)).sum() + (res.r.lse.to(kFloat64) * dlse64.to(dev)).sum();
  loss.backward();
  res.dq = q.grad();
  res.dk = k.grad();
  res.dv = v.grad();

  const double scale = c.o.scale ? *c.o.scale : 1.0 / std::sqrt(static_cast<double>(d.E));
  std::vector<int64_t> cap_sizes;
  for (const Tensor& t : c.learnable) cap_sizes.push_back(t.numel());
  // The golden reads the values the call saw: a layout may change them (shared_batch repeats batch 0).
  auto values = [](const Tensor& t) { return t.detach().cpu().to(kFloat64).to_vector(); };
  Golden g = golden(d, scale, values(q), values(k), values(v), values(place(do64)), dlse64.to_vector(), c.m, cap_sizes);
  const double tol = tolerance(dt), stat_tol = stat_tolerance(dt);
  EXPECT_TRUE(matches("out", res.r.out, g.out, tol));
  EXPECT_TRUE(matches("lse", res.r.lse, g.lse, stat_tol));
  EXPECT_TRUE(matches("max_scores", res.r.max_scores, g.max_scores, stat_tol));
  EXPECT_TRUE(matches("dq", res.dq, g.dq, tol));
  EXPECT_TRUE(matches("dk", res.dk, g.dk, tol));
  EXPECT_TRUE(matches("dv", res.dv, g.dv, tol));
  for (size_t i = 0; i < c.learnable.size(); ++i) {
    EXPECT_TRUE(matches(("d capture " + std::to_string(i)).c_str(), c.learnable[i].grad(), g.dcaps[i], tol));
  }
  return res;
}

// ---- Mods: the Expr version flexgrad traces, and the plain version the golden runs ------------------------

struct NamedMod {
  const char* name;
  ScoreMod mod;
  PlainMod plain;
};

NamedMod identity_mod() { return {"identity", [](Expr s, Expr, Expr, Expr, Expr) { return s; }, {}}; }
NamedMod times_two() {
  PlainMod p;
  p.f = [](double s, int64_t, int64_t, int64_t, int64_t) { return 2 * s; };
  p.dfds = [](double, int64_t, int64_t, int64_t, int64_t) { return 2.0; };
  return {"times_two", [](Expr s, Expr, Expr, Expr, Expr) { return s * 2; }, p};
}
NamedMod squared() {
  PlainMod p;
  p.f = [](double s, int64_t, int64_t, int64_t, int64_t) { return s * s; };
  p.dfds = [](double s, int64_t, int64_t, int64_t, int64_t) { return 2 * s; };
  return {"squared", [](Expr s, Expr, Expr, Expr, Expr) { return s * s; }, p};
}
NamedMod softcap(double cap) {
  PlainMod p;
  p.f = [cap](double s, int64_t, int64_t, int64_t, int64_t) { return cap * std::tanh(s / cap); };
  p.dfds = [cap](double s, int64_t, int64_t, int64_t, int64_t) {
    const double t = std::tanh(s / cap);
    return 1 - t * t;
  };
  return {"softcap", [cap](Expr s, Expr, Expr, Expr, Expr) { return cap * tanh(s / cap); }, p};
}
NamedMod rel_bias() {
  PlainMod p;
  p.f = [](double s, int64_t, int64_t, int64_t q, int64_t kv) { return s + static_cast<double>(q - kv); };
  return {"rel_bias", [](Expr s, Expr, Expr, Expr q, Expr kv) { return s + (q - kv); }, p};
}
// ALiBi with the slopes as a captured float32 tensor on the device (not learnable).
NamedMod alibi(int64_t H, Device dev) {
  std::vector<double> slopes(H);
  for (int64_t h = 0; h < H; ++h) slopes[h] = std::exp2(-8.0 * static_cast<double>(h + 1) / static_cast<double>(H));
  Tensor st = from_vector(slopes, {H}, kFloat32).to(dev);
  std::vector<double> sv = st.cpu().to(kFloat64).to_vector();  // the float32 values the kernel reads
  PlainMod p;
  p.f = [sv](double s, int64_t, int64_t h, int64_t q, int64_t kv) { return s + static_cast<double>(kv - q) * sv[h]; };
  return {"alibi", [c = Captured(st, "slopes")](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + (kv - q) * c[h]; }, p};
}

bool causal(int64_t, int64_t, int64_t q, int64_t kv) { return q >= kv; }
Expr causal_mask(Expr, Expr, Expr q, Expr kv) { return q >= kv; }

// A BlockMask for `dev`, built there; mask_for(d) gives the mask_mod over captures living on device d.
BlockMask mask_on(Device dev, const std::function<MaskMod(Device)>& mask_for, int64_t B, int64_t H, int64_t Lq,
                  int64_t Lkv, BlockSize bs) {
  return create_block_mask(mask_for(dev), B, H, Lq, Lkv, bs, dev);
}
BlockMask causal_on(Device dev, int64_t Lq, int64_t Lkv, BlockSize bs = 128) {
  return mask_on(dev, [](Device) { return MaskMod(causal_mask); }, 1, 1, Lq, Lkv, bs);
}

// ---- The suite ---------------------------------------------------------------------------------------------

class FlexDevices : public ::testing::TestWithParam<DeviceType> {
 protected:
  void SetUp() override {
    if (device_count(GetParam()) == 0) {
      GTEST_SKIP() << "no " << (GetParam() == DeviceType::CUDA ? "CUDA" : "CPU")
                   << " device present: skipping this device's flex_attention tests";
    }
  }
  Device dev() const { return Device(GetParam(), 0); }
};

TEST_P(FlexDevices, ScoreModsTimesDtypes) {
  for (const NamedMod& nm : {identity_mod(), alibi(4, dev()), softcap(2.0), rel_bias(), times_two(), squared()}) {
    for (DType dt : kDtypes) {
      SCOPED_TRACE(std::string(nm.name) + " " + dtype_name(dt));
      Case c{{2, 4, 100, 32, 2, 4, 100, 32}, {}, nm.plain, {}, {}};
      c.o.score_mod = nm.mod;
      check_case(c, dt, dev());
    }
  }
}

TEST_P(FlexDevices, ShapesLqNeLkvOddLengthsHeadDims) {
  // (B, Hq, Lq, E, Bkv, Hkv, Lkv, Ev): lengths off the 128 grid, Lq != Lkv both ways, E from 16 to 256, Ev != E.
  const Dims shapes[] = {{1, 2, 70, 16, 1, 2, 200, 16},   {1, 2, 200, 64, 1, 2, 70, 32},  {1, 2, 130, 128, 1, 2, 257, 128},
                         {1, 1, 64, 256, 1, 1, 96, 256}, {2, 2, 150, 80, 2, 2, 150, 80}, {1, 2, 129, 256, 1, 2, 129, 64},
                         {1, 2, 65, 16, 1, 2, 65, 128}};
  for (const Dims& d : shapes) {
    for (bool masked : {false, true}) {
      for (DType dt : kDtypes) {
        SCOPED_TRACE(fmt::format("Lq {} Lkv {} E {} Ev {} causal {} {}", d.Lq, d.Lkv, d.E, d.Ev, masked, dtype_name(dt)));
        NamedMod nm = rel_bias();
        Case c{d, {}, nm.plain, {}, {}};
        c.o.score_mod = nm.mod;
        if (masked) {
          c.o.block_mask = causal_on(dev(), d.Lq, d.Lkv);
          c.m.allowed = causal;
        }
        check_case(c, dt, dev());
      }
    }
  }
}

TEST_P(FlexDevices, BlockSizesOfTheMask) {
  for (BlockSize bs : {BlockSize(64), BlockSize(128), BlockSize(128, 64), BlockSize(64, 128), BlockSize(256)}) {
    for (DType dt : {kFloat32, kBFloat16}) {
      SCOPED_TRACE(fmt::format("block ({}, {}) {}", bs.q, bs.kv, dtype_name(dt)));
      Case c{{1, 2, 300, 64, 1, 2, 300, 64}, {}, {}, {}, {}};
      c.o.block_mask = causal_on(dev(), 300, 300, bs);
      c.m.allowed = causal;
      check_case(c, dt, dev());
    }
  }
}

TEST_P(FlexDevices, GroupedQueryAttentionAndKvBatchBroadcast) {
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    NamedMod nm = alibi(8, dev());
    Case gqa{{2, 8, 96, 32, 2, 2, 160, 32}, {}, nm.plain, {}, {}};
    gqa.o.enable_gqa = true;
    gqa.o.score_mod = nm.mod;
    gqa.o.block_mask = causal_on(dev(), 96, 160, 64);
    gqa.m.allowed = causal;
    check_case(gqa, dt, dev());
    for (int64_t hkv : {1, 2}) {
      NamedMod sq = squared();
      Case bc{{3, 4, 64, 16, 1, hkv, 64, 16}, {}, sq.plain, {}, {}};
      bc.o.enable_gqa = true;
      bc.o.score_mod = sq.mod;
      check_case(bc, dt, dev());
    }
  }
}

TEST_P(FlexDevices, FiveStridedLayouts) {
  // test_strided_inputs' layouts: a storage offset of 997 elements, dims transposed in memory, heads and
  // sequence swapped, padded rows (a narrow of a wider buffer), a shared (expanded) batch dim.
  std::vector<std::pair<const char*, std::function<Tensor(const Tensor&)>>> layouts = {
      {"offset997", [](const Tensor& t) {
         Tensor buf = zeros({t.numel() + 997}, TensorOptions().dtype(t.dtype()).device(t.device()));
         Tensor v = buf.narrow(0, 997, t.numel()).view(t.sizes());
         v.copy_(t);
         return v;
       }},
      {"transposed", [](const Tensor& t) { return t.transpose(1, 2).contiguous().transpose(1, 2); }},
      {"heads_seq_swapped", [](const Tensor& t) { return t.permute({0, 2, 1, 3}).contiguous().permute({0, 2, 1, 3}); }},
      {"padded", [](const Tensor& t) {
         Tensor buf = zeros({t.size(0), t.size(1), t.size(2), t.size(3) + 8}, TensorOptions().dtype(t.dtype()).device(t.device()));
         Tensor v = buf.narrow(3, 0, t.size(3));
         v.copy_(t);
         return v;
       }},
      {"shared_batch", [](const Tensor& t) { return t.narrow(0, 0, 1).expand(t.sizes()); }},
  };
  for (const auto& [name, layout] : layouts) {
    for (DType dt : kDtypes) {
      SCOPED_TRACE(std::string(name) + " " + dtype_name(dt));
      NamedMod nm = rel_bias();
      Case c{{2, 2, 80, 64, 2, 2, 80, 64}, {}, nm.plain, layout, {}};
      c.o.score_mod = nm.mod;
      c.o.block_mask = causal_on(dev(), 80, 80, 64);
      c.m.allowed = causal;
      check_case(c, dt, dev());
    }
  }
}

TEST_P(FlexDevices, LearnableCapturedTensorsGetTheirGradients) {
  const int64_t H = 4, S = 72;
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    const DType cdt = dt == kFloat64 ? kFloat64 : kFloat32;
    Generator gen(7);
    Tensor table = (randn({H, 2 * S - 1}, kFloat64, &gen) * 0.5).to(cdt).to(dev()).requires_grad_();
    Tensor hoff = (rand({H}, kFloat64, &gen) + 0.5).to(cdt).to(dev()).requires_grad_();
    const std::vector<double> tv = table.detach().cpu().to(kFloat64).to_vector(), hv = hoff.detach().cpu().to(kFloat64).to_vector();
    PlainMod p;
    p.f = [=](double s, int64_t, int64_t h, int64_t q, int64_t kv) { return s * hv[h] + tv[h * (2 * S - 1) + q - kv + S - 1]; };
    p.dfds = [=](double, int64_t, int64_t h, int64_t, int64_t) { return hv[h]; };
    p.dcap = [=](double s, int64_t, int64_t h, int64_t q, int64_t kv, double g, std::vector<std::vector<double>>& dc) {
      dc[0][h * (2 * S - 1) + q - kv + S - 1] += g;
      dc[1][h] += g * s;
    };
    p.allowed = causal;
    Case c{{2, H, S, 32, 2, H, S, 32}, {}, p, {}, {table, hoff}};
    c.o.score_mod = [t = Captured(table, "table"), o = Captured(hoff, "hoff"), S](Expr s, Expr, Expr h, Expr q, Expr kv) {
      return s * o[h] + t[h][q - kv + (S - 1)];
    };
    c.o.block_mask = causal_on(dev(), S, S, 32);
    check_case(c, dt, dev());
    EXPECT_GT(amax(abs(table.grad().cpu())).item(), 0.0);
  }
}

TEST_P(FlexDevices, NegativeCapturedIndicesWrapAsPython) {
  // table[h][kv - q] under a causal mask reads indices in [-(S-1), 0]: Python indexing wraps them to
  // [1, S-1] and 0, in the forward and in the captured tensor's gradient alike.
  const int64_t H = 2, S = 50;
  for (DType dt : {kFloat32, kBFloat16, kFloat64}) {
    SCOPED_TRACE(dtype_name(dt));
    const DType cdt = dt == kFloat64 ? kFloat64 : kFloat32;
    Generator gen(5);
    Tensor table = randn({H, S}, kFloat64, &gen).to(cdt).to(dev()).requires_grad_();
    const std::vector<double> tv = table.detach().cpu().to(kFloat64).to_vector();
    auto wrap = [S](int64_t i) { return i < 0 ? i + S : i; };
    PlainMod p;
    p.f = [=](double s, int64_t, int64_t h, int64_t q, int64_t kv) { return s + tv[h * S + wrap(kv - q)]; };
    p.dcap = [=](double, int64_t, int64_t h, int64_t q, int64_t kv, double g, std::vector<std::vector<double>>& dc) {
      dc[0][h * S + wrap(kv - q)] += g;
    };
    p.allowed = causal;
    Case c{{1, H, S, 16, 1, H, S, 16}, {}, p, {}, {table}};
    c.o.score_mod = [t = Captured(table, "table")](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + t[h][kv - q]; };
    c.o.block_mask = causal_on(dev(), S, S, 16);
    check_case(c, dt, dev());
  }
}

TEST_P(FlexDevices, DocumentMaskFromCapturedIds) {
  const int64_t L = 157;
  std::vector<int64_t> ids(L);
  for (int64_t i = 0; i < L; ++i) ids[i] = i < 40 ? 0 : i < 100 ? 1 : i < 150 ? 2 : 3;
  auto mask_for = [ids, L](Device d) {
    Captured doc(from_vector(ids, {L}, kInt64).to(d), "doc");
    return MaskMod([doc](Expr, Expr, Expr q, Expr kv) { return (Expr(doc[q]) == Expr(doc[kv])) & (q >= kv); });
  };
  for (BlockSize bs : {BlockSize(32), BlockSize(128)}) {
    for (DType dt : kDtypes) {
      SCOPED_TRACE(fmt::format("block {} {}", bs.q, dtype_name(dt)));
      Case c{{1, 2, L, 64, 1, 2, L, 64}, {}, {}, {}, {}};
      c.o.block_mask = mask_on(dev(), mask_for, 1, 1, L, L, bs);
      c.m.allowed = [ids](int64_t, int64_t, int64_t q, int64_t kv) { return ids[q] == ids[kv] && q >= kv; };
      check_case(c, dt, dev());
    }
  }
}

TEST_P(FlexDevices, CapturedReadsOnlyWhereTheModIsEvaluated) {
  // t[q] and u[kv] have 32 entries; the BlockMask visits only q < 32 (so kv <= q < 32). The score_mod's
  // per-row and per-column parts (computed once per row / column on the GPU) must not read t or u for the
  // rows and columns no visited entry has: no IndexError, as on the CPU, which evaluates entry by entry.
  const int64_t S = 64, n = 32;
  auto mask_for = [](Device) { return MaskMod([](Expr, Expr, Expr q, Expr kv) { return (q < 32) & (kv <= q); }); };
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    const DType cdt = dt == kFloat64 ? kFloat64 : kFloat32;
    Generator gen(11);
    Tensor t = randn({n}, kFloat64, &gen).to(cdt), u = randn({n}, kFloat64, &gen).to(cdt);
    const std::vector<double> tv = t.to(kFloat64).to_vector(), uv = u.to(kFloat64).to_vector();
    Case c{{1, 2, S, 16, 1, 2, S, 16}, {}, {}, {}, {}};
    c.o.score_mod = [tc = Captured(t.to(dev()), "t"), uc = Captured(u.to(dev()), "u")](Expr s, Expr, Expr, Expr q,
                                                                                        Expr kv) {
      return s + Expr(tc[q]) * Expr(uc[kv]);
    };
    c.m.f = [=](double s, int64_t, int64_t, int64_t q, int64_t kv) { return s + tv[q] * uv[kv]; };
    c.m.allowed = [](int64_t, int64_t, int64_t q, int64_t kv) { return q < 32 && kv <= q; };
    c.o.block_mask = mask_on(dev(), mask_for, 1, 1, S, S, 32);
    check_case(c, dt, dev());
  }
}

TEST_P(FlexDevices, EmptyRowsGiveZeroOutputMinusInfAndZeroGradients) {
  auto mask_for = [](Device) { return MaskMod([](Expr, Expr, Expr q, Expr kv) { return (q >= 10) & (kv <= q); }); };
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    Case c{{1, 2, 64, 16, 1, 2, 64, 16}, {}, {}, {}, {}};
    c.o.block_mask = mask_on(dev(), mask_for, 1, 1, 64, 64, 32);
    c.m.allowed = [](int64_t, int64_t, int64_t q, int64_t kv) { return q >= 10 && kv <= q; };
    Outputs r = check_case(c, dt, dev());
    EXPECT_EQ(amax(abs(r.r.out.narrow(2, 0, 10).cpu())).item(), 0.0);
    EXPECT_TRUE(all(isinf(r.r.lse.narrow(2, 0, 10).cpu())).item<bool>());
    EXPECT_TRUE(all(isinf(r.r.max_scores.narrow(2, 0, 10).cpu())).item<bool>());
    EXPECT_EQ(amax(abs(r.dq.narrow(2, 0, 10).cpu())).item(), 0.0);
  }
}

TEST_P(FlexDevices, ArgumentErrorsNameTheArgument) {
  const Device d = dev();
  auto t = [d](Shape s, DType dt = kFloat32) { return randn(s).to(dt).to(d); };
  Tensor q = t({1, 4, 16, 8}), k = t({1, 2, 16, 8}), v = t({1, 2, 16, 8});
  EXPECT_THROW_MSG(flex_attention(q.view({4, 16, 8}), k, v), ShapeError, "4-D", "[4, 16, 8]");
  EXPECT_THROW_MSG(flex_attention(q, k, v), ShapeError, "Hq=4", "Hkv=2", "enable_gqa");
  FlexAttentionOptions gqa;
  gqa.enable_gqa = true;
  EXPECT_THROW_MSG(flex_attention(t({1, 3, 16, 8}), k, v, gqa), ShapeError, "multiple", "Hq=3");
  EXPECT_THROW_MSG(flex_attention(q, t({1, 2, 16, 4}), v, gqa), ShapeError, "head dim", "[1, 2, 16, 4]");
  EXPECT_THROW_MSG(flex_attention(q, k.to(kFloat64), v, gqa), DTypeError, "same dtype", "float64");
  EXPECT_THROW_MSG(flex_attention(t({1, 4, 16, 8}, kInt64), t({1, 2, 16, 8}, kInt64), t({1, 2, 16, 8}, kInt64), gqa),
                   DTypeError, "floating point", "int64");
  EXPECT_THROW_MSG(flex_attention(t({3, 4, 16, 8}), t({2, 2, 16, 8}), t({2, 2, 16, 8}), gqa), ShapeError, "batch");
  FlexAttentionOptions wrong_mask = gqa;
  wrong_mask.block_mask = causal_on(d, 32, 32, 16);
  EXPECT_THROW_MSG(flex_attention(q, k, v, wrong_mask), ShapeError, "(32, 32)", "Q_LEN=16");
  if (!d.is_cpu()) {
    EXPECT_THROW_MSG(flex_attention(q, k.cpu(), v, gqa), DeviceError, "same device", "cpu");
  }
  // A captured index past the end is the same IndexError on every device (never an out-of-bounds read).
  FlexAttentionOptions oob = gqa;
  oob.score_mod = [b = Captured(t({10}), "short_bias")](Expr s, Expr, Expr, Expr q, Expr) { return s + b[q]; };
  EXPECT_THROW_MSG(flex_attention(q, k, v, oob), IndexError, "out of range", "short_bias");
  // An in-place change of a saved input between forward and backward raises before any kernel runs.
  Tensor qg = q.detach().requires_grad_();
  Tensor loss = flex_attention(qg, k, v, gqa).out.sum();
  {
    NoGradGuard g;
    k.mul_(0.0);
  }
  EXPECT_THROW_MSG(loss.backward(), AutogradError, "flex_attention backward: k,", "modified by an inplace operation");
}

INSTANTIATE_TEST_SUITE_P(Devices, FlexDevices, ::testing::Values(DeviceType::CPU, DeviceType::CUDA),
                         [](const auto& info) { return info.param == DeviceType::CUDA ? "CUDA" : "CPU"; });

}  // namespace
}  // namespace fg
