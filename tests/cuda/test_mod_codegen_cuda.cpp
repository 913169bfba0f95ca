// The generated CUDA mods (attention/mod_codegen.h) on the GPU against the CPU's op semantics: random
// programs (tests/attention/random_mods.h) are emitted with emit_cuda_mods, compiled through
// fg::cuda::jit with a small kernel that evaluates fg_score_mod / fg_mask_mod / fg_dscore / fg_cap_grad
// at every (b, h, q, kv) of a grid, and compared with
//   double kernels: the scalar evaluator, bracketed by runs whose libm results move by up to 4 ulp
//                   (CUDA's exp/sin/pow are within 2 ulp; an ill-conditioned program gets a wide
//                   bracket, a well-conditioned one a 1e-12 one);
//   float kernels:  the CPU's float TileEvaluator (both ~2 ulp functions): few-ulp agreement on
//                   nearly every point (ill-conditioned points are counted, and must stay rare);
//   capture gradients: the scalar evaluator's derivative program summed over the grid.
// Plus the error flag: an out-of-range captured read or an integer division by zero on the GPU raises
// on the host what the CPU raises. Skips visibly without a GPU.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>

#include "flexgrad/attention/const_division.h"
#include "flexgrad/attention/mod_codegen.h"
#include "flexgrad/attention/mod_grad.h"
#include "flexgrad/attention/tile_eval.h"
#include "tests/attention/random_mods.h"
#include "tests/test_util.h"
#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/attention/cuda/flex_cuda_common.h"
#include "flexgrad/attention/cuda/jit.h"
#endif

using namespace fg;

#ifdef FLEXGRAD_WITH_CUDA
namespace {

constexpr int64_t kB = 2, kH = 3, kLq = 9, kLkv = 11;
constexpr int64_t kPoints = kB * kH * kLq * kLkv;

const char* kKernel = R"(
struct FuzzOut {
  double* sd; float* sf; unsigned char* md; unsigned char* mf; double* dd; float* df;
  double* cap[FG_MAX_CAPTURES];
};
struct CapSink {
  double* cap[FG_MAX_CAPTURES];
  __device__ void add(int slot, fg_i64 i, double v) const { atomicAdd(cap[slot] + i, v); }
};
extern "C" __global__ void fg_fuzz(FgModArgs a, const double* scores, FuzzOut o, int B, int H, int Lq, int Lkv) {
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  if (p >= B * H * Lq * Lkv) return;
  const int kv = p % Lkv, q = (p / Lkv) % Lq, h = (p / (Lkv * Lq)) % H, b = p / (Lkv * Lq * H);
  const double s = scores[p];
  o.sd[p] = fg_score_mod<double>(s, b, h, q, kv, a);
  o.sf[p] = fg_score_mod<float>((float)s, b, h, q, kv, a);
  o.md[p] = fg_mask_mod_t<double>(b, h, q, kv, a) ? 1 : 0;
  o.mf[p] = fg_mask_mod(b, h, q, kv, a) ? 1 : 0;
  o.dd[p] = fg_dscore<double>(s, b, h, q, kv, a);
  o.df[p] = fg_dscore<float>((float)s, b, h, q, kv, a);
  CapSink sink;
  for (int i = 0; i < FG_MAX_CAPTURES; ++i) sink.cap[i] = o.cap[i];
  fg_cap_grad<double, CapSink>(s, 1.0, b, h, q, kv, a, sink);
}
)";

// Host mirror of FuzzOut above.
struct FuzzOut {
  double* sd;
  float* sf;
  unsigned char* md;
  unsigned char* mf;
  double* dd;
  float* df;
  double* cap[cuda::flex::kMaxCaptures];
};

struct GpuRun {
  std::vector<double> sd, dd;
  std::vector<float> sf, df;
  std::vector<double> md, mf;
  std::vector<std::vector<double>> capgrad;  // per kernel slot (float64 sums over the grid)
  cuda::flex::FgError error;
};

Tensor dev(const Tensor& t) { return t.to(Device(DeviceType::CUDA, 0)); }

