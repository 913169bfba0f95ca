// The fused FlexAttention backward on CUDA (attention/cuda/flex_backward_cuda.cpp) against a float64
// golden written here: plain softmax attention forward and backward over nested loops, with each score
// mod, mask and captured-tensor gradient spelled out as a C++ lambda (nothing of flexgrad's tracing,
// evaluators or kernels). The kernel is called through flex_backward_stub with out/lse from that golden,
// so these tests do not depend on the CUDA forward; the end-to-end tests at the bottom go through
// flex_attention and autograd when a CUDA forward is registered. Skipped visibly without a GPU.
// The cases run on both backward kernel families (FlexCudaBackward: Tiled, and Wgmma on Hopper, which skips
// visibly elsewhere); a case the Wgmma kernels cannot run (float32 / float64, head dims other than 64 and 128)
// must be refused with NotImplementedError there.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <optional>
#include <string>

#include "flexgrad/attention/block_mask.h"
#include "flexgrad/attention/cuda/flex_cuda_common.h"
#include "flexgrad/attention/cuda/jit.h"
#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/flex_kernels.h"
#include "flexgrad/attention/mod_grad.h"
#include "flexgrad/tensor/random.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/test_util.h"
#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/tensor/cuda/cuda_api.h"
#endif

namespace fg {
namespace {

using testing::device_arch;
using testing::ScopedEnv;

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---- the golden -------------------------------------------------------------------------------------
// One score function per entry, in plain C++: mod(s) and d mod / d s, the mask (partial and full blocks
// alike: the golden knows nothing of blocks), and the captured gradients dL/dcap += ds * d mod / d cap.
struct NativeMod {
  std::function<double(double, int, int, int, int)> mod = [](double s, int, int, int, int) { return s; };
  std::function<double(double, int, int, int, int)> dmod = [](double, int, int, int, int) { return 1.0; };
  std::function<bool(int, int, int, int)> mask = [](int, int, int, int) { return true; };
  // (ds w.r.t. the modified score, pre-mod score, b, h, q, kv, per-capture gradient buffers)
  std::function<void(double, double, int, int, int, int, std::vector<std::vector<double>>&)> cap_grad;
};

struct Dims {
  int64_t B = 1, Hq = 2, Lq = 64, E = 32, Bkv = 1, Hkv = 2, Lkv = 64, Ev = 32;
};

struct Grads {
  Tensor dq, dk, dv;
  std::vector<Tensor> dcaps;
};

struct Golden {
  Tensor out, lse;  // float64
  Grads g;
};

// q, k, v, dout float64 contiguous CPU; dlse may be undefined; caps sizes the captured-gradient buffers.
Golden golden(const Dims& d, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, const Tensor& dlse,
              double scale, const NativeMod& m, const std::vector<int64_t>& cap_numel) {  // cap_numel empty: no captured gradients wanted
  const auto Q = q.to_vector(), K = k.to_vector(), V = v.to_vector(), DO = dout.to_vector();
  const std::vector<double> DL = dlse.defined() ? dlse.to_vector() : std::vector<double>();
  std::vector<double> out(d.B * d.Hq * d.Lq * d.Ev, 0.0), lse(d.B * d.Hq * d.Lq, -kInf);
  std::vector<double> dq(Q.size(), 0.0), dk(K.size(), 0.0), dv(V.size(), 0.0);
  std::vector<std::vector<double>> caps(cap_numel.size());
  for (size_t c = 0; c < caps.size(); ++c) caps[c].assign(cap_numel[c], 0.0);
  const int64_t G = d.Hq / d.Hkv;
  std::vector<double> S(d.Lq * d.Lkv), P(d.Lq * d.Lkv);
  for (int64_t b = 0; b < d.B; ++b) {
    for (int64_t h = 0; h < d.Hq; ++h) {
      const int64_t bk = d.Bkv == 1 ? 0 : b, hk = h / G;
      const double* qb = Q.data() + (b * d.Hq + h) * d.Lq * d.E;
      const double* kb = K.data() + (bk * d.Hkv + hk) * d.Lkv * d.E;
      const double* vb = V.data() + (bk * d.Hkv + hk) * d.Lkv * d.Ev;
      const double* dob = DO.data() + (b * d.Hq + h) * d.Lq * d.Ev;
      double* ob = out.data() + (b * d.Hq + h) * d.Lq * d.Ev;
      for (int64_t i = 0; i < d.Lq; ++i) {
        double mx = -kInf;
        for (int64_t j = 0; j < d.Lkv; ++j) {
          double s = 0;
          for (int64_t e = 0; e < d.E; ++e) s += qb[i * d.E + e] * kb[j * d.E + e];
          s *= scale;
          S[i * d.Lkv + j] = s;
          const double sm = m.mask(b, h, i, j) ? m.mod(s, b, h, i, j) : -kInf;
          P[i * d.Lkv + j] = sm;
          mx = std::max(mx, sm);
        }
        double l = 0;
        for (int64_t j = 0; j < d.Lkv; ++j) l += mx == -kInf ? 0.0 : std::exp(P[i * d.Lkv + j] - mx);
        const double L = l > 0 ? mx + std::log(l) : -kInf;
        lse[(b * d.Hq + h) * d.Lq + i] = L;
        for (int64_t j = 0; j < d.Lkv; ++j) P[i * d.Lkv + j] = L == -kInf ? 0.0 : std::exp(P[i * d.Lkv + j] - L);
        for (int64_t e = 0; e < d.Ev; ++e) {
          double a = 0;
          for (int64_t j = 0; j < d.Lkv; ++j) a += P[i * d.Lkv + j] * vb[j * d.Ev + e];
          ob[i * d.Ev + e] = a;
        }
      }
      for (int64_t i = 0; i < d.Lq; ++i) {
        double delta = 0;
        for (int64_t e = 0; e < d.Ev; ++e) delta += dob[i * d.Ev + e] * ob[i * d.Ev + e];
        if (!DL.empty()) delta -= DL[(b * d.Hq + h) * d.Lq + i];
        for (int64_t j = 0; j < d.Lkv; ++j) {
          const double p = P[i * d.Lkv + j];
          if (p == 0) continue;
          double dp = 0;
          for (int64_t e = 0; e < d.Ev; ++e) dp += dob[i * d.Ev + e] * vb[j * d.Ev + e];
          const double ds = p * (dp - delta);
          const double s = S[i * d.Lkv + j];
          if (m.cap_grad && !caps.empty()) m.cap_grad(ds, s, b, h, i, j, caps);
          const double dsp = ds * m.dmod(s, b, h, i, j);
          for (int64_t e = 0; e < d.Ev; ++e) dv[((bk * d.Hkv + hk) * d.Lkv + j) * d.Ev + e] += p * dob[i * d.Ev + e];
          for (int64_t e = 0; e < d.E; ++e) {
            dq[((b * d.Hq + h) * d.Lq + i) * d.E + e] += scale * dsp * kb[j * d.E + e];
            dk[((bk * d.Hkv + hk) * d.Lkv + j) * d.E + e] += scale * dsp * qb[i * d.E + e];
          }
        }
      }
    }
  }
  Golden r;
  r.out = from_vector(out, {d.B, d.Hq, d.Lq, d.Ev}, kFloat64);
  r.lse = from_vector(lse, {d.B, d.Hq, d.Lq}, kFloat64);
  r.g.dq = from_vector(dq, q.sizes(), kFloat64);
  r.g.dk = from_vector(dk, k.sizes(), kFloat64);
  r.g.dv = from_vector(dv, v.sizes(), kFloat64);
  for (auto& c : caps) r.g.dcaps.push_back(from_vector(c, {static_cast<int64_t>(c.size())}, kFloat64));
  return r;
}

// ‖x - ref‖ / ‖ref‖ (or / `norm` when given), NaN-aware: any NaN gives +inf.
double rel_err(const Tensor& x, const Tensor& ref, double norm = 0) {
  const auto a = x.to(kCPU).to(kFloat64).to_vector(), b = ref.to(kCPU).to(kFloat64).to_vector();
  EXPECT_EQ(a.size(), b.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (std::isnan(a[i])) return kInf;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num) / (norm > 0 ? norm : std::max(std::sqrt(den), 1e-300));
}
double norm2(const Tensor& t) {
  double s = 0;
  for (double x : t.to(kCPU).to(kFloat64).to_vector()) s += x * x;
  return std::sqrt(s);
}

double tol(DType t) {
  switch (t) {
    case kFloat64: return 1e-10;
    case kFloat32: return 2e-5;
    case kFloat16: return 5e-3;
    default: return 3e-2;
  }
}

// ---- the problem as flex_attention builds it (attention/flex_attention.cpp, make_problem) -----------
BlockLists lists(const Tensor& num, const Tensor& idx, const Tensor& fnum, const Tensor& fidx, Device dev) {
  BlockLists l;
  auto c = [dev](const Tensor& t) { return t.defined() ? t.to(kInt32).contiguous().to(dev) : t; };
  l.num = c(num);
  l.idx = c(idx);
  l.full_num = c(fnum);
  l.full_idx = c(fidx);
  l.Bm = l.num.defined() ? l.num.size(0) : l.full_num.size(0);
  l.Hm = l.num.defined() ? l.num.size(1) : l.full_num.size(1);
  l.rows = l.num.defined() ? l.num.size(2) : l.full_num.size(2);
  return l;
}

struct Case {
  Dims d;
  ScoreMod score_mod;
  std::optional<BlockMask> mask;
  NativeMod native;
  std::vector<Tensor> learnable;  // captured float tensors that want a gradient (CPU float64)
  bool with_dlse = false;
  bool deterministic = true;
  bool approx_math = false;  // FlexKernelOptions::approx_math
  double min_tol = 0;        // a floor under tol(dt) (approx_math's error is not rounding)
  std::function<Tensor(const Tensor&)> layout;  // applied to q, k, v on the device (strided inputs)
  bool shifted_out = false;  // out and dout contiguous but one element into their buffers (not 16-byte aligned)
  FlexCudaBackward kernel = FlexCudaBackward::Tiled;
};

struct Inputs {
  Tensor q, k, v, dout, dlse;  // float64, CPU, already rounded to the dtype under test
};

Inputs make_inputs(const Dims& d, DType dt, bool with_dlse, uint64_t seed) {
  Generator gen(seed);
  auto r = [&](const Shape& s) { return randn(s, kFloat64, &gen).to(dt).to(kFloat64); };
  Inputs in;
  in.q = r({d.B, d.Hq, d.Lq, d.E});
  in.k = r({d.Bkv, d.Hkv, d.Lkv, d.E});
  in.v = r({d.Bkv, d.Hkv, d.Lkv, d.Ev});
  in.dout = r({d.B, d.Hq, d.Lq, d.Ev});
  if (with_dlse) in.dlse = randn({d.B, d.Hq, d.Lq}, kFloat64, &gen).to(dt == kFloat64 ? kFloat64 : kFloat32).to(kFloat64);
  return in;
}

// The case's float64 golden on `in` (golden() above), with the captured gradients of c.learnable.
Golden golden_of(const Case& c, const Inputs& in) {
  std::vector<int64_t> numel;
  for (const Tensor& t : c.learnable) numel.push_back(t.numel());
  return golden(c.d, in.q, in.k, in.v, in.dout, in.dlse, 1.0 / std::sqrt(double(c.d.E)), c.native, numel);
}

// dq, dk, dv and the captured gradients of `g` within `t` of `ref` (relative L2). The captured ones are normalised by
// the largest of ref's: a shift-invariant bias (bias[h]) has an exact gradient of ~0 that only rounding populates.
void expect_grads_near(const Grads& g, const Grads& ref, double t) {
  EXPECT_LE(rel_err(g.dq, ref.dq), t) << "dq";
  EXPECT_LE(rel_err(g.dk, ref.dk), t) << "dk";
  EXPECT_LE(rel_err(g.dv, ref.dv), t) << "dv";
  double cap_norm = 0;
  for (const Tensor& gc : ref.dcaps) cap_norm = std::max(cap_norm, norm2(gc));
  for (size_t i = 0; i < g.dcaps.size() && i < ref.dcaps.size(); ++i)
    EXPECT_LE(rel_err(g.dcaps[i], ref.dcaps[i], cap_norm), t) << "dcap " << i;
}

// A Golden holding only out / lse of d's shapes, zero: for calls refused before any kernel runs.
Golden shapes_only(const Dims& d) {
  Golden g;
  g.out = zeros({d.B, d.Hq, d.Lq, d.Ev}, TensorOptions().dtype(kFloat64));
  g.lse = zeros({d.B, d.Hq, d.Lq}, TensorOptions().dtype(kFloat64));
  return g;
}

// Runs the backward stub on `dev` with out / lse taken from the golden forward.
Grads run_stub(const Case& c, const Inputs& in, const Golden& gold, DType dt, Device dev) {
  const Dims& d = c.d;
  FlexProblem p;
  const DType cdt = dev.is_cuda() ? dt : (dt == kFloat64 ? kFloat64 : kFloat32);
  auto put = [&](const Tensor& t) {
    Tensor x = t.to(cdt).to(dev);
    if (c.layout && dev.is_cuda()) x = c.layout(x);
    return x;
  };
  p.q = put(in.q);
  p.k = put(in.k);
  p.v = put(in.v);
  p.B = d.B, p.Hq = d.Hq, p.Lq = d.Lq, p.E = d.E, p.Bkv = d.Bkv, p.Hkv = d.Hkv, p.Lkv = d.Lkv, p.Ev = d.Ev;
  p.scale = 1.0 / std::sqrt(static_cast<double>(d.E));
  p.deterministic = c.deterministic;
  p.cuda_backward = c.kernel;
  p.approx_math = c.approx_math;
  if (c.score_mod) {
    p.score_mod = std::make_shared<ModProgram>(trace_score_mod(c.score_mod));
    p.score_grad = std::make_shared<ScoreModBackward>(derive_score_mod(*p.score_mod));
  }
  if (c.mask) {
    const BlockMask& bm = *c.mask;
    p.block_q = bm.block_size().q;
    p.block_kv = bm.block_size().kv;
    p.mask_mod = bm.mask_program();
    p.kv_lists = lists(bm.kv_num_blocks(), bm.kv_indices(), bm.full_kv_num_blocks(), bm.full_kv_indices(), dev);
    p.q_lists = lists(bm.q_num_blocks(), bm.q_indices(), bm.full_q_num_blocks(), bm.full_q_indices(), dev);
    p.visited = bm.visited_blocks();  // as flex_attention's make_problem: the persistent backward's rule reads it
  } else {
    p.block_q = p.block_kv = 128;
    const int64_t nQB = (d.Lq + 127) / 128, nKB = (d.Lkv + 127) / 128;
    auto all = [&](int64_t rows, int64_t cols) {
      Tensor num = full({1, 1, rows}, cols, kInt32);
      Tensor idx = arange(0, static_cast<double>(cols), 1, kInt32).view({1, 1, 1, cols}).expand({1, 1, rows, cols}).contiguous();
      return lists(Tensor(), Tensor(), num, idx, dev);
    };
    p.kv_lists = all(nQB, nKB);
    p.q_lists = all(nKB, nQB);
    p.visited = VisitedBlocks::of(nQB * nKB);
  }
  std::vector<bool> needs;
  if (p.score_grad) {
    for (const CaptureRef& cr : p.score_grad->captures) {
      bool want = false;
      for (const Tensor& t : c.learnable) want = want || cr.tensor.is_same(t);
      needs.push_back(want);
    }
  }
  const DType sdt = cdt == kFloat64 ? kFloat64 : kFloat32;
  Tensor out = gold.out.to(cdt).to(dev), lse = gold.lse.to(sdt).to(dev), dout = in.dout.to(cdt).to(dev);
  if (c.shifted_out && dev.is_cuda()) {
    auto shift = [](const Tensor& t) {
      Tensor buf = empty({t.numel() + 1}, TensorOptions().dtype(t.dtype()).device(t.device()));
      Tensor x = buf.narrow(0, 1, t.numel()).view(t.sizes());
      x.copy_(t);
      return x;
    };
    out = shift(out);
    dout = shift(dout);
  }
  Tensor dlse = in.dlse.defined() ? in.dlse.to(sdt).to(dev) : Tensor();
  FlexBackwardOutputs o;
  o.dq = empty(p.q.sizes(), TensorOptions().dtype(cdt).device(dev));
  o.dk = empty(p.k.sizes(), TensorOptions().dtype(cdt).device(dev));
  o.dv = empty(p.v.sizes(), TensorOptions().dtype(cdt).device(dev));
  // Poison the outputs: every element must be written.
  o.dq.fill_(std::nan(""));
  o.dk.fill_(std::nan(""));
  o.dv.fill_(std::nan(""));
  flex_backward_stub(dev, p, out, lse, dout, dlse, needs, o);
  Grads g{o.dq.to(kCPU), o.dk.to(kCPU), o.dv.to(kCPU), {}};
  // In the order of c.learnable (the capture slots follow tracing order).
  for (const Tensor& t : c.learnable) {
    for (size_t i = 0; i < needs.size(); ++i) {
      if (needs[i] && p.score_grad->captures[i].tensor.is_same(t)) {
        EXPECT_TRUE(o.dcaps[i].defined()) << "no gradient for a learnable capture";
        if (o.dcaps[i].defined()) g.dcaps.push_back(o.dcaps[i].to(kCPU).contiguous().view({o.dcaps[i].numel()}));
      }
    }
  }
  return g;
}

// Whether the Wgmma kernels run this dtype and these head dims (else they must refuse).
bool wgmma_runs(DType dt, const Dims& d) {
  auto dim_ok = [](int64_t e) { return e == 64 || e == 128; };
  return (dt == kBFloat16 || dt == kFloat16) && dim_ok(d.E) && dim_ok(d.Ev);
}

// Each case on the backward kernel family of the parameter.
class FlexBackwardCuda : public ::testing::TestWithParam<FlexCudaBackward> {
 protected:
  void SetUp() override {
    if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present: skipping the CUDA flex backward tests";
    if (wgmma() && device_arch() != "sm_90a")
      GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  }
  static FlexCudaBackward kernel() { return GetParam(); }
  static bool wgmma() { return kernel() == FlexCudaBackward::Wgmma; }
  // Golden vs CUDA for each dtype; returns the CUDA gradients of the last dtype the kernel ran.
  Grads check(Case c, std::initializer_list<DType> dts, uint64_t seed = 1) {
    c.kernel = kernel();
    Grads last;
    for (DType dt : dts) {
      SCOPED_TRACE(dtype_name(dt));
      if (wgmma() && !wgmma_runs(dt, c.d)) {
        // Refused before any kernel runs: out / lse only need their shapes.
        const Golden shapes = shapes_only(c.d);
        const Inputs in = make_inputs(c.d, dt, c.with_dlse, seed);
        testing::expect_error<NotImplementedError>([&] { run_stub(c, in, shapes, dt, kCUDA); }, "Wgmma backward");
        continue;
      }
      const Inputs in = make_inputs(c.d, dt, c.with_dlse, seed);
      const Golden gold = golden_of(c, in);
      last = run_stub(c, in, gold, dt, kCUDA);
      expect_grads_near(last, gold.g, std::max(tol(dt), c.min_tol));
      EXPECT_GT(norm2(gold.g.dq), 0.0);
      EXPECT_EQ(last.dcaps.size(), gold.g.dcaps.size());
    }
    return last;
  }
};

// ---- the mods, in IR and in plain C++ ---------------------------------------------------------------
Expr causal(Expr, Expr, Expr q, Expr kv) { return q >= kv; }
NativeMod native_mask(std::function<bool(int, int, int, int)> m) {
  NativeMod n;
  n.mask = std::move(m);
  return n;
}

TEST_P(FlexBackwardCuda, NoMaskEveryDtype) {
  Case c;
  c.d = {2, 3, 150, 64, 2, 3, 150, 64};
  check(c, {kFloat64, kFloat32, kFloat16, kBFloat16});
}

TEST_P(FlexBackwardCuda, CausalBlockMask) {
  Case c;
  c.d = {1, 2, 200, 64, 1, 2, 200, 64};
  c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 200, 200, 64);
  c.native = native_mask([](int, int, int q, int kv) { return q >= kv; });
  check(c, {kFloat64, kFloat32, kBFloat16, kFloat16});
}

TEST_P(FlexBackwardCuda, SlidingWindowWithOddBlockSizes) {
  // BlockMask blocks (48, 80) against the kernel tiles: sub-tiles clipped at block and sequence ends. (Head dim
  // 64 on the Wgmma kernels, which take 64 and 128 only.)
  Case c;
  const int64_t E = wgmma() ? 64 : 32;
  c.d = {1, 2, 190, E, 1, 2, 170, E};
  const int W = 37;
  c.mask = create_block_mask([W](Expr, Expr, Expr q, Expr kv) { return ((q - kv).abs() < W); }, std::nullopt,
                             std::nullopt, 190, 170, BlockSize(48, 80));
  c.native = native_mask([W](int, int, int q, int kv) { return std::abs(q - kv) < W; });
  check(c, {kFloat64, kFloat32, kBFloat16, kFloat16});
}

TEST_P(FlexBackwardCuda, DocumentMaskFromCapturedInt64Ids) {
  const int64_t L = 260;
  std::vector<int64_t> ids(L);
  for (int64_t i = 0; i < L; ++i) ids[i] = i < 70 ? 0 : i < 71 ? 1 : i < 200 ? 2 : 3;
  Captured doc(from_vector(ids, {L}, kInt64));  // CPU: the BlockMask is built on the CPU
  Case c;
  c.d = {1, 2, L, 64, 1, 2, L, 64};
  c.mask = create_block_mask([doc](Expr, Expr, Expr q, Expr kv) { return (Expr(doc[q]) == Expr(doc[kv])) & (q >= kv); },
                             std::nullopt, std::nullopt, L, L, 64);
  // The kernel evaluates the mask on the device: it must read a device copy of the ids.
  Tensor ids_dev = from_vector(ids, {L}, kInt64).to(kCUDA);
  Captured doc_dev(ids_dev);
  const BlockMask& m = *c.mask;
  c.mask = BlockMask::from_kv_blocks(
      m.kv_num_blocks(), m.kv_indices(), m.full_kv_num_blocks(), m.full_kv_indices(), m.block_size(),
      [doc_dev](Expr, Expr, Expr q, Expr kv) { return (Expr(doc_dev[q]) == Expr(doc_dev[kv])) & (q >= kv); },
      m.seq_lengths());
  c.native = native_mask([ids](int, int, int q, int kv) { return ids[q] == ids[kv] && q >= kv; });
  check(c, {kFloat64, kFloat32, kBFloat16});
}

TEST_P(FlexBackwardCuda, AlibiCausal) {
  const int64_t H = 4;
  Case c;
  c.d = {2, H, 130, 64, 2, H, 130, 64};
  c.score_mod = [H](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + (kv - q) * exp2(-((h + 1) * 8.0 / H)); };
  c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 130, 130, 64);
  c.native.mod = [H](double s, int, int h, int q, int kv) { return s + (kv - q) * std::exp2(-((h + 1) * 8.0 / H)); };
  c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
  check(c, {kFloat64, kFloat32, kBFloat16});
}

