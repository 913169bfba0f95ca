// The fused FlexAttention forward on CUDA (attention/cuda/flex_forward_cuda.cpp) against a golden written
// here: plain float64 softmax(scale * Q K^T + mod) V over loops, from the inputs rounded to the dtype under
// test. The golden shares no code with flexgrad's tracing, evaluators or kernels: each case states its
// score_mod / mask_mod twice, once as flexgrad Exprs (what the kernel runs) and once as plain C++.
// Every case runs in bf16, f16, f32 and f64 (tolerances by dtype) on the tiled kernel, and in bf16 and f16 on the
// split-KV (decoding) kernel and on the Hopper wgmma kernel too, forced onto every case (the wgmma ones skip,
// saying so, on a device other than sm_90a); each checks out, lse and max_scores.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "flexgrad/attention/cuda/jit.h"
#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/mod_program.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/test_util.h"
#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/attention/cuda/flex_cuda_common.h"
#include "flexgrad/tensor/cuda/cuda_api.h"
#endif

namespace fg {
namespace {

using testing::device_arch;
using testing::ScopedEnv;

constexpr double kInf = std::numeric_limits<double>::infinity();

// The modified score of one entry in plain C++ (-inf: masked).
using GoldenMod = std::function<double(double score, int64_t b, int64_t h, int64_t q, int64_t kv)>;

struct Golden {
  Tensor out, lse, mx;
};

// q [B, Hq, Lq, E], k [Bkv, Hkv, Lkv, E], v [Bkv, Hkv, Lkv, Ev], float64 on the CPU.
Golden golden(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const GoldenMod& mod) {
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), E = q.size(3);
  const int64_t Bkv = k.size(0), Hkv = k.size(1), Lkv = k.size(2), Ev = v.size(3);
  const std::vector<double> qv = q.contiguous().to_vector(), kv = k.contiguous().to_vector(), vv = v.contiguous().to_vector();
  std::vector<double> out(B * Hq * Lq * Ev, 0.0), lse(B * Hq * Lq), mx(B * Hq * Lq);
  std::vector<double> s(Lkv);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t bk = Bkv == 1 ? 0 : b, hk = h / (Hq / Hkv);
      const double* K = kv.data() + (bk * Hkv + hk) * Lkv * E;
      const double* V = vv.data() + (bk * Hkv + hk) * Lkv * Ev;
      for (int64_t i = 0; i < Lq; ++i) {
        const double* Q = qv.data() + ((b * Hq + h) * Lq + i) * E;
        double m = -kInf;
        for (int64_t j = 0; j < Lkv; ++j) {
          double dot = 0;
          for (int64_t e = 0; e < E; ++e) dot += Q[e] * K[j * E + e];
          s[j] = mod ? mod(scale * dot, b, h, i, j) : scale * dot;
          m = std::max(m, s[j]);
        }
        const int64_t row = (b * Hq + h) * Lq + i;
        mx[row] = m;
        if (m == -kInf) {
          lse[row] = -kInf;
          continue;
        }
        double l = 0;
        for (int64_t j = 0; j < Lkv; ++j) {
          s[j] = std::exp(s[j] - m);
          l += s[j];
        }
        lse[row] = m + std::log(l);
        double* O = out.data() + row * Ev;
        for (int64_t j = 0; j < Lkv; ++j)
          for (int64_t e = 0; e < Ev; ++e) O[e] += s[j] / l * V[j * Ev + e];
      }
    }
  }
  return {from_vector(out, {B, Hq, Lq, Ev}, kFloat64), from_vector(lse, {B, Hq, Lq}, kFloat64),
          from_vector(mx, {B, Hq, Lq}, kFloat64)};
}

struct Tol {
  double out_atol, out_rtol, stat_atol, stat_rtol;
};
Tol tol(DType t) {
  switch (t) {
    case kBFloat16: return {1.5e-2, 2e-2, 1e-4, 1e-4};
    case kFloat16: return {2e-3, 4e-3, 1e-4, 1e-4};
    case kFloat32: return {1e-5, 1e-5, 1e-5, 1e-5};
    default: return {1e-12, 1e-12, 1e-12, 1e-12};
  }
}

// One flex_attention call: shapes, the flexgrad options and the same semantics in plain C++.
struct Case {
  int64_t B = 2, Hq = 2, Lq = 160, E = 64, Bkv = 2, Hkv = 2, Lkv = 160, Ev = 64;
  FlexAttentionOptions opts;
  GoldenMod mod;                                            // null: identity
  std::function<Tensor(const Tensor&)> layout;              // applied on the device (strided inputs)
  double input_scale = 1.0;                                 // spreads the scores
  std::optional<Tol> min_tol;                               // a floor under tol(dt) (approx_math)
  bool with_max_scores = true;                              // FlexAttentionOptions::return_max_scores
};

// A BlockMask built on the CPU from `cpu_mask`, whose kernels run `dev_mask` (the same rule reading device
// copies of its captured tensors).
BlockMask device_mask(const MaskMod& cpu_mask, const MaskMod& dev_mask, int64_t Lq, int64_t Lkv, BlockSize bs,
                      std::optional<int64_t> B = std::nullopt, std::optional<int64_t> H = std::nullopt) {
  BlockMask m = create_block_mask(cpu_mask, B, H, Lq, Lkv, bs);
  return BlockMask::from_kv_blocks(m.kv_num_blocks(), m.kv_indices(), m.full_kv_num_blocks(), m.full_kv_indices(), bs,
                                   dev_mask, m.seq_lengths());
}

// Runs case c on `kernel` in dtype dt (inputs from `seed`) and checks out, lse and max_scores against the golden.
void check_case(const Case& c, DType dt, FlexCudaForward kernel, uint64_t seed) {
  SCOPED_TRACE(dtype_name(dt));
  Generator gen(seed);
  Tensor q = randn({c.B, c.Hq, c.Lq, c.E}, kFloat64, &gen) * c.input_scale;
  Tensor k = randn({c.Bkv, c.Hkv, c.Lkv, c.E}, kFloat64, &gen) * c.input_scale;
  Tensor v = randn({c.Bkv, c.Hkv, c.Lkv, c.Ev}, kFloat64, &gen);
  // The golden starts from the values the kernel sees (rounded to dt).
  Tensor qr = q.to(dt).to(kFloat64), kr = k.to(dt).to(kFloat64), vr = v.to(dt).to(kFloat64);
  const double scale = c.opts.scale ? *c.opts.scale : 1.0 / std::sqrt(static_cast<double>(c.E));
  Golden g = golden(qr, kr, vr, scale, c.mod);

  const Device cuda(DeviceType::CUDA, 0);
  auto dev = [&](const Tensor& t) {
    Tensor x = t.to(dt).to(cuda);
    return c.layout ? c.layout(x) : x;
  };
  FlexAttentionOptions o = c.opts;
  o.return_lse = true;
  o.return_max_scores = c.with_max_scores;
  o.kernel.backend = FlexBackend::Fused;
  o.kernel.cuda_forward = kernel;
  FlexAttentionResult r = flex_attention(dev(q), dev(k), dev(v), o);
  ASSERT_EQ(r.out.device(), cuda);
  ASSERT_EQ(r.out.dtype(), dt);
  Tol t = tol(dt);
  if (c.min_tol) {
    t.out_atol = std::max(t.out_atol, c.min_tol->out_atol);
    t.out_rtol = std::max(t.out_rtol, c.min_tol->out_rtol);
    t.stat_atol = std::max(t.stat_atol, c.min_tol->stat_atol);
    t.stat_rtol = std::max(t.stat_rtol, c.min_tol->stat_rtol);
  }
  Tensor out = r.out.to(kCPU).to(kFloat64), lse = r.lse.to(kCPU).to(kFloat64);
  EXPECT_FALSE(any(isnan(out)).item<bool>()) << "NaN in out";
  EXPECT_TRUE(testing::close(out, g.out, t.out_atol, t.out_rtol)) << "out";
  EXPECT_TRUE(testing::close(lse, g.lse, t.stat_atol, t.stat_rtol)) << "lse";
  if (!c.with_max_scores) {
    EXPECT_FALSE(r.max_scores.defined()) << "max_scores returned unasked";
    return;
  }
  Tensor mx = r.max_scores.to(kCPU).to(kFloat64);
  EXPECT_TRUE(testing::close(mx, g.mx, t.stat_atol, t.stat_rtol)) << "max_scores";
}

// out and lse (as float64 vectors, [B 1, H 2, L 300, D 128]) of `o` on the Wgmma forward in dt, with random inputs (k
// serving as v too) and a NaN in query row 50 of head 0; then: among `rows` of head 0, row 50's out and lse are NaN
// and the others' are not.
struct NanRowRun {
  std::vector<double> out, lse;
};
NanRowRun run_with_nan_in_row_50(FlexAttentionOptions o, DType dt) {
  const Device cuda(DeviceType::CUDA, 0);
  Generator gen(9);
  Tensor q = randn({1, 2, 300, 128}, kFloat64, &gen);
  std::vector<double> qv = q.to_vector();
  qv[50 * 128 + 7] = std::numeric_limits<double>::quiet_NaN();
  q = from_vector(qv, q.sizes(), kFloat64).to(dt).to(cuda);
  Tensor k = randn({1, 2, 300, 128}, kFloat32, &gen).to(dt).to(cuda);
  o.return_lse = true;
  o.kernel.backend = FlexBackend::Fused;
  o.kernel.cuda_forward = FlexCudaForward::Wgmma;
  FlexAttentionResult r = flex_attention(q, k, k, o);
  return {r.out.to(kCPU).to(kFloat64).to_vector(), r.lse.to(kCPU).to(kFloat64).to_vector()};
}
void expect_only_row_50_nan(const NanRowRun& r, std::initializer_list<int64_t> rows) {
  for (int64_t i : rows) {
    SCOPED_TRACE("row " + std::to_string(i));
    const bool nan_row = i == 50;
    EXPECT_EQ(std::isnan(r.lse[i]), nan_row) << r.lse[i];
    for (int64_t e = 0; e < 128; ++e) EXPECT_EQ(std::isnan(r.out[i * 128 + e]), nan_row) << r.out[i * 128 + e];
  }
}