// Emits, compiles and runs the fuzz kernel. `caps` are the kernel's capture slots (CPU tensors; copied).
GpuRun run_on_gpu(const ModProgram* score, const ModProgram* mask, const ScoreModBackward* grad,
                  const std::vector<Tensor>& caps, const std::vector<double>& scores) {
  auto slots_of = [&](const std::vector<CaptureRef>& refs) {
    std::vector<int> s;
    for (const CaptureRef& r : refs)
      for (size_t i = 0; i < caps.size(); ++i)
        if (caps[i].is_same(r.tensor)) s.push_back(static_cast<int>(i));
    return s;
  };
  CudaModsInput in;
  in.score_mod = score;
  in.mask_mod = mask;
  in.score_grad = grad;
  if (score) in.score_slots = slots_of(score->captures());
  if (mask) in.mask_slots = slots_of(mask->captures());
  if (grad) {
    in.grad_slots = slots_of(grad->program.captures());
    in.grad_needed.assign(grad->captures.size(), true);
  }
  const std::string code = std::string(cuda::jit::embedded_source("flex_abi.cuh")) + emit_cuda_mods(in) + kKernel;
  auto module = cuda::jit::get_module(cuda::jit::JitSource{"mod_codegen_fuzz", code, {"fg_fuzz"}, {}}, 0);

  std::vector<Tensor> dcaps;
  cuda::flex::FgModArgs args;
  for (size_t i = 0; i < caps.size(); ++i) {
    dcaps.push_back(dev(caps[i]));
    const Tensor& t = dcaps.back();
    cuda::flex::FgCapture& c = args.caps[i];
    c.data = t.data_ptr();
    c.ndim = static_cast<int>(t.dim());
    c.dtype = cuda::flex::abi_dtype(t.dtype());
    for (int64_t d = 0; d < t.dim(); ++d) {
      c.sizes[d] = t.size(d);
      c.strides[d] = t.stride(d);
    }
  }
  const auto on_gpu = TensorOptions().device(Device(DeviceType::CUDA, 0));
  Tensor err = zeros({static_cast<int64_t>(sizeof(cuda::flex::FgError) / 8)}, on_gpu.dtype(kInt64));
  args.error = static_cast<cuda::flex::FgError*>(err.data_ptr());
  Tensor s_in = dev(from_vector(scores, {kPoints}, kFloat64));
  Tensor sd = zeros({kPoints}, on_gpu.dtype(kFloat64)), dd = zeros({kPoints}, on_gpu.dtype(kFloat64));
  Tensor sf = zeros({kPoints}, on_gpu.dtype(kFloat32)), df = zeros({kPoints}, on_gpu.dtype(kFloat32));
  Tensor md = zeros({kPoints}, on_gpu.dtype(kBool)), mf = zeros({kPoints}, on_gpu.dtype(kBool));
  FuzzOut o{};
  o.sd = static_cast<double*>(sd.data_ptr());
  o.sf = static_cast<float*>(sf.data_ptr());
  o.md = static_cast<unsigned char*>(md.data_ptr());
  o.mf = static_cast<unsigned char*>(mf.data_ptr());
  o.dd = static_cast<double*>(dd.data_ptr());
  o.df = static_cast<float*>(df.data_ptr());
  std::vector<Tensor> acc;
  for (size_t i = 0; i < caps.size(); ++i) {
    acc.push_back(zeros({caps[i].numel()}, on_gpu.dtype(kFloat64)));
    o.cap[i] = static_cast<double*>(acc.back().data_ptr());
  }
  const double* sp = static_cast<const double*>(s_in.data_ptr());
  int B = kB, H = kH, Lq = kLq, Lkv = kLkv;
  void* kargs[] = {&args, &sp, &o, &B, &H, &Lq, &Lkv};
  cuda::jit::launch(module->function("fg_fuzz"), {static_cast<unsigned>((kPoints + 127) / 128)}, {128}, 0, kargs, 0);

  GpuRun r;
  r.sd = sd.cpu().to_vector();
  r.dd = dd.cpu().to_vector();
  r.md = md.cpu().to_vector();
  r.mf = mf.cpu().to_vector();
  for (double x : sf.cpu().to_vector()) r.sf.push_back(static_cast<float>(x));
  for (double x : df.cpu().to_vector()) r.df.push_back(static_cast<float>(x));
  for (Tensor& t : acc) r.capgrad.push_back(t.cpu().to_vector());
  Tensor e = err.cpu();
  std::memcpy(&r.error, e.data_ptr(), sizeof r.error);
  return r;
}

void for_points(const std::function<void(int64_t, int64_t, int64_t, int64_t, size_t)>& f) {
  size_t p = 0;
  for (int64_t b = 0; b < kB; ++b)
    for (int64_t h = 0; h < kH; ++h)
      for (int64_t q = 0; q < kLq; ++q)
        for (int64_t kv = 0; kv < kLkv; ++kv) f(b, h, q, kv, p++);
}