TEST_P(FlexBackwardCuda, SoftcapHasANonConstantScoreDerivative) {
  Case c;
  c.d = {1, 2, 140, 64, 1, 2, 140, 64};
  // A small cap so tanh saturates and the derivative matters.
  c.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 2.0 * tanh(s / 2.0); };
  c.native.mod = [](double s, int, int, int, int) { return 2.0 * std::tanh(s / 2.0); };
  c.native.dmod = [](double s, int, int, int, int) { return 1.0 - std::tanh(s / 2.0) * std::tanh(s / 2.0); };
  check(c, {kFloat64, kFloat32, kBFloat16, kFloat16});
  // Masked: the merged element step (selected for every entry where it is pure, FG_SCORE_ELEM_PURE) meets masked
  // entries of partial blocks and the first 10 rows, which are empty (lse = -inf): zero gradients there.
  c.mask = create_block_mask([](Expr, Expr, Expr q, Expr kv) { return (q >= 10) & (kv <= q); }, std::nullopt,
                             std::nullopt, 140, 140, 64);
  c.native.mask = [](int, int, int q, int kv) { return q >= 10 && kv <= q; };
  const Grads g = check(c, {kFloat64, kFloat32, kBFloat16});
  EXPECT_EQ(amax(abs(g.dq.narrow(2, 0, 10).to(kFloat64))).item(), 0.0);
}

// FlexKernelOptions::approx_math: tanh.approx.f32 (relative error <= ~2^-11) in the recomputed scores and in
// the derivative 1 - tanh^2, div.full.f32 for the divisions by 20 (2 ulp). With cap 20 the scores stay in tanh's
// near-linear range, where the gradients' normwise error is a few times 2^-11: 2e-3 holds it (tol(dt) for bf16 / f16 is looser already), and the
// exact-tanh gradient of the golden is still what is checked. float64 keeps the exact tanh (1e-10).
TEST_P(FlexBackwardCuda, SoftcapWithApproxMath) {
  Case c;
  c.d = {1, 2, 140, 64, 1, 2, 140, 64};
  c.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
  c.native.mod = [](double s, int, int, int, int) { return 20.0 * std::tanh(s / 20.0); };
  c.native.dmod = [](double s, int, int, int, int) { return 1.0 - std::tanh(s / 20.0) * std::tanh(s / 20.0); };
  c.approx_math = true;
  c.min_tol = 2e-3;
  check(c, {kFloat32, kBFloat16, kFloat16});
  c.min_tol = 0;
  check(c, {kFloat64});
  // Masked, as SoftcapHasANonConstantScoreDerivative: partial blocks and empty rows under the approximations.
  c.mask = create_block_mask([](Expr, Expr, Expr q, Expr kv) { return (q >= 10) & (kv <= q); }, std::nullopt,
                             std::nullopt, 140, 140, 64);
  c.native.mask = [](int, int, int q, int kv) { return q >= 10 && kv <= q; };
  c.min_tol = 2e-3;
  const Grads g = check(c, {kFloat32, kBFloat16});
  EXPECT_EQ(amax(abs(g.dq.narrow(2, 0, 10).to(kFloat64))).item(), 0.0);
}

// score * hscale[h] + table[h][q - kv + L - 1] + bias[h], all three learnable.
Case learnable_case(int64_t H, int64_t L, Tensor& hscale, Tensor& table, Tensor& bias) {
  Generator gen(99);
  hscale = (rand({H}, kFloat64, &gen) + 0.5);
  table = randn({H, 2 * L - 1}, kFloat64, &gen) * 0.5;
  bias = randn({H}, kFloat64, &gen);
  Tensor hs_d = hscale.to(kCUDA), tb_d = table.to(kCUDA), bi_d = bias.to(kCUDA);
  Case c;
  c.d = {2, H, L, 64, 2, H, L, 64};
  c.score_mod = [hs = Captured(hs_d), tb = Captured(tb_d), bi = Captured(bi_d), L](Expr s, Expr, Expr h, Expr q, Expr kv) {
    return s * hs[h] + tb[h][q - kv + (L - 1)] + bi[h];
  };
  c.learnable = {hs_d, tb_d, bi_d};
  const auto HS = hscale.to_vector(), TB = table.to_vector(), BI = bias.to_vector();
  c.native.mod = [=](double s, int, int h, int q, int kv) { return s * HS[h] + TB[h * (2 * L - 1) + q - kv + L - 1] + BI[h]; };
  c.native.dmod = [=](double, int, int h, int, int) { return HS[h]; };
  c.native.cap_grad = [=](double ds, double s, int, int h, int q, int kv, std::vector<std::vector<double>>& g) {
    g[0][h] += ds * s;
    g[1][h * (2 * L - 1) + q - kv + L - 1] += ds;
    g[2][h] += ds;
  };
  return c;
}