class FlexForwardCuda : public ::testing::TestWithParam<std::tuple<DType, FlexCudaForward>> {
 protected:
  static DType dtype() { return std::get<0>(GetParam()); }
  static FlexCudaForward kernel() { return std::get<1>(GetParam()); }
  static FlexAttentionOptions with_kernel(FlexAttentionOptions o) {
    o.kernel.cuda_forward = kernel();
    return o;
  }
  void SetUp() override {
    if (device_count(DeviceType::CUDA) == 0) {
      GTEST_SKIP() << "no CUDA device present: skipping the CUDA flex_attention forward tests";
    }
    if (kernel() == FlexCudaForward::Wgmma && device_arch() != "sm_90a") {
      GTEST_SKIP() << "the Wgmma forward kernel needs sm_90a (Hopper); this device is " << device_arch();
    }
  }
  static Device cuda() { return Device(DeviceType::CUDA, 0); }

  void check(const Case& c, uint64_t seed = 1) { check_case(c, dtype(), kernel(), seed); }
};

Expr causal(Expr, Expr, Expr q, Expr kv) { return q >= kv; }
double causal_golden(double s, int64_t, int64_t, int64_t q, int64_t kv) { return q >= kv ? s : -kInf; }

TEST_P(FlexForwardCuda, NoMask) {
  Case c;
  c.B = 2, c.Hq = c.Hkv = 3, c.Lq = c.Lkv = 200;
  check(c);
}

TEST_P(FlexForwardCuda, CausalBlockMask) {
  Case c;
  c.Lq = c.Lkv = 300;
  c.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 300, 300);
  c.mod = causal_golden;
  check(c);
}

TEST_P(FlexForwardCuda, SlidingWindowMixedBlockSizes) {
  auto window = [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv <= 70); };
  for (BlockSize bs : {BlockSize(64), BlockSize(128, 64), BlockSize(16), BlockSize(100, 48)}) {
    SCOPED_TRACE("block " + std::to_string(bs.q) + "x" + std::to_string(bs.kv));
    Case c;
    c.B = c.Bkv = 1, c.Lq = c.Lkv = 333;
    c.opts.block_mask = create_block_mask(window, std::nullopt, std::nullopt, 333, 333, bs);
    c.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) { return q >= kv && q - kv <= 70 ? s : -kInf; };
    check(c);
  }
}

TEST_P(FlexForwardCuda, DocumentMaskFromCapturedInt64Ids) {
  const int64_t L = 333;
  std::vector<int64_t> ids(L);
  for (int64_t i = 0; i < L; ++i) ids[i] = i < 50 ? 0 : i < 190 ? 1 : i < 200 ? 2 : 3;
  Tensor doc_cpu = from_vector(std::vector<double>(ids.begin(), ids.end()), {L}, kInt64);
  Captured dc(doc_cpu), dd(doc_cpu.to(cuda()));
  Case c;
  c.Lq = c.Lkv = L;
  c.opts.block_mask = device_mask([dc](Expr, Expr, Expr q, Expr kv) { return (Expr(dc[q]) == Expr(dc[kv])) & (q >= kv); },
                                  [dd](Expr, Expr, Expr q, Expr kv) { return (Expr(dd[q]) == Expr(dd[kv])) & (q >= kv); },
                                  L, L, 64);
  c.mod = [ids](double s, int64_t, int64_t, int64_t q, int64_t kv) { return ids[q] == ids[kv] && q >= kv ? s : -kInf; };
  check(c);
}

TEST_P(FlexForwardCuda, AlibiFromCapturedSlopesWithCausalMask) {
  const int64_t H = 4;
  std::vector<double> slopes(H);
  for (int64_t h = 0; h < H; ++h) slopes[h] = std::exp2(-(h + 1) * 8.0 / H);
  Tensor sl = from_vector(slopes, {H}, kFloat32);
  std::vector<double> sl32 = sl.to(kFloat64).to_vector();  // the values the kernel reads
  Case c;
  c.Hq = c.Hkv = H, c.Lq = c.Lkv = 257;
  c.opts.score_mod = [s_ = Captured(sl.to(cuda()))](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + s_[h] * (kv - q); };
  c.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 257, 257);
  c.mod = [sl32](double s, int64_t, int64_t h, int64_t q, int64_t kv) {
    return q >= kv ? s + sl32[h] * static_cast<double>(kv - q) : -kInf;
  };
  check(c);
}

TEST_P(FlexForwardCuda, Softcap) {
  Case c;
  c.input_scale = 3.0;  // scores well past the cap
  c.opts.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
  c.mod = [](double s, int64_t, int64_t, int64_t, int64_t) { return 20.0 * std::tanh(s / 20.0); };
  check(c);
}

// FlexKernelOptions::approx_math: the scores' tanh is tanh.approx.f32 (relative error <= ~2^-11, so a score
// moves by at most |score| * 2^-11: lse and max_scores within rtol 1e-3, the output within 1e-3 / 2e-3, what
// PyTorch allows its approximate softcap) and the division by 20 div.full.f32 (2 ulp, folded into a multiply);
// float64 inputs keep the exact tanh (tol(dt) applies).
TEST_P(FlexForwardCuda, SoftcapWithApproxMath) {
  Case c;
  c.Lq = c.Lkv = 300;
  c.opts.kernel.approx_math = true;
  c.opts.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
  c.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 300, 300);
  c.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) { return q >= kv ? 20.0 * std::tanh(s / 20.0) : -kInf; };
  if (dtype() != kFloat64) c.min_tol = Tol{1e-3, 2e-3, 5e-4, 1e-3};
  check(c);
}

// FlexKernelOptions::approx_math's division by a variable (div.full.f32: 2 ulp, one MUFU.RCP with scaling, where a
// constant divisor folds into a multiply): scores divided by a per-key factor and a per-head one, against the
// exact float64 golden at tol(dt) — two float ulps sit far below every dtype's tolerance; float64 divides exactly.
TEST_P(FlexForwardCuda, ApproxMathDividesByAVariable) {
  Case c;
  c.Lq = 70, c.Lkv = 150;
  c.opts.kernel.approx_math = true;
  c.opts.score_mod = [](Expr s, Expr, Expr h, Expr, Expr kv) {
    return s / (0.5 + to_float(kv % 7) * 0.25) + 1.0 / to_float(h + 1);
  };
  c.mod = [](double s, int64_t, int64_t h, int64_t, int64_t kv) {
    return s / (0.5 + static_cast<double>(kv % 7) * 0.25) + 1.0 / static_cast<double>(h + 1);
  };
  check(c);
}

TEST_P(FlexForwardCuda, GroupedQueryAttentionAndKvBatchBroadcast) {
  Case c;
  c.B = 3, c.Hq = 8, c.Hkv = 2, c.Bkv = 1, c.Lq = c.Lkv = 130;
  c.opts.enable_gqa = true;
  c.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 130, 130, 64);
  c.mod = causal_golden;
  check(c);
}

TEST_P(FlexForwardCuda, DifferentLengthsNotMultiplesOfTheBlock) {
  auto m = [](Expr, Expr, Expr q, Expr kv) { return kv <= q * 2 + 5; };
  for (auto [Lq, Lkv] : {std::pair<int64_t, int64_t>{77, 201}, {201, 77}, {1, 129}, {129, 1}}) {
    SCOPED_TRACE(std::to_string(Lq) + "x" + std::to_string(Lkv));
    Case c;
    c.Lq = Lq, c.Lkv = Lkv;
    c.opts.block_mask = create_block_mask(m, std::nullopt, std::nullopt, Lq, Lkv);
    c.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) { return kv <= q * 2 + 5 ? s : -kInf; };
    check(c);
  }
}

TEST_P(FlexForwardCuda, HeadDims) {
  for (auto [E, Ev] : {std::pair<int64_t, int64_t>{16, 16}, {64, 64}, {80, 80}, {128, 128}, {256, 256}, {64, 32},
                       {32, 128}, {256, 64}, {20, 24}}) {
    SCOPED_TRACE("E=" + std::to_string(E) + " Ev=" + std::to_string(Ev));
    Case c;
    c.B = c.Bkv = 1, c.E = E, c.Ev = Ev, c.Lq = c.Lkv = 150;
    c.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 150, 150);
    c.mod = causal_golden;
    check(c);
  }
}

TEST_P(FlexForwardCuda, StridedInputsReadInPlace) {
  const std::vector<std::pair<const char*, std::function<Tensor(const Tensor&)>>> layouts = {
      {"transposed", [](const Tensor& t) { return t.transpose(1, 2).contiguous().transpose(1, 2); }},
      {"padded_rows", [](const Tensor& t) {
         Shape s = t.sizes();
         s[3] += 8;
         return zeros(s, TensorOptions().dtype(t.dtype()).device(t.device())).narrow(3, 0, t.size(3)).copy_(t);
       }},
  };
  for (const auto& [name, layout] : layouts) {
    SCOPED_TRACE(name);
    Case c;
    c.Hq = c.Hkv = 3, c.Lq = c.Lkv = 140;
    c.layout = layout;
    c.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 140, 140, 64);
    c.mod = causal_golden;
    check(c);
  }
}