bool same(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

// Is `got` within the bracket of perturbed scalar evaluations of output `out`?
struct Bracket {
  double lo = INFINITY, hi = -INFINITY;
  bool nan = false;
  std::vector<double> seen;
  void add(double v) {
    seen.push_back(v);
    if (std::isnan(v)) nan = true;
    else { lo = std::min(lo, v); hi = std::max(hi, v); }
  }
  bool holds(double v) const {
    for (double s : seen)
      if (same(s, v)) return true;
    if (std::isnan(v)) return nan;
    const double tol = 1e-12 * std::max({1.0, std::abs(lo), std::abs(hi)});
    return std::isfinite(lo) && std::isfinite(hi) && v >= lo - tol && v <= hi + tol;
  }
  bool tight() const { return !nan && std::isfinite(lo) && hi - lo <= 1e-12 * std::max({1.0, std::abs(lo), std::abs(hi)}); }
};

std::vector<Bracket> brackets(const ModProgram& p, size_t output, const std::vector<double>& scores, uint64_t seed) {
  std::vector<Bracket> r(kPoints);
  std::mt19937_64 rng(seed);
  const ValueKind k = p.instrs()[p.outputs()[output]].kind;
  for_points([&](int64_t b, int64_t h, int64_t q, int64_t kv, size_t i) {
    r[i].add(fg::testing::evaluate_perturbed(p, b, h, q, kv, scores[i], nullptr, 0)[output].as_double(k));
    for (int t = 0; t < 16; ++t)
      r[i].add(fg::testing::evaluate_perturbed(p, b, h, q, kv, scores[i], &rng, 4)[output].as_double(k));
  });
  return r;
}

std::vector<double> random_scores(uint64_t seed) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> n(0, 2);
  std::vector<double> s(kPoints);
  const double special[] = {0.0, -0.0, INFINITY, -INFINITY, NAN, 1e300, 1.0};
  for (double& x : s) x = g() % 10 == 0 ? special[g() % 7] : n(g);
  return s;
}

// float results: the CPU's float tile evaluator, to a few ulp (scaled by magnitude).
bool float_close(float cpu, float gpu) {
  if ((std::isnan(cpu) && std::isnan(gpu)) || cpu == gpu) return true;
  if (!std::isfinite(cpu) || !std::isfinite(gpu)) return false;
  return std::abs(cpu - gpu) <= 1e-5f * std::max(1.0f, std::max(std::abs(cpu), std::abs(gpu)));
}

// What the host raises for the flag the GPU wrote (check_mod_errors on an error buffer holding it).
void raise_on_host(const GpuRun& r, const std::vector<CaptureRef>& captures) {
  static_assert(sizeof(cuda::flex::FgError) == 32);
  cuda::flex::ModContext ctx;
  ctx.captures = captures;
  Tensor hb = from_vector(std::vector<int64_t>(4, 0), {4}, kInt64);
  std::memcpy(hb.data_ptr(), &r.error, sizeof r.error);
  ctx.error_buf = dev(hb);
  cuda::flex::check_mod_errors(ctx);
}

template <class E, class F> std::string message_of(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  return "(nothing raised)";
}

class ModCodegenCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present: skipping the generated-mod GPU tests";
  }
};

}  // namespace