TEST_P(FlexBackwardCuda, LearnableCapturedBiasGradientsCausal) {
  Tensor hs, tb, bi;
  Case c = learnable_case(3, 150, hs, tb, bi);
  c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 150, 150, 64);
  c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
  check(c, {kFloat64, kFloat32, kBFloat16});
  c.with_dlse = true;  // dlse makes the bias[h] gradient non-trivial (sum of dS over a row = dlse)
  check(c, {kFloat64, kFloat32});
  c.deterministic = false;  // float64 atomics
  check(c, {kFloat64, kFloat32});
}

TEST_P(FlexBackwardCuda, GqaBroadcastBatchUnequalLengthsAndHeadDims) {
  Case c;
  c.d = {2, 4, 100, 128, 1, 2, 173, 64};
  c.mask = create_block_mask([](Expr, Expr, Expr q, Expr kv) { return kv <= q + 40; }, std::nullopt, std::nullopt, 100,
                             173, 64);
  c.native.mask = [](int, int, int q, int kv) { return kv <= q + 40; };
  check(c, {kFloat64, kFloat32, kBFloat16, kFloat16});
  c.d = {2, 4, 100, 64, 1, 2, 173, 128};
  check(c, {kFloat32, kBFloat16});
}

TEST_P(FlexBackwardCuda, HeadDimsFrom16To256) {
  // (Ev 8, 24, 80, 256: the preprocess's 16-byte loads with 32, 1 (partial lanes) and 1 rows a warp in 16-bit.)
  for (auto [E, Ev] : {std::pair<int64_t, int64_t>{16, 16}, {32, 80}, {256, 256}, {256, 64}, {16, 8}, {32, 24}}) {
    SCOPED_TRACE(::testing::Message() << "E=" << E << " Ev=" << Ev);
    Case c;
    c.d = {1, 2, 90, E, 1, 2, 90, Ev};
    c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 90, 90, 64);
    c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
    check(c, {kFloat32, kBFloat16});
  }
}

TEST_P(FlexBackwardCuda, EmptyRowsGiveZeroGradients) {
  Case c;
  const int64_t E = wgmma() ? 64 : 32;  // (the Wgmma kernels take head dims 64 and 128)
  c.d = {1, 2, 96, E, 1, 2, 96, E};
  c.mask = create_block_mask([](Expr, Expr, Expr q, Expr kv) { return (q >= 10) & (kv <= q); }, std::nullopt,
                             std::nullopt, 96, 96, 32);
  c.native.mask = [](int, int, int q, int kv) { return q >= 10 && kv <= q; };
  Grads g = check(c, {kFloat32, kBFloat16});
  EXPECT_EQ(amax(abs(g.dq.narrow(2, 0, 10).to(kFloat64))).item(), 0.0);
}

TEST_P(FlexBackwardCuda, GradientThroughLse) {
  Case c;
  c.d = {1, 2, 120, 64, 1, 2, 120, 64};
  c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 120, 120, 64);
  c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
  c.with_dlse = true;
  check(c, {kFloat64, kFloat32, kBFloat16});
}

TEST_P(FlexBackwardCuda, OutAndDoutOffTheirAlignmentTakeTheScalarPreprocess) {
  Case c;
  c.d = {1, 2, 70, 64, 1, 2, 70, 64};
  c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 70, 70, 32);
  c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
  c.shifted_out = true;
  c.with_dlse = true;
  if (wgmma()) {  // the Wgmma kernels need 16-byte-aligned rows everywhere: refused, not misread
    c.kernel = kernel();
    const Golden shapes = shapes_only(c.d);
    const Inputs in = make_inputs(c.d, kBFloat16, c.with_dlse, 1);
    testing::expect_error<NotImplementedError>([&] { run_stub(c, in, shapes, kBFloat16, kCUDA); }, "16-byte-aligned");
    return;
  }
  check(c, {kFloat32, kBFloat16, kFloat16});
}

TEST_P(FlexBackwardCuda, StridedInputsReadInPlace) {
  Case c;
  c.d = {2, 2, 80, 64, 2, 2, 80, 64};
  // [B, L, H, E] storage seen as [B, H, L, E]: the strides of a fused qkv projection.
  c.layout = [](const Tensor& t) { return t.transpose(1, 2).contiguous().transpose(1, 2); };
  c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 80, 80, 32);
  c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
  check(c, {kFloat32, kBFloat16});
}

// The cases that do not depend on the kernel family (float64, input checks).
class FlexBackwardCudaCommon : public ::testing::Test {
 protected:
  void SetUp() override {
    if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present: skipping the CUDA flex backward tests";
  }
};

TEST_F(FlexBackwardCudaCommon, MatchesTheCpuFusedBackwardInFloat64) {
  Tensor hs, tb, bi;
  Case c = learnable_case(2, 100, hs, tb, bi);
  c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 100, 100, 32);
  c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
  const Inputs in = make_inputs(c.d, kFloat64, true, 5);
  const Golden gold = golden(c.d, in.q, in.k, in.v, in.dout, in.dlse, 1.0 / std::sqrt(double(c.d.E)), c.native, {});
  Grads gpu = run_stub(c, in, gold, kFloat64, kCUDA);
  // The CPU kernel reads captures on the CPU: the same mods over CPU copies of the tensors.
  Tensor hs_c = c.learnable[0].to(kCPU), tb_c = c.learnable[1].to(kCPU), bi_c = c.learnable[2].to(kCPU);
  Case cc = c;
  cc.score_mod = [hs = Captured(hs_c), tb = Captured(tb_c), bi = Captured(bi_c)](Expr s, Expr, Expr h, Expr q, Expr kv) {
    return s * hs[h] + tb[h][q - kv + 99] + bi[h];
  };
  cc.learnable = {hs_c, tb_c, bi_c};
  Grads cpu = run_stub(cc, in, gold, kFloat64, kCPU);
  EXPECT_LE(rel_err(gpu.dq, cpu.dq), 1e-12);
  EXPECT_LE(rel_err(gpu.dk, cpu.dk), 1e-12);
  EXPECT_LE(rel_err(gpu.dv, cpu.dv), 1e-12);
  ASSERT_EQ(gpu.dcaps.size(), 3u);
  ASSERT_EQ(cpu.dcaps.size(), 3u);
  for (int i = 0; i < 3; ++i) EXPECT_LE(rel_err(gpu.dcaps[i], cpu.dcaps[i], norm2(cpu.dcaps[1])), 1e-10) << "dcap " << i;
}

TEST_P(FlexBackwardCuda, RerunsAreBitIdentical) {
  Tensor hs, tb, bi;
  Case c = learnable_case(4, 256, hs, tb, bi);
  c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 256, 256, 128);
  c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
  c.kernel = kernel();
  for (DType dt : {kBFloat16, kFloat32, kFloat16}) {
    SCOPED_TRACE(dtype_name(dt));
    if (wgmma() && !wgmma_runs(dt, c.d)) continue;  // (refusals: check())
    const Inputs in = make_inputs(c.d, dt, true, 11);
    const Golden gold = golden(c.d, in.q, in.k, in.v, in.dout, in.dlse, 1.0 / std::sqrt(double(c.d.E)), c.native, {});
    Grads a = run_stub(c, in, gold, dt, kCUDA), b = run_stub(c, in, gold, dt, kCUDA);
    EXPECT_TRUE(equal(a.dq, b.dq));
    EXPECT_TRUE(equal(a.dk, b.dk));
    EXPECT_TRUE(equal(a.dv, b.dv));
    ASSERT_EQ(a.dcaps.size(), 3u);
    for (int i = 0; i < 3; ++i) EXPECT_TRUE(equal(a.dcaps[i], b.dcaps[i])) << "dcap " << i;
  }
}

TEST_F(FlexBackwardCudaCommon, RejectsMismatchedInputs) {
  Case c;
  c.d = {1, 1, 16, 16, 1, 1, 16, 16};
  const Inputs in = make_inputs(c.d, kFloat32, false, 3);
  const Golden gold = golden(c.d, in.q, in.k, in.v, in.dout, in.dlse, 0.25, {}, {});
  FlexProblem p;
  p.q = in.q.to(kFloat32).to(kCUDA);
  p.k = in.k.to(kFloat32).to(kCUDA);
  p.v = in.v.to(kFloat32).to(kCUDA);
  p.B = p.Hq = p.Bkv = p.Hkv = 1;
  p.Lq = p.Lkv = p.E = p.Ev = 16;
  FlexBackwardOutputs o;
  Tensor out_cpu = gold.out.to(kFloat32), lse = gold.lse.to(kFloat32).to(kCUDA), dout = in.dout.to(kFloat32).to(kCUDA);
  testing::expect_error<DeviceError>([&] { flex_backward_stub(kCUDA, p, out_cpu, lse, dout, Tensor(), {}, o); }, "out");
  testing::expect_error<DTypeError>(
      [&] { flex_backward_stub(kCUDA, p, out_cpu.to(kCUDA), lse.to(kFloat64), dout, Tensor(), {}, o); }, "lse");
  // lse and dlse are read as [B, Hq, Lq] rows: another shape is refused, not read out of bounds.
  const Tensor short_lse = lse.slice(2, 0, 8);
  testing::expect_error<ShapeError>(
      [&] { flex_backward_stub(kCUDA, p, out_cpu.to(kCUDA), short_lse, dout, Tensor(), {}, o); }, "lse");
  testing::expect_error<ShapeError>(
      [&] { flex_backward_stub(kCUDA, p, out_cpu.to(kCUDA), lse, dout, short_lse, {}, o); }, "dlse");
}

// ---- end to end: flex_attention on CUDA, autograd, gradients through out and lse ----------------------
TEST_P(FlexBackwardCuda, EndToEndThroughAutogradWithLse) {
  if (!flex_forward_stub.has(DeviceType::CUDA)) GTEST_SKIP() << "no CUDA flex forward registered in this build";
  const int64_t B = 2, H = 2, L = 140, E = 64;
  Generator gen(21);
  Tensor q64 = randn({B, H, L, E}, kFloat64, &gen), k64 = randn({B, H, L, E}, kFloat64, &gen);
  Tensor v64 = randn({B, H, L, E}, kFloat64, &gen), w = randn({B, H, L}, kFloat64, &gen);
  Tensor bias = randn({H}, kFloat64, &gen);
  auto run = [&](DType dt, Device dev, FlexBackend be) {
    Tensor q = q64.to(dt).to(dev).detach().requires_grad_(), k = k64.to(dt).to(dev).detach().requires_grad_();
    Tensor v = v64.to(dt).to(dev).detach().requires_grad_(), b = bias.to(dev).detach().requires_grad_();
    FlexAttentionOptions o;
    o.return_lse = true;
    o.kernel.backend = be;
    o.kernel.cuda_backward = dev.is_cuda() ? kernel() : FlexCudaBackward::Auto;
    o.score_mod = [cb = Captured(b)](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + cb[h] * (q - kv) / 64.0; };
    o.block_mask = create_block_mask(causal, std::nullopt, std::nullopt, L, L, 64);
    auto r = flex_attention(q, k, v, o);
    (r.out.to(kFloat64).sum() + (r.lse.to(kFloat64) * w.to(dev)).sum()).backward();
    return std::vector<Tensor>{q.grad().to(kCPU), k.grad().to(kCPU), v.grad().to(kCPU), b.grad().to(kCPU)};
  };
  const auto ref = run(kFloat64, kCPU, FlexBackend::Reference);
  for (DType dt : {kFloat64, kFloat32, kBFloat16}) {
    SCOPED_TRACE(dtype_name(dt));
    if (wgmma() && dt != kBFloat16) continue;  // (the Wgmma kernels' refusals: check())
    const auto got = run(dt, kCUDA, FlexBackend::Auto);
    const char* names[] = {"dq", "dk", "dv", "dbias"};
    for (int i = 0; i < 4; ++i) EXPECT_LE(rel_err(got[i], ref[i]), dt == kFloat64 ? 1e-9 : tol(dt)) << names[i];
  }
}

INSTANTIATE_TEST_SUITE_P(Tiled, FlexBackwardCuda, ::testing::Values(FlexCudaBackward::Tiled));
INSTANTIATE_TEST_SUITE_P(Wgmma, FlexBackwardCuda, ::testing::Values(FlexCudaBackward::Wgmma));

// ---- the Hopper kernels against the mma.sync ones, and the choice between them -----------------------
// Four documents over L = 300 (one of a single token), causal inside each, ids captured on the device, BlockMask
// blocks of 128 (clipped q chunks, partial and full blocks), B 2, H 4, head dims 128.
// A captured document mask over ids.size() rows (document ids[i] for row i; causal too where `causal`), built on the
// CPU, whose kernels read the ids on the GPU; 128-row blocks, B 2, H 4, head dims 128.
Case documents_case(const std::vector<int64_t>& ids, bool causal) {
  const int64_t L = static_cast<int64_t>(ids.size()), H = 4;
  Captured doc(from_vector(ids, {L}, kInt64));
  Captured doc_dev(from_vector(ids, {L}, kInt64).to(kCUDA));
  auto rule = [causal](const Captured& d) {
    return MaskMod([d, causal](Expr, Expr, Expr q, Expr kv) {
      const Expr same = Expr(d[q]) == Expr(d[kv]);
      return causal ? same & (q >= kv) : same;
    });
  };
  const BlockMask m = create_block_mask(rule(doc), std::nullopt, std::nullopt, L, L, 128);
  Case c;
  c.d = {2, H, L, 128, 2, H, L, 128};
  c.mask = BlockMask::from_kv_blocks(m.kv_num_blocks(), m.kv_indices(), m.full_kv_num_blocks(), m.full_kv_indices(),
                                     m.block_size(), rule(doc_dev), m.seq_lengths());
  c.native = native_mask([ids, causal](int, int, int q, int kv) { return ids[q] == ids[kv] && (!causal || q >= kv); });
  return c;
}