TEST_P(FlexForwardCuda, EmptyRowsGiveZeroOutAndMinusInfLse) {
  auto m = [](Expr, Expr, Expr q, Expr kv) { return (q >= 10) & (kv <= q); };
  Case c;
  c.Lq = c.Lkv = 100;
  c.opts.block_mask = create_block_mask(m, std::nullopt, std::nullopt, 100, 100, 32);
  c.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) { return q >= 10 && kv <= q ? s : -kInf; };
  check(c);  // the golden has out 0, lse -inf, max_scores -inf there; close() needs the same infinities
  // And a mask with no block at all in some rows (Lkv == 0 is rejected upstream; an all-false mask is not).
  Case none;
  none.Lq = none.Lkv = 64;
  none.opts.block_mask = create_block_mask([](Expr, Expr, Expr q, Expr) { return q < 0; }, std::nullopt, std::nullopt, 64, 64, 32);
  none.mod = [](double, int64_t, int64_t, int64_t, int64_t) { return -kInf; };
  check(none);
}

TEST_P(FlexForwardCuda, NonFiniteScoresFollowPyTorch) {
  // PyTorch's flex_attention (eager math: NaN-propagating max, softmax, logsumexp), written out per row:
  //   a NaN score -> the row's out, lse and max_scores NaN; every score -inf -> out 0, lse -inf;
  //   a +inf score and no NaN -> out NaN, lse +inf, max_scores +inf; a -inf entry weighs 0.
  // The special values come from a captured float32 bias added to the score; kv blocks of 16 put them in
  // the first or the second kv tile of the row, where the online softmax takes different steps.
  enum Kind { Finite, NaNRow, Empty, PlusInf };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  struct Row {
    Kind kind;
    int64_t col;   // where the special value goes (-1: none); other entries keep their bias of 0
    double value;
    bool all_neg_inf_but_col = false;  // every other entry -inf
  };
  const std::vector<Row> rows{
      {Finite, -1, 0},           {NaNRow, 20, nan},      {NaNRow, 3, nan},         {Empty, -1, -kInf, true},
      {NaNRow, 20, nan, true},   {PlusInf, 5, kInf},     {PlusInf, 21, kInf, true}, {Finite, 18, 1.0, true},
      {Finite, 2, -kInf},        {NaNRow, 30, nan, true},  {NaNRow, 1, kInf},  // + a NaN at 25 (below)
  };
  const int64_t Lq = static_cast<int64_t>(rows.size()), Lkv = 32, E = 16;
  std::vector<double> bias(Lq * Lkv, 0.0);
  for (int64_t i = 0; i < Lq; ++i) {
    if (rows[i].all_neg_inf_but_col) std::fill(bias.begin() + i * Lkv, bias.begin() + (i + 1) * Lkv, -kInf);
    if (rows[i].col >= 0) bias[i * Lkv + rows[i].col] = rows[i].value;
  }
  bias[10 * Lkv + 25] = nan;  // +inf in the first tile, NaN in the second: NaN wins, as torch.amax
  const std::vector<double> plain = bias;
  Tensor bias_dev = from_vector(bias, {Lq, Lkv}, kFloat64).to(kFloat32).to(cuda());
  const DType dt = dtype();
  Generator gen(3);
  Tensor q = randn({1, 1, Lq, E}, kFloat64, &gen), k = randn({1, 1, Lkv, E}, kFloat64, &gen),
         v = randn({1, 1, Lkv, E}, kFloat64, &gen);
  Tensor qr = q.to(dt).to(kFloat64), kr = k.to(dt).to(kFloat64), vr = v.to(dt).to(kFloat64);
  const double scale = 0.25;
  // The finite rows' golden; the non-finite rows are checked by kind below.
  Golden g = golden(qr, kr, vr, scale, [&](double s, int64_t, int64_t, int64_t i, int64_t j) {
    const double b = plain[i * Lkv + j];
    return std::isnan(b) || (std::isinf(b) && b > 0) ? 0.0 : s + b;
  });
  FlexAttentionOptions o;
  o.scale = scale;
  o.return_lse = true;
  o.return_max_scores = true;
  o.kernel.backend = FlexBackend::Fused;
  o.score_mod = [b_ = Captured(bias_dev, "bias")](Expr s, Expr, Expr, Expr qi, Expr kv) { return s + b_[qi][kv]; };
  o.block_mask = create_block_mask([](Expr, Expr, Expr qi, Expr) { return qi >= 0; }, std::nullopt, std::nullopt,
                                   Lq, Lkv, BlockSize(16), cuda());
  o.kernel.cuda_forward = kernel();
  FlexAttentionResult r = flex_attention(q.to(dt).to(cuda()), k.to(dt).to(cuda()), v.to(dt).to(cuda()), o);
  const std::vector<double> out = r.out.to(kCPU).to(kFloat64).to_vector(), lse = r.lse.to(kCPU).to(kFloat64).to_vector(),
                            mx = r.max_scores.to(kCPU).to(kFloat64).to_vector();
  const std::vector<double> gout = g.out.to_vector(), glse = g.lse.to_vector();
  const Tol t = tol(dt);
  for (int64_t i = 0; i < Lq; ++i) {
    SCOPED_TRACE("row " + std::to_string(i));
    switch (rows[i].kind) {
      case NaNRow:
        EXPECT_TRUE(std::isnan(lse[i]) && std::isnan(mx[i]));
        for (int64_t e = 0; e < E; ++e) EXPECT_TRUE(std::isnan(out[i * E + e])) << out[i * E + e];
        break;
      case Empty:
        EXPECT_EQ(lse[i], -kInf);
        EXPECT_EQ(mx[i], -kInf);
        for (int64_t e = 0; e < E; ++e) EXPECT_EQ(out[i * E + e], 0.0);
        break;
      case PlusInf:
        EXPECT_EQ(lse[i], kInf);
        EXPECT_EQ(mx[i], kInf);
        for (int64_t e = 0; e < E; ++e) EXPECT_TRUE(std::isnan(out[i * E + e])) << out[i * E + e];
        break;
      case Finite:
        EXPECT_NEAR(lse[i], glse[i], t.stat_atol + t.stat_rtol * std::abs(glse[i]));
        for (int64_t e = 0; e < E; ++e)
          EXPECT_NEAR(out[i * E + e], gout[i * E + e], t.out_atol + t.out_rtol * std::abs(gout[i * E + e]));
        break;
    }
  }
  // scale = NaN: every row NaN (not an empty row)
  o.scale = nan;
  o.score_mod = {};
  FlexAttentionResult rn = flex_attention(q.to(dt).to(cuda()), k.to(dt).to(cuda()), v.to(dt).to(cuda()), o);
  EXPECT_TRUE(all(isnan(rn.out.to(kCPU).to(kFloat64))).item<bool>());
  EXPECT_TRUE(all(isnan(rn.lse.to(kCPU).to(kFloat64))).item<bool>());
}

TEST_P(FlexForwardCuda, OutOfRangeCapturedIndexRaisesIndexError) {
  Tensor bias = zeros({10}, TensorOptions().dtype(kFloat32).device(cuda()));
  FlexAttentionOptions o;
  o.score_mod = [b_ = Captured(bias, "bias")](Expr s, Expr, Expr, Expr q, Expr) { return s + b_[q]; };
  const DType dt = dtype();
  Tensor q = randn({1, 1, 64, 16}).to(dt).to(cuda());
  testing::expect_error<IndexError>([&] { flex_attention(q, q, q, with_kernel(o)); }, "out of range");
}

// Decoding shapes: one to a few query rows against a long K/V, GQA groups packed into one tile (or not, when
// the mask differs per head), kv split into ranges whose partials are merged (kv_splits 0 picks them; 2 merges
// through a thread-block cluster on sm_90+, and through global memory with FLEXGRAD_FLEX_DECODE_CLUSTER=0; 64
// leaves most ranges empty). The tiled kernel runs them too.
TEST_P(FlexForwardCuda, DecodeShapesAndKvSplits) {
  struct Shape {
    int64_t B, Hq, Hkv, Lq, Lkv;
  };
  for (Shape sh : {Shape{2, 8, 2, 1, 1000}, Shape{3, 8, 1, 3, 517}, Shape{1, 4, 4, 1, 64}, Shape{2, 16, 2, 2, 700}}) {
    for (int64_t splits : {0, 1, 2, 3, 64}) {
      SCOPED_TRACE("B=" + std::to_string(sh.B) + " Hq=" + std::to_string(sh.Hq) + " Hkv=" + std::to_string(sh.Hkv) +
                   " Lq=" + std::to_string(sh.Lq) + " Lkv=" + std::to_string(sh.Lkv) + " splits=" + std::to_string(splits));
      Case c;
      c.B = c.Bkv = sh.B, c.Hq = sh.Hq, c.Hkv = sh.Hkv, c.Lq = sh.Lq, c.Lkv = sh.Lkv;
      c.E = c.Ev = 128;
      c.opts.enable_gqa = sh.Hq != sh.Hkv;
      c.opts.kernel.kv_splits = splits;
      // The query sits at the end of the sequence (q_idx + Lkv - Lq), as in decoding: a causal mask with an offset.
      const int64_t off = sh.Lkv - sh.Lq;
      c.opts.block_mask = create_block_mask([off](Expr, Expr, Expr q, Expr kv) { return kv <= q + off; }, std::nullopt,
                                            std::nullopt, sh.Lq, sh.Lkv, BlockSize(128, 64));
      c.mod = [off](double s, int64_t, int64_t, int64_t q, int64_t kv) { return kv <= q + off ? s : -kInf; };
      check(c);
      if (splits == 2) {
        ScopedEnv global_merge("FLEXGRAD_FLEX_DECODE_CLUSTER", "0");
        check(c);
      }
    }
  }
  // Without a BlockMask (the all-full lists flex_attention builds): 20 kv blocks of 128, the last one partial
  // (Lkv 2500), in 1, 3 or 8 ranges, or 16 (ranges of two blocks, the last six empty), or Auto's choice.
  for (int64_t splits : {0, 1, 2, 3, 8, 16}) {
    SCOPED_TRACE("no BlockMask, splits=" + std::to_string(splits));
    Case c;
    c.B = c.Bkv = 3, c.Hq = 8, c.Hkv = 2, c.Lq = 1, c.Lkv = 2500, c.E = c.Ev = 128;
    c.opts.enable_gqa = true;
    c.opts.kernel.kv_splits = splits;
    check(c);
  }
  // A mask that differs per head (a window whose width grows with h): each query head has its own block lists,
  // so the split-KV kernel runs one head per tile.
  Case c;
  c.B = c.Bkv = 2, c.Hq = 4, c.Hkv = 2, c.Lq = 1, c.Lkv = 900, c.E = c.Ev = 64;
  c.opts.enable_gqa = true;
  c.opts.block_mask = create_block_mask([](Expr, Expr h, Expr q, Expr kv) { return kv >= q + 899 - (h + 1) * 200; },
                                        std::nullopt, 4, 1, 900, BlockSize(128, 32));
  c.mod = [](double s, int64_t, int64_t h, int64_t q, int64_t kv) { return kv >= q + 899 - (h + 1) * 200 ? s : -kInf; };
  check(c);
}

