// The FlexAttention backward on CUDA: host side of kernels/flex_backward.cuh. Builds the kernel
// parameters from a FlexProblem, picks the kernel family and tiles, compiles the translation unit once
// per configuration (jit cache) and launches preprocess -> dK/dV -> dQ (-> captured-gradient finalize), or, where the
// warp-specialised dQ kernel computes the preprocess's delta itself (dq_delta below), dQ -> dK/dV.
//
// Kernel families: bf16/f16 with head dims that are multiples of 16 up to 128 run on tensor cores
// (mma.sync, fp32 accumulation); float32 (exact FFMA, no TF32), float64 and the remaining bf16/f16 head
// dims run the SIMT kernels. Deterministic by default: every dQ/dK/dV element has one writer and the
// captured-tensor gradients are summed in int64 fixed point (see the header of flex_backward.cuh for the
// precision); FlexProblem::deterministic == false sums those with float64 atomics instead.
// FLEXGRAD_FLEX_BWD_TILE="warps,q_chunk,kv_chunk" overrides the mma.sync tiles, FLEXGRAD_FLEX_WGMMA_BWD_WG="dkdv,dq"
// the wgmma kernels' warpgroups a CTA (benchmarking only).
// On Hopper, FlexCudaBackward::Wgmma runs the dK/dV and dQ kernels of kernels/flex_backward_wgmma.cuh (warpgroup
// MMA, sm_90a, bf16/f16, head dims 64 or 128) with the same preprocess / finalize kernels; Auto picks them wherever
// they run (FLEXGRAD_FLEX_WGMMA_BWD=0 keeps the mma.sync kernels). With two warpgroups a CTA the wgmma kernels run
// in their warp-specialised form (a TMA producer warpgroup; ws_choice below). There, where FlexProblem::deterministic
// is false, the dK/dV kernel also sums dQ with float atomics where that was measured faster (no dQ kernel;
// fused_dq_may_run and ws_choice below; FLEXGRAD_FLEX_WGMMA_BWD_FUSED_DQ=1 / 0 forces it on / off).
// The dQ kernel runs on a second stream beside the dK/dV kernel where both are warp-specialised (StreamFork below;
// FLEXGRAD_FLEX_BWD_CONCURRENT=1 / 0 forces / drops it).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <cuda_runtime.h>
#include <fmt/ranges.h>

#include "flexgrad/attention/cuda/flex_cuda_common.h"
#include "flexgrad/attention/cuda/jit.h"
#include "flexgrad/attention/cuda/tma_map.h"
#include "flexgrad/attention/flex_kernels.h"
#include "flexgrad/tensor/cuda/cuda_check.h"
#include "flexgrad/tensor/error.h"