// Documents [0, 90), [90, 91), [91, 230), [230, 300), causal: clipped chunks at L 300, an empty-ish document.
Case document_case() {
  std::vector<int64_t> ids(300);
  for (int64_t i = 0; i < 300; ++i) ids[i] = i < 90 ? 0 : i < 91 ? 1 : i < 230 ? 2 : 3;
  return documents_case(ids, true);
}

// ALiBi (slopes 2^(-8 (h + 1) / H)) with a causal BlockMask of 128-row blocks over L = 300, H 4 q heads on 2 kv
// heads, head dims 128 / 64, B 2.
Case alibi_causal_gqa_case() {
  const int64_t L = 300, H = 4;
  Case c;
  c.d = {2, H, L, 128, 2, 2, L, 64};
  c.score_mod = [H](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + (kv - q) * exp2(-((h + 1) * 8.0 / H)); };
  c.mask = create_block_mask(causal, std::nullopt, std::nullopt, L, L, 128);
  c.native.mod = [H](double s, int, int h, int q, int kv) { return s + (kv - q) * std::exp2(-((h + 1) * 8.0 / H)); };
  c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
  return c;
}

// Bit equality of two kernels' gradients, NaN equal to NaN (poisoned inputs make NaNs where both kernels agree).
bool same_bits(const Tensor& a, const Tensor& b) {
  const auto x = a.to(kFloat64).to_vector(), y = b.to(kFloat64).to_vector();
  if (x.size() != y.size()) return false;
  for (size_t i = 0; i < x.size(); ++i)
    if (!(x[i] == y[i] || (std::isnan(x[i]) && std::isnan(y[i])))) return false;
  return true;
}
void expect_same_bits(const Grads& a, const Grads& b) {
  EXPECT_TRUE(same_bits(a.dk, b.dk)) << "dk";
  EXPECT_TRUE(same_bits(a.dv, b.dv)) << "dv";
  EXPECT_TRUE(same_bits(a.dq, b.dq)) << "dq";
  ASSERT_EQ(a.dcaps.size(), b.dcaps.size());
  for (size_t i = 0; i < a.dcaps.size(); ++i) EXPECT_TRUE(same_bits(a.dcaps[i], b.dcaps[i])) << "dcap " << i;
}

class FlexBackwardWgmma : public ::testing::Test {
 protected:
  void SetUp() override {
    if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present: skipping the Wgmma backward tests";
  }
  static bool hopper() { return device_arch() == "sm_90a"; }
  // The gradients of `c` on `kind` (out / lse from the float64 golden, as check()).
  static Grads run(Case c, DType dt, FlexCudaBackward kind, uint64_t seed = 7) {
    c.kernel = kind;
    const Inputs in = make_inputs(c.d, dt, c.with_dlse, seed);
    const Golden gold = golden_of(c, in);
    return run_stub(c, in, gold, dt, kCUDA);
  }
  // Wgmma and Tiled on the same inputs: two fp32-accumulating kernels over the same bf16 / f16 P and dS agree to
  // well within the dtype's tolerance against float64.
  static void expect_agree(const Case& c, DType dt) {
    SCOPED_TRACE(dtype_name(dt));
    const Grads t = run(c, dt, FlexCudaBackward::Tiled), w = run(c, dt, FlexCudaBackward::Wgmma);
    ASSERT_EQ(w.dcaps.size(), t.dcaps.size());
    expect_grads_near(w, t, tol(dt) / 3);
  }
};

TEST_F(FlexBackwardWgmma, AgreesWithTiledOnDocumentAlibiSoftcapAndLearnableBias) {
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  const int64_t L = 300, H = 4;
  {
    SCOPED_TRACE("document, kv blocks of 128 (two warpgroups)");
    Case c = document_case();
    expect_agree(c, kBFloat16);
    expect_agree(c, kFloat16);
  }
  {
    SCOPED_TRACE("ALiBi, causal, GQA");
    expect_agree(alibi_causal_gqa_case(), kBFloat16);
  }
  {
    SCOPED_TRACE("softcap, causal, blocks of 64 (one warpgroup)");
    Case c;
    c.d = {1, H, L, 64, 1, H, L, 128};
    c.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 2.0 * tanh(s / 2.0); };
    c.mask = create_block_mask(causal, std::nullopt, std::nullopt, L, L, 64);
    c.native.mod = [](double s, int, int, int, int) { return 2.0 * std::tanh(s / 2.0); };
    c.native.dmod = [](double s, int, int, int, int) { return 1.0 - std::tanh(s / 2.0) * std::tanh(s / 2.0); };
    c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
    expect_agree(c, kBFloat16);
    expect_agree(c, kFloat16);
  }
  {
    SCOPED_TRACE("learnable bias, deterministic and float64 atomics");
    Tensor hs, tb, bi;
    Case c = learnable_case(3, 200, hs, tb, bi);
    c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 200, 200, 128);
    c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
    c.with_dlse = true;
    expect_agree(c, kBFloat16);
    c.deterministic = false;
    expect_agree(c, kBFloat16);
  }
}

TEST_F(FlexBackwardWgmma, RefusesWhatItCannotRun) {
  Case c;
  c.d = {1, 2, 64, 64, 1, 2, 64, 64};
  c.kernel = FlexCudaBackward::Wgmma;
  Golden shapes;
  shapes.out = zeros({1, 2, 64, 64}, TensorOptions().dtype(kFloat64));
  shapes.lse = zeros({1, 2, 64}, TensorOptions().dtype(kFloat64));
  const Inputs in = make_inputs(c.d, kFloat32, false, 3);
  if (!hopper()) {
    testing::expect_error<NotImplementedError>([&] { run_stub(c, in, shapes, kBFloat16, kCUDA); }, "sm_90a");
    return;
  }
  testing::expect_error<NotImplementedError>([&] { run_stub(c, in, shapes, kFloat32, kCUDA); }, "bfloat16 and float16");
  c.d.E = c.d.Ev = 32;
  shapes.out = zeros({1, 2, 64, 32}, TensorOptions().dtype(kFloat64));
  const Inputs in32 = make_inputs(c.d, kBFloat16, false, 3);
  testing::expect_error<NotImplementedError>([&] { run_stub(c, in32, shapes, kBFloat16, kCUDA); }, "head dims 64 or 128");
}

// dQ summed by the dK/dV kernel with float atomics (flex_backward_wgmma.cuh, FG_DQ_ATOMIC), which the host takes
// where the call is not deterministic, by default where its adds go through the TMA unit and the dK/dV kernel
// launches as a grid, and wherever it may run with FLEXGRAD_FLEX_WGMMA_BWD_FUSED_DQ=1: against the float64 golden
// and against the dQ kernel on the same inputs (FLEXGRAD_FLEX_WGMMA_BWD_FUSED_DQ=0, and the default where the dK/dV
// kernel launches persistent); dK and dV are the dK/dV kernel's own either way (bit-equal), whatever order the dK/dV
// grid launches its CTAs in (FLEXGRAD_FLEX_WGMMA_BWD_GROUP: the default groups of 16 pairs, the 3-D grid, groups of
// 3 pairs with a partial last group), with its adds by red.global (FLEXGRAD_FLEX_BWD_DQ_TMA_ADD=0) in the
// warp-specialised dK/dV kernel and persistent on 3 CTAs (many grid CTAs a CTA: the dS^T tiles' index runs on across
// them, and each grid CTA's last dQ product is issued after its walk), with its adds through the TMA unit (float32
// staging tiles, rows past a chunk's end as zeros; grid, persistent on 3 CTAs, and the default's grid) and in the
// plain kernel (FLEXGRAD_FLEX_WGMMA_BWD_WS=0, red.global); the counters say which ran.
// Cases: a captured document mask with clipped q chunks (L 300, q blocks of 128), GQA with a broadcast kv batch and
// Lq != Lkv, and rows no kv block reaches (their dQ rows must come out zero, not the NaN the outputs are poisoned
// with; Ev 64, so the warp-specialised kernel's warpgroups run without turns and meet on a barrier before each dQ
// product).
TEST_F(FlexBackwardWgmma, FusedDqMatchesTheGoldenAndTheDqKernel) {
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  ScopedEnv env("FLEXGRAD_FLEX_WGMMA_BWD_FUSED_DQ", nullptr), group("FLEXGRAD_FLEX_WGMMA_BWD_GROUP", nullptr),
      ws("FLEXGRAD_FLEX_WGMMA_BWD_WS", nullptr), persistent("FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT", nullptr),
      tma("FLEXGRAD_FLEX_BWD_DQ_TMA_ADD", nullptr);
  const DType dt = kBFloat16;
  auto check_case = [&](Case c, const char* what, bool expect_visible) {
    SCOPED_TRACE(what);
    c.kernel = FlexCudaBackward::Wgmma;
    c.with_dlse = true;
    c.deterministic = false;
    const Inputs in = make_inputs(c.d, dt, true, 13);
    const Golden gold = golden(c.d, in.q, in.k, in.v, in.dout, in.dlse, 1.0 / std::sqrt(double(c.d.E)), c.native, {});
    env.set("0");
    const Grads ref = run_stub(c, in, gold, dt, kCUDA);  // the dQ kernel
    env.set("1");
    tma.set("0");
    const int64_t fused0 = cuda::flex::fused_dq_backward_calls(), ws0 = cuda::flex::fused_dq_ws_backward_calls();
    const Grads fused = run_stub(c, in, gold, dt, kCUDA);
    group.set("0");
    const Grads grid3d = run_stub(c, in, gold, dt, kCUDA);
    group.set("3");
    const Grads groups3 = run_stub(c, in, gold, dt, kCUDA);
    group.set(nullptr);
    persistent.set("3");
    const Grads persistent3 = run_stub(c, in, gold, dt, kCUDA);
    tma.set(nullptr);  // (the TMA adds are the default)
    const int64_t tma0 = cuda::flex::dq_tma_add_backward_calls();
    const Grads tma_persistent3 = run_stub(c, in, gold, dt, kCUDA);
    persistent.set(nullptr);
    const Grads tma_grid = run_stub(c, in, gold, dt, kCUDA);
    EXPECT_EQ(cuda::flex::dq_tma_add_backward_calls() - tma0, 2) << "the TMA adds";
    EXPECT_EQ(cuda::flex::fused_dq_ws_backward_calls() - ws0, 6) << "the warp-specialised dK/dV kernel";
    ws.set("0");
    const Grads plain = run_stub(c, in, gold, dt, kCUDA);
    ws.set(nullptr);
    EXPECT_EQ(cuda::flex::fused_dq_backward_calls() - fused0, 7);
    EXPECT_EQ(cuda::flex::fused_dq_ws_backward_calls() - ws0, 6) << "the plain dK/dV kernel";
    env.set(nullptr);
    // Not deterministic, switch unset: the dQ kernel where the dK/dV kernel launches persistent (the short-row
    // cases), the fused sum with the TMA adds where it launches as a grid.
    persistent.set("1");
    EXPECT_TRUE(equal(run_stub(c, in, gold, dt, kCUDA).dq, ref.dq)) << "default, persistent launch";
    persistent.set("0");
    const int64_t auto_tma0 = cuda::flex::dq_tma_add_backward_calls();
    const Grads auto_grid = run_stub(c, in, gold, dt, kCUDA);
    persistent.set(nullptr);
    EXPECT_EQ(cuda::flex::dq_tma_add_backward_calls() - auto_tma0, 1) << "default, grid launch: the TMA adds";
    EXPECT_LE(rel_err(ref.dq, gold.g.dq), tol(dt)) << "dq kernel";
    const char* names[] = {"groups of 16", "3-D grid",         "groups of 3", "persistent, 3 CTAs",
                           "TMA adds",     "TMA adds, persistent, 3 CTAs", "plain kernel", "default, grid launch"};
    int i = 0;
    for (const Grads* g : {&fused, &grid3d, &groups3, &persistent3, &tma_grid, &tma_persistent3, &plain, &auto_grid}) {
      SCOPED_TRACE(names[i++]);
      EXPECT_LE(rel_err(g->dq, gold.g.dq), tol(dt)) << "dq";
      EXPECT_LE(rel_err(g->dq, ref.dq), tol(dt) / 3) << "dq against the dQ kernel";
      EXPECT_TRUE(equal(g->dk, ref.dk)) << "dk";
      EXPECT_TRUE(equal(g->dv, ref.dv)) << "dv";
    }
    // The fused sum adds in another order than the dQ kernel: some bf16 element differs (else it did not run).
    if (expect_visible) {
      EXPECT_FALSE(equal(fused.dq, ref.dq)) << "the fused dQ gave the dQ kernel's bits";
    }
    // A deterministic call (the default) keeps the dQ kernel, the switch on too.
    c.deterministic = true;
    env.set("1");
    EXPECT_TRUE(equal(run_stub(c, in, gold, dt, kCUDA).dq, ref.dq)) << "deterministic dq";
    env.set(nullptr);
  };
  const int64_t L = 300, H = 4;
  {
    Case c = document_case();
    check_case(c, "document + causal", true);
  }
  {
    Case c;
    c.d = {2, H, L, 128, 1, 2, 260, 128};
    check_case(c, "GQA, broadcast kv batch, Lq != Lkv, no mask", true);
  }
  {
    Case c;
    c.d = {1, 2, 256, 128, 1, 2, 256, 64};
    c.mask = create_block_mask([](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q >= 140); }, std::nullopt,
                               std::nullopt, 256, 256, 128);
    c.native.mask = [](int, int, int q, int kv) { return q >= kv && q >= 140; };
    check_case(c, "rows 0-139 masked out, Ev 64", false);
  }
  env.set("x");
  Case c;
  c.d = {1, 2, 128, 128, 1, 2, 128, 128};
  testing::expect_error<ValueError>([&] { run(c, kBFloat16, FlexCudaBackward::Wgmma); },
                                    "FLEXGRAD_FLEX_WGMMA_BWD_FUSED_DQ");
  env.set(nullptr);
  group.set("-1");
  testing::expect_error<ValueError>([&] { run(c, kBFloat16, FlexCudaBackward::Wgmma); }, "FLEXGRAD_FLEX_WGMMA_BWD_GROUP");
}