// Rows of very different lengths (a per-batch kv length, one batch with none, first or last): each row's
// listed blocks split into 1, 2, 3 or 64 ranges (2: the cluster merge on sm_90+; 64: most ranges of the short rows
// empty, the merge of the long ones in rounds of 32 partials) or Auto's count. kv blocks of 64 and 40 columns (40:
// a block's last 16-column slice is short). Reruns are bit-identical (the partials are merged in split order, not
// finishing order).
TEST_P(FlexForwardCuda, DecodeUnevenRowsAndEmptyRows) {
  for (bool empty_last : {false, true}) {
    for (int64_t bkv : {64, 40}) {
      for (int64_t splits : {0, 1, 2, 3, 64}) {
        SCOPED_TRACE("empty_last=" + std::to_string(empty_last) + " block_kv=" + std::to_string(bkv) +
                     " splits=" + std::to_string(splits));
        Case c;
        c.B = c.Bkv = 5, c.Hq = 8, c.Hkv = 2, c.Lq = 1, c.Lkv = 1500, c.E = c.Ev = 128;
        // kv length of batch b: (b' * 397) % 1501 for b' = b (or B - 1 - b): 0, 397, 794, 1191, 87. One
        // spelling for the traced mask (Expr) and the golden (int64_t).
        auto len = [empty_last, last = c.B - 1](auto b) { return ((empty_last ? last - b : b) * 397) % 1501; };
        c.opts.enable_gqa = true;
        c.opts.kernel.kv_splits = splits;
        c.opts.block_mask = create_block_mask([len](Expr b, Expr, Expr, Expr kv) { return kv < len(b); }, c.B,
                                              std::nullopt, c.Lq, c.Lkv, BlockSize(128, bkv));
        c.mod = [len](double s, int64_t b, int64_t, int64_t, int64_t kv) { return kv < len(b) ? s : -kInf; };
        check(c);
        if (splits == 2 || splits == 3) {
          Generator gen(5);
          Tensor q = randn({c.B, c.Hq, c.Lq, c.E}, kFloat32, &gen).to(dtype()).to(cuda());
          Tensor k = randn({c.Bkv, c.Hkv, c.Lkv, c.E}, kFloat32, &gen).to(dtype()).to(cuda());
          Tensor v = randn({c.Bkv, c.Hkv, c.Lkv, c.Ev}, kFloat32, &gen).to(dtype()).to(cuda());
          FlexAttentionOptions o = with_kernel(c.opts);
          o.return_lse = true;
          FlexAttentionResult r1 = flex_attention(q, k, v, o), r2 = flex_attention(q, k, v, o);
          EXPECT_TRUE(all(eq(r1.out.to(kCPU).to(kFloat64), r2.out.to(kCPU).to(kFloat64))).item<bool>());
          EXPECT_TRUE(all(eq(r1.lse.to(kCPU).to(kFloat64), r2.lse.to(kCPU).to(kFloat64))).item<bool>());
        }
      }
    }
  }
}

// Every case on the tiled kernel in every dtype; on the split-KV kernel in the dtypes it runs.
std::string dtype_param_name(const ::testing::TestParamInfo<std::tuple<DType, FlexCudaForward>>& info) {
  return dtype_name(std::get<0>(info.param));
}
INSTANTIATE_TEST_SUITE_P(Tiled, FlexForwardCuda,
                         ::testing::Combine(::testing::Values(kBFloat16, kFloat16, kFloat32, kFloat64),
                                            ::testing::Values(FlexCudaForward::Tiled)),
                         dtype_param_name);
INSTANTIATE_TEST_SUITE_P(SplitKv, FlexForwardCuda,
                         ::testing::Combine(::testing::Values(kBFloat16, kFloat16),
                                            ::testing::Values(FlexCudaForward::SplitKv)),
                         dtype_param_name);
// The Hopper kernel pads head dims to 64, so it runs every case (E = 16, 20, 80 ... included).
INSTANTIATE_TEST_SUITE_P(Wgmma, FlexForwardCuda,
                         ::testing::Combine(::testing::Values(kBFloat16, kFloat16),
                                            ::testing::Values(FlexCudaForward::Wgmma)),
                         dtype_param_name);

// Auto's choice, and the split-KV kernel's refusals. (With FLEXGRAD_FLEX_WGMMA=0: Auto's prefill calls go to the
// tiled kernel on Hopper too, so "tiled" below is one kernel on every GPU.)
class FlexSplitKvChoice : public ::testing::Test {
 protected:
  void SetUp() override {
    if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present: skipping split-KV choice tests";
  }
  ScopedEnv no_wgmma_{"FLEXGRAD_FLEX_WGMMA", "0"};
  ScopedEnv no_cudnn_{"FLEXGRAD_FLEX_CUDNN", "0"};  // Auto's choice among our kernels, not cuDNN's (test_flex_cudnn)
};

TEST_F(FlexSplitKvChoice, AutoAgreesWithTheForcedKernelItPicks) {
  // Lq = 1 with a GQA group of 4: Auto must pick split-KV (bit-identical to forcing it); Lq = 256: tiled.
  const Device cuda(DeviceType::CUDA, 0);
  Generator gen(3);
  for (int64_t Lq : {1, 256}) {
    Tensor q = randn({2, 8, Lq, 64}, kFloat32, &gen).to(kBFloat16).to(cuda);
    Tensor k = randn({2, 2, 700, 64}, kFloat32, &gen).to(kBFloat16).to(cuda);
    Tensor v = randn({2, 2, 700, 64}, kFloat32, &gen).to(kBFloat16).to(cuda);
    FlexAttentionOptions o;
    o.enable_gqa = true;
    Tensor automatic = flex_attention(q, k, v, o).out.to(kCPU).to(kFloat64);
    o.kernel.cuda_forward = Lq == 1 ? FlexCudaForward::SplitKv : FlexCudaForward::Tiled;
    Tensor forced = flex_attention(q, k, v, o).out.to(kCPU).to(kFloat64);
    o.kernel.cuda_forward = Lq == 1 ? FlexCudaForward::Tiled : FlexCudaForward::SplitKv;
    Tensor other = flex_attention(q, k, v, o).out.to(kCPU).to(kFloat64);
    EXPECT_TRUE(all(eq(automatic, forced)).item<bool>()) << "Lq=" << Lq;
    EXPECT_TRUE(testing::close(automatic, other, 2e-2, 2e-2)) << "Lq=" << Lq;  // bf16 outputs, both kernels right
  }
}

TEST_F(FlexSplitKvChoice, RefusesWhatItCannotRun) {
  const Device cuda(DeviceType::CUDA, 0);
  FlexAttentionOptions o;
  o.kernel.cuda_forward = FlexCudaForward::SplitKv;
  Tensor q = randn({1, 2, 1, 32}).to(cuda);
  testing::expect_error<NotImplementedError>([&] { flex_attention(q, q, q, o); }, "bfloat16 and float16");
  o.kernel.kv_splits = -1;
  testing::expect_error<ValueError>([&] { flex_attention(q.to(kBFloat16), q.to(kBFloat16), q.to(kBFloat16), o); },
                                    "kv_splits");
}

// The Hopper kernel: Auto uses it on sm_90a, score_mods with a tanh included (FLEXGRAD_FLEX_WGMMA=0|1 overrides),
// and forcing it where it cannot run raises.
class FlexWgmmaChoice : public ::testing::Test {
 protected:
  void SetUp() override {
    if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present: skipping Wgmma choice tests";
  }
  ScopedEnv env_{"FLEXGRAD_FLEX_WGMMA", nullptr};
  ScopedEnv no_cudnn_{"FLEXGRAD_FLEX_CUDNN", "0"};  // Auto's choice among our kernels, not cuDNN's (test_flex_cudnn)
};

TEST_F(FlexWgmmaChoice, AutoPicksItOnHopper) {
  const Device cuda(DeviceType::CUDA, 0);
  if (device_arch() != "sm_90a") GTEST_SKIP() << "needs sm_90a; this device is " << device_arch();
  Generator gen(4);
  Tensor q = randn({2, 4, 300, 128}, kFloat32, &gen).to(kBFloat16).to(cuda);
  Tensor k = randn({2, 4, 300, 128}, kFloat32, &gen).to(kBFloat16).to(cuda);
  Tensor v = randn({2, 4, 300, 128}, kFloat32, &gen).to(kBFloat16).to(cuda);
  FlexAttentionOptions o;
  o.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 300, 300);
  auto run = [&](FlexCudaForward kind) {
    o.kernel.cuda_forward = kind;
    return flex_attention(q, k, v, o).out.to(kCPU).to(kFloat64);
  };
  auto same = [](const Tensor& a, const Tensor& b) { return all(eq(a, b)).item<bool>(); };
  Tensor tiled = run(FlexCudaForward::Tiled), wgmma = run(FlexCudaForward::Wgmma);
  ASSERT_FALSE(same(tiled, wgmma)) << "the two kernels round alike here: Auto's choice would not be observable";
  EXPECT_TRUE(testing::close(wgmma, tiled, 2e-2, 2e-2));  // bf16 outputs of two right kernels
  EXPECT_TRUE(same(run(FlexCudaForward::Auto), wgmma)) << "Auto on Hopper: Wgmma";
  env_.set("0");
  EXPECT_TRUE(same(run(FlexCudaForward::Auto), tiled)) << "Auto with FLEXGRAD_FLEX_WGMMA=0: Tiled";
  env_.set("x");
  testing::expect_error<ValueError>([&] { run(FlexCudaForward::Auto); }, "FLEXGRAD_FLEX_WGMMA");

  // A score_mod with a tanh (softcap) too (it stayed on Tiled until the wgmma kernel became the faster one there).
  o.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
  env_.set(nullptr);
  wgmma = run(FlexCudaForward::Wgmma);
  tiled = run(FlexCudaForward::Tiled);
  ASSERT_FALSE(same(tiled, wgmma));
  EXPECT_TRUE(same(run(FlexCudaForward::Auto), wgmma)) << "softcap, Auto: Wgmma";
  env_.set("0");
  EXPECT_TRUE(same(run(FlexCudaForward::Auto), tiled)) << "softcap, FLEXGRAD_FLEX_WGMMA=0: Tiled";
}