namespace fg::cuda::flex {
namespace {

// Host mirrors of FgLists / FgBwdParams (flex_backward.cuh): 8-byte fields only, same order.
struct Lists {
  const void* num = nullptr;
  const void* idx = nullptr;
  const void* full_num = nullptr;
  const void* full_idx = nullptr;
  int64_t Bm = 1, Hm = 1, rows = 0, cols = 0, full_cols = 0;
};
struct BwdParams {
  const void *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr, *dout = nullptr, *lse = nullptr, *dlse = nullptr;
  void *delta = nullptr, *lse2 = nullptr, *dq = nullptr, *dk = nullptr, *dv = nullptr;
  int64_t qs_b = 0, qs_h = 0, qs_l = 0, ks_b = 0, ks_h = 0, ks_l = 0, vs_b = 0, vs_h = 0, vs_l = 0;
  int64_t B = 0, Hq = 0, Lq = 0, Bkv = 0, Hkv = 0, Lkv = 0, G = 1;
  int64_t block_q = 0, block_kv = 0;
  int64_t sub_q = 1, sub_kv = 1;
  double scale = 1;
  Lists kvl, ql;
  void* cap_acc[kMaxCaptures] = {};
  void* cap_max = nullptr;
  double cap_scale[kMaxCaptures] = {};
  int64_t cap_numel[kMaxCaptures] = {};
  void* dq_acc = nullptr;
  int64_t dkdv_group = 0;
  void* job_counters = nullptr;
  void* quad_live = nullptr;
};
static_assert(sizeof(Lists) == 72 && sizeof(BwdParams) % 8 == 0, "BwdParams must mirror FgBwdParams");

Lists lists_of(const BlockLists& l, Device dev) {
  Lists d;
  auto ptr = [&](const Tensor& t, const char* what) -> const void* {
    if (!t.defined()) return nullptr;
    FG_CHECK(t.device() == dev && t.dtype() == kInt32 && t.is_contiguous(), DeviceError,
             "flex_attention backward (CUDA): block list {} must be a contiguous int32 tensor on {}, got {} on {}", what,
             dev, t.dtype(), t.device());
    return t.data_ptr();
  };
  d.num = ptr(l.num, "num");
  d.idx = ptr(l.idx, "idx");
  d.full_num = ptr(l.full_num, "full_num");
  d.full_idx = ptr(l.full_idx, "full_idx");
  d.Bm = l.Bm;
  d.Hm = l.Hm;
  d.rows = l.rows;
  d.cols = l.idx.defined() ? l.idx.size(3) : 0;
  d.full_cols = l.full_idx.defined() ? l.full_idx.size(3) : 0;
  return d;
}

// Kernel family and tiles of one problem. dK/dV blocks own kv_tile rows and walk q in q_chunk steps;
// dQ blocks own q_tile rows and walk kv in kv_chunk steps (the SIMT kernels use bq = bkv for all four).
// With wgmma, the dK/dV CTA has wg_dkdv warpgroups (kv_tile = 64 each) and the dQ CTA wg_dq (q_tile = 64 each).
struct Config {
  bool mma = false;
  bool wgmma = false;  // fg_bwd_dkdv_wgmma / fg_bwd_dq_wgmma (then mma too)
  int threads = 256;   // both kernels but the wgmma ones
  int wg_dkdv = 1, wg_dq = 1;
  int kv_tile = 32, q_chunk = 32, q_tile = 32, kv_chunk = 32;
  size_t smem_dkdv = 0, smem_dq = 0;
};

// Shared memory of the wgmma kernels (kernels/flex_backward_wgmma.cuh): swizzled K, V tile and 2 Q, dO chunks
// (dK/dV; plus lse and delta), Q, dO tile and 2 K, V chunks (dQ); 1024 bytes for the kernel to align its window.
size_t wgmma_smem_dkdv(const FlexProblem& p, int wg) {
  return 2 * static_cast<size_t>(64 * wg + 2 * 64) * (p.E + p.Ev) + 4 * 64 * 4 + 1024;
}
size_t wgmma_smem_dq(const FlexProblem& p, int wg) { return 2 * static_cast<size_t>(64 * wg + 2 * 64) * (p.E + p.Ev) + 1024; }
// The warp-specialised kernels': a 128-row tile of one side and `stages` 64-row chunks of the other (dK/dV: K, V
// and Q, dO chunks with their lse and delta; dQ: Q, dO and K, V chunks).
size_t ws_smem(const FlexProblem& p, int stages, bool dkdv) {
  return 2 * static_cast<size_t>(128 + stages * 64) * (p.E + p.Ev) +
         (dkdv ? static_cast<size_t>(stages) * 2 * 64 * 4 : 0) + 1024;
}
// The fused dQ's dS^T tiles (kv_tile x 64, 16-bit) on top of the dK/dV kernel's shared memory: one in the plain
// kernel, three in the warp-specialised one (its dQ runs a chunk behind), 1024-byte aligned after lse2 / delta (up
// to 1023 bytes of padding); with the TMA adds (FG_DQ_TMA_ADD) two float32 staging tiles of 64 x 64 after them.
size_t fused_dq_smem(const Config& c, bool ws, bool tma_add) {
  const size_t tile = static_cast<size_t>(c.kv_tile) * 64 * 2;
  constexpr size_t kStageTile = 64 * 64 * 4;  // the kernel's FG_DQ_STAGE_BYTES, one a dK/dV warpgroup
  return ws ? 3 * tile + 1024 + (tma_add ? 2 * kStageTile : 0) : tile;
}

// Why the wgmma kernels cannot run this call ("" when they can): the forced kernel raises it, Auto skips them.
// `aligned`: every tensor the kernels read or write has 16-byte-aligned rows (cp.async and the packed stores).
std::string wgmma_unsupported(const FlexProblem& p, bool aligned, const std::string& arch, size_t smem_limit) {
  const DType dt = p.q.dtype();
  if (dt != kBFloat16 && dt != kFloat16)
    return fmt::format("the Wgmma backward kernels run bfloat16 and float16; got {}", dtype_name(dt));
  if (arch != "sm_90a")
    return fmt::format("the Wgmma backward kernels need a Hopper GPU (sm_90a); this device is {}", arch);
  // dK, dV and the four products' accumulators live in registers: at 256 the dK/dV kernel would need 320 a thread.
  if ((p.E != 64 && p.E != 128) || (p.Ev != 64 && p.Ev != 128))
    return fmt::format("the Wgmma backward kernels take head dims 64 or 128; got E={}, Ev={}", p.E, p.Ev);
  if (!aligned)
    return "the Wgmma backward kernels need 16-byte-aligned rows in q, k, v, out, dout and the gradients";
  // The mods' row / column parts take a few KiB of static shared memory on top.
  constexpr size_t kStaticReserve = 8192;
  const size_t need = std::max(wgmma_smem_dkdv(p, 2), wgmma_smem_dq(p, 2)) + kStaticReserve;
  if (need > smem_limit)
    return fmt::format("the Wgmma backward kernels need {} bytes of shared memory per block for E={}, Ev={}; this "
                       "device allows {}", need, p.E, p.Ev, smem_limit);
  return "";
}

// `out` and `dout` are the contiguous tensors the kernels read, `o` the outputs they write. `arch` and
// `smem_limit`: the device's (jit::target_arch, the opt-in shared memory per block).
Config choose_config(const FlexProblem& p, const Tensor& out, const Tensor& dout, const FlexBackwardOutputs& o,
                     const std::string& arch, size_t smem_limit) {
  const DType dt = p.q.dtype();
  Config c;
  bool aligned = true;
  for (const Tensor* t : {&p.q, &p.k, &p.v, &out, &dout, &o.dq, &o.dk, &o.dv}) aligned = aligned && rows_aligned16(*t);
  // The one place the CUDA backward kernels are chosen (FlexCudaBackward).
  const std::string why = wgmma_unsupported(p, aligned, arch, smem_limit);
  bool wgmma = p.cuda_backward == FlexCudaBackward::Wgmma;
  if (p.cuda_backward == FlexCudaBackward::Auto) {
    // Wherever they run: on the H200 (session 8) they were faster than the mma.sync kernels on every case
    // (bf16 B4 H16 S4096 D128: no mask 254 vs 173 TFLOP/s, causal 207 vs 149, document 109 vs 82, ALiBi 142 vs
    // 116, softcap 67 vs 60). FLEXGRAD_FLEX_WGMMA_BWD=0 keeps Auto on the mma.sync kernels (A/B).
    wgmma = env_switch("FLEXGRAD_FLEX_WGMMA_BWD").value_or(true) && why.empty();
  }
  if (wgmma) {
    FG_CHECK(why.empty(), NotImplementedError, "flex_attention backward (CUDA): {}", why);
    c.mma = c.wgmma = true;
    // Two warpgroups (128 rows) when the BlockMask's blocks hold more than 64 rows, else one (no idle rows).
    c.wg_dkdv = p.block_kv > 64 ? 2 : 1;
    c.wg_dq = p.block_q > 64 ? 2 : 1;
    // Tuning knob for benchmarks: FLEXGRAD_FLEX_WGMMA_BWD_WG="dkdv,dq" (1 or 2 warpgroups a CTA each). One
    // warpgroup a CTA leaves room for two CTAs an SM (registers and, at head dim 128, shared memory), whose
    // barriers do not hold each other back.
    if (const char* env = std::getenv("FLEXGRAD_FLEX_WGMMA_BWD_WG")) {
      int a = 0, b = 0;
      FG_CHECK(std::sscanf(env, "%d,%d", &a, &b) == 2 && (a == 1 || a == 2) && (b == 1 || b == 2), ValueError,
               "FLEXGRAD_FLEX_WGMMA_BWD_WG: expected \"dkdv,dq\" warpgroups, each 1 or 2, got '{}'", env);
      c.wg_dkdv = a;
      c.wg_dq = b;
    }
    c.threads = 128 * std::max(c.wg_dkdv, c.wg_dq);
    c.kv_tile = 64 * c.wg_dkdv;
    c.q_tile = 64 * c.wg_dq;
    c.q_chunk = c.kv_chunk = 64;
    c.smem_dkdv = wgmma_smem_dkdv(p, c.wg_dkdv);
    c.smem_dq = wgmma_smem_dq(p, c.wg_dq);
    return c;
  }
  // Other bf16/f16 layouts (head dims over 128 or not multiples of 16, rows off 16-byte alignment) run
  // the SIMT kernels, which read any layout element by element.
  if ((dt == kBFloat16 || dt == kFloat16) && p.E % 16 == 0 && p.Ev % 16 == 0 && p.E <= 128 && p.Ev <= 128 && aligned) {
    // 4 warps of 16 rows each own 64 kv rows (dK/dV) or 64 q rows (dQ); the other side in steps of 64.
    // (8 warps of 128 rows measured the same without mods and 3-8% slower with them.)
    c.mma = true;
    c.threads = 128;
    c.kv_tile = c.q_tile = 64;
    c.q_chunk = c.kv_chunk = 64;
    // Tuning knob for benchmarks: FLEXGRAD_FLEX_BWD_TILE="warps,q_chunk,kv_chunk" (warps 4 or 8: blocks
    // of 16 * warps rows; chunks 16, 32 or 64).
    if (const char* env = std::getenv("FLEXGRAD_FLEX_BWD_TILE")) {
      int w = 0, qc = 0, kc = 0;
      FG_CHECK(std::sscanf(env, "%d,%d,%d", &w, &qc, &kc) == 3 && (w == 4 || w == 8) && (qc == 16 || qc == 32 || qc == 64) &&
                   (kc == 16 || kc == 32 || kc == 64),
               ValueError, "FLEXGRAD_FLEX_BWD_TILE: expected \"warps,q_chunk,kv_chunk\" with warps 4 or 8 and chunks 16, 32 or 64, got '{}'",
               env);
      c.threads = 32 * w;
      c.kv_tile = c.q_tile = 16 * w;
      c.q_chunk = qc;
      c.kv_chunk = kc;
    }
    const size_t re = p.E + 8, rv = p.Ev + 8;  // padded shared rows (flex_mma.cuh, FG_SMEM_PAD_B16)
    c.smem_dkdv = 2 * (c.kv_tile * (re + rv) + 2 * c.q_chunk * (re + rv)) + 4 * 4 * c.q_chunk;
    c.smem_dq = 2 * (c.q_tile * (re + rv) + 2 * c.kv_chunk * (re + rv));
    return c;
  }
  // SIMT: K, V, Q, dO tiles (+1 padding per row), P and dS tiles, lse and delta; the largest square tile
  // (32 or 16) whose shared memory fits comfortably under the 227 KiB a block may have.
  const size_t es = dt == kFloat64 ? 8 : 4;
  for (int t : {32, 16}) {
    c.kv_tile = c.q_chunk = c.q_tile = c.kv_chunk = t;
    c.smem_dkdv = c.smem_dq = es * (static_cast<size_t>(t) * (p.E + 1) * 2 + static_cast<size_t>(t) * (p.Ev + 1) * 2 +
                                    2 * static_cast<size_t>(t) * (t + 1) + 2 * t);
    if (c.smem_dkdv <= 160 * 1024) break;
  }
  return c;
}

// Whether the wgmma dK/dV kernel may also sum dQ (FG_DQ_ATOMIC of kernels/flex_backward_wgmma.cuh): float atomics
// into a float32 buffer, in any order, so only where the call is not deterministic; it saves the dQ kernel's two
// recomputed score products. Where it may run: two dK/dV warpgroups, head dim 128, no captured-tensor gradients and
// a constant d score_mod / d score (a varying one, softcap's, costs the fused kernel spills), bfloat16 (float16 keeps
// the dQ kernel until its test has run on a GPU). Whether it does is ws_choice's (below): the automatic rule, or
// FLEXGRAD_FLEX_WGMMA_BWD_FUSED_DQ=1 / 0. Its history (H100, bf16 B4 H16 S4096 D128 backward ms; the figures in
// docs/flex_cuda_notes.md): 10-19% faster than the dQ kernel of its day (H200, session 16), then left behind by the
// warp-specialised pair that deterministic calls run; in the warp-specialised dK/dV kernel since session 34, a
// chunk behind since session 35, still 4-15% slower than that pair with red.global adds (no mask 3.34 against
// 2.90-3.23); with its adds through the TMA unit (session 36's FG_DQ_TMA_ADD) 4-12% less time than the pair on
// the long-row cases (sessions 38-39, up to seven rounds: causal, ALiBi + causal, causal S 16k; no mask from 10%
// less to 3% more, 4.5% less on average) and level with it on the short-row ones (document, sliding window: -2% to
// +3.5%).
// (An ordered, deterministic form of the same sum measured slower than the dQ kernel on every case:
// docs/flex_cuda_notes.md, session 16.)
bool fused_dq_may_run(const FlexProblem& p, const Config& c, int cap_mode) {
  const bool dconst = p.score_grad == nullptr || p.score_grad->dscore_is_constant;
  return c.wgmma && p.q.dtype() == kBFloat16 && c.wg_dkdv == 2 && p.E == 128 && cap_mode == 0 && dconst &&
         !p.deterministic;
}

// The warp-specialised kernels (fg_bwd_dkdv_wgmma_ws / fg_bwd_dq_wgmma_ws of kernels/flex_backward_wgmma.cuh: a
// producer warpgroup loads the other side's chunks with TMA into `stages` stages on mbarriers; the same
// arithmetic as fg_bwd_dkdv_wgmma / fg_bwd_dq_wgmma, so the same results). Each where its CTA has two warpgroups,
// the dQ kernel runs (not with the fused dQ) and the stages fit the device's shared memory.
// The dK/dV one stays plain with captured-tensor gradients summed by float64 atomics (cap_mode 2) at head dim 128,
// where its consumers, held to 232 registers by setmaxnreg, spilled 164 bytes until session 22 (ptxas; ModCodegen's
// BackwardWarpSpecialisedCompilesWithCapturedGradients; none since the merged element step is selected where
// pure, but the warp-specialised kernel has not run on a GPU in that mode: the rule stands until it has).
// FLEXGRAD_FLEX_WGMMA_BWD_WS=0 keeps the plain kernels (A/B), FLEXGRAD_FLEX_WGMMA_BWD_WS_DQ=0 the plain dQ kernel;
// FLEXGRAD_FLEX_WGMMA_BWD_STAGES=2..4 sets the stages (benchmarking).
// Persistent launch (FG_BWD_PERSISTENT: one CTA an SM, each running the grid's CTAs it takes from a queue, so that
// one's stores overlap the next one's loads): chosen where the mask's rows are short (persistent_pays, at the file's
// end);
// FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT=0 / 1 forces the grid / the persistent launch, =N (N >= 2) caps the grid at N
// CTAs (tests: many grid CTAs a CTA on small problems).
struct WsChoice {
  int stages = 0;  // 0: neither kernel is warp-specialised
  bool dkdv = false, dq = false;
  bool dq_fused = false;    // the dK/dV kernel sums dQ (FG_DQ_ATOMIC; no dQ kernel)
  bool dq_tma_add = false;  // the fused dQ's adds through the TMA unit (FG_DQ_TMA_ADD; with dkdv only)
  int64_t persistent = 0;  // 0: the grid; 1: one CTA an SM; N >= 2: at most N CTAs
};
// The kernels' layout for a given fused-dQ choice (ws_choice below decides that choice).
WsChoice ws_layout(const FlexProblem& p, const Config& c, bool dq_fused, bool tma_add, int cap_mode,
                   size_t smem_limit) {
  WsChoice w;
  w.dq_fused = dq_fused;
  // (A tensor map has no empty dims: an empty call keeps the plain kernels, whose grids or walks are empty.)
  const bool empty = p.B * p.Hq * p.Lq * p.Bkv * p.Hkv * p.Lkv == 0;
  if (!c.wgmma || empty || (c.wg_dkdv != 2 && c.wg_dq != 2) ||
      !env_switch("FLEXGRAD_FLEX_WGMMA_BWD_WS").value_or(true))
    return w;
  // The fused dQ's adds as TMA reduces of float32 staging tiles (FG_DQ_TMA_ADD, kernels/flex_backward_wgmma.cuh), in
  // place of red.global from registers. The two staging tiles (32 KiB) leave room for two stages only. It is the
  // warp-specialised dK/dV kernel's: where that one does not run (FLEXGRAD_FLEX_WGMMA_BWD_WS=0,
  // FLEXGRAD_FLEX_WGMMA_BWD_STAGES=3 or 4, one dK/dV warpgroup) a fused dQ adds with red.global;
  // dq_tma_add_backward_calls() counts the calls that took the TMA adds.
  tma_add = tma_add && dq_fused;
  w.stages = tma_add ? 2 : 3;
  if (const char* env = std::getenv("FLEXGRAD_FLEX_WGMMA_BWD_STAGES")) {
    FG_CHECK((env[0] == '2' || env[0] == '3' || env[0] == '4') && env[1] == '\0', ValueError,
             "FLEXGRAD_FLEX_WGMMA_BWD_STAGES: expected 2, 3 or 4; got \"{}\"", env);
    w.stages = env[0] - '0';
  }
  // The mods' row / column parts and the barriers take a few KiB of static shared memory on top.
  constexpr size_t kStaticReserve = 8192;
  const size_t need = ws_smem(p, w.stages, true) + kStaticReserve;
  const bool fits = need <= smem_limit;
  w.dkdv = c.wg_dkdv == 2 && !(cap_mode == 2 && p.E == 128) &&
           need + (dq_fused ? fused_dq_smem(c, true, tma_add) : 0) <= smem_limit;
  w.dq_tma_add = w.dkdv && tma_add;
  w.dq = fits && !dq_fused && c.wg_dq == 2 && env_switch("FLEXGRAD_FLEX_WGMMA_BWD_WS_DQ").value_or(true);
  if (!w.dkdv && !w.dq) w.stages = 0;
  if (w.stages > 0) {
    const std::optional<int64_t> env = env_persistent("FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT");
    w.persistent = env ? *env : persistent_pays(p) ? 1 : 0;
  }
  return w;
}

// Where the fused dQ may run (fused_dq_may_run): FLEXGRAD_FLEX_WGMMA_BWD_FUSED_DQ=1 / 0 forces it on / off (its adds
// through the TMA unit unless FLEXGRAD_FLEX_BWD_DQ_TMA_ADD=0 keeps red.global, A/B); unset, a call that is not
// deterministic takes it where its adds go through the TMA unit and the dK/dV kernel launches as a grid (the
// long-row cases, where it measured faster than the deterministic pair; level on the short rows the persistent
// launch takes, so those keep the pair), and runs the deterministic pair elsewhere.
WsChoice ws_choice(const FlexProblem& p, const Config& c, int cap_mode, size_t smem_limit) {
  const std::optional<bool> forced = env_switch("FLEXGRAD_FLEX_WGMMA_BWD_FUSED_DQ");
  const bool tma_add = env_switch("FLEXGRAD_FLEX_BWD_DQ_TMA_ADD").value_or(true);
  if (fused_dq_may_run(p, c, cap_mode) && forced.value_or(true)) {
    WsChoice w = ws_layout(p, c, true, tma_add, cap_mode, smem_limit);
    if (forced.has_value() || (w.dq_tma_add && w.persistent == 0)) return w;  // (forced here means forced on)
  }
  return ws_layout(p, c, false, false, cap_mode, smem_limit);
}

// "NAME VALUE" (assemble() writes the #define).
std::string define(const char* name, int64_t v) { return fmt::format("{} {}", name, v); }

// The second stream the dQ kernel runs on beside the dK/dV kernel (FLEXGRAD_FLEX_BWD_CONCURRENT) and the two events
// that fork it from and join it to the call's stream: one set for each (device, stream of the call), created once and
// kept for the process, so that calls on other streams (another thread's, or one being captured into a CUDA graph)
// never share them, and a backward call creates no event (session 32 measured ~10 us more host time a call while
// each call created and destroyed its two). Reusing an event is safe: cudaStreamWaitEvent waits for the event's most
// recent record, made by this call on the same stream, or by a later call there, whose record covers this one's work.
struct SideStream {
  cudaStream_t stream = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;
};
const SideStream& concurrent_side(int device, cudaStream_t main) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, SideStream> sides;
  std::lock_guard lock(mu);
  SideStream& s = sides[{device, main}];
  if (s.join == nullptr) {  // the last one made: a failure part way leaves the entry to be finished next call
    if (s.stream == nullptr) s.stream = static_cast<cudaStream_t>(create_stream(device));
    if (s.fork == nullptr) FG_CUDA_CHECK(cudaEventCreateWithFlags(&s.fork, cudaEventDisableTiming));
    FG_CUDA_CHECK(cudaEventCreateWithFlags(&s.join, cudaEventDisableTiming));
  }
  return s;
}

std::atomic<int64_t> g_concurrent_dq_calls{0};
std::atomic<int64_t> g_dq_delta_calls{0};
std::atomic<int64_t> g_persistent_calls{0};
std::atomic<int64_t> g_finite_dscore_calls{0};
std::atomic<int64_t> g_lean_step_calls{0};
std::atomic<int64_t> g_skip_empty_calls{0};
std::atomic<int64_t> g_pingpong_calls{0};
std::atomic<int64_t> g_tile_prefetch_calls{0};
std::atomic<int64_t> g_fused_dq_calls{0};
std::atomic<int64_t> g_fused_dq_ws_calls{0};
std::atomic<int64_t> g_dq_tma_add_calls{0};
// The bytes of FG_BWD_SKIP_EMPTY's table: one a 64 x 64 quadrant of the call's [B, Hq] rows and columns.
int64_t quad_table_bytes(const FlexProblem& p) { return p.B * p.Hq * ((p.Lq + 63) / 64) * ((p.Lkv + 63) / 64); }

// A fork of the call's stream: work put on `side` after construction follows what the call's stream had queued,
// and from destruction on (exceptions included) the call's stream waits for `side`'s work: the caller's reads of
// the outputs and the caching allocator's reuse of the call's temporaries both come after it.
class StreamFork {
 public:
  StreamFork(int device, cudaStream_t main) : main_(main), side_(concurrent_side(device, main)) {
    FG_CUDA_CHECK(cudaEventRecord(side_.fork, main_));
    FG_CUDA_CHECK(cudaStreamWaitEvent(side_.stream, side_.fork, 0));
  }
  ~StreamFork() {
    cudaEventRecord(side_.join, side_.stream);
    cudaStreamWaitEvent(main_, side_.join, 0);
  }
  StreamFork(const StreamFork&) = delete;
  StreamFork& operator=(const StreamFork&) = delete;
  cudaStream_t side() const { return side_.stream; }