// The warp-specialised kernels (fg_bwd_dkdv_wgmma_ws, fg_bwd_dq_wgmma_ws: a producer warpgroup loads the other
// side's chunks with TMA, or cp.async where a chunk is clipped by its block's end) run the plain kernels'
// arithmetic in the same order, so their gradients are the plain kernels' bit for bit
// (FLEXGRAD_FLEX_WGMMA_BWD_WS=0), at 3 stages (2 and 4 on the first case), and match the float64 golden. Cases
// (blocks over 64 rows: two consumer warpgroups): the captured document mask (chunks clipped at L 300, past which
// TMA reads zeros), blocks of (48, 80) and (80, 48) with E 128 (chunks clipped by their blocks: the cp.async path)
// and an infinite dO (K) row just past a clipped q (kv) chunk, which must not reach the dK / dV (dQ) of rows it
// does not meet (0 * inf), GQA with a broadcast kv batch and Lq != Lkv, a learnable captured bias (deterministic
// captured gradients), float16. A bad stage count is refused only where the kernels are chosen.
TEST_F(FlexBackwardWgmma, WarpSpecialisedKernelsMatchThePlainOnes) {
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  ScopedEnv ws("FLEXGRAD_FLEX_WGMMA_BWD_WS", nullptr), stages("FLEXGRAD_FLEX_WGMMA_BWD_STAGES", nullptr);
  // The same arithmetic as the plain kernels: every chunk computed (the opt-in skip, which the plain kernels do not
  // have, leaves out products of zeros; with an infinite input those are NaNs the plain kernels keep).
  ScopedEnv skip("FLEXGRAD_FLEX_BWD_SKIP_EMPTY", "0");
  // Each stage count is a module of its own (an NVRTC compile): every stage count on the first case only.
  std::vector<const char*> stage_counts{"2", "3", "4"};
  auto check_case = [&](Case c, DType dt, const char* what, const std::function<void(Inputs&)>& poison) {
    SCOPED_TRACE(what);
    SCOPED_TRACE(dtype_name(dt));
    c.kernel = FlexCudaBackward::Wgmma;
    Inputs in = make_inputs(c.d, dt, c.with_dlse, 17);
    const Golden gold = golden_of(c, in);
    if (poison) poison(in);
    ws.set("0");
    const Grads plain = run_stub(c, in, gold, dt, kCUDA);
    ws.set(nullptr);
    for (const char* n : stage_counts) {
      SCOPED_TRACE(std::string("stages ") + n);
      stages.set(n);
      const Grads w = run_stub(c, in, gold, dt, kCUDA);
      expect_same_bits(w, plain);
      if (!poison) {
        EXPECT_LE(rel_err(w.dk, gold.g.dk), tol(dt)) << "dk against the golden";
        EXPECT_LE(rel_err(w.dv, gold.g.dv), tol(dt)) << "dv against the golden";
        EXPECT_LE(rel_err(w.dq, gold.g.dq), tol(dt)) << "dq against the golden";
      }
    }
    stages.set(nullptr);
  };
  check_case(document_case(), kBFloat16, "document, clipped at L 300", {});
  stage_counts = {"3"};
  // Sliding window |q - kv| < 37 over Lq 190, Lkv 170: with blocks (bq, bkv), `row` of `name` ("dout" or "key")
  // set to +inf; `rows` of the gradient `grad` ("dkdv" or "dq") must stay finite.
  auto sliding = [&](BlockSize bs, const char* name, int64_t row, const char* grad, int64_t rows, const char* what) {
    Case c;
    const int64_t W = 37;
    c.d = {1, 2, 190, 128, 1, 2, 170, 128};
    c.mask = create_block_mask([W](Expr, Expr, Expr q, Expr kv) { return ((q - kv).abs() < W); }, std::nullopt,
                               std::nullopt, 190, 170, bs);
    c.native = native_mask([W](int, int, int q, int kv) { return std::abs(q - kv) < W; });
    check_case(c, kBFloat16, what, {});
    check_case(c, kFloat16, what, {});
    const std::string key = name;
    auto poison = [key, row](Inputs& in) {
      Tensor& t = key == "key" ? in.k : in.dout;
      auto v = t.to_vector();
      const int64_t L = t.size(2), D = t.size(3);
      for (int64_t h = 0; h < t.size(1); ++h)
        for (int64_t e = 0; e < D; ++e) v[(h * L + row) * D + e] = kInf;
      t = from_vector(v, t.sizes(), kFloat64);
    };
    c.kernel = FlexCudaBackward::Wgmma;
    Inputs in = make_inputs(c.d, kBFloat16, false, 17);
    const Golden gold = golden(c.d, in.q, in.k, in.v, in.dout, in.dlse, 1.0 / std::sqrt(128.0), c.native, {});
    poison(in);
    const Grads g = run_stub(c, in, gold, kBFloat16, kCUDA);
    const bool dkdv = std::string(grad) == "dkdv";
    const int64_t L = dkdv ? 170 : 190;
    for (const Tensor* t : dkdv ? std::vector<const Tensor*>{&g.dk, &g.dv} : std::vector<const Tensor*>{&g.dq}) {
      const auto x = t->to(kFloat64).to_vector();
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t j = 0; j < rows; ++j)
          for (int64_t e = 0; e < 128; ++e)
            ASSERT_TRUE(std::isfinite(x[(h * L + j) * 128 + e]))
                << what << ": head " << h << " row " << j << " col " << e;
    }
    check_case(c, kBFloat16, (std::string(what) + ", an infinite row").c_str(), poison);
  };
  // kv block 0 (kv rows 0-79) visits q blocks 0-2 (q < 116), not block 3 (rows 144-189), but a 64-row box from row
  // 96 (q block 2, clipped to 48 rows by its block) would bring rows 144-159 into its last chunk: dO row 150 does
  // not meet kv rows 0-79 (the warp-specialised dK/dV kernel; the dQ kernel is plain at q blocks of 48).
  sliding(BlockSize(48, 80), "dout", 150, "dkdv", 80, "sliding window, blocks (48, 80)");
  // The same with the sides swapped: q block 0 (rows 0-79) visits kv blocks 0-2 (kv < 116), whose last chunk (rows
  // 96-143) a box would extend into kv block 3: K row 150 does not meet q rows 0-79 (the warp-specialised dQ).
  sliding(BlockSize(80, 48), "key", 150, "dq", 80, "sliding window, blocks (80, 48)");
  {
    Case c;
    c.d = {2, 4, 300, 128, 1, 2, 260, 64};
    c.with_dlse = true;
    check_case(c, kBFloat16, "GQA, broadcast kv batch, Lq != Lkv, Ev 64", {});
  }
  {
    Tensor hs, tb, bi;
    Case c = learnable_case(3, 200, hs, tb, bi);
    c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 200, 200, 128);
    c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
    check_case(c, kBFloat16, "learnable captured bias, causal", {});
  }
  // The stage count is read only where the warp-specialised kernel is chosen.
  Case c;
  c.d = {1, 2, 128, 128, 1, 2, 128, 128};
  stages.set("5");
  testing::expect_error<ValueError>([&] { run(c, kBFloat16, FlexCudaBackward::Wgmma); },
                                    "FLEXGRAD_FLEX_WGMMA_BWD_STAGES");
  ws.set("0");
  EXPECT_NO_THROW(run(c, kBFloat16, FlexCudaBackward::Wgmma));
  ws.set(nullptr);
  stages.set(nullptr);
  ws.set("x");
  testing::expect_error<ValueError>([&] { run(c, kBFloat16, FlexCudaBackward::Wgmma); }, "FLEXGRAD_FLEX_WGMMA_BWD_WS");
}

// (The tests below read the CUDA layer's counters and JIT statistics, which a build without CUDA does not have.)
#ifdef FLEXGRAD_WITH_CUDA

// A switch's two sides on c's inputs: `env` at `off` (a run `counter` must not count), then at `on` (one it must
// count); `off_what` / `on_what` name them in the messages. Returns the gradients of (off, on); `env` stays at `on`.
std::pair<Grads, Grads> switch_off_then_on(const Case& c, DType dt, const Golden& gold, const Inputs& in,
                                           const testing::ScopedEnv& env, const char* off, const char* on,
                                           int64_t (*counter)(), const char* off_what, const char* on_what) {
  env.set(off);
  int64_t calls = counter();
  Grads a = run_stub(c, in, gold, dt, kCUDA);
  EXPECT_EQ(counter() - calls, 0) << off_what;
  env.set(on);
  calls = counter();
  Grads b = run_stub(c, in, gold, dt, kCUDA);
  EXPECT_EQ(counter() - calls, 1) << on_what;
  return {std::move(a), std::move(b)};
}
// A Wgmma backward of the document case, refused before any kernel runs with a ValueError naming `var` (an
// environment variable the caller has set to a bad value).
void expect_bad_env_named(const char* var) {
  Case c = document_case();
  c.kernel = FlexCudaBackward::Wgmma;
  const Inputs in = make_inputs(c.d, kBFloat16, false, 23);
  testing::expect_error<ValueError>([&] { run_stub(c, in, shapes_only(c.d), kBFloat16, kCUDA); }, var);
}

// The persistent warp-specialised kernels (FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT; FG_BWD_PERSISTENT): each CTA runs
// the grid's CTAs it takes from a queue, its stage ring, resident-tile barriers and counters carried from one to
// the next, so they must give the grid kernels' bits. "3" caps the grid at 3 CTAs: every CTA then runs many grid
// CTAs on these small problems, among them ones with no blocks to walk (rows that see nothing, kv blocks no q
// row visits) and ones past a block's end; "1" is the launch the option gives (one CTA an SM). Both with the next
// grid CTA started before the current one ends (FG_BWD_TILE_PREFETCH, the default: taken and its walk started
// before the consumers release the resident tile, which they do after the last chunk's score products) and without
// (FLEXGRAD_FLEX_BWD_TILE_PREFETCH=0, "3" only). Also against the float64 golden written in this file.
TEST_F(FlexBackwardWgmma, PersistentKernelsMatchTheGridOnes) {
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  ScopedEnv persistent("FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT", nullptr), ws("FLEXGRAD_FLEX_WGMMA_BWD_WS", nullptr),
      prefetch("FLEXGRAD_FLEX_BWD_TILE_PREFETCH", nullptr);
  auto check_case = [&](Case c, DType dt, const char* what) {
    SCOPED_TRACE(what);
    c.kernel = FlexCudaBackward::Wgmma;
    Inputs in = make_inputs(c.d, dt, c.with_dlse, 23);
    const Golden gold = golden_of(c, in);
    persistent.set("0");  // (unset, these short rows would take the persistent launch too)
    cuda::jit::clear_memory_cache();
    const Grads grid = run_stub(c, in, gold, dt, kCUDA);
    struct Launch {
      const char* n;  // FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT
      bool prefetch;  // FLEXGRAD_FLEX_BWD_TILE_PREFETCH unset (the default) or "0"
    };
    for (const Launch& l : {Launch{"3", true}, Launch{"1", true}, Launch{"3", false}}) {
      const char* n = l.n;
      SCOPED_TRACE(std::string("FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT=") + n + (l.prefetch ? "" : ", TILE_PREFETCH=0"));
      persistent.set(n);
      prefetch.set(l.prefetch ? nullptr : "0");
      const cuda::jit::JitStats before = cuda::jit::stats();
      const int64_t prefetched = cuda::flex::tile_prefetch_backward_calls();
      const Grads w = run_stub(c, in, gold, dt, kCUDA);
      EXPECT_EQ(cuda::flex::tile_prefetch_backward_calls() - prefetched, l.prefetch ? 1 : 0)
          << "FLEXGRAD_FLEX_BWD_TILE_PREFETCH's counter";
      // The persistent kernels are another module (FG_BWD_PERSISTENT): were the grid's module used again (the host
      // keeping the grid kernels for this case), the bit comparison below would compare it with itself.
      const cuda::jit::JitStats after = cuda::jit::stats();
      if (n[0] == '3') {
        EXPECT_GT(after.compiles + after.disk_hits, before.compiles + before.disk_hits) << "the grid kernels ran";
      }
      expect_same_bits(w, grid);
      EXPECT_LE(rel_err(w.dk, gold.g.dk), tol(dt)) << "dk against the golden";
      EXPECT_LE(rel_err(w.dv, gold.g.dv), tol(dt)) << "dv against the golden";
      EXPECT_LE(rel_err(w.dq, gold.g.dq), tol(dt)) << "dq against the golden";
    }
    persistent.set(nullptr);
    prefetch.set(nullptr);
  };
  check_case(document_case(), kBFloat16, "document, clipped at L 300");
  {
    // Blocks of 256 rows, two 128-row tiles each: q block 0 (rows 0-255) sees nothing (q >= 150 and kv >= 300
    // exclude kv <= q there), kv block 0 meets no q row, and the second tile of block 2 (rows 640-767) lies past
    // L 600: grid CTAs with no blocks to walk and ones with no rows.
    Case c;
    c.d = {2, 3, 600, 128, 2, 3, 600, 128};
    auto m = [](Expr, Expr, Expr q, Expr kv) { return (q >= 150) & (kv <= q) & (kv >= 300); };
    c.mask = create_block_mask(m, std::nullopt, std::nullopt, 600, 600, 256);
    c.native = native_mask([](int, int, int q, int kv) { return q >= 150 && kv <= q && kv >= 300; });
    check_case(c, kFloat16, "rows and kv blocks with nothing to walk");
  }
  {
    Case c;
    c.d = {2, 4, 300, 128, 1, 2, 260, 64};
    c.with_dlse = true;
    check_case(c, kBFloat16, "GQA, broadcast kv batch, Lq != Lkv, Ev 64");
  }
  {
    Tensor hs, tb, bi;
    Case c = learnable_case(3, 200, hs, tb, bi);
    c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 200, 200, 128);
    c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
    check_case(c, kBFloat16, "learnable captured bias, causal (fixed-point captured gradients)");
  }
  Case c;
  c.d = {1, 2, 128, 128, 1, 2, 128, 128};
  persistent.set("x");
  testing::expect_error<ValueError>([&] { run(c, kBFloat16, FlexCudaBackward::Wgmma); },
                                    "FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT");
  ws.set("0");  // read only where the warp-specialised kernels run
  EXPECT_NO_THROW(run(c, kBFloat16, FlexCudaBackward::Wgmma));
}