TEST_F(FlexWgmmaChoice, RefusesWhatItCannotRun) {
  const Device cuda(DeviceType::CUDA, 0);
  FlexAttentionOptions o;
  o.kernel.cuda_forward = FlexCudaForward::Wgmma;
  Tensor q = randn({1, 2, 64, 64}).to(cuda);
  if (device_arch() == "sm_90a") {
    testing::expect_error<NotImplementedError>([&] { flex_attention(q, q, q, o); }, "bfloat16 and float16");
  } else {
    Tensor h = q.to(kBFloat16);
    testing::expect_error<NotImplementedError>([&] { flex_attention(h, h, h, o); }, "sm_90a");
  }
}

// flex_fwd_wgmma's main loops (FLEXGRAD_FLEX_WGMMA_PIPE 0: sequential, 1: pipelined, 2: warp-specialised (the
// default on 128-row tiles with head dims over 128), 3: warp-specialised with the intra-warpgroup overlap (with
// FLEXGRAD_FLEX_WGMMA_PINGPONG=0), "3pp": the same with the consumer warpgroups taking turns (the default on
// 128-row tiles with head dims up to 128); a "P": persistent,
// FLEXGRAD_FLEX_WGMMA_PERSISTENT=3, three CTAs running every grid CTA, their stages and barriers carried from one to
// the next, so that rows with no blocks and rows past a block's end come between others) and kv sub-tiles (FLEXGRAD_FLEX_WGMMA_BN 64, 128) on the cases the pipelines' bookkeeping can
// get wrong: rows of one sub-tile (prologue and epilogue only), rows with none, many sub-tiles (the K / V stages,
// their mbarrier phases and the column-part buffers rotate), partial -> full -> partial blocks, head dims 64 / 128 /
// 256, score mods with column parts.
// (The pipeline tests read the CUDA layer's JIT statistics, which a build without CUDA does not have.)
#ifdef FLEXGRAD_WITH_CUDA
// A mask_mod alone that reads captured tensors: four documents (one of ten tokens) over L 1100, ids captured on
// the CPU for the mask's build and on the device for the kernels, blocks of 128, B 1, head dims 128, no causal part.
Case captured_document_case() {
  const int64_t L = 1100;
  std::vector<int64_t> ids(L);
  for (int64_t i = 0; i < L; ++i) ids[i] = i < 300 ? 0 : i < 310 ? 1 : i < 900 ? 2 : 3;
  const Tensor doc_cpu = from_vector(std::vector<double>(ids.begin(), ids.end()), {L}, kInt64);
  const Captured dc(doc_cpu), dd(doc_cpu.to(Device(DeviceType::CUDA, 0)));
  Case c;
  c.B = c.Bkv = 1, c.E = c.Ev = 128, c.Lq = c.Lkv = L;
  c.opts.block_mask = device_mask([dc](Expr, Expr, Expr q, Expr kv) { return Expr(dc[q]) == Expr(dc[kv]); },
                                  [dd](Expr, Expr, Expr q, Expr kv) { return Expr(dd[q]) == Expr(dd[kv]); }, L, L, 128);
  c.mod = [ids](double s, int64_t, int64_t, int64_t q, int64_t kv) { return ids[q] == ids[kv] ? s : -kInf; };
  return c;
}

class FlexWgmmaPipeline : public ::testing::TestWithParam<std::tuple<DType, const char*, const char*>> {
 protected:
  void SetUp() override {
    if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present: skipping Wgmma pipeline tests";
    if (device_arch() != "sm_90a") GTEST_SKIP() << "needs sm_90a; this device is " << device_arch();
  }
  // Head dims over 128 take BN = 64 only (BN = 128 raises there: PipelineKnobsRejectBadValues).
  void check(const Case& c) {
    const char* bn = std::max(c.E, c.Ev) > 128 ? "64" : std::get<2>(GetParam());
    ScopedEnv bn_env("FLEXGRAD_FLEX_WGMMA_BN", bn);
    SCOPED_TRACE(std::string("PIPE=") + std::get<1>(GetParam()) + " BN=" + bn);
    check_case(c, std::get<0>(GetParam()), FlexCudaForward::Wgmma, 7);
  }
  // For a parameter other than "0": case c (in bfloat16) must run another kernel module than the same parameter
  // without its last part (a "P" without persistence, a "pp" without ping-pong, a pipe without it: the sequential
  // loop), so that a silent fallback (64-row tiles keep the sequential loop) cannot pass for the form under test.
  // The module of the second run must then be loaded anew.
  void expect_not_a_fallback(const Case& c) {
    if (pipe_name_ == "0") return;
    const bool persistent = pipe_name_.find('P') != std::string::npos;
    const bool pingpong = pipe_name_.find("pp") != std::string::npos;
    const char* var = persistent ? "FLEXGRAD_FLEX_WGMMA_PERSISTENT"
                      : pingpong ? "FLEXGRAD_FLEX_WGMMA_PINGPONG"
                                 : "FLEXGRAD_FLEX_WGMMA_PIPE";
    expect_module_changes(c, var, "0");
  }
  // Case c (in bfloat16, this loop) loads another kernel module with `var` set to `value` than without it: the
  // variable changed the kernel.
  void expect_module_changes(const Case& c, const char* var, const char* value) {
    const Device cuda(DeviceType::CUDA, 0);
    Generator gen(5);
    Tensor q = randn({c.B, c.Hq, c.Lq, c.E}, kFloat32, &gen).to(kBFloat16).to(cuda);
    Tensor k = randn({c.Bkv, c.Hkv, c.Lkv, c.E}, kFloat32, &gen).to(kBFloat16).to(cuda);
    Tensor v = randn({c.Bkv, c.Hkv, c.Lkv, c.Ev}, kFloat32, &gen).to(kBFloat16).to(cuda);
    FlexAttentionOptions o = c.opts;
    o.kernel.backend = FlexBackend::Fused;
    o.kernel.cuda_forward = FlexCudaForward::Wgmma;
    ScopedEnv bn_env("FLEXGRAD_FLEX_WGMMA_BN", std::max(c.E, c.Ev) > 128 ? "64" : std::get<2>(GetParam()));
    cuda::jit::clear_memory_cache();
    flex_attention(q, k, v, o);
    const cuda::jit::JitStats before = cuda::jit::stats();
    {
      ScopedEnv with(var, value);
      flex_attention(q, k, v, o);
    }
    const cuda::jit::JitStats after = cuda::jit::stats();
    EXPECT_GT(after.compiles + after.disk_hits, before.compiles + before.disk_hits)
        << "FLEXGRAD_FLEX_WGMMA_PIPE=" << pipe_name_ << ": " << var << "=" << value
        << " ran the same module as without it";
  }
  const std::string pipe_name_ = std::get<1>(GetParam());
  ScopedEnv pipe_{"FLEXGRAD_FLEX_WGMMA_PIPE", pipe_name_.substr(0, 1).c_str()};
  ScopedEnv pingpong_{"FLEXGRAD_FLEX_WGMMA_PINGPONG", pipe_name_.find("pp") != std::string::npos ? "1" : "0"};
  ScopedEnv persistent_{"FLEXGRAD_FLEX_WGMMA_PERSISTENT", pipe_name_.find('P') != std::string::npos ? "3" : "0"};
};

TEST_P(FlexWgmmaPipeline, OneSubTileRowsAndHeadDims) {
  for (auto [E, Ev] : {std::pair<int64_t, int64_t>{64, 64}, {128, 128}, {256, 256}, {128, 64}, {64, 256}}) {
    for (int64_t L : {40, 64, 128}) {  // one kv block of at most 128 columns: one or two sub-tiles a row
      SCOPED_TRACE("E=" + std::to_string(E) + " Ev=" + std::to_string(Ev) + " L=" + std::to_string(L));
      Case c;
      c.B = c.Bkv = 1, c.E = E, c.Ev = Ev, c.Lq = c.Lkv = L;
      check(c);
    }
  }
}

TEST_P(FlexWgmmaPipeline, EmptyRowsAndPartialFullPartialBlocks) {
  // Rows below 150 see nothing (whole q blocks, and part of one); the others a 300-wide causal window:
  // partial (window start), full, partial (diagonal) blocks in one row.
  // Blocks of 128 and 256 rows: 64-row blocks would take 64-row tiles, where every loop is the sequential one. With
  // 128, q block 0 lists no kv block; with 256, its first 128-row tile lists blocks whose entries all fall out.
  auto m = [](Expr, Expr, Expr q, Expr kv) { return (q >= 150) & (kv <= q) & (q - kv <= 300); };
  for (int64_t block : {128, 256}) {
    for (int64_t E : {64, 128, 256}) {
      SCOPED_TRACE("E=" + std::to_string(E) + " block=" + std::to_string(block));
      Case c;
      c.B = c.Bkv = 1, c.E = c.Ev = E, c.Lq = c.Lkv = 700;
      c.opts.block_mask = create_block_mask(m, std::nullopt, std::nullopt, 700, 700, block);
      c.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) {
        return q >= 150 && kv <= q && q - kv <= 300 ? s : -kInf;
      };
      check(c);
      if (E == 128) expect_not_a_fallback(c);
    }
  }
}