TEST_F(ModCodegenCuda, FuzzAgreesWithCpuSemantics) {
  int64_t float_points = 0, float_mismatch = 0, mask_f_mismatch = 0, cap_checked = 0;
  for (uint64_t seed = 1; seed <= 64; ++seed) {
    fg::testing::RandomModOptions opt;
    opt.steps = 10 + static_cast<int>(seed % 20);
    const fg::testing::RandomMod m = fg::testing::random_mod(seed, opt);
    const std::vector<double> scores = random_scores(seed * 31);
    // the CPU says whether the program raises; this fuzz checks values (errors are tested below)
    bool raises = false;
    for_points([&](int64_t b, int64_t h, int64_t q, int64_t kv, size_t i) {
      try {
        m.score.evaluate(b, h, q, kv, scores[i]);
        m.mask.evaluate(b, h, q, kv);
      } catch (const Error&) {
        raises = true;
      }
    });
    if (raises) continue;
    const ScoreModBackward g = derive_score_mod(m.score);
    const GpuRun r = run_on_gpu(&m.score, &m.mask, &g, m.captures, scores);
    const std::string label = "seed " + std::to_string(seed) + "\nscore_mod: " + m.score.to_string() +
                              "\nmask_mod: " + m.mask.to_string();
    ASSERT_EQ(r.error.flag, 0) << label;
    // double: inside the bracket of the scalar evaluator
    const auto bs = brackets(m.score, 0, scores, seed), bm = brackets(m.mask, 0, scores, seed),
               bd = brackets(g.program, 0, scores, seed);
    for (size_t i = 0; i < static_cast<size_t>(kPoints); ++i) {
      ASSERT_TRUE(bs[i].holds(r.sd[i])) << label << "\npoint " << i << ": gpu " << r.sd[i] << " cpu " << bs[i].seen[0]
                                        << " bracket [" << bs[i].lo << ", " << bs[i].hi << "]";
      ASSERT_TRUE(bm[i].holds(r.md[i])) << label << "\npoint " << i << ": gpu mask " << r.md[i];
      ASSERT_TRUE(bd[i].holds(r.dd[i])) << label << "\nd/dscore " << g.program.to_string(0) << "\npoint " << i
                                        << ": gpu " << r.dd[i] << " cpu " << bd[i].seen[0];
    }
    // float: the CPU float tile evaluator
    TileEvaluator<float> es(m.score), em(m.mask), ed(g.program);
    std::vector<float> fs(kLq * kLkv), fd(kLq * kLkv), fscore(kLq * kLkv);
    std::vector<uint8_t> fm(kLq * kLkv);
    for (int64_t b = 0; b < kB; ++b)
      for (int64_t h = 0; h < kH; ++h) {
        const size_t at = static_cast<size_t>((b * kH + h) * kLq * kLkv);
        for (size_t i = 0; i < fscore.size(); ++i) fscore[i] = static_cast<float>(scores[at + i]);
        es.score_tile(b, h, 0, kLq, 0, kLkv, fscore.data(), fs.data());
        em.mask_tile(b, h, 0, kLq, 0, kLkv, fm.data());
        ed.run(b, h, 0, kLq, 0, kLkv, fscore.data());
        ed.copy_output<float>(0, fd.data());
        for (size_t i = 0; i < fs.size(); ++i) {
          float_points += 2;
          float_mismatch += !float_close(fs[i], r.sf[at + i]);
          float_mismatch += !float_close(fd[i], r.df[at + i]);
          mask_f_mismatch += (fm[i] != 0) != (r.mf[at + i] != 0);
        }
      }
    // capture gradients: sums over the grid, when every derivative output is well conditioned
    bool tight = true;
    std::vector<std::vector<Bracket>> bo;
    for (size_t o = 1; o < g.program.outputs().size() && tight; ++o) {
      bo.push_back(brackets(g.program, o, scores, seed));
      for (const Bracket& x : bo.back()) tight = tight && x.tight();
    }
    if (!tight || g.terms.empty()) continue;
    std::vector<std::vector<double>> want(m.captures.size()), mag(m.captures.size());
    for (size_t c = 0; c < m.captures.size(); ++c) {
      want[c].assign(static_cast<size_t>(m.captures[c].numel()), 0.0);
      mag[c] = want[c];
    }
    for_points([&](int64_t b, int64_t h, int64_t q, int64_t kv, size_t i) {
      const std::vector<ScalarValue> v = g.program.evaluate_exact(b, h, q, kv, scores[i]);
      for (const CaptureGradTerm& t : g.terms) {
        size_t slot = 0;
        while (!m.captures[slot].is_same(g.captures[t.capture].tensor)) ++slot;
        int64_t lin = 0;
        for (int32_t d = 0; d < t.ndim; ++d) {
          int64_t x = v[t.index_output + d].i;
          if (x < 0) x += m.captures[slot].size(d);
          lin = lin * m.captures[slot].size(d) + x;
        }
        want[slot][lin] += v[t.deriv_output].f;
        mag[slot][lin] += std::abs(v[t.deriv_output].f);
      }
    });
    for (size_t c = 0; c < want.size(); ++c)
      for (size_t i = 0; i < want[c].size(); ++i) {
        if (!std::isfinite(mag[c][i])) continue;
        ASSERT_NEAR(r.capgrad[c][i], want[c][i], 1e-12 * (1 + mag[c][i])) << label << "\ncapture " << c << " elem " << i;
        ++cap_checked;
      }
  }
  std::cout << "[  INFO    ] float points " << float_points << ", beyond 1e-5 relative: " << float_mismatch
            << "; float mask mismatches " << mask_f_mismatch << "; capture-gradient elements checked " << cap_checked
            << "\n";
  EXPECT_LE(float_mismatch * 100, float_points) << "more than 1% of float results differ from the CPU float path";
  EXPECT_LE(mask_f_mismatch * 100, float_points / 2);
  EXPECT_GT(cap_checked, 10);  // the gradient comparison really ran
}