// The dQ kernel on a second stream beside the dK/dV kernel, the main stream waiting for it before the call returns:
// the default where both kernels are warp-specialised, FLEXGRAD_FLEX_BWD_CONCURRENT=1 elsewhere. The same kernels, so
// the same bits as FLEXGRAD_FLEX_BWD_CONCURRENT=0, on both kernel families, grid and persistent, and the float64
// golden; deterministic captured gradients (dQ waits for the dK/dV pass's scales) stay in order.
TEST_F(FlexBackwardWgmma, ConcurrentDqKernelGivesTheSameBits) {
  ScopedEnv concurrent("FLEXGRAD_FLEX_BWD_CONCURRENT", nullptr), persistent("FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT", nullptr);
  // `by_default`: whether the call forks with the switch unset.
  auto check_case = [&](Case c, DType dt, FlexCudaBackward kind, bool by_default, const char* what) {
    SCOPED_TRACE(what);
    c.kernel = kind;
    Inputs in = make_inputs(c.d, dt, c.with_dlse, 31);
    const Golden gold = golden_of(c, in);
    concurrent.set("0");
    int64_t calls = cuda::flex::concurrent_dq_calls();
    const Grads one = run_stub(c, in, gold, dt, kCUDA);
    EXPECT_EQ(cuda::flex::concurrent_dq_calls() - calls, 0) << "FLEXGRAD_FLEX_BWD_CONCURRENT=0: one stream";
    // Deterministic captured gradients keep dQ after the dK/dV pass (it waits for the scales that pass finds).
    const bool may_fork = c.learnable.empty() || !c.deterministic;
    for (const char* value : {"1", static_cast<const char*>(nullptr)}) {
      concurrent.set(value);
      SCOPED_TRACE(value ? "FLEXGRAD_FLEX_BWD_CONCURRENT=1" : "FLEXGRAD_FLEX_BWD_CONCURRENT unset");
      const bool expected = may_fork && (value != nullptr || by_default);
      for (int rep = 0; rep < 3; ++rep) {  // (a race between the streams would show as a changed or poisoned value)
        calls = cuda::flex::concurrent_dq_calls();
        const Grads two = run_stub(c, in, gold, dt, kCUDA);
        EXPECT_EQ(cuda::flex::concurrent_dq_calls() - calls, expected ? 1 : 0) << "dQ on the second stream";
        if (c.deterministic) expect_same_bits(two, one);  // (float atomics otherwise: the golden only)
        expect_grads_near(two, gold.g, tol(dt));
      }
    }
    concurrent.set(nullptr);
  };
  check_case(document_case(), kBFloat16, FlexCudaBackward::Tiled, false, "document, mma.sync kernels");
  Tensor hs, tb, bi;
  check_case(learnable_case(2, 100, hs, tb, bi), kFloat32, FlexCudaBackward::Tiled, false,
             "learnable captures, deterministic: dQ after the dK/dV pass");
  Case atomics = learnable_case(2, 100, hs, tb, bi);
  atomics.deterministic = false;
  check_case(atomics, kFloat32, FlexCudaBackward::Tiled, false, "learnable captures summed by float64 atomics: concurrent");
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  persistent.set("0");
  check_case(document_case(), kBFloat16, FlexCudaBackward::Wgmma, true, "document, warp-specialised kernels");
  {
    Case c;  // 64-row q blocks: one warpgroup a dQ CTA, no warp-specialised dQ kernel, so no fork by default
    c.d = {1, 2, 200, 64, 1, 2, 200, 64};
    c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 200, 200, 64);
    c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
    check_case(c, kBFloat16, FlexCudaBackward::Wgmma, false, "causal, 64-row blocks: plain wgmma kernels");
  }
  persistent.set("1");
  check_case(document_case(), kBFloat16, FlexCudaBackward::Wgmma, true, "document, persistent warp-specialised kernels");
  check_case(atomics, kBFloat16, FlexCudaBackward::Wgmma, true, "learnable captures summed by float64 atomics, warp-specialised");
  check_case(learnable_case(2, 100, hs, tb, bi), kBFloat16, FlexCudaBackward::Wgmma, true,
             "learnable captures, deterministic, warp-specialised: dQ after the dK/dV pass");
  persistent.set(nullptr);
  concurrent.set("yes");
  expect_bad_env_named("FLEXGRAD_FLEX_BWD_CONCURRENT");
}

// FG_BWD_DQ_DELTA: where the warp-specialised dQ kernel runs, it computes its rows' delta = rowsum(dO * O) - dlse
// and lse2 itself, in the preprocess's order, writes them for the dK/dV kernel and runs first, with no preprocess
// kernel: the gradients are the preprocess path's bit for bit (FLEXGRAD_FLEX_BWD_DQ_DELTA=0) and match the float64
// golden. Cases: the captured document mask clipped at L 300 (a q tile past the sequence's end), GQA with a
// broadcast kv batch, Lq != Lkv, Ev 64 and a gradient through the lse (dlse), float16, the persistent kernels, and
// learnable captures summed by float64 atomics. Deterministic captured gradients keep the preprocess (dQ runs after
// the dK/dV pass there); so does a dQ kernel that is not warp-specialised (q blocks of 64 rows: one warpgroup).
// Since session 32 the fold runs only with FLEXGRAD_FLEX_BWD_CONCURRENT=0 where both kernels are warp-specialised
// (the dQ kernel runs beside the dK/dV kernel by default there, ConcurrentDqKernelGivesTheSameBits).
TEST_F(FlexBackwardWgmma, DqKernelComputesThePreprocessDeltaBitForBit) {
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  ScopedEnv delta("FLEXGRAD_FLEX_BWD_DQ_DELTA", nullptr), persistent("FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT", nullptr);
  ScopedEnv concurrent("FLEXGRAD_FLEX_BWD_CONCURRENT", "0");
  auto check_case = [&](Case c, DType dt, bool expected, const char* what) {
    SCOPED_TRACE(what);
    SCOPED_TRACE(dtype_name(dt));
    c.kernel = FlexCudaBackward::Wgmma;
    Inputs in = make_inputs(c.d, dt, c.with_dlse, 23);
    const Golden gold = golden_of(c, in);
    delta.set("0");
    int64_t calls = cuda::flex::dq_delta_calls();
    const Grads pre = run_stub(c, in, gold, dt, kCUDA);
    EXPECT_EQ(cuda::flex::dq_delta_calls() - calls, 0) << "FLEXGRAD_FLEX_BWD_DQ_DELTA=0 keeps the preprocess";
    delta.set(nullptr);
    calls = cuda::flex::dq_delta_calls();
    const Grads fold = run_stub(c, in, gold, dt, kCUDA);
    EXPECT_EQ(cuda::flex::dq_delta_calls() - calls, expected ? 1 : 0) << "delta computed by the dQ kernel";
    if (c.deterministic) expect_same_bits(fold, pre);  // (float64 atomics otherwise: the golden only)
    expect_grads_near(fold, gold.g, tol(dt));
  };
  check_case(document_case(), kBFloat16, true, "document, clipped at L 300");
  check_case(document_case(), kFloat16, true, "document, clipped at L 300");
  {
    Case c;
    c.d = {2, 4, 300, 128, 1, 2, 260, 64};
    c.with_dlse = true;
    check_case(c, kBFloat16, true, "GQA, broadcast kv batch, Lq != Lkv, Ev 64, dlse");
  }
  persistent.set("3");
  check_case(document_case(), kBFloat16, true, "document, persistent kernels capped at 3 CTAs");
  persistent.set(nullptr);
  Tensor hs, tb, bi;
  Case atomics = learnable_case(2, 200, hs, tb, bi);
  atomics.deterministic = false;
  check_case(atomics, kBFloat16, true, "learnable captures summed by float64 atomics");
  check_case(learnable_case(2, 200, hs, tb, bi), kBFloat16, false, "learnable captures, deterministic: the preprocess");
  {
    Case c = document_case();
    c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 300, 300, 64);
    c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
    check_case(c, kBFloat16, false, "q blocks of 64: the plain dQ kernel and the preprocess");
  }
  delta.set("yes");
  expect_bad_env_named("FLEXGRAD_FLEX_BWD_DQ_DELTA");
}

// FG_BWD_SKIP_EMPTY (opt-in, FLEXGRAD_FLEX_BWD_SKIP_EMPTY=1, with the warp-specialised kernels and a pure mask_mod):
// the producers skip the chunks the mask keeps nothing of, and the dQ consumers the quadrants, by fg_bwd_quad_live's
// table. Against the float64 golden and the same kernels computing every chunk (unset: the same bits on finite
// inputs, skipped products add only zeros; the counter moves only with the switch at 1). Cases: documents [0, 64),
// [64, 192), [192, 300) (quadrants and whole chunks with nothing kept in partial blocks) in bfloat16 and float16, on
// 3 persistent CTAs, documents + causal clipped at L 300, ALiBi + causal with GQA (a mask without captures). Then an
// infinite key row 10 and an infinite dO row 200: dQ rows 64-255 (whose quadrants with key row 10 the mask keeps
// nothing of) and dK / dV rows 0-127 (whose q chunk 192-255 it keeps nothing of) come out finite with the skip, and
// not without it (0 * inf). The table needs blocks of multiples of 64 rows: with 32-row blocks the switch changes
// nothing.
TEST_F(FlexBackwardWgmma, SkipsWhatTheMaskKeepsNothingOf) {
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  ScopedEnv skip("FLEXGRAD_FLEX_BWD_SKIP_EMPTY", nullptr), persistent("FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT", nullptr);
  auto both = [&](const Case& c, DType dt, const Golden& gold, const Inputs& in) {
    auto r = switch_off_then_on(c, dt, gold, in, skip, nullptr, "1", cuda::flex::skip_empty_backward_calls,
                                "unset: every chunk", "FLEXGRAD_FLEX_BWD_SKIP_EMPTY=1: the skip");
    skip.set(nullptr);
    return r;
  };
  auto check_case = [&](Case c, DType dt, const char* what) {
    SCOPED_TRACE(what);
    SCOPED_TRACE(dtype_name(dt));
    c.kernel = FlexCudaBackward::Wgmma;
    const Inputs in = make_inputs(c.d, dt, c.with_dlse, 41);
    const Golden gold = golden_of(c, in);
    const auto [full, g] = both(c, dt, gold, in);
    expect_grads_near(g, gold.g, tol(dt));
    expect_same_bits(g, full);
  };
  std::vector<int64_t> ids(300);
  for (int64_t i = 0; i < 300; ++i) ids[i] = i < 64 ? 0 : i < 192 ? 1 : 2;
  const Case three = documents_case(ids, false);
  check_case(three, kBFloat16, "documents [0, 64), [64, 192), [192, 300)");
  check_case(three, kFloat16, "documents [0, 64), [64, 192), [192, 300)");
  persistent.set("3");
  check_case(three, kBFloat16, "documents [0, 64), [64, 192), [192, 300), 3 persistent CTAs");
  persistent.set(nullptr);
  check_case(document_case(), kBFloat16, "documents + causal, clipped at L 300");
  check_case(alibi_causal_gqa_case(), kBFloat16, "ALiBi, causal, GQA");
  // `name`'s row `row` ("key" or "dout") infinite; rows [r0, r1) of dQ (a key row) or of dK and dV (a dO row).
  auto poisoned = [&](const char* name, int64_t row, int64_t r0, int64_t r1) {
    SCOPED_TRACE(std::string("an infinite ") + name + " row");
    Case c = three;
    c.kernel = FlexCudaBackward::Wgmma;
    Inputs in = make_inputs(c.d, kBFloat16, false, 43);
    const Golden gold = golden_of(c, in);
    const bool key = std::string(name) == "key";
    Tensor& t = key ? in.k : in.dout;
    auto v = t.to_vector();
    const int64_t L = t.size(2), D = t.size(3);
    for (int64_t bh = 0; bh < t.size(0) * t.size(1); ++bh)
      for (int64_t e = 0; e < D; ++e) v[(bh * L + row) * D + e] = kInf;
    t = from_vector(v, t.sizes(), kFloat64);
    const auto [full, g] = both(c, kBFloat16, gold, in);
    auto finite_rows = [&](const Grads& r) {
      for (const Tensor* x : key ? std::vector<const Tensor*>{&r.dq} : std::vector<const Tensor*>{&r.dk, &r.dv}) {
        const auto vals = x->to(kFloat64).to_vector();
        const int64_t n = x->size(3);
        for (int64_t bh = 0; bh < x->size(0) * x->size(1); ++bh)
          for (int64_t j = r0; j < r1; ++j)
            for (int64_t e = 0; e < n; ++e)
              if (!std::isfinite(vals[(bh * L + j) * n + e])) return false;
      }
      return true;
    };
    EXPECT_TRUE(finite_rows(g)) << "the skip: rows " << r0 << "-" << r1 - 1 << " finite";
    EXPECT_FALSE(finite_rows(full)) << "every chunk computed: 0 * inf reaches rows " << r0 << "-" << r1 - 1;
  };
  poisoned("key", 10, 64, 256);
  poisoned("dout", 200, 0, 128);
  {
    SCOPED_TRACE("documents with 32-row blocks: FLEXGRAD_FLEX_BWD_SKIP_EMPTY=1 changes nothing");
    Case c = three;
    c.kernel = FlexCudaBackward::Wgmma;
    c.mask = create_block_mask(
        [](Expr, Expr, Expr q, Expr kv) { return ((q < 64) & (kv < 64)) | ((q >= 64) & (kv >= 64)); }, std::nullopt,
        std::nullopt, 300, 300, 32);
    c.native = native_mask([](int, int, int q, int kv) { return (q < 64) == (kv < 64); });
    const Inputs in = make_inputs(c.d, kBFloat16, false, 47);
    const Golden gold = golden_of(c, in);
    skip.set("1");
    const int64_t calls = cuda::flex::skip_empty_backward_calls();
    const Grads g = run_stub(c, in, gold, kBFloat16, kCUDA);
    EXPECT_EQ(cuda::flex::skip_empty_backward_calls(), calls) << "a table for 32-row blocks";
    expect_grads_near(g, gold.g, tol(kBFloat16));
  }
  skip.set("yes");
  expect_bad_env_named("FLEXGRAD_FLEX_BWD_SKIP_EMPTY");
}