 private:
  cudaStream_t main_;
  const SideStream& side_;
};

void flex_backward_cuda(const FlexProblem& p, const Tensor& out, const Tensor& lse, const Tensor& dout_in,
                        const Tensor& dlse_in, const std::vector<bool>& needs_cap, FlexBackwardOutputs& o) {
  const Device dev = p.q.device();
  const DType dt = p.q.dtype();
  FG_CHECK(dt == kFloat16 || dt == kBFloat16 || dt == kFloat32 || dt == kFloat64, DTypeError,
           "flex_attention backward (CUDA): q/k/v must be float16, bfloat16, float32 or float64, got {}", dt);
  FG_CHECK(p.k.dtype() == dt && p.v.dtype() == dt, DTypeError,
           "flex_attention backward (CUDA): q, k, v must share a dtype, got {}, {}, {}", dt, p.k.dtype(), p.v.dtype());
  FG_CHECK(p.E >= 1 && p.E <= 256 && p.Ev >= 1 && p.Ev <= 256, NotImplementedError,
           "flex_attention backward (CUDA): head dims up to 256 are supported, got E={} and Ev={}", p.E, p.Ev);
  const DType stat_dt = dt == kFloat64 ? kFloat64 : kFloat32;
  auto check_on = [&](const Tensor& t, const char* name, DType want) {
    FG_CHECK(t.device() == dev, DeviceError, "flex_attention backward (CUDA): {} must be on {}, got {}", name, dev,
             t.device());
    FG_CHECK(t.dtype() == want, DTypeError, "flex_attention backward (CUDA): {} must be {}, got {}", name, want,
             t.dtype());
  };
  for (const Tensor* t : {&p.q, &p.k, &p.v}) {
    check_on(*t, "q/k/v", dt);
    FG_CHECK(t->stride(3) == 1, ValueError,
             "flex_attention backward (CUDA): q/k/v need a contiguous last dim, got strides {}", shape_str(t->strides()));
  }
  const Shape out_shape{p.B, p.Hq, p.Lq, p.Ev};
  check_on(out, "out", dt);
  check_on(dout_in, "dout", dt);
  check_on(lse, "lse", stat_dt);
  FG_CHECK(out.sizes() == out_shape && dout_in.sizes() == out_shape, ShapeError,
           "flex_attention backward (CUDA): out and dout must be {}, got {} and {}", shape_str(out_shape),
           shape_str(out.sizes()), shape_str(dout_in.sizes()));
  // lse and its gradient are read as [B, Hq, Lq] rows by the preprocess: a wrong shape would be read out of bounds.
  const Shape lse_shape{p.B, p.Hq, p.Lq};
  FG_CHECK(lse.sizes() == lse_shape, ShapeError, "flex_attention backward (CUDA): lse must be {}, got {}",
           shape_str(lse_shape), shape_str(lse.sizes()));
  const Tensor outc = out.contiguous(), dout = dout_in.contiguous(), lsec = lse.contiguous();
  Tensor dlse;
  if (dlse_in.defined()) {
    check_on(dlse_in, "dlse", stat_dt);
    FG_CHECK(dlse_in.sizes() == lse_shape, ShapeError, "flex_attention backward (CUDA): dlse must be {}, got {}",
             shape_str(lse_shape), shape_str(dlse_in.sizes()));
    dlse = dlse_in.contiguous();
  }
  auto out_like = [&](Tensor& t, const Tensor& like, const char* name) {
    if (!t.defined()) t = empty(like.sizes(), TensorOptions().dtype(dt).device(dev));
    FG_CHECK(t.device() == dev && t.dtype() == dt && t.is_contiguous() && t.sizes() == like.sizes(), ValueError,
             "flex_attention backward (CUDA): {} must be a contiguous {} tensor of shape {} on {}", name, dt,
             shape_str(like.sizes()), dev);
  };
  out_like(o.dq, p.q, "dq");
  out_like(o.dk, p.k, "dk");
  out_like(o.dv, p.v, "dv");

  // ---- captured-tensor gradients
  const size_t ncaps = p.score_grad ? p.score_grad->captures.size() : 0;
  std::vector<bool> want(ncaps, false);
  bool any_cap = false;
  for (size_t c = 0; c < ncaps; ++c) any_cap |= want[c] = c < needs_cap.size() && needs_cap[c];
  const int cap_mode = !any_cap ? 0 : (p.deterministic ? 1 : 2);

  ModContext ctx = make_mod_context(p, true, want);
  const int device = dev.index;
  DeviceGuard guard(device);
  int smem_optin = 0;
  FG_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const Config cfg = choose_config(p, outc, dout, o, jit::target_arch(device), static_cast<size_t>(smem_optin));
  const WsChoice ws = ws_choice(p, cfg, cap_mode, static_cast<size_t>(smem_optin));
  const bool dq_fused = ws.dq_fused;
  const size_t smem_dkdv =
      (ws.dkdv ? ws_smem(p, ws.stages, true) : cfg.smem_dkdv) +
      (dq_fused ? fused_dq_smem(cfg, ws.dkdv, ws.dq_tma_add) : 0);
  const size_t smem_dq = ws.dq ? ws_smem(p, ws.stages, false) : cfg.smem_dq;
  std::vector<std::string> defines{
      define("FG_IN_DTYPE", abi_dtype(dt)), define("FG_E", p.E),         define("FG_EV", p.Ev),
      define("FG_NT", cfg.threads),         define("FG_USE_MMA", cfg.mma ? 1 : 0), define("FG_CAP_MODE", cap_mode),
      define("FG_BQ", cfg.q_tile),          define("FG_BKV", cfg.kv_tile),
      define("FG_Q_TILE", cfg.q_tile),      define("FG_KV_TILE", cfg.kv_tile),
      define("FG_Q_CHUNK", cfg.q_chunk),    define("FG_KV_CHUNK", cfg.kv_chunk)};
  // The preprocess's 16-byte loads (fg_bwd_preprocess): 16-bit rows of Ev elements, 16-byte aligned.
  const bool pre_vec = (dt == kBFloat16 || dt == kFloat16) && vec_ok(outc, p.Ev) && vec_ok(dout, p.Ev);
  const int64_t pre_rows = !pre_vec ? 1 : p.Ev / 8 < 32 && 32 % (p.Ev / 8) == 0 ? 32 / (p.Ev / 8) : 1;
  if (pre_vec) defines.emplace_back("FG_PRE_VEC 1");
  const int64_t nKB = (p.Lkv + p.block_kv - 1) / p.block_kv, nQB = (p.Lq + p.block_q - 1) / p.block_q;
  const bool dq_kernel_runs = !dq_fused && nQB > 0 && p.B * p.Hq > 0;
  // The dQ kernel on a second stream beside the dK/dV kernel (StreamFork below; both read the same inputs, the
  // preprocess's included, and write different outputs), so that one's ramp and tail overlap the other's work, as
  // PyTorch's Triton backward runs its dK/dV and dQ programs in one grid. The default where both kernels are
  // warp-specialised: against the fold below (dQ, then dK/dV), the preprocess's own pass included, on an H100
  // (session 32, two calls of five and four alternating rounds, medians of the backward): causal 3.1% / 5.0%
  // faster, softcap 2.3% / 1.6% (with approx_math 1.9%), ALiBi 2.8% / 0.6%, no mask 2.2% / 0.0%, sliding window
  // 1.7% / 0.7%, document 1.4% / 0.2%, causal at head dim 64 and at 16k within +-0.6%. Elsewhere opt-in (within the
  // noise on the H200, session 21, before the warp-specialised kernels). Not where dQ waits for the
  // captured-gradient scales the dK/dV pass finds (deterministic captured gradients) or where the dK/dV kernel sums
  // dQ itself. The same kernels, so the same results. FLEXGRAD_FLEX_BWD_CONCURRENT=1 / 0 forces / drops it.
  const bool concurrent = dq_kernel_runs && cap_mode != 1 &&
                          env_switch("FLEXGRAD_FLEX_BWD_CONCURRENT").value_or(ws.dq && ws.dkdv);
  // The warp-specialised dQ kernel computes the rows' delta and lse2 itself (FG_BWD_DQ_DELTA, bit for bit the
  // preprocess's sums) and runs first; the dK/dV kernel reads what it wrote: no preprocess kernel, whose pass over O
  // and dO was ~5% of a document mask's backward (51 us of ~1.07 ms on the H200, session 11), nor its launch. Not
  // where dQ waits for the dK/dV pass (deterministic captured gradients) or runs beside it (concurrent: so only
  // with FLEXGRAD_FLEX_BWD_CONCURRENT=0 where both kernels are warp-specialised, since session 32).
  // FLEXGRAD_FLEX_BWD_DQ_DELTA=0 keeps the preprocess (A/B).
  const bool dq_delta = ws.dq && pre_vec && dq_kernel_runs && cap_mode != 1 && !concurrent &&
                        env_switch("FLEXGRAD_FLEX_BWD_DQ_DELTA").value_or(true);
  // The tensor-core kernels' element steps with four cuts found in their SASS (FG_BWD_LEAN_STEP, flex_backward.cuh;
  // session 27): 5-34% off the backward of every case of issue 13's table on an H100 (two calls, alternating rounds).
  // FLEXGRAD_FLEX_BWD_LEAN_STEP=0 keeps the previous steps (A/B). Instructions a thread a chunk in the
  // warp-specialised kernels (bf16, D 128, sm_90a, nvcc 13.0; docs/flex_cuda_notes.md, session 27), the dK/dV step:
  // no mask 369 -> 209, causal 468 -> 209 in a full block (372 on the diagonal), the document mask 541 -> 226 (427);
  // the dQ step: 274 -> 149, 435 -> 149 (377), 590 -> 149 (413). The same values up to one rounding of P's exponent.
  // Under approx_math a score_mod of the form c * f(k score) (softcap) has its factors folded into the scale and P's
  // exponent by the tensor-core kernels' merged element step (FG_BWD_SCORE_AFFINE, flex_backward.cuh), where no
  // capture takes a gradient (the code generator gives the form only then); FLEXGRAD_FLEX_AFFINE_FOLD=0 keeps the
  // whole program an entry (A/B).
  const bool folded = affine_fold(ctx, cfg.mma, defines);
  const bool lean_step = cfg.mma && env_switch("FLEXGRAD_FLEX_BWD_LEAN_STEP").value_or(true);
  if (lean_step) {
    defines.emplace_back("FG_BWD_LEAN_STEP 1");
    ++g_lean_step_calls;
  }
  // A varying d score_mod / d score that is finite wherever the score is not NaN (softcap's 1 - tanh^2; the code
  // generator proves it, float_ranges.h) multiplies dS without the test for zero that keeps 0 * inf out of dS
  // (FG_BWD_DSCORE_FINITE, flex_backward.cuh): one comparison an entry fewer, the same values up to the sign of a
  // zero. In the lean step's interior copies only (the tensor-core kernels'), and not with captured-tensor gradients
  // (their sinks take dS before that product). FLEXGRAD_FLEX_BWD_FINITE_DSCORE=0 keeps the test (A/B).
  const bool finite_dscore_allowed = env_switch("FLEXGRAD_FLEX_BWD_FINITE_DSCORE").value_or(true);
  if (lean_step && cap_mode == 0 && (folded ? ctx.facts.core_dscore_finite : ctx.facts.dscore_finite)) {
    if (finite_dscore_allowed)
      ++g_finite_dscore_calls;
    else
      defines.emplace_back("FG_NO_FINITE_DSCORE 1");
  }
  bool skip_empty = false;
  if (cfg.wgmma) {
    for (const char* d : {"FG_BWD_WGMMA 1", "FG_VEC 1"}) defines.emplace_back(d);
    defines.push_back(define("FG_WG_DKDV", cfg.wg_dkdv));
    defines.push_back(define("FG_WG_DQ", cfg.wg_dq));
    defines.push_back(define("FG_DQ_ATOMIC", dq_fused ? 1 : 0));
    defines.push_back(define("FG_BWD_WS_DKDV", ws.dkdv ? 1 : 0));
    defines.push_back(define("FG_BWD_WS_DQ", ws.dq ? 1 : 0));
    if (ws.dq_tma_add) {
      defines.emplace_back("FG_DQ_TMA_ADD 1");
      ++g_dq_tma_add_calls;
    }
    if (ws.stages > 0) defines.push_back(define("FG_BWD_STAGES", ws.stages));
    if (ws.persistent > 0) defines.emplace_back("FG_BWD_PERSISTENT 1");
    if (dq_delta) defines.emplace_back("FG_BWD_DQ_DELTA 1");
    // Opt-in, FLEXGRAD_FLEX_BWD_SKIP_EMPTY=1: the warp-specialised producers skip the chunks a pure mask_mod keeps
    // nothing of, and the dQ consumers their empty quadrants (FG_BWD_SKIP_EMPTY, flex_backward_wgmma.cuh; the same
    // bits where every input is finite), reading a table of the partial blocks' 64 x 64 quadrants that
    // fg_bwd_quad_live fills before the backward's kernels (BlockMask blocks of multiples of 64 both ways, a table
    // of a byte a quadrant of [B, Hq] of at most 64 MiB). Measured slower on an H100 (FLEXGRAD_FLEX_CUDNN=0
    // bench_flex_cuda, backward ms, on / off, alternating rounds): session 29, document 0.775 0.779 / 0.726 0.736,
    // sliding 1024 1.114 1.108 / 1.019 1.026, causal 1.902 1.890 / 1.784 1.802, with the grid launch document 0.731;
    // session 28's form, whose producers evaluated the mask and voted before each chunk's copies, was slower still
    // (document 1.052 1.015 / 0.707 0.719). The dK/dV consumers' own quadrant skip (FG_BWD_SKIP_DKDV_WG, opt-in
    // FLEXGRAD_FLEX_BWD_SKIP_DKDV_WG=1, which spills there): document 0.806, sliding 1.173, causal 2.019.
    if ((ws.dkdv || ws.dq) && p.mask_mod && ctx.facts.mask_elem_pure && p.block_q % 64 == 0 && p.block_kv % 64 == 0 &&
        quad_table_bytes(p) <= (int64_t{64} << 20) && env_switch("FLEXGRAD_FLEX_BWD_SKIP_EMPTY").value_or(false)) {
      skip_empty = true;
      defines.emplace_back("FG_BWD_SKIP_EMPTY 1");
      ++g_skip_empty_calls;
      if (!dq_fused && env_switch("FLEXGRAD_FLEX_BWD_SKIP_DKDV_WG").value_or(false))
        defines.emplace_back("FG_BWD_SKIP_DKDV_WG 1");
    }
    // The warp-specialised kernels' two consumer warpgroups take turns issuing their products (FG_BWD_PINGPONG,
    // flex_backward_wgmma.cuh; the same bits), so that one's element step runs while the other's products hold the
    // tensor cores. Measured on an H100 (session 31, FLEXGRAD_FLEX_CUDNN=0 bench_flex_cuda --reps 10 --warmup 2,
    // backward ms, turns / none, rounds of calls 2 and 3 of docs/flex_cuda_notes.md's session 31): softcap + causal
    // under approx_math 1.948 2.027 1.918 2.024 2.025 / 2.091 2.102 2.165 2.160 2.128 (-7%), causal 1.707 1.708 1.707
    // / 1.759 1.768 1.766 (-3%), sliding 1024 1.024 1.019 / 1.035 1.046, no mask 3.005 3.020 / 3.009 3.007, document
    // 0.742 0.743 / 0.738 0.755, ALiBi + causal 1.931 1.979 1.903 / 1.926 1.941 2.022, causal S 16k 5.725 6.271 /
    // 6.214 6.372; but causal at head dim 64 2.282 2.441 2.443 2.354 2.339 / 2.241 2.269 2.319 2.322 2.299 (+4%:
    // half the products' length against the same element step; turns at the score products alone were even there).
    // So by default where both head dims are 128. FLEXGRAD_FLEX_BWD_PINGPONG=1 / 0 forces the turns (wherever the
    // warp-specialised kernels run) / drops them; never with the opt-in skip (its warpgroups' walks differ).
    const bool pingpong = env_switch("FLEXGRAD_FLEX_BWD_PINGPONG").value_or(p.E == 128 && p.Ev == 128);
    if ((ws.dkdv || ws.dq) && !skip_empty && pingpong) {
      defines.emplace_back("FG_BWD_PINGPONG 1");
      ++g_pingpong_calls;
    }
    // A persistent warp-specialised kernel's next grid CTA started before the current one ends (FG_BWD_TILE_PREFETCH,
    // flex_backward_wgmma.cuh; the same bits): the default; FLEXGRAD_FLEX_BWD_TILE_PREFETCH=0 keeps the previous
    // order (A/B). On an H100 (session 33, FLEXGRAD_FLEX_CUDNN=0 bench_flex_cuda --reps 20 --warmup 3, backward ms,
    // three alternating rounds, new / previous): document 0.665 0.711 0.732 / 0.715 0.758 0.762 (-4 to -7%), sliding
    // 1024 0.947 1.019 0.982 / 0.977 1.016 1.018 (0 to -3.5%). Forced onto causal (16.5 blocks a row) the persistent
    // launch still did not beat the grid (1.692 1.778 1.799 against 1.654 1.763 1.792), so persistent_pays stands.
    if ((ws.dkdv || ws.dq) && ws.persistent > 0 && !dq_fused) {  // (the fused dQ's products read K to the end)
      const bool prefetch = env_switch("FLEXGRAD_FLEX_BWD_TILE_PREFETCH").value_or(true);
      defines.push_back(define("FG_BWD_TILE_PREFETCH", prefetch ? 1 : 0));
      if (prefetch) ++g_tile_prefetch_calls;
    }
  }
  const char* dkdv_kernel = ws.dkdv ? "fg_bwd_dkdv_wgmma_ws" : cfg.wgmma ? "fg_bwd_dkdv_wgmma" : "fg_bwd_dkdv";
  const char* dq_kernel = dq_fused ? "fg_bwd_dq_finalize"
                          : ws.dq  ? "fg_bwd_dq_wgmma_ws"
                          : cfg.wgmma ? "fg_bwd_dq_wgmma"
                                      : "fg_bwd_dq";
  jit::JitSource src;
  src.name = "flex_backward";
  // flex_mma.cuh (the shared device helpers) goes between the defines and the backward template (the wgmma one
  // includes flex_backward.cuh).
  src.code = assemble(ctx, defines, {"flex_mma.cuh", cfg.wgmma ? "flex_backward_wgmma.cuh" : "flex_backward.cuh"});
  src.kernels = {"fg_bwd_preprocess", dkdv_kernel, dq_kernel, "fg_bwd_cap_finalize"};
  if (skip_empty) src.kernels.emplace_back("fg_bwd_quad_live");
  auto mod = jit::get_module(src, device);

  BwdParams bp;
  bp.q = p.q.data_ptr();
  bp.k = p.k.data_ptr();
  bp.v = p.v.data_ptr();
  bp.out = outc.data_ptr();
  bp.dout = dout.data_ptr();
  bp.lse = lsec.data_ptr();
  bp.dlse = dlse.defined() ? dlse.data_ptr() : nullptr;
  Tensor delta = empty({p.B, p.Hq, p.Lq}, TensorOptions().dtype(stat_dt).device(dev));
  bp.delta = delta.data_ptr();
  Tensor lse2 = empty({p.B, p.Hq, p.Lq}, TensorOptions().dtype(stat_dt).device(dev));
  bp.lse2 = lse2.data_ptr();
  bp.dq = o.dq.data_ptr();
  bp.dk = o.dk.data_ptr();
  bp.dv = o.dv.data_ptr();
  bp.qs_b = p.q.stride(0), bp.qs_h = p.q.stride(1), bp.qs_l = p.q.stride(2);
  bp.ks_b = p.k.stride(0), bp.ks_h = p.k.stride(1), bp.ks_l = p.k.stride(2);
  bp.vs_b = p.v.stride(0), bp.vs_h = p.v.stride(1), bp.vs_l = p.v.stride(2);
  bp.B = p.B, bp.Hq = p.Hq, bp.Lq = p.Lq, bp.Bkv = p.Bkv, bp.Hkv = p.Hkv, bp.Lkv = p.Lkv, bp.G = p.group();
  bp.block_q = p.block_q, bp.block_kv = p.block_kv;
  bp.sub_q = (p.block_q + cfg.q_tile - 1) / cfg.q_tile;
  bp.sub_kv = (p.block_kv + cfg.kv_tile - 1) / cfg.kv_tile;
  bp.scale = p.scale;
  bp.kvl = lists_of(p.kv_lists, dev);
  bp.ql = lists_of(p.q_lists, dev);
  // The wgmma dK/dV grid's order (FgBwdParams::dkdv_group): with the fused dQ, groups of 16 (kv batch, kv head)
  // pairs, pairs fastest, so that the atomics of CTAs running together rarely meet on one dQ row (H200, against
  // the 3-D grid: causal 2.68 against 2.87 ms, ALiBi 3.40 against 3.66, others within 2%);
  // FLEXGRAD_FLEX_WGMMA_BWD_GROUP=n sets the group (0: the 3-D grid, tiles fastest).
  if (cfg.wgmma) {
    bp.dkdv_group = dq_fused ? 16 : 0;
    if (const char* env = std::getenv("FLEXGRAD_FLEX_WGMMA_BWD_GROUP")) {
      char* end = nullptr;
      const long n = std::strtol(env, &end, 10);
      FG_CHECK(end != env && *end == '\0' && n >= 0 && n <= (1 << 20), ValueError,
               "FLEXGRAD_FLEX_WGMMA_BWD_GROUP: expected a count of (batch, head) pairs >= 0; got \"{}\"", env);
      bp.dkdv_group = n;
    }
  }
  // A persistent launch's queues (FgJobQueue): the dK/dV and dQ kernels' counters, zeroed.
  Tensor job_counters;
  if (ws.persistent > 0) {
    ++g_persistent_calls;
    job_counters = zeros({2}, TensorOptions().dtype(kInt32).device(dev));
    bp.job_counters = job_counters.data_ptr();
  }
  Tensor dq_acc;
  if (dq_fused) {
    dq_acc = zeros({p.B, p.Hq, p.Lq, p.E}, TensorOptions().dtype(kFloat32).device(dev));
    bp.dq_acc = dq_acc.data_ptr();
    ++g_fused_dq_calls;
    if (ws.dkdv) ++g_fused_dq_ws_calls;
  }

  // Capture-gradient accumulators, indexed like the kernel's FgModArgs slots (fg_cap_grad passes the
  // kernel slot; make_mod_context merges the captures of all programs by tensor identity).
  Tensor cap_max;
  std::vector<Tensor> acc(ncaps);
  std::vector<int> slot_of(ncaps, -1);
  o.dcaps.assign(ncaps, Tensor());
  if (cap_mode != 0) {
    cap_max = zeros({kMaxCaptures}, TensorOptions().dtype(kInt32).device(dev));
    bp.cap_max = cap_max.data_ptr();
    for (size_t c = 0; c < ncaps; ++c) {
      if (!want[c]) continue;
      const Tensor& t = p.score_grad->captures[c].tensor;
      for (size_t s = 0; s < ctx.captures.size(); ++s)
        if (ctx.captures[s].tensor.is_same(t)) slot_of[c] = static_cast<int>(s);
      FG_CHECK(slot_of[c] >= 0, ValueError,
               "flex_attention backward (CUDA): captured tensor {} has no slot among the kernel's captures", c);
      acc[c] = zeros(t.sizes(), TensorOptions().dtype(cap_mode == 1 ? kInt64 : kFloat64).device(dev));
      bp.cap_acc[slot_of[c]] = acc[c].data_ptr();
      bp.cap_numel[slot_of[c]] = acc[c].numel();
    }
  }

  // The warp-specialised kernels' tensor maps (their third parameter): Q and dO for dK/dV, K and V for dQ. Their
  // inputs have 16-byte-aligned rows (the wgmma kernels' condition), which every map of them accepts, so a
  // refusal is raised.
  struct {
    TmaMap a, b, c;  // (c: the dK/dV kernel's dq_acc map, FG_DQ_TMA_ADD; the dQ kernel's third is never read)
  } qmaps, kvmaps;
  auto encode = [](TmaMap& map, const Tensor& t, const char* name) {
    const std::string why = encode_tma_map_sw128(map, t, 64);
    FG_CHECK(why.empty(), CudaError,
             "flex_attention backward (CUDA): the TMA map of {} (sizes {}, strides {}, dtype {}) was refused: {}; "
             "FLEXGRAD_FLEX_WGMMA_BWD_WS=0 runs the backward kernels without it",
             name, fmt::join(t.sizes(), ", "), fmt::join(t.strides(), ", "), dtype_name(t.dtype()), why);
  };
  if (ws.dkdv) {
    encode(qmaps.a, p.q, "query");
    encode(qmaps.b, dout, "grad_out");
    if (ws.dq_tma_add) encode(qmaps.c, dq_acc, "the fused dQ's float32 sums");
  }
  if (ws.dq) {
    encode(kvmaps.a, p.k, "key");
    encode(kvmaps.b, p.v, "value");
  }
  void* pargs[] = {&bp};
  void* kargs[] = {&bp, &ctx.args};
  void* dkdv_args[] = {&bp, &ctx.args, &qmaps};
  void* dq_args[] = {&bp, &ctx.args, &kvmaps};
  Tensor quad_live;
  if (skip_empty && nQB > 0 && p.B * p.Hq > 0) {
    quad_live = empty({quad_table_bytes(p)}, TensorOptions().dtype(kBool).device(dev));
    bp.quad_live = quad_live.data_ptr();
    jit::launch(mod->function("fg_bwd_quad_live"),
                {static_cast<unsigned>(nQB), static_cast<unsigned>(p.Hq), static_cast<unsigned>(p.B)}, {256}, 0, kargs,
                device);
  }
  const int64_t rows = p.B * p.Hq * p.Lq;
  if (rows > 0 && !dq_delta) {
    const int64_t per_cta = 8 * pre_rows;  // 8 warps of pre_rows rows
    jit::launch(mod->function("fg_bwd_preprocess"), {static_cast<unsigned>((rows + per_cta - 1) / per_cta)}, {256}, 0,
                pargs, device);
  }
  // Forked after the preprocess (which both kernels read) and before the dK/dV launch; joined once dQ is queued.
  std::optional<StreamFork> fork;
  if (concurrent) {
    fork.emplace(device, stream(device));
    ++g_concurrent_dq_calls;
  }
  // A persistent warp-specialised kernel: one CTA an SM (their shared memory allows no second) or the count asked
  // for, each running the grid's CTAs it takes from a queue (fg_for_each_cta).
  auto persistent_grid = [&](int64_t jobs) { return jit::Dim3{persistent_ctas(jobs, ws.persistent, device)}; };
  auto launch_dq = [&] {
    jit::launch_on(concurrent ? fork->side() : stream(device), mod->function(dq_kernel),
                   ws.dq && ws.persistent > 0
                       ? persistent_grid(nQB * bp.sub_q * p.Hq * p.B)
                       : jit::Dim3{static_cast<unsigned>(nQB * bp.sub_q), static_cast<unsigned>(p.Hq),
                                   static_cast<unsigned>(p.B)},
                   {static_cast<unsigned>(ws.dq ? 128 * 3 : cfg.wgmma ? 128 * cfg.wg_dq : cfg.threads)}, smem_dq,
                   ws.dq ? dq_args : kargs, device);
  };
  if (dq_delta) {
    launch_dq();  // (it writes the delta and lse2 the dK/dV kernel reads)
    ++g_dq_delta_calls;
  }
  if (nKB > 0 && p.Bkv * p.Hkv > 0) {
    const int64_t jobs = nKB * bp.sub_kv * p.Hkv * p.Bkv;
    const jit::Dim3 grid =
        ws.dkdv && ws.persistent > 0 ? persistent_grid(jobs)
        : bp.dkdv_group > 0          ? jit::Dim3{static_cast<unsigned>(jobs)}
                                     : jit::Dim3{static_cast<unsigned>(nKB * bp.sub_kv), static_cast<unsigned>(p.Hkv),
                                                 static_cast<unsigned>(p.Bkv)};
    jit::launch(mod->function(dkdv_kernel), grid,
                {static_cast<unsigned>(ws.dkdv ? 128 * 3 : cfg.wgmma ? 128 * cfg.wg_dkdv : cfg.threads)}, smem_dkdv,
                ws.dkdv ? dkdv_args : kargs, device);
  }
  std::vector<bool> nonfinite(ncaps, false);
  if (cap_mode == 1) {
    // Fixed-point scale per capture from the max |contribution| the dK/dV pass saw (see flex_backward.cuh).
    Tensor mx = cap_max.to(kCPU);
    const auto* bits = static_cast<const uint32_t*>(mx.data_ptr());
    for (size_t c = 0; c < ncaps; ++c) {
      if (slot_of[c] < 0) continue;
      float m;
      std::memcpy(&m, bits + slot_of[c], 4);
      if (!std::isfinite(m)) {
        nonfinite[c] = true;
        bp.cap_scale[slot_of[c]] = 0;
        continue;
      }
      int nterms = 0;
      for (const CaptureGradTerm& t : p.score_grad->terms) nterms += t.capture == static_cast<int32_t>(c);
      const double n = static_cast<double>(p.B) * p.Hq * p.Lq * p.Lkv * std::max(nterms, 1);
      const double bound = 2.0 * 1.01 * n * static_cast<double>(m);
      const int s = m > 0 ? std::clamp(static_cast<int>(std::floor(62.0 - std::log2(bound))), -1000, 1000) : 0;
      bp.cap_scale[slot_of[c]] = std::ldexp(1.0, s);
    }
  }
  if (dq_fused) {
    const int64_t n4 = p.B * p.Hq * p.Lq * p.E / 4;
    if (n4 > 0)
      jit::launch(mod->function(dq_kernel), {static_cast<unsigned>(std::min<int64_t>((n4 + 255) / 256, 65535))}, {256},
                  0, pargs, device);
  } else if (dq_kernel_runs && !dq_delta) {
    launch_dq();
  }
  fork.reset();  // the finalize below reads what the dQ kernel added to the captured-gradient sums
  for (size_t c = 0; c < ncaps; ++c) {
    if (!acc[c].defined()) continue;
    if (cap_mode == 2) {
      o.dcaps[c] = acc[c];
      continue;
    }
    Tensor g = empty(acc[c].sizes(), TensorOptions().dtype(kFloat64).device(dev));
    const void* a = acc[c].data_ptr();
    void* d = g.data_ptr();
    int64_t n = g.numel();
    const double scale = bp.cap_scale[slot_of[c]];
    double inv = scale > 0 ? 1.0 / scale : 0.0;
    int nf = nonfinite[c] ? 1 : 0;
    void* fargs[] = {&a, &d, &n, &inv, &nf};
    if (n > 0) jit::launch(mod->function("fg_bwd_cap_finalize"), {static_cast<unsigned>((n + 255) / 256)}, {256}, 0, fargs, device);
    o.dcaps[c] = g;
  }
  check_mod_errors(ctx);
}

}  // namespace