TEST_P(FlexWgmmaPipeline, ManySubTilesWithCapturedColumnParts) {
  // A document mask (captured ids: row and column parts) and ALiBi from captured slopes over 1100 columns,
  // up to 18 sub-tiles a row, so every buffer rotation happens with partial and full blocks mixed.
  const int64_t L = 1100, H = 2;
  std::vector<int64_t> ids(L);
  for (int64_t i = 0; i < L; ++i) ids[i] = i < 300 ? 0 : i < 310 ? 1 : i < 900 ? 2 : 3;
  Tensor doc_cpu = from_vector(std::vector<double>(ids.begin(), ids.end()), {L}, kInt64);
  Captured dc(doc_cpu), dd(doc_cpu.to(Device(DeviceType::CUDA, 0)));
  const std::vector<double> slopes = {0.25, 1.0 / 16};  // exact in float32
  Tensor sl = from_vector(slopes, {H}, kFloat32);
  for (int64_t E : {64, 128}) {
    SCOPED_TRACE("E=" + std::to_string(E));
    Case c;
    c.B = c.Bkv = 1, c.Hq = c.Hkv = H, c.E = c.Ev = E, c.Lq = c.Lkv = L;
    c.opts.block_mask = device_mask([dc](Expr, Expr, Expr q, Expr kv) { return (Expr(dc[q]) == Expr(dc[kv])) & (q >= kv); },
                                    [dd](Expr, Expr, Expr q, Expr kv) { return (Expr(dd[q]) == Expr(dd[kv])) & (q >= kv); },
                                    L, L, 128);
    c.opts.score_mod = [s_ = Captured(sl.to(Device(DeviceType::CUDA, 0)))](Expr s, Expr, Expr h, Expr q, Expr kv) {
      return s + s_[h] * (kv - q);
    };
    c.mod = [ids, slopes](double s, int64_t, int64_t h, int64_t q, int64_t kv) {
      return ids[q] == ids[kv] && q >= kv ? s + slopes[h] * static_cast<double>(kv - q) : -kInf;
    };
    check(c);
  }
}

// A mask_mod alone that reads captured tensors (document ids; no causal part) runs the forward's bounds-free mask step
// (fg_frag_mask_step: the mask for every entry, then -inf past the sequence on edge sub-tiles only). L 1100 ends
// inside a q tile and a kv sub-tile, so edge sub-tiles meet the bounds pass with partial and full blocks; against
// the float64 golden, and bit for bit against the step with bounds (FLEXGRAD_FLEX_FWD_MASK_STEP=0, another module).
TEST_P(FlexWgmmaPipeline, CapturedMaskAloneTakesTheBoundsFreeStep) {
  const Case c = captured_document_case();
  const int64_t L = c.Lq;
  const Device cuda(DeviceType::CUDA, 0);
  check(c);
  Generator gen(9);
  Tensor q = randn({c.B, c.Hq, L, c.E}, kFloat32, &gen).to(kBFloat16).to(cuda);
  Tensor k = randn({c.Bkv, c.Hkv, L, c.E}, kFloat32, &gen).to(kBFloat16).to(cuda);
  Tensor v = randn({c.Bkv, c.Hkv, L, c.Ev}, kFloat32, &gen).to(kBFloat16).to(cuda);
  FlexAttentionOptions o = c.opts;
  o.kernel.backend = FlexBackend::Fused;
  o.kernel.cuda_forward = FlexCudaForward::Wgmma;
  ScopedEnv bn_env("FLEXGRAD_FLEX_WGMMA_BN", std::get<2>(GetParam()));
  ScopedEnv step("FLEXGRAD_FLEX_FWD_MASK_STEP", nullptr);
  const Tensor with_pass = flex_attention(q, k, v, o).out.to(kCPU).to(kFloat64);
  cuda::jit::clear_memory_cache();
  const cuda::jit::JitStats before = cuda::jit::stats();
  step.set("0");
  const Tensor with_bounds = flex_attention(q, k, v, o).out.to(kCPU).to(kFloat64);
  const cuda::jit::JitStats after = cuda::jit::stats();
  EXPECT_GT(after.compiles + after.disk_hits, before.compiles + before.disk_hits) << "no module was loaded";
  EXPECT_TRUE(equal(with_pass, with_bounds)) << "the two steps' outputs differ";
  step.set("x");
  testing::expect_error<ValueError>([&] { flex_attention(q, k, v, o); }, "FLEXGRAD_FLEX_FWD_MASK_STEP");
}

// FG_FWD_RAW_SOFTMAX (the default; FLEXGRAD_FLEX_FWD_RAW_SOFTMAX=0 leaves it out): without a score_mod and with a
// positive scale the scores stay unscaled and the scale goes into the softmax's exponent; out, lse and max_scores
// against the float64 golden on every loop: no mask, a causal mask, a captured mask alone (the bounds-free step),
// explicit scales, and a negative scale (which keeps the scaled path). The first case must load another module with
// the variable at 0.
TEST_P(FlexWgmmaPipeline, RawScoreSoftmaxMatchesTheGolden) {
  ScopedEnv raw("FLEXGRAD_FLEX_FWD_RAW_SOFTMAX", "1");
  Case plain;
  plain.B = plain.Bkv = 1, plain.E = plain.Ev = 128, plain.Lq = plain.Lkv = 300;
  {
    SCOPED_TRACE("no mask");
    check(plain);
    raw.set(nullptr);
    expect_module_changes(plain, "FLEXGRAD_FLEX_FWD_RAW_SOFTMAX", "0");
    raw.set("1");
  }
  for (double scale : {0.3, 0.05, -0.2}) {
    SCOPED_TRACE("causal, scale " + std::to_string(scale));
    Case c = plain;
    c.opts.scale = scale;
    c.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 300, 300, 128);
    c.mod = causal_golden;
    check(c);
  }
  {
    SCOPED_TRACE("captured mask alone");
    Case c = captured_document_case();
    c.input_scale = 3.0;
    check(c);
  }
}

// The affine form under approx_math (FG_FWD_SCORE_AFFINE, flex_forward_common.cuh; the default): q.k times scale
// in_factor into the core alone, out_factor in the exponent's constant and in the reported max. out, lse and
// max_scores against the float64 golden at approx_math's tolerance on every loop: softcap + causal (scores past the
// cap), a factor on the output that is not the inverse of the score's (30 tanh(s / 20)) without a mask, a core that
// reads q and kv, with a negative scale; the fold's counter moves, and FLEXGRAD_FLEX_AFFINE_FOLD=0 loads another
// module.
TEST_P(FlexWgmmaPipeline, AffineFoldMatchesTheGolden) {
  ScopedEnv fold("FLEXGRAD_FLEX_AFFINE_FOLD", nullptr);
  Case softcap;
  softcap.B = softcap.Bkv = 1, softcap.E = softcap.Ev = 128, softcap.Lq = softcap.Lkv = 300;
  softcap.input_scale = 3.0;
  softcap.opts.kernel.approx_math = true;
  softcap.min_tol = Tol{1e-3, 2e-3, 5e-4, 1e-3};
  softcap.opts.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
  softcap.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 300, 300, 128);
  softcap.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) { return q >= kv ? 20.0 * std::tanh(s / 20.0) : -kInf; };
  Case wide = softcap;
  wide.opts.block_mask.reset();
  wide.opts.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 30.0 * tanh(s / 20.0); };
  wide.mod = [](double s, int64_t, int64_t, int64_t, int64_t) { return 30.0 * std::tanh(s / 20.0); };
  Case indexed = softcap;
  indexed.opts.scale = -0.2;
  indexed.opts.score_mod = [](Expr s, Expr, Expr, Expr q, Expr kv) { return 10.0 * tanh(s / 10.0 + to_float(q - kv) * 0.01); };
  indexed.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) {
    return q >= kv ? 10.0 * std::tanh(s / 10.0 + static_cast<double>(q - kv) * 0.01) : -kInf;
  };
  for (const auto& [c, what] : {std::pair{&softcap, "softcap, causal"}, std::pair{&wide, "30 tanh(s / 20), no mask"},
                                std::pair{&indexed, "a core reading q and kv, negative scale"}}) {
    SCOPED_TRACE(what);
    const int64_t calls = cuda::flex::affine_fold_calls();
    check(*c);
    EXPECT_GT(cuda::flex::affine_fold_calls(), calls) << "the fold did not run";
  }
  expect_module_changes(softcap, "FLEXGRAD_FLEX_AFFINE_FOLD", "0");
}