// The affine form under approx_math (FG_BWD_SCORE_AFFINE, flex_backward.cuh; the default): the tensor-core kernels'
// merged step takes q.k times scale in_factor, the core and out_factor in_factor core' from fg_score_core_dscore,
// and out_factor in P's exponent. Against the float64 golden (exact tanh) at approx_math's floor and against the
// whole program an entry (FLEXGRAD_FLEX_AFFINE_FOLD=0) on the same inputs, near (the products round once where the
// program rounds twice); the fold's counter moves only with the switch unset. Cases: softcap with causal GQA (Ev 64)
// on the warp-specialised, the plain Wgmma and the mma.sync kernels, in bfloat16 and float16; 30 tanh(s / 20) (a
// factor 1.5 on the derivative) without a mask at L 300; a core reading q and kv, causal, with dlse.
TEST_F(FlexBackwardWgmma, AffineFoldMatchesTheGoldenAndTheWholeProgram) {
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  ScopedEnv fold("FLEXGRAD_FLEX_AFFINE_FOLD", nullptr), ws("FLEXGRAD_FLEX_WGMMA_BWD_WS", nullptr);
  auto check_case = [&](Case c, DType dt, FlexCudaBackward kind, const char* what) {
    SCOPED_TRACE(what);
    SCOPED_TRACE(dtype_name(dt));
    c.kernel = kind;
    c.approx_math = true;
    const Inputs in = make_inputs(c.d, dt, c.with_dlse, 37);
    const Golden gold = golden_of(c, in);
    const auto [whole, g] = switch_off_then_on(c, dt, gold, in, fold, "0", nullptr, cuda::flex::affine_fold_calls,
                                               "FLEXGRAD_FLEX_AFFINE_FOLD=0: the whole program", "unset: the fold");
    expect_grads_near(g, gold.g, std::max(tol(dt), 2e-3));
    expect_grads_near(g, whole, tol(dt) / 10);
  };
  Case softcap = alibi_causal_gqa_case();
  softcap.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
  softcap.native.mod = [](double s, int, int, int, int) { return 20.0 * std::tanh(s / 20.0); };
  softcap.native.dmod = [](double s, int, int, int, int) { return 1.0 - std::tanh(s / 20.0) * std::tanh(s / 20.0); };
  check_case(softcap, kBFloat16, FlexCudaBackward::Wgmma, "softcap, causal, GQA");
  check_case(softcap, kFloat16, FlexCudaBackward::Wgmma, "softcap, causal, GQA");
  ws.set("0");
  check_case(softcap, kBFloat16, FlexCudaBackward::Wgmma, "softcap, causal, GQA: the plain Wgmma kernels");
  ws.set(nullptr);
  check_case(softcap, kBFloat16, FlexCudaBackward::Tiled, "softcap, causal, GQA: the mma.sync kernels");
  {
    Case c;
    c.d = {2, 4, 300, 128, 2, 4, 300, 128};
    c.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 30.0 * tanh(s / 20.0); };
    c.native.mod = [](double s, int, int, int, int) { return 30.0 * std::tanh(s / 20.0); };
    c.native.dmod = [](double s, int, int, int, int) { return 1.5 * (1.0 - std::tanh(s / 20.0) * std::tanh(s / 20.0)); };
    check_case(c, kBFloat16, FlexCudaBackward::Wgmma, "30 tanh(s / 20), no mask");
  }
  {
    Case c = softcap;
    c.with_dlse = true;
    c.score_mod = [](Expr s, Expr, Expr, Expr q, Expr kv) { return 10.0 * tanh(s / 10.0 + to_float(q - kv) * 0.01); };
    c.native.mod = [](double s, int, int, int q, int kv) { return 10.0 * std::tanh(s / 10.0 + (q - kv) * 0.01); };
    c.native.dmod = [](double s, int, int, int q, int kv) {
      const double t = std::tanh(s / 10.0 + (q - kv) * 0.01);
      return 1.0 - t * t;
    };
    check_case(c, kBFloat16, FlexCudaBackward::Wgmma, "a core reading q and kv, causal, dlse");
  }
}

// d score_mod / d score multiplied into dS untested in the tensor-core kernels' interior steps where the code
// generator proved it finite (FG_BWD_DSCORE_FINITE, flex_backward.cuh; float_ranges.h): softcap exact and under
// approx_math (the affine form's core), on the warp-specialised, plain Wgmma and mma.sync kernels, causal with GQA
// at L 300 (interior, diagonal and clipped chunks), a query row and a key row scaled by 256 so that most of their
// scores saturate tanh (d = 0 there; the two together ~1e5 before the cap). The same gradients as with the zero
// test (FLEXGRAD_FLEX_BWD_FINITE_DSCORE=0), and near the float64 golden. (Scores past float's range are no test
// of this: q . k overflows in the tensor cores' float32 sums whatever follows.)
TEST_F(FlexBackwardWgmma, FiniteDerivativeSkipsTheZeroTest) {
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  ScopedEnv env("FLEXGRAD_FLEX_BWD_FINITE_DSCORE", nullptr), ws("FLEXGRAD_FLEX_WGMMA_BWD_WS", nullptr);
  Case softcap = alibi_causal_gqa_case();
  softcap.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
  softcap.native.mod = [](double s, int, int, int, int) { return 20.0 * std::tanh(s / 20.0); };
  softcap.native.dmod = [](double s, int, int, int, int) { return 1.0 - std::tanh(s / 20.0) * std::tanh(s / 20.0); };
  auto scale_row = [](Tensor& t, int64_t row, double f) {
    auto v = t.to_vector();
    const int64_t L = t.size(2), D = t.size(3);
    for (int64_t bh = 0; bh < t.size(0) * t.size(1); ++bh)
      for (int64_t e = 0; e < D; ++e) v[(bh * L + row) * D + e] *= f;
    t = from_vector(v, t.sizes(), kFloat64);
  };
  auto check_case = [&](Case c, DType dt, FlexCudaBackward kind, bool approx, const char* what) {
    SCOPED_TRACE(what);
    SCOPED_TRACE(dtype_name(dt));
    c.kernel = kind;
    c.approx_math = approx;
    Inputs in = make_inputs(c.d, dt, c.with_dlse, 43);
    scale_row(in.q, 200, 256.0);  // q block 1 against kv block 0: a full block (interior chunks)
    scale_row(in.k, 10, 256.0);
    const Golden gold = golden_of(c, in);
    const auto [tested, g] = switch_off_then_on(c, dt, gold, in, env, "0", nullptr,
                                                cuda::flex::finite_dscore_backward_calls,
                                                "FLEXGRAD_FLEX_BWD_FINITE_DSCORE=0: the zero test", "unset: untested");
    expect_grads_near(g, gold.g, std::max(tol(dt), approx ? 2e-3 : 0.0));
    EXPECT_TRUE(equal(g.dq, tested.dq)) << "dq";
    EXPECT_TRUE(equal(g.dk, tested.dk)) << "dk";
    EXPECT_TRUE(equal(g.dv, tested.dv)) << "dv";
  };
  for (bool approx : {true, false}) {
    const char* math = approx ? "approx_math" : "exact math";
    check_case(softcap, kBFloat16, FlexCudaBackward::Wgmma, approx, math);
    ws.set("0");
    check_case(softcap, kBFloat16, FlexCudaBackward::Wgmma, approx, (std::string(math) + ", plain Wgmma").c_str());
    ws.set(nullptr);
    check_case(softcap, kFloat16, FlexCudaBackward::Tiled, approx, (std::string(math) + ", mma.sync").c_str());
  }
  // Not where the derivative is not provably finite (s tanh(s): inf * 0 at s = inf): the counter stays.
  Case st = softcap;
  st.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return s * tanh(s / 20.0); };
  st.kernel = FlexCudaBackward::Wgmma;
  const Inputs in = make_inputs(st.d, kBFloat16, false, 44);
  const int64_t calls = cuda::flex::finite_dscore_backward_calls();
  run_stub(st, in, shapes_only(st.d), kBFloat16, kCUDA);
  EXPECT_EQ(cuda::flex::finite_dscore_backward_calls(), calls);
  env.set("2");
  expect_bad_env_named("FLEXGRAD_FLEX_BWD_FINITE_DSCORE");
}

// The lean element steps (FG_BWD_LEAN_STEP, flex_backward.cuh, the default: the scale in P's exponent, lse2 / delta
// read in pairs, the dQ kernel's P finished before dP with invalid entries' P = -0, and a copy of each step for
// interior chunks). Against the float64 golden and the previous steps (FLEXGRAD_FLEX_BWD_LEAN_STEP=0) on the same
// inputs: where a score_mod keeps the scale out of the exponent (ALiBi, softcap, a learnable bias with its captured
// gradients) the same bits; elsewhere the exponent rounds once less, so near (P differs by an ulp before its
// rounding to 16 bits). Cases: the captured
// document mask clipped at L 300 (interior, diagonal and clipped chunks) in bfloat16 and float16, no mask at L 256
// (interior only) and 300, GQA with Ev 64 and dlse, the plain Wgmma kernels and the mma.sync (Tiled) ones; and the
// entries the mask drops must not carry an infinite dP (V row) into dQ, nor a stale delta past a clipped chunk (an
// infinite dO row) into dK / dV.
TEST_F(FlexBackwardWgmma, LeanElementStepMatchesTheGoldenAndThePreviousStep) {
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  ScopedEnv lean("FLEXGRAD_FLEX_BWD_LEAN_STEP", nullptr), ws("FLEXGRAD_FLEX_WGMMA_BWD_WS", nullptr);
  // The previous step's gradients and the lean step's on c's inputs.
  auto both = [&](const Case& c, DType dt, const Golden& gold, const Inputs& in) {
    return switch_off_then_on(c, dt, gold, in, lean, "0", nullptr, cuda::flex::lean_step_backward_calls,
                              "FLEXGRAD_FLEX_BWD_LEAN_STEP=0: the previous step", "unset: the lean step");
  };
  auto check_case = [&](Case c, DType dt, FlexCudaBackward kind, bool same, const char* what) {
    SCOPED_TRACE(what);
    SCOPED_TRACE(dtype_name(dt));
    c.kernel = kind;
    const Inputs in = make_inputs(c.d, dt, c.with_dlse, 29);
    const Golden gold = golden_of(c, in);
    const auto [base, g] = both(c, dt, gold, in);
    expect_grads_near(g, gold.g, tol(dt));
    if (same)
      expect_same_bits(g, base);
    else
      expect_grads_near(g, base, tol(dt) / 10);
  };
  check_case(document_case(), kBFloat16, FlexCudaBackward::Wgmma, false, "document, clipped at L 300");
  check_case(document_case(), kFloat16, FlexCudaBackward::Wgmma, false, "document, clipped at L 300");
  for (int64_t L : {256, 300}) {
    Case c;
    c.d = {2, 4, L, 128, 2, 4, L, 128};
    check_case(c, kBFloat16, FlexCudaBackward::Wgmma, false, L == 256 ? "no mask, L 256" : "no mask, L 300");
  }
  {
    Case c;
    c.d = {2, 4, 300, 128, 1, 2, 260, 64};
    c.with_dlse = true;
    check_case(c, kBFloat16, FlexCudaBackward::Wgmma, false, "GQA, broadcast kv batch, Lq != Lkv, Ev 64, dlse");
  }
  {
    Case c = alibi_causal_gqa_case();
    check_case(c, kBFloat16, FlexCudaBackward::Wgmma, true, "ALiBi, causal, GQA");
    c.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
    c.native.mod = [](double s, int, int, int, int) { return 20.0 * std::tanh(s / 20.0); };
    c.native.dmod = [](double s, int, int, int, int) { return 1.0 - std::tanh(s / 20.0) * std::tanh(s / 20.0); };
    check_case(c, kBFloat16, FlexCudaBackward::Wgmma, true, "softcap, causal, GQA");
  }
  {
    Tensor hs, tb, bi;
    Case c = learnable_case(3, 200, hs, tb, bi);
    c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 200, 200, 128);
    c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
    c.with_dlse = true;
    check_case(c, kBFloat16, FlexCudaBackward::Wgmma, true, "learnable bias, causal, deterministic");
  }
  ws.set("0");
  check_case(document_case(), kBFloat16, FlexCudaBackward::Wgmma, false, "document, the plain Wgmma kernels");
  ws.set(nullptr);
  check_case(document_case(), kBFloat16, FlexCudaBackward::Tiled, false, "document, the mma.sync kernels");
  // Sliding window |q - kv| < 37 over L 190 with blocks `bs`: row `row` of `name` ("value" or "dout") set to +inf
  // after the golden; rows [0, rows) of dQ (for a V row: the rows whose window ends before it) or of dK and dV (for
  // a dO row: the kv rows of block 0, whose q blocks end before it) stay finite, in the default and the lean step.
  auto poisoned = [&](BlockSize bs, const char* name, int64_t row, int64_t rows) {
    SCOPED_TRACE(std::string("an infinite ") + name + " row");
    const int64_t W = 37, L = 190;
    Case c;
    c.d = {1, 2, L, 128, 1, 2, L, 128};
    c.kernel = FlexCudaBackward::Wgmma;
    c.mask = create_block_mask([W](Expr, Expr, Expr q, Expr kv) { return ((q - kv).abs() < W); }, std::nullopt,
                               std::nullopt, L, L, bs);
    c.native = native_mask([W](int, int, int q, int kv) { return std::abs(q - kv) < W; });
    Inputs in = make_inputs(c.d, kBFloat16, false, 31);
    const Golden gold = golden_of(c, in);
    Tensor& t = std::string(name) == "value" ? in.v : in.dout;
    auto v = t.to_vector();
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t e = 0; e < 128; ++e) v[(h * L + row) * 128 + e] = kInf;
    t = from_vector(v, t.sizes(), kFloat64);
    const auto [base, g] = both(c, kBFloat16, gold, in);
    const bool dq = std::string(name) == "value";
    for (const Grads* r : {&base, &g}) {
      SCOPED_TRACE(r == &base ? "default" : "lean");
      for (const Tensor* x : dq ? std::vector<const Tensor*>{&r->dq} : std::vector<const Tensor*>{&r->dk, &r->dv}) {
        const auto vals = x->to(kFloat64).to_vector();
        for (int64_t h = 0; h < 2; ++h)
          for (int64_t j = 0; j < rows; ++j)
            for (int64_t e = 0; e < 128; ++e)
              ASSERT_TRUE(std::isfinite(vals[(h * L + j) * 128 + e])) << "head " << h << " row " << j << " col " << e;
      }
    }
  };
  // q block 1 (rows 80-159, two warpgroups: the warp-specialised dQ) visits kv block 3 (rows 144-191) partially:
  // its rows up to 113 drop kv row 150 there, with dP infinite.
  poisoned(BlockSize(80, 48), "value", 150, 150 - 37 + 1);
  // kv block 0 (rows 0-79: the warp-specialised dK/dV) visits q blocks 0-2 (rows < 144); a 64-row chunk from row
  // 96 unclipped would reach dO row 150.
  poisoned(BlockSize(48, 80), "dout", 150, 80);
  lean.set("yes");
  expect_bad_env_named("FLEXGRAD_FLEX_BWD_LEAN_STEP");
}