// Whether the persistent launch pays for this problem: where each grid CTA walks few blocks, so that its start
// (the first chunks' loads) and end (the gradients' stores) are a large part of it, which the persistent kernels
// overlap with the neighbouring CTA's work. Measured (session 25, backward ms, grid -> persistent): on the H200
// the document mask (3.7 visited blocks a row) 0.784 -> 0.755, the sliding window 1024 (7.9) 1.163 -> 1.140; on
// an H100 document -4 / -5%, sliding -2 / -4%, but causal (16.5 a row) +3.5%, softcap + causal +6.5%, causal at
// S 16384 (64.5) +3%, no mask (32) within the noise; with this rule (session 26, H100, three rounds against the grid)
// document 0.740-0.746 against 0.775-0.781 ms, sliding 1.119-1.124 against 1.145-1.151. So: persistent where the mean
// visited rows of the other side per grid CTA, in both kernels, is at most twelve 128-row blocks. The count comes
// from the mask (FlexProblem::visited) only where the host already has it; an unknown count keeps the grid. Both
// launches give the same bits (PersistentKernelsMatchTheGridOnes), so the choice's timing cannot change a result.
bool persistent_pays(const FlexProblem& p) {
  constexpr double kMaxMeanRows = 12 * 128;
  const std::optional<int64_t> visited = p.visited ? p.visited->known() : std::nullopt;
  if (!visited || p.kv_lists.rows == 0 || p.q_lists.rows == 0) return false;
  const double planes = static_cast<double>(p.kv_lists.Bm * p.kv_lists.Hm);
  const double dq_rows = static_cast<double>(*visited) * static_cast<double>(p.block_kv) / (planes * p.kv_lists.rows);
  const double dkdv_rows = static_cast<double>(*visited) * static_cast<double>(p.block_q) / (planes * p.q_lists.rows);
  return dq_rows <= kMaxMeanRows && dkdv_rows <= kMaxMeanRows;
}

int64_t concurrent_dq_calls() { return g_concurrent_dq_calls.load(); }
int64_t dq_delta_calls() { return g_dq_delta_calls.load(); }
int64_t persistent_backward_calls() { return g_persistent_calls.load(); }
int64_t lean_step_backward_calls() { return g_lean_step_calls.load(); }
int64_t skip_empty_backward_calls() { return g_skip_empty_calls.load(); }
int64_t finite_dscore_backward_calls() { return g_finite_dscore_calls.load(); }
int64_t pingpong_backward_calls() { return g_pingpong_calls.load(); }
int64_t tile_prefetch_backward_calls() { return g_tile_prefetch_calls.load(); }
int64_t fused_dq_backward_calls() { return g_fused_dq_calls.load(); }
int64_t fused_dq_ws_backward_calls() { return g_fused_dq_ws_calls.load(); }
int64_t dq_tma_add_backward_calls() { return g_dq_tma_add_calls.load(); }

FG_REGISTER_KERNEL(flex_backward_stub, CUDA, &flex_backward_cuda);

}  // namespace fg::cuda::flex