TEST_F(ModCodegenCuda, OutOfRangeCapturedIndexRaisesLikeTheCpu) {
  Captured t(from_vector(std::vector<double>{10, 20, 30, 40}, {4}, kFloat64), "t");
  ModProgram p = trace_score_mod([t](Expr s, Expr, Expr, Expr q, Expr) { return s + t[q - 9]; });  // q < 5: < -4
  std::vector<double> scores(kPoints, 0.5);
  const GpuRun r = run_on_gpu(&p, nullptr, nullptr, {p.captures()[0].tensor}, scores);
  ASSERT_EQ(r.error.flag, 1);
  EXPECT_EQ(r.error.capture, 0);
  EXPECT_EQ(r.error.dim, 0);
  EXPECT_EQ(r.error.size, 4);
  EXPECT_GE(r.error.index, -9);
  EXPECT_LT(r.error.index, -4);
  // the CPU rejects that very index, and the host check raises the CPU's error
  std::string cpu_message;
  try {
    p.evaluate(0, 0, r.error.index + 9, 0);
  } catch (const IndexError& e) {
    cpu_message = e.what();
  }
  ASSERT_FALSE(cpu_message.empty());
  EXPECT_THROW_MSG(raise_on_host(r, p.captures()), IndexError, cpu_message);
  // in range everywhere (q - 4 wraps for q < 4): no flag
  ModProgram ok = trace_score_mod([t](Expr s, Expr, Expr, Expr q, Expr) { return s + t[q % 8 - 4]; });
  const GpuRun r2 = run_on_gpu(&ok, nullptr, nullptr, {ok.captures()[0].tensor}, scores);
  EXPECT_EQ(r2.error.flag, 0);
  for_points([&](int64_t b, int64_t h, int64_t q, int64_t kv, size_t i) {
    EXPECT_EQ(r2.sd[i], ok.evaluate(b, h, q, kv, 0.5));
  });
}

TEST_F(ModCodegenCuda, IntegerErrorsAreFlaggedNotACrash) {
  std::vector<double> scores(kPoints, 0.0);
  // q // kv at kv == 0 (every row): flag 2, and the host raises the CPU's ValueError for that dividend
  ModProgram p = trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return floor_div(q + 100, kv) >= 0; });
  const GpuRun r = run_on_gpu(nullptr, &p, nullptr, {}, scores);
  ASSERT_EQ(r.error.flag, 2);
  EXPECT_EQ(r.error.capture, -1);
  const std::string cpu = message_of<ValueError>([&] { p.evaluate(0, 0, r.error.index - 100, 0); });
  EXPECT_THROW_MSG(raise_on_host(r, {}), ValueError, cpu, std::string("floor division by zero"));
  // remainder
  ModProgram m = trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return (q + 100) % (kv - 1) >= 0; });
  const GpuRun rm = run_on_gpu(nullptr, &m, nullptr, {}, scores);
  ASSERT_EQ(rm.error.flag, 2);
  EXPECT_THROW_MSG(raise_on_host(rm, {}), ValueError,
                   message_of<ValueError>([&] { m.evaluate(0, 0, rm.error.index - 100, 1); }), std::string("remainder by zero"));
  // an integer to a negative power: flag 3
  ModProgram neg = trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return pow(q + 100, kv - 3) > 0; });
  const GpuRun rn = run_on_gpu(nullptr, &neg, nullptr, {}, scores);
  ASSERT_EQ(rn.error.flag, 3);
  EXPECT_EQ(rn.error.capture, -1);
  EXPECT_LT(rn.error.size, 0);  // the exponent
  EXPECT_THROW_MSG(raise_on_host(rn, {}), ValueError,
                   message_of<ValueError>([&] { neg.evaluate(0, 0, rn.error.index - 100, rn.error.size + 3); }));
}