// Unset, FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT leaves the launch to the mask's rows (persistent_pays in
// flex_backward_cuda.cpp): persistent where each grid CTA walks at most twelve 128-row blocks of the other side on
// average, the grid where rows are longer and where the host has no count (a mask derived by select). The mask is
// built on the GPU, its count copied back behind its lists, and read back once synchronously so the count has
// landed when the backward asks. The persistent launch gives the grid's bits and the float64 golden's values.
TEST_F(FlexBackwardWgmma, PersistentLaunchWhereTheMasksRowsAreShort) {
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  ScopedEnv persistent("FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT", nullptr), ws("FLEXGRAD_FLEX_WGMMA_BWD_WS", nullptr);
  auto persistent_launches = [](const Case& c, const Inputs& in, const Golden& gold, Grads& out) {
    const int64_t before = cuda::flex::persistent_backward_calls();
    out = run_stub(c, in, gold, kBFloat16, kCUDA);
    return cuda::flex::persistent_backward_calls() - before;
  };
  // A causal window of 256 at L 1024 in blocks of 128: rows of 1, 2, then 3 blocks (21 in all; 336 rows a CTA).
  const int64_t L = 1024;
  Case c;
  c.kernel = FlexCudaBackward::Wgmma;
  c.d = {1, 2, L, 128, 1, 2, L, 128};
  c.mask = create_block_mask([](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv <= 256); }, std::nullopt,
                             std::nullopt, L, L, 128, kCUDA);
  c.native.mask = [](int, int, int q, int kv) { return q >= kv && q - kv <= 256; };
  (void)c.mask->kv_num_blocks().to(kCPU);  // synchronous: the count's copy was queued before it
  ASSERT_TRUE(c.mask->visited_blocks());
  ASSERT_EQ(c.mask->visited_blocks()->known(), std::optional<int64_t>(21));
  const Inputs in = make_inputs(c.d, kBFloat16, false, 41);
  const Golden gold = golden_of(c, in);
  Grads chosen, grid, derived;
  EXPECT_EQ(persistent_launches(c, in, gold, chosen), 1) << "short rows, the variable unset: persistent";
  persistent.set("0");
  EXPECT_EQ(persistent_launches(c, in, gold, grid), 0) << "FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT=0: the grid";
  persistent.set(nullptr);
  expect_same_bits(chosen, grid);
  expect_grads_near(chosen, gold.g, tol(kBFloat16));
  Case no_count = c;
  no_count.mask = c.mask->select(0, 0);  // the same lists (B = H = 1), no count
  ASSERT_EQ(no_count.mask->visited_blocks(), nullptr);
  EXPECT_EQ(persistent_launches(no_count, in, gold, derived), 0) << "no count on the host: the grid";
  expect_same_bits(derived, grid);
  // No mask at L 2048: every row visits 16 blocks (2048 rows a CTA): the grid. (The choice reads no values.)
  Case dense;
  dense.kernel = FlexCudaBackward::Wgmma;
  dense.d = {1, 1, 2048, 128, 1, 1, 2048, 128};
  const Inputs dense_in = make_inputs(dense.d, kBFloat16, false, 43);
  Grads g;
  EXPECT_EQ(persistent_launches(dense, dense_in, shapes_only(dense.d), g), 0) << "rows of 16 blocks: the grid";
  // ... and at L 1024 (8 blocks, 1024 rows a CTA): persistent.
  dense.d = {1, 1, L, 128, 1, 1, L, 128};
  EXPECT_EQ(persistent_launches(dense, make_inputs(dense.d, kBFloat16, false, 43), shapes_only(dense.d), g), 1)
      << "rows of 8 blocks: persistent";
}
// The warp-specialised kernels' consumer warpgroups taking turns at their products (FG_BWD_PINGPONG,
// flex_backward_wgmma.cuh; FLEXGRAD_FLEX_BWD_PINGPONG=1 forces the turns, 0 drops them): the same products in the
// same order, so the bits of the kernels without turns, and near the float64 golden. On walks of many chunks, of one
// and of none (rows that see nothing, kv blocks no q row visits), grid and persistent (3 CTAs running many grid
// CTAs, the turns running on from one to the next), a chunk clipped by its block's end, softcap under approx_math
// (the affine fold), GQA with dlse and Ev 64, head dim 64; the counter moves only with turns. Unset, the turns are
// taken where both head dims are 128 and not at 64 (measured slower there).
TEST_F(FlexBackwardWgmma, PingPongGivesTheSameBits) {
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  ScopedEnv pingpong("FLEXGRAD_FLEX_BWD_PINGPONG", nullptr), persistent("FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT", nullptr);
  auto check_case = [&](Case c, DType dt, std::vector<const char*> launches, const char* what) {
    SCOPED_TRACE(what);
    c.kernel = FlexCudaBackward::Wgmma;
    const Inputs in = make_inputs(c.d, dt, c.with_dlse, 47);
    const Golden gold = golden_of(c, in);
    const double t = std::max(tol(dt), c.approx_math ? 2e-3 : 0.0);
    for (const char* launch : launches) {
      SCOPED_TRACE(std::string("FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT=") + (launch ? launch : "(unset)"));
      persistent.set(launch);
      const auto [none, turns] = switch_off_then_on(c, dt, gold, in, pingpong, "0", "1",
                                                    cuda::flex::pingpong_backward_calls, "=0: no turns", "=1: turns");
      expect_same_bits(turns, none);
      expect_grads_near(turns, gold.g, t);
    }
    pingpong.set(nullptr);
    persistent.set(nullptr);
  };
  check_case(document_case(), kBFloat16, {"0", "3"}, "document, clipped at L 300");
  {
    Case c;  // (as PersistentKernelsMatchTheGridOnes's)
    c.d = {2, 3, 600, 128, 2, 3, 600, 128};
    auto m = [](Expr, Expr, Expr q, Expr kv) { return (q >= 150) & (kv <= q) & (kv >= 300); };
    c.mask = create_block_mask(m, std::nullopt, std::nullopt, 600, 600, 256);
    c.native = native_mask([](int, int, int q, int kv) { return q >= 150 && kv <= q && kv >= 300; });
    check_case(c, kFloat16, {"0", "3"}, "rows and kv blocks with nothing to walk");
  }
  {
    Case c = alibi_causal_gqa_case();
    c.score_mod = [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
    c.native.mod = [](double s, int, int, int, int) { return 20.0 * std::tanh(s / 20.0); };
    c.native.dmod = [](double s, int, int, int, int) { return 1.0 - std::tanh(s / 20.0) * std::tanh(s / 20.0); };
    c.approx_math = true;
    check_case(c, kBFloat16, {nullptr}, "softcap under approx_math, causal, GQA, Ev 64");
  }
  {
    Case c;
    c.d = {2, 4, 300, 128, 1, 2, 260, 64};
    c.with_dlse = true;
    check_case(c, kBFloat16, {nullptr}, "GQA, broadcast kv batch, Lq != Lkv, Ev 64, dlse");
  }
  {
    Case c;
    c.d = {2, 2, 384, 64, 2, 2, 384, 64};
    c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 384, 384, 128);
    c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
    check_case(c, kFloat16, {nullptr}, "causal, head dim 64");
    // Unset: no turns at head dim 64, turns at 128.
    const Inputs in = make_inputs(c.d, kFloat16, false, 47);
    c.kernel = FlexCudaBackward::Wgmma;
    int64_t calls = cuda::flex::pingpong_backward_calls();
    (void)run_stub(c, in, shapes_only(c.d), kFloat16, kCUDA);
    EXPECT_EQ(cuda::flex::pingpong_backward_calls() - calls, 0) << "unset, head dim 64: no turns";
    c.d = {2, 2, 384, 128, 2, 2, 384, 128};
    calls = cuda::flex::pingpong_backward_calls();
    (void)run_stub(c, make_inputs(c.d, kFloat16, false, 47), shapes_only(c.d), kFloat16, kCUDA);
    EXPECT_EQ(cuda::flex::pingpong_backward_calls() - calls, 1) << "unset, head dim 128: turns";
  }
  pingpong.set("x");
  expect_bad_env_named("FLEXGRAD_FLEX_BWD_PINGPONG");
}
#endif  // FLEXGRAD_WITH_CUDA

TEST_F(FlexBackwardWgmma, AutoPicksItWhereItRuns) {
  if (!hopper()) GTEST_SKIP() << "the Wgmma backward kernels need sm_90a (Hopper); this device is " << device_arch();
  ScopedEnv env("FLEXGRAD_FLEX_WGMMA_BWD", nullptr);
  Case c;
  c.d = {1, 2, 200, 64, 1, 2, 200, 64};
  c.mask = create_block_mask(causal, std::nullopt, std::nullopt, 200, 200, 128);
  c.native.mask = [](int, int, int q, int kv) { return q >= kv; };
  env.set("x");
  testing::expect_error<ValueError>([&] { run(c, kBFloat16, FlexCudaBackward::Auto); }, "FLEXGRAD_FLEX_WGMMA_BWD");
  env.set(nullptr);
  const Grads tiled = run(c, kBFloat16, FlexCudaBackward::Tiled), wgmma = run(c, kBFloat16, FlexCudaBackward::Wgmma);
  auto same = [](const Grads& a, const Grads& b) { return equal(a.dq, b.dq) && equal(a.dk, b.dk) && equal(a.dv, b.dv); };
  // Bit-identical results would leave the choice invisible here (the two families sum in the same order and
  // could round alike): say so rather than pass.
  if (same(tiled, wgmma)) GTEST_SKIP() << "Tiled and Wgmma gave bit-identical gradients: Auto's choice is not observable";
  EXPECT_TRUE(same(run(c, kBFloat16, FlexCudaBackward::Auto), wgmma)) << "Auto on Hopper: Wgmma";
  env.set("0");
  EXPECT_TRUE(same(run(c, kBFloat16, FlexCudaBackward::Auto), tiled)) << "Auto with FLEXGRAD_FLEX_WGMMA_BWD=0: Tiled";
  // Where the Wgmma kernels cannot run, Auto takes the mma.sync ones.
  env.set(nullptr);
  c.d.E = c.d.Ev = 32;
  EXPECT_TRUE(same(run(c, kBFloat16, FlexCudaBackward::Auto), run(c, kBFloat16, FlexCudaBackward::Tiled)));
}

}  // namespace
}  // namespace fg