// The lazy rescale (FG_FWD_LAZY_RESCALE, flex_forward_common.cuh; opt-in FLEXGRAD_FLEX_FWD_LAZY_RESCALE=1): a row keeps
// its running max while the new one exceeds it by at most 2^8 in P's units. out and lse against the float64 golden on
// every loop: scores that climb along the keys (s + 0.02 kv: each sub-tile moves the max by less than the bound, the
// whole row by more, so the stale and the exact path both run), a jump past the bound (s + 30 from key 200), a
// causal mask with spread scores (the raw softmax; rows whose first sub-tiles keep nothing), and a NaN in query row
// 50 (its out and lse NaN). Its counter moves and FLEXGRAD_FLEX_FWD_LAZY_RESCALE unset loads another module; with
// max_scores asked for it is not taken (the kept max would be stale), and the max is right.
TEST_P(FlexWgmmaPipeline, LazyRescaleMatchesTheGolden) {
  ScopedEnv lazy("FLEXGRAD_FLEX_FWD_LAZY_RESCALE", "1");
  Case climb;
  climb.B = climb.Bkv = 1, climb.E = climb.Ev = 128, climb.Lq = climb.Lkv = 300;
  climb.with_max_scores = false;
  climb.opts.score_mod = [](Expr s, Expr, Expr, Expr, Expr kv) { return s + to_float(kv) * 0.02; };
  climb.mod = [](double s, int64_t, int64_t, int64_t, int64_t kv) { return s + 0.02 * static_cast<double>(kv); };
  Case jump = climb;
  jump.opts.score_mod = [](Expr s, Expr, Expr, Expr, Expr kv) { return where(kv >= 200, s + 30.0, s); };
  jump.mod = [](double s, int64_t, int64_t, int64_t, int64_t kv) { return kv >= 200 ? s + 30.0 : s; };
  Case causal_spread = climb;
  causal_spread.opts.score_mod = nullptr;
  causal_spread.input_scale = 3.0;
  causal_spread.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 300, 300, 128);
  causal_spread.mod = causal_golden;
  for (const auto& [c, what] : {std::pair{&climb, "scores climbing along the keys"}, std::pair{&jump, "a jump past the bound"},
                                std::pair{&causal_spread, "causal, spread scores"}}) {
    SCOPED_TRACE(what);
    const int64_t calls = cuda::flex::lazy_rescale_calls();
    check(*c);
    EXPECT_GT(cuda::flex::lazy_rescale_calls(), calls) << "the lazy rescale did not run";
  }
  {
    SCOPED_TRACE("a NaN in query row 50");
    expect_only_row_50_nan(run_with_nan_in_row_50(climb.opts, std::get<0>(GetParam())), {49, 50, 51});
  }
  {
    SCOPED_TRACE("max_scores asked for: not taken");
    Case c = climb;
    c.with_max_scores = true;
    const int64_t calls = cuda::flex::lazy_rescale_calls();
    check(c);
    EXPECT_EQ(cuda::flex::lazy_rescale_calls(), calls) << "taken with max_scores";
  }
  lazy.set(nullptr);
  expect_module_changes(climb, "FLEXGRAD_FLEX_FWD_LAZY_RESCALE", "1");
  lazy.set("x");
  testing::expect_error<ValueError>(
      [&] {
        Case c = climb;
        check(c);
      },
      "FLEXGRAD_FLEX_FWD_LAZY_RESCALE");
}

// The bounded max (kFgBoundedMax, flex_forward_common.cuh; the default where it applies): softcap under approx_math
// in bfloat16 without max_scores keeps no running max (P = exp(20 (u - 1)), u = tanh(s / 20)). out and lse against
// the float64 golden at approx_math's tolerance on every loop, scores spread past the cap (input_scale 4), a causal
// mask whose rows 0-9 keep nothing (out 0, lse -inf: an empty row, not 0 / 0), and a NaN in query row 50 (its out
// and lse NaN, as with the running max); its counter moves for bfloat16 only, on the mma.sync kernel too, and for a
// core bounded by its arithmetic (20 (0.5 tanh(s / 20) + 0.5): [0, 1]). Not
// taken: with max_scores asked for, with a span out of range (30 tanh(s / 10): exp(-60) is under 2^-64), with
// FLEXGRAD_FLEX_FWD_BOUNDED_MAX=0 (which loads another module).
TEST_P(FlexWgmmaPipeline, BoundedMaxMatchesTheGolden) {
  ScopedEnv bounded("FLEXGRAD_FLEX_FWD_BOUNDED_MAX", nullptr);
  const DType dt = std::get<0>(GetParam());
  Case c;
  c.B = c.Bkv = 1, c.E = c.Ev = 128, c.Lq = c.Lkv = 300;
  c.input_scale = 4.0;
  c.with_max_scores = false;
  c.opts.kernel.approx_math = true;
  c.min_tol = Tol{1e-3, 2e-3, 5e-4, 1e-3};
  c.opts.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
  c.opts.block_mask = create_block_mask([](Expr, Expr, Expr q, Expr kv) { return (q >= 10) & (q >= kv); },
                                        std::nullopt, std::nullopt, 300, 300, 128);
  c.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) {
    return q >= 10 && q >= kv ? 20.0 * std::tanh(s / 20.0) : -kInf;
  };
  auto counted = [&](const Case& x, const char* what) {
    SCOPED_TRACE(what);
    const int64_t calls = cuda::flex::bounded_max_calls();
    check(x);
    return cuda::flex::bounded_max_calls() - calls;
  };
  EXPECT_EQ(counted(c, "softcap, causal, rows 0-9 empty"), dt == kBFloat16 ? 1 : 0);
  {
    SCOPED_TRACE("the mma.sync kernel");
    const int64_t calls = cuda::flex::bounded_max_calls();
    check_case(c, dt, FlexCudaForward::Tiled, 1);
    EXPECT_EQ(cuda::flex::bounded_max_calls() - calls, dt == kBFloat16 ? 1 : 0);
  }
  {
    Case m = c;
    m.with_max_scores = true;
    EXPECT_EQ(counted(m, "with max_scores"), 0);
    Case wide = c;
    wide.opts.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 30.0 * tanh(s / 10.0); };
    wide.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) {
      return q >= 10 && q >= kv ? 30.0 * std::tanh(s / 10.0) : -kInf;
    };
    EXPECT_EQ(counted(wide, "30 tanh(s / 10)"), 0);
    // A core bounded by its arithmetic, not its output op: 0.5 tanh(x) + 0.5 in [0, 1] (float_ranges.h).
    Case image = c;
    image.opts.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * (0.5 * tanh(s / 20.0) + 0.5); };
    image.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) {
      return q >= 10 && q >= kv ? 20.0 * (0.5 * std::tanh(s / 20.0) + 0.5) : -kInf;
    };
    EXPECT_EQ(counted(image, "20 (0.5 tanh(s / 20) + 0.5)"), dt == kBFloat16 ? 1 : 0);
  }
  {
    SCOPED_TRACE("a NaN in query row 50");
    const NanRowRun r = run_with_nan_in_row_50(c.opts, dt);
    expect_only_row_50_nan(r, {9, 50, 51});
    EXPECT_EQ(r.lse[9], -kInf) << "row 9 keeps nothing";
  }
  expect_module_changes(c, "FLEXGRAD_FLEX_FWD_BOUNDED_MAX", "0");
}

TEST_P(FlexWgmmaPipeline, SoftcapOverManySubTiles) {
  Case c;
  c.B = c.Bkv = 1, c.E = c.Ev = 128, c.Lq = c.Lkv = 600;
  c.input_scale = 3.0;
  c.opts.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
  c.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 600, 600);
  c.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) { return q >= kv ? 20.0 * std::tanh(s / 20.0) : -kInf; };
  check(c);
}

INSTANTIATE_TEST_SUITE_P(Wgmma, FlexWgmmaPipeline,
                         ::testing::Combine(::testing::Values(kBFloat16, kFloat16), ::testing::Values("0", "1", "2", "3", "3pp", "2P", "3ppP"),
                                            ::testing::Values("64", "128")),
                         [](const auto& info) {
                           return std::string(dtype_name(std::get<0>(info.param))) + "_pipe" +
                                  std::get<1>(info.param) + "_bn" + std::get<2>(info.param);
                         });
#endif  // FLEXGRAD_WITH_CUDA

TEST_F(FlexWgmmaChoice, PipelineKnobsRejectBadValues) {
  const Device cuda(DeviceType::CUDA, 0);
  if (device_arch() != "sm_90a") GTEST_SKIP() << "needs sm_90a; this device is " << device_arch();
  FlexAttentionOptions o;
  o.kernel.cuda_forward = FlexCudaForward::Wgmma;
  Tensor q = randn({1, 2, 64, 64}).to(kBFloat16).to(cuda);
  {
    ScopedEnv pipe("FLEXGRAD_FLEX_WGMMA_PIPE", "4");
    testing::expect_error<ValueError>([&] { flex_attention(q, q, q, o); }, "FLEXGRAD_FLEX_WGMMA_PIPE");
  }
  {
    ScopedEnv bounded("FLEXGRAD_FLEX_FWD_BOUNDED_MAX", "2");
    testing::expect_error<ValueError>([&] { flex_attention(q, q, q, o); }, "FLEXGRAD_FLEX_FWD_BOUNDED_MAX");
  }
  {
    ScopedEnv pipe("FLEXGRAD_FLEX_WGMMA_PIPE", "3");
    ScopedEnv pingpong("FLEXGRAD_FLEX_WGMMA_PINGPONG", "yes");
    Tensor q128 = randn({1, 2, 128, 64}).to(kBFloat16).to(cuda);  // a 128-row tile: the loop that reads the knob
    testing::expect_error<ValueError>([&] { flex_attention(q128, q128, q128, o); }, "FLEXGRAD_FLEX_WGMMA_PINGPONG");
  }
  {
    ScopedEnv persistent("FLEXGRAD_FLEX_WGMMA_PERSISTENT", "-1");
    Tensor q128 = randn({1, 2, 128, 64}).to(kBFloat16).to(cuda);
    testing::expect_error<ValueError>([&] { flex_attention(q128, q128, q128, o); }, "FLEXGRAD_FLEX_WGMMA_PERSISTENT");
  }
  {
    ScopedEnv bn("FLEXGRAD_FLEX_WGMMA_BN", "96");
    testing::expect_error<ValueError>([&] { flex_attention(q, q, q, o); }, "FLEXGRAD_FLEX_WGMMA_BN");
  }
  {
    ScopedEnv pipe("FLEXGRAD_FLEX_WGMMA_PIPE", "2");
    ScopedEnv tma("FLEXGRAD_FLEX_WGMMA_TMA", "2");
    Tensor q128 = randn({1, 2, 128, 64}).to(kBFloat16).to(cuda);  // a 128-row tile: the loop that reads the knob
    testing::expect_error<ValueError>([&] { flex_attention(q128, q128, q128, o); }, "FLEXGRAD_FLEX_WGMMA_TMA");
  }
  Tensor wide = randn({1, 2, 64, 256}).to(kBFloat16).to(cuda);
  ScopedEnv bn("FLEXGRAD_FLEX_WGMMA_BN", "128");
  testing::expect_error<ValueError>([&] { flex_attention(wide, wide, wide, o); }, "head dims up to 128");
}