// Division by a constant on the GPU (const_division.h: x * 2^-k for a power of two, the double product for 20, 3, 6,
// 0.75 and 12345.75, __fdiv_rn for 98, whose double product misrounds a tie): the float score_mod s / c and its
// derivative 1 / c equal C++'s float division on the host (IEEE, correctly rounded) bit for bit, at scores of every
// exponent, at subnormal quotients and their midpoints (ties: x = B C 2^(g - 150) for c = C 2^g, B odd), zeros,
// infinities and NaN.
TEST_F(ModCodegenCuda, DivisionByAConstantIsCorrectlyRounded) {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> xs = {0.f, -0.f, inf, -inf, std::numeric_limits<float>::quiet_NaN(),
                           std::numeric_limits<float>::max(), -std::numeric_limits<float>::max(),
                           std::numeric_limits<float>::min(), std::numeric_limits<float>::denorm_min(), -1e-40f,
                           0x1.fffffep-110f, 0x1.000002p-126f, 1.f, 20.f, -3.f};
  for (int b = 1; b < 64; b += 2)  // quotients at subnormal midpoints for c = 20 (5 2^2), 6 (3 2) and 98 (49 2)
    for (const float tie : {b * 5 * 0x1p-148f, b * 3 * 0x1p-149f, b * 49 * 0x1p-149f}) {
      xs.push_back(tie);
      xs.push_back(-tie);
    }
  std::mt19937 gen(11);
  std::uniform_real_distribution<float> scores(-60.f, 60.f);
  while (xs.size() < static_cast<size_t>(kPoints))
    xs.push_back(xs.size() % 2 ? std::bit_cast<float>(static_cast<uint32_t>(gen())) : scores(gen));
  const std::vector<double> in(xs.begin(), xs.end());
  // (constants float holds exactly: the derivative's 1 / c may be folded in double, then rounded once)
  for (const double c : {16.0, -0.25, 0x1p-20, 0x1p20, 20.0, 3.0, 6.0, 0.75, 12345.75, 98.0}) {
    SCOPED_TRACE(c);
    const float cf = static_cast<float>(c);
    const ModProgram p = trace_score_mod([c](Expr s, Expr, Expr, Expr, Expr) { return s / c; });
    const ScoreModBackward g = derive_score_mod(p);
    const GpuRun r = run_on_gpu(&p, nullptr, &g, {}, in);
    for (size_t i = 0; i < xs.size(); ++i) {
      const float want = xs[i] / cf;
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(r.sf[i])) << xs[i] << " / " << cf;
      } else {
        ASSERT_EQ(std::bit_cast<uint32_t>(r.sf[i]), std::bit_cast<uint32_t>(want))
            << std::hexfloat << xs[i] << " / " << cf << ": gpu " << r.sf[i] << ", host " << want;
      }
      ASSERT_EQ(std::bit_cast<uint32_t>(r.df[i]), std::bit_cast<uint32_t>(1.f / cf)) << "d/ds at " << xs[i];
    }
  }
}

// FLEXGRAD_FLEX_CONST_DIVISION (host only, no GPU): unset, make_mod_context's text divides by 16 as a multiplication;
// =0, with __fdiv_rn (a text of its own, not the memo's first); a bad value raises a ValueError naming it.
TEST(FlexCudaModsMemo, ConstDivisionSwitch) {
  const ModProgram score = trace_score_mod([](Expr s, Expr, Expr, Expr, Expr) { return s / 16.0; });
  auto text = [&] {
    return cuda::flex::make_mod_context(&score, nullptr, nullptr, {}, kCPU, "test", IndexBounds{1, 1, 8, 8}, false)
        .source;
  };
  const std::string on = text();
  EXPECT_TRUE(on.find("__fmul_rn(") != std::string::npos && on.find("0.0625f)") != std::string::npos) << on;
  EXPECT_TRUE(on.find("__fdiv_rn(") == std::string::npos) << on;
  {
    fg::testing::ScopedEnv off("FLEXGRAD_FLEX_CONST_DIVISION", "0");
    const std::string t = text();
    EXPECT_TRUE(t.find("__fdiv_rn(") != std::string::npos) << t;
    EXPECT_TRUE(t.find("__fmul_rn(") == std::string::npos) << t;
  }
  {
    fg::testing::ScopedEnv bad("FLEXGRAD_FLEX_CONST_DIVISION", "yes");
    fg::testing::expect_error<ValueError>([&] { text(); }, "FLEXGRAD_FLEX_CONST_DIVISION");
  }
  EXPECT_EQ(text(), on);
}

// make_mod_context takes the generated text from a memo keyed by the programs' structure and the captures' kernel
// slots: programs traced afresh each call reuse it, and whatever changes the text (a capture's dtype, two programs
// sharing a captured tensor or not, the derivative, approx_math) changes the key. Each text is checked against
// emit_cuda_mods run directly. (CPU tensors: no GPU needed.)
TEST(FlexCudaModsMemo, RepeatedCallsReuseTheTextAndEveryDifferenceIsInTheKey) {
  const IndexBounds bounds{1, 2, 8, 8};
  auto doc_mask = [](const Tensor& ids) {
    Captured doc(ids, "doc");
    return trace_mask_mod([doc](Expr, Expr, Expr q, Expr kv) { return (Expr(doc[q]) == Expr(doc[kv])) & (q >= kv); });
  };
  auto doc_bias = [](const Tensor& ids) {
    Captured doc(ids, "doc");
    // d / d score reads doc too: the derivative's programs carry the capture (their slots by identity)
    return trace_score_mod([doc](Expr s, Expr, Expr, Expr, Expr kv) { return tanh(s * to_float(Expr(doc[kv]) + 1)); });
  };
  const Tensor ids64 = from_vector(std::vector<int64_t>{0, 0, 1, 1, 1, 2, 2, 2}, {8}, kInt64);
  const Tensor ids32 = from_vector(std::vector<int64_t>{0, 0, 1, 1, 1, 2, 2, 2}, {8}, kInt32);
  const Tensor other64 = from_vector(std::vector<int64_t>{0, 0, 1, 1, 1, 2, 2, 2}, {8}, kInt64);
  struct Call {
    const char* name;
    Tensor score_ids, mask_ids;
    bool grad, approx;
    std::vector<int> score_slots, mask_slots;  // what make_mod_context assigns (for the direct emission)
  };
  const std::vector<Call> calls = {
      {"one tensor for both programs", ids64, ids64, false, false, {0}, {0}},
      {"two tensors", ids64, other64, false, false, {0}, {1}},
      {"int32 ids", ids32, ids32, false, false, {0}, {0}},
      {"with the derivative", ids64, ids64, true, false, {0}, {0}},
      {"approx_math", ids64, ids64, true, true, {0}, {0}},
  };
  std::vector<std::string> texts;
  for (const Call& c : calls) {
    SCOPED_TRACE(c.name);
    for (int rep = 0; rep < 2; ++rep) {  // traced afresh each time, as flex_attention does per call
      const ModProgram score = doc_bias(c.score_ids), mask = doc_mask(c.mask_ids);
      const ScoreModBackward g = derive_score_mod(score);
      const std::vector<bool> needs(g.captures.size(), false);
      const cuda::flex::ModContext ctx = cuda::flex::make_mod_context(
          &score, &mask, c.grad ? &g : nullptr, needs, kCPU, "test", bounds, c.approx);
      CudaModsInput in;
      in.score_mod = &score;
      in.mask_mod = &mask;
      in.score_slots = c.score_slots;
      in.mask_slots = c.mask_slots;
      in.approx_math = c.approx;
      if (c.grad) {
        in.score_grad = &g;
        in.grad_slots = c.score_slots;
        in.grad_needed = needs;
      }
      EXPECT_EQ(ctx.source, "#include \"flex_abi.cuh\"\n" + emit_cuda_mods(in));
      if (rep == 0) texts.push_back(ctx.source);
    }
  }
  for (size_t i = 0; i < texts.size(); ++i)
    for (size_t j = i + 1; j < texts.size(); ++j) EXPECT_NE(texts[i], texts[j]) << calls[i].name << " / " << calls[j].name;
}

// The kernel-choice overrides' 0 / 1 switch (host only, no GPU): unset and empty read as unset, 0 and 1 as
// themselves, anything else raises a ValueError naming the variable and the value.
TEST(FlexCudaEnv, SwitchReadsZeroOneAndNamesBadValues) {
  const char* name = "FLEXGRAD_TEST_ENV_SWITCH";
  fg::testing::ScopedEnv env(name, nullptr);
  EXPECT_FALSE(cuda::flex::env_switch(name).has_value());
  env.set("");
  EXPECT_FALSE(cuda::flex::env_switch(name).has_value());
  env.set("0");
  EXPECT_EQ(cuda::flex::env_switch(name), std::optional<bool>(false));
  env.set("1");
  EXPECT_EQ(cuda::flex::env_switch(name), std::optional<bool>(true));
  env.set("yes");
  fg::testing::expect_error<ValueError>([&] { cuda::flex::env_switch(name); },
                                        "FLEXGRAD_TEST_ENV_SWITCH: expected 0 or 1; got \"yes\"");
}