#ifdef FLEXGRAD_WITH_CUDA
// Two CTAs an SM (FLEXGRAD_FLEX_WGMMA_TWO_CTAS=1, opt-in: pipe 2, BN 64, FG_MIN_BLOCKS 2 with setmaxnreg's 32 / 104
// split) at head dim 64, against the float64 golden: causal over 1000 rows (16 sub-tiles a row, partial and full
// blocks), rows with no block and partial -> full -> partial ones, softcap and captured-slope ALiBi with causal, the
// captured document mask (the producer's column parts), in bfloat16 and float16. The knob must change the module
// (a D 64 call loads another one), and calls it cannot take raise.
TEST_F(FlexWgmmaChoice, TwoCtasAnSmMatchTheGolden) {
  const Device cuda(DeviceType::CUDA, 0);
  if (device_arch() != "sm_90a") GTEST_SKIP() << "needs sm_90a; this device is " << device_arch();
  ScopedEnv pipe("FLEXGRAD_FLEX_WGMMA_PIPE", nullptr), bn("FLEXGRAD_FLEX_WGMMA_BN", nullptr),
      persistent("FLEXGRAD_FLEX_WGMMA_PERSISTENT", nullptr), two("FLEXGRAD_FLEX_WGMMA_TWO_CTAS", nullptr);
  std::vector<std::pair<std::string, Case>> cases;
  {
    Case c;
    c.Lq = c.Lkv = 1000;
    c.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 1000, 1000);
    c.mod = causal_golden;
    cases.emplace_back("causal", c);
  }
  {
    Case c;
    c.B = c.Bkv = 1, c.Lq = c.Lkv = 700;
    auto m = [](Expr, Expr, Expr q, Expr kv) { return (q >= 150) & (kv <= q) & (q - kv <= 300); };
    c.opts.block_mask = create_block_mask(m, std::nullopt, std::nullopt, 700, 700);
    c.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) {
      return q >= 150 && kv <= q && q - kv <= 300 ? s : -kInf;
    };
    cases.emplace_back("empty rows, partial-full-partial", c);
  }
  {
    Case c;
    c.Lq = c.Lkv = 600;
    c.input_scale = 3.0;
    c.opts.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
    c.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 600, 600);
    c.mod = [](double s, int64_t, int64_t, int64_t q, int64_t kv) { return q >= kv ? 20.0 * std::tanh(s / 20.0) : -kInf; };
    cases.emplace_back("softcap + causal", c);
  }
  {
    const int64_t H = 4;
    std::vector<double> slopes(H);
    for (int64_t h = 0; h < H; ++h) slopes[h] = std::exp2(-(h + 1) * 8.0 / H);
    Tensor sl = from_vector(slopes, {H}, kFloat32);
    std::vector<double> sl32 = sl.to(kFloat64).to_vector();
    Case c;
    c.Hq = c.Hkv = H, c.Lq = c.Lkv = 520;
    c.opts.score_mod = [s_ = Captured(sl.to(cuda))](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + s_[h] * (kv - q); };
    c.opts.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 520, 520);
    c.mod = [sl32](double s, int64_t, int64_t h, int64_t q, int64_t kv) {
      return q >= kv ? s + sl32[h] * static_cast<double>(kv - q) : -kInf;
    };
    cases.emplace_back("alibi + causal", c);
  }
  {
    Case c = captured_document_case();
    c.E = c.Ev = 64;
    cases.emplace_back("captured document mask", c);
  }
  two.set("1");
  for (const auto& [name, c] : cases) {
    SCOPED_TRACE(name);
    for (DType dt : {kBFloat16, kFloat16}) check_case(c, dt, FlexCudaForward::Wgmma, 7);
  }

  // The knob changes the D 64 kernel: with it set, the same call loads another module.
  auto run_d = [&](int64_t D) {
    Generator gen(5);
    Tensor q = randn({1, 2, 300, D}, kFloat32, &gen).to(kBFloat16).to(cuda);
    FlexAttentionOptions o;
    o.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, 300, 300);
    o.kernel.backend = FlexBackend::Fused;
    o.kernel.cuda_forward = FlexCudaForward::Wgmma;
    return flex_attention(q, q, q, o);
  };
  two.set(nullptr);
  cuda::jit::clear_memory_cache();
  run_d(64);
  const cuda::jit::JitStats before = cuda::jit::stats();
  two.set("1");
  run_d(64);
  const cuda::jit::JitStats after = cuda::jit::stats();
  EXPECT_GT(after.compiles + after.disk_hits, before.compiles + before.disk_hits)
      << "FLEXGRAD_FLEX_WGMMA_TWO_CTAS=1 ran the same module at D 64 as without it";

  // Calls it cannot take raise, naming what was seen: wider heads, another loop, the persistent launch.
  testing::expect_error<ValueError>([&] { run_d(128); }, "E=128");
  testing::expect_error<ValueError>([&] { run_d(128); }, "FLEXGRAD_FLEX_WGMMA_PIPE unset");
  {
    ScopedEnv p3("FLEXGRAD_FLEX_WGMMA_PIPE", "3");
    testing::expect_error<ValueError>([&] { run_d(64); }, "FLEXGRAD_FLEX_WGMMA_PIPE 3");
  }
  {
    ScopedEnv p1("FLEXGRAD_FLEX_WGMMA_PERSISTENT", "1");
    testing::expect_error<ValueError>([&] { run_d(64); }, "persistent 1");
  }
}
#endif  // FLEXGRAD_WITH_CUDA

// Division by a constant (attention/const_division.h): the softcap's s / 20 as __fdiv_rn (FLEXGRAD_FLEX_CONST_DIVISION
// =0) and in the default forms (the double product; Markstein's corrected form for a thread's sub-tile whose dividends
// are all in its range, FG_SCORE_ELEM_FAST and FG_SCORE_ELEM_DSCORE_FAST) give the forward's output and log-sum-exp and
// the backward's gradients bit for bit, on the Wgmma and Tiled forwards (both sub-tile widths) and their backwards. Some q rows are scaled to 1e-30 (scores below 2^-64) and some k rows to 1e25
// (above 2^64): their threads take the exact form; zeros are in the form's range.
TEST_F(FlexWgmmaChoice, ConstDivisionFormsGiveTheSameBits) {
  const Device cuda(DeviceType::CUDA, 0);
  const int64_t L = 300, E = 128;
  Tensor q = randn({1, 2, L, E}), k = randn({1, 2, L, E}), v = randn({1, 2, L, E});
  std::vector<double> qs(static_cast<size_t>(L), 1.0), ks(static_cast<size_t>(L), 1.0);
  for (int64_t i = 0; i < L; ++i) {
    if (i % 37 == 5) qs[i] = 1e-30;
    if (i % 53 == 7) ks[i] = 1e25;
    if (i % 61 == 3) qs[i] = 0.0;
  }
  q = q * from_vector(qs, {1, 1, L, 1}, kFloat64).to(kFloat32);
  k = k * from_vector(ks, {1, 1, L, 1}, kFloat64).to(kFloat32);
  q = q.to(kBFloat16).to(cuda), k = k.to(kBFloat16).to(cuda), v = v.to(kBFloat16).to(cuda);
  std::vector<std::pair<FlexCudaForward, const char*>> kernels = {{FlexCudaForward::Tiled, "128"}};
  if (device_arch() == "sm_90a")
    kernels.insert(kernels.end(), {{FlexCudaForward::Wgmma, "128"}, {FlexCudaForward::Wgmma, "64"}});
  for (const auto& [kernel, bn] : kernels) {
    SCOPED_TRACE(fmt::format("{}, BN {}", kernel == FlexCudaForward::Wgmma ? "wgmma" : "tiled", bn));
    ScopedEnv width("FLEXGRAD_FLEX_WGMMA_BN", kernel == FlexCudaForward::Wgmma ? bn : nullptr);
    // out, lse, then dq, dk, dv of sum(out) (the backward's default kernels for the forward's choice)
    auto run = [&] {
      FlexAttentionOptions o;
      o.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
      o.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, L, L);
      o.return_lse = true;
      o.kernel.cuda_forward = kernel;
      Tensor qg = q.detach().requires_grad_(), kg = k.detach().requires_grad_(), vg = v.detach().requires_grad_();
      const FlexAttentionResult r = flex_attention(qg, kg, vg, o);
      r.out.to(kFloat32).sum().backward();
      std::vector<std::vector<double>> got;
      for (const Tensor& t : {r.out, r.lse, qg.grad(), kg.grad(), vg.grad()})
        got.push_back(t.to(kCPU).to(kFloat64).to_vector());
      return got;
    };
    const auto fast = run();
    decltype(run()) exact;
    {
      ScopedEnv off("FLEXGRAD_FLEX_CONST_DIVISION", "0");
      exact = run();
    }
    const char* names[] = {"out", "lse", "dq", "dk", "dv"};
    for (size_t i = 0; i < fast.size(); ++i) {
      ASSERT_EQ(fast[i].size(), exact[i].size()) << names[i];
      EXPECT_EQ(std::memcmp(fast[i].data(), exact[i].data(), fast[i].size() * sizeof(double)), 0) << names[i];
      size_t finite = 0;
      for (double x : fast[i]) finite += std::isfinite(x);
      EXPECT_EQ(finite, fast[i].size()) << names[i];
    }
  }
}

}  // namespace
}  // namespace fg