// The persistent launches' setting (host only, no GPU): unset / empty nothing (the caller's default), 0 (the grid),
// 1 (one CTA an SM), N >= 2 a CTA cap; anything else raises a ValueError naming the variable and the value.
TEST(FlexCudaEnv, PersistentReadsACountAndNamesBadValues) {
  const char* name = "FLEXGRAD_TEST_ENV_PERSISTENT";
  fg::testing::ScopedEnv env(name, nullptr);
  EXPECT_EQ(cuda::flex::env_persistent(name), std::nullopt);
  env.set("");
  EXPECT_EQ(cuda::flex::env_persistent(name), std::nullopt);
  for (auto [text, n] : {std::pair{"0", 0}, {"1", 1}, {"3", 3}, {"132", 132}}) {
    env.set(text);
    EXPECT_EQ(cuda::flex::env_persistent(name), n) << text;
  }
  for (const char* bad : {"-1", "x", "2x", "1.5", "99999999999"}) {
    env.set(bad);
    fg::testing::expect_error<ValueError>([&] { cuda::flex::env_persistent(name); },
                                          std::string("FLEXGRAD_TEST_ENV_PERSISTENT: expected 0, 1 (one CTA an SM) or a "
                                                      "CTA count >= 2; got \"") + bad + "\"");
  }
}
// A capped persistent grid (no device query): at most the cap, at least one CTA, and no more grid CTAs than the
// kernels' 32-bit numbering holds.
TEST(FlexCudaEnv, PersistentGridIsCappedAndRefusesOverflowingCounts) {
  EXPECT_EQ(cuda::flex::persistent_ctas(10, 3, 0), 3u);
  EXPECT_EQ(cuda::flex::persistent_ctas(2, 3, 0), 2u);
  EXPECT_EQ(cuda::flex::persistent_ctas(0, 3, 0), 1u);
  EXPECT_EQ(cuda::flex::persistent_ctas(INT32_MAX, 5, 0), 5u);
  fg::testing::expect_error<NotImplementedError>([] { cuda::flex::persistent_ctas(int64_t{INT32_MAX} + 1, 5, 0); },
                                                 "numbers its grid CTAs in 32 bits");
}

// The backward's persistent rule (host only, no GPU): persistent where the mean visited rows of the other side a grid
// CTA is at most 12 x 128 in both kernels, never where the count is unknown. Counts by hand: 32 q-block and 32 kv-block
// rows of 128 (S 4096): causal visits 528 blocks (16.5 a row), the bench's document mask ~118 (3.7), 384 is twelve.
TEST(FlexCudaPersistentRule, ShortRowsOnlyAndOnlyWhereTheCountIsKnown) {
  struct Pending final : VisitedBlocks {
    std::optional<int64_t> known() const override { return std::nullopt; }
  };
  auto problem = [](int64_t bm, int64_t hm, int64_t q_rows, int64_t kv_rows, int64_t block_q, int64_t block_kv,
                    std::shared_ptr<const VisitedBlocks> visited) {
    FlexProblem p;
    p.block_q = block_q, p.block_kv = block_kv;
    p.kv_lists.Bm = p.q_lists.Bm = bm;
    p.kv_lists.Hm = p.q_lists.Hm = hm;
    p.kv_lists.rows = q_rows;  // rows = q blocks (the dQ kernel's)
    p.q_lists.rows = kv_rows;  // rows = kv blocks (the dK/dV kernel's)
    p.visited = std::move(visited);
    return p;
  };
  using cuda::flex::persistent_pays;
  EXPECT_FALSE(persistent_pays(problem(1, 1, 32, 32, 128, 128, nullptr))) << "no count";
  EXPECT_FALSE(persistent_pays(problem(1, 1, 32, 32, 128, 128, std::make_shared<Pending>()))) << "count not landed";
  EXPECT_TRUE(persistent_pays(problem(1, 1, 32, 32, 128, 128, VisitedBlocks::of(118)))) << "document";
  EXPECT_FALSE(persistent_pays(problem(1, 1, 32, 32, 128, 128, VisitedBlocks::of(528)))) << "causal";
  EXPECT_TRUE(persistent_pays(problem(1, 1, 32, 32, 128, 128, VisitedBlocks::of(384)))) << "twelve a row";
  EXPECT_FALSE(persistent_pays(problem(1, 1, 32, 32, 128, 128, VisitedBlocks::of(385)))) << "past twelve";
  // A mask per batch and head counts over all of them.
  EXPECT_TRUE(persistent_pays(problem(4, 16, 32, 32, 128, 128, VisitedBlocks::of(4 * 16 * 118))));
  EXPECT_FALSE(persistent_pays(problem(4, 16, 32, 32, 128, 128, VisitedBlocks::of(4 * 16 * 528))));
  // Blocks of 64: rows are counted in 128-row blocks' worth (24 blocks of 64 a row = 1536 rows).
  EXPECT_TRUE(persistent_pays(problem(1, 1, 64, 64, 64, 64, VisitedBlocks::of(64 * 24))));
  EXPECT_FALSE(persistent_pays(problem(1, 1, 64, 64, 64, 64, VisitedBlocks::of(64 * 25))));
  // Lq 4096, Lkv 1024, dense: dQ rows walk 8 blocks (1024 rows), dK/dV rows 32 (4096): one kernel's rows are long.
  EXPECT_FALSE(persistent_pays(problem(1, 1, 32, 8, 128, 128, VisitedBlocks::of(32 * 8))));
  EXPECT_TRUE(persistent_pays(problem(1, 1, 8, 8, 128, 128, VisitedBlocks::of(8 * 8)))) << "dense at 1024";
}
#endif
