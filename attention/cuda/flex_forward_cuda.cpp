// FlexAttention forward on CUDA. Short queries (decoding) go to the split-KV kernel (flex_decode_cuda.h);
// the rest to the tiled kernel: picks a tile configuration for (dtype, head dims, BlockMask block sizes,
// layout), assembles the translation unit (mods + kernels/flex_mma.cuh + kernels/flex_forward.cuh),
// compiles it through the JIT cache and launches one CTA per (q tile, head, batch).
//
// bf16 / f16 run flex_fwd_mma (tensor cores, f32 accumulation); f32 and f64 run flex_fwd_simt (exact
// FMA arithmetic, no TF32). On Hopper, FlexCudaForward::Wgmma runs flex_fwd_wgmma (kernels/flex_forward_wgmma.cuh:
// the same algorithm on warpgroup MMA, sm_90a, bf16 / f16); Auto picks it there (wgmma_preferred). Anything the
// kernels cannot run raises NotImplementedError saying why.
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "flexgrad/attention/cuda/flex_cuda_common.h"
#include "flexgrad/attention/cuda/flex_decode_cuda.h"
#include "flexgrad/attention/cuda/tma_map.h"
#include "flexgrad/attention/flex_kernels.h"
#include "flexgrad/tensor/cuda/cuda_check.h"

namespace fg::cuda {
namespace {

std::atomic<int64_t> g_bounded_max_calls{0};
std::atomic<int64_t> g_lazy_rescale_calls{0};

using flex::env_persistent;
using flex::env_switch;
using flex::persistent_ctas;
using flex::round_up;
using flex::to_i32;
using flex::vec_ok;

// Host mirror of FgFwdParams (kernels/flex_forward.cuh): same members, same order.
struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  void* lse;
  void* mx;
  int64_t q_sb, q_sh, q_sl;
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  const int32_t* num;
  const int32_t* idx;
  const int32_t* full_num;
  const int32_t* full_idx;
  double scale;
  int32_t B, Hq, Lq, Hkv, Lkv, Bkv, group;
  int32_t E, Ev;
  int32_t Bm, Hm, rows, idx_cols, full_cols;
  int32_t block_q, block_kv;
  int32_t tiles_per_qblock;
  int32_t n_qtiles;
  int32_t* job_counter;
};
static_assert(sizeof(FwdParams) == 240, "FwdParams must mirror FgFwdParams of flex_forward.cuh");

constexpr int64_t kMaxHeadDim = 256;

struct TileConfig {
  bool mma = false;
  bool wgmma = false;  // flex_fwd_wgmma (then mma too: a bf16 / f16 tensor-core kernel)
  int pipe = 0;  // flex_fwd_wgmma's main loop (FG_WGMMA_PIPE): 0 sequential, 1 pipelined, 2 warp-specialised,
                 // 3 warp-specialised with the consumers' intra-warpgroup overlap
  bool pingpong = false;  // FG_WGMMA_PINGPONG: pipe 3's consumer warpgroups take turns issuing their products
  int64_t persistent = 0;  // FG_WGMMA_PERSISTENT (pipes 2, 3): 0 the grid, else env_persistent's setting
  int64_t bm = 0, bn = 0, warps = 0, min_blocks = 1;
  int64_t e_pad = 0, ev_pad = 0;
  size_t smem = 0;
};

size_t mma_smem(const TileConfig& c) {
  constexpr int64_t pad = 8;  // FG_SMEM_PAD_B16
  return static_cast<size_t>((c.bm * (c.e_pad + pad) + 2 * c.bn * (c.e_pad + pad) + 2 * c.bn * (c.ev_pad + pad)) * 2);
}
// flex_fwd_wgmma: Q, 2 K and 2 V buffers, plus 1024 bytes for the kernel to align its window (the swizzle needs it).
size_t wgmma_smem(const TileConfig& c) {
  return static_cast<size_t>((c.bm * c.e_pad + 2 * c.bn * (c.e_pad + c.ev_pad)) * 2 + 1024);
}
size_t simt_smem(const TileConfig& c, size_t elem) {
  return static_cast<size_t>(c.bm * (c.e_pad + 4) + c.bn * (c.e_pad + 4) + c.bn * c.ev_pad + c.bm * (c.bn + 4)) * elem;
}

// Rows per CTA never straddle a BlockMask q block (the CTA reads one row of the block lists): a CTA
// covers at most min(cap, block_q rounded up to 16) rows; kv sub-tiles likewise stay within a kv block.
int64_t rows_for(int64_t block, int64_t cap) { return std::min(cap, round_up(block, 16)); }

// Optional tuning override, FLEXGRAD_FLEX_FWD_TILE="BM,BN,WARPS,MIN_BLOCKS" (mma kernel only).
bool tile_override(TileConfig& c) {
  const char* env = std::getenv("FLEXGRAD_FLEX_FWD_TILE");
  if (env == nullptr || *env == '\0') return false;
  long bm = 0, bn = 0, w = 0, mb = 0;
  FG_CHECK(std::sscanf(env, "%ld,%ld,%ld,%ld", &bm, &bn, &w, &mb) == 4 && bm % (16 * w) == 0 && bn % 16 == 0 &&
               w > 0 && mb > 0,
           ValueError, "FLEXGRAD_FLEX_FWD_TILE: expected \"BM,BN,WARPS,MIN_BLOCKS\" with BM a multiple of 16*WARPS "
           "and BN a multiple of 16; got \"{}\"", env);
  c.bm = bm;
  c.bn = bn;
  c.warps = w;
  c.min_blocks = mb;
  return true;
}

TileConfig choose_config(const FlexProblem& p, size_t smem_limit) {
  FG_CHECK(p.E >= 1 && p.E <= kMaxHeadDim && p.Ev >= 1 && p.Ev <= kMaxHeadDim, NotImplementedError,
           "flex_attention on CUDA: head dims up to {} are supported; got E={}, Ev={}", kMaxHeadDim, p.E, p.Ev);
  TileConfig c;
  const DType dt = p.q.dtype();
  if (dt == kBFloat16 || dt == kFloat16) {
    c.mma = true;
    c.e_pad = round_up(p.E, 16);
    c.ev_pad = round_up(p.Ev, 16);
    const bool wide = std::max(c.e_pad, c.ev_pad) > 128;
    if (!tile_override(c)) {
      // Head dims up to 128: two m16 fragments per warp, so each K / V fragment read from shared memory
      // feeds two mma (shared-memory bandwidth, not the tensor cores, bounds one fragment per warp); a
      // 32-column kv sub-tile keeps S and O in registers. With a score_mod, whose code needs registers
      // the two fragments leave none of, one fragment per warp and two CTAs per SM (ALiBi and softcap
      // ran 5% and 25% faster so on the H200). Wider heads: one fragment, one CTA (O alone is 128
      // registers at Ev = 256).
      c.bm = rows_for(p.block_q, 128);
      c.bn = rows_for(p.block_kv, 32);
      const bool two = !wide && !p.score_mod && c.bm % 32 == 0;
      c.warps = two ? c.bm / 32 : c.bm / 16;
      c.min_blocks = wide ? 1 : 2;
    }
    c.smem = mma_smem(c);
  } else if (dt == kFloat32 || dt == kFloat64) {
    c.e_pad = round_up(p.E, 4);
    c.ev_pad = round_up(p.Ev, 16);
    const size_t elem = dt == kFloat64 ? 8 : 4;
    for (int64_t cap : {64, 32, 16}) {
      c.bm = rows_for(p.block_q, cap);
      c.bn = rows_for(p.block_kv, cap);
      c.warps = 8;
      c.smem = simt_smem(c, elem);
      if (c.smem <= smem_limit) break;
    }
    c.min_blocks = c.smem * 2 <= smem_limit ? 2 : 1;
  } else {
    FG_FAIL(NotImplementedError, "flex_attention on CUDA: no kernel for dtype {} (bfloat16, float16, float32, "
            "float64 are supported)", dtype_name(dt));
  }
  FG_CHECK(c.smem <= smem_limit, NotImplementedError,
           "flex_attention on CUDA: E={}, Ev={} in {} needs {} bytes of shared memory per block with the smallest "
           "tile; this device allows {}", p.E, p.Ev, dtype_name(dt), c.smem, smem_limit);
  return c;
}

// flex_fwd_wgmma's configuration (kernels/flex_forward_wgmma.cuh). Head dims are padded to multiples of 64 with
// zero columns, so any E, Ev up to 256 run (those not multiples of 64 waste tensor-core work: Auto does not pick
// the kernel for them). One warpgroup per 64 q rows, two when the q blocks hold more than 64 rows; kv sub-tiles of
// 128 columns (the N of the Q K^T wgmma) for head dims up to 128 and kv blocks over 64, else 64 (smem and the
// registers of O at Ev = 256). min_blocks 1: ptxas gives the kernel 150-255 registers a thread on sm_90a.
// The pipelined main loop (FG_WGMMA_PIPE 1, opt-in: FLEXGRAD_FLEX_WGMMA_PIPE=1; the sequential loop measured as
// fast or faster) holds S_j, P_{j-1} and O at once: with a score_mod and head dims over 64 its 128-column sub-tile
// spills (ptxas -v: 12-52 bytes at D = 128), so it takes 64 there; at head dims over 128 it spills 24-72 bytes even
// so (O alone is 128 registers). FLEXGRAD_FLEX_WGMMA_BN=64|128 overrides BN (tuning).
// Why flex_fwd_wgmma cannot run this call ("" when it can): the forced kernel raises it, Auto skips the kernel.
std::string wgmma_unsupported(const FlexProblem& p, const std::string& arch) {
  const DType dt = p.q.dtype();
  if (dt != kBFloat16 && dt != kFloat16)
    return fmt::format("the Wgmma forward kernel runs bfloat16 and float16; got {}", dtype_name(dt));
  if (arch != "sm_90a")
    return fmt::format("the Wgmma forward kernel needs a Hopper GPU (sm_90a); this device is {}", arch);
  if (p.E < 1 || p.E > kMaxHeadDim || p.Ev < 1 || p.Ev > kMaxHeadDim)
    return fmt::format("head dims up to {} are supported; got E={}, Ev={}", kMaxHeadDim, p.E, p.Ev);
  return "";
}

// FLEXGRAD_FLEX_WGMMA_PIPE: flex_fwd_wgmma's main loop, 0 the sequential one, 1 the pipelined one, 2 the
// warp-specialised one, 3 the warp-specialised one with the consumers' intra-warpgroup overlap (A/B); unset:
// `fallback`.
int wgmma_pipe_env(int fallback) {
  const char* env = std::getenv("FLEXGRAD_FLEX_WGMMA_PIPE");
  if (env == nullptr || *env == '\0') return fallback;
  const std::string v(env);
  FG_CHECK(v == "0" || v == "1" || v == "2" || v == "3", ValueError,
           "FLEXGRAD_FLEX_WGMMA_PIPE: expected 0, 1, 2 or 3; got \"{}\"", v);
  return v[0] - '0';
}
// FLEXGRAD_FLEX_WGMMA_BN: 64 or 128 overrides flex_fwd_wgmma's kv sub-tile (tuning); unset: 0, the default rule.
// The sub-tile never straddles a kv block: a BlockMask with kv blocks of 64 or fewer keeps 64.
int64_t wgmma_bn_env() {
  const char* env = std::getenv("FLEXGRAD_FLEX_WGMMA_BN");
  if (env == nullptr || *env == '\0') return 0;
  const std::string v(env);
  FG_CHECK(v == "64" || v == "128", ValueError, "FLEXGRAD_FLEX_WGMMA_BN: expected 64 or 128; got \"{}\"", v);
  return v == "64" ? 64 : 128;
}

// FLEXGRAD_FLEX_WGMMA_TMA: 0 keeps the warp-specialised loop's producer on cp.async (A/B); unset or 1: TMA where
// the tensors allow a map.
bool wgmma_tma_env() { return env_switch("FLEXGRAD_FLEX_WGMMA_TMA").value_or(true); }

// K's and V's tensor maps for FG_WGMMA_TMA (the kernel's FgTmaMaps): boxes of 64 columns x BN rows. Called only
// for inputs whose rows are 16-byte aligned (FG_VEC), which every tensor map of these tensors accepts, so a
// refusal is raised, not worked around: the cp.async producer would give the same results ~35% slower, unseen.
struct WgmmaTmaMaps {
  TmaMap k, v;
};
void wgmma_tma_maps(const FlexProblem& p, const TileConfig& cfg, WgmmaTmaMaps& maps) {
  const int rows = static_cast<int>(cfg.bn);
  for (auto [map, t, name] : {std::tuple{&maps.k, &p.k, "key"}, std::tuple{&maps.v, &p.v, "value"}}) {
    const std::string why = encode_tma_map_sw128(*map, *t, rows);
    FG_CHECK(why.empty(), CudaError,
             "flex_attention on CUDA: the Wgmma forward's TMA map of {} (sizes {}, strides {}, dtype {}) was refused: "
             "{}; FLEXGRAD_FLEX_WGMMA_TMA=0 runs the cp.async producer instead",
             name, fmt::join(t->sizes(), ", "), fmt::join(t->strides(), ", "), dtype_name(t->dtype()), why);
  }
}

TileConfig choose_wgmma_config(const FlexProblem& p, size_t smem_limit, const std::string& arch) {
  const std::string why = wgmma_unsupported(p, arch);
  FG_CHECK(why.empty(), NotImplementedError, "flex_attention on CUDA: {}", why);
  TileConfig c;
  c.mma = c.wgmma = true;
  c.e_pad = round_up(p.E, 64);
  c.ev_pad = round_up(p.Ev, 64);
  c.bm = rows_for(p.block_q, 128) > 64 ? 128 : 64;
  c.warps = c.bm / 16;
  const bool wide = std::max(c.e_pad, c.ev_pad) > 128;
  // The warp-specialised loop with its TMA producer by default where it runs (two consumer warpgroups, BM 128):
  // on the H200 (session 12, one call, bf16 B4 H16 S4096 D128, FLEXGRAD_FLEX_CUDNN=0) it took the forward from
  // the sequential loop's 303 / 278 / 163 / 246 / 165 / 116 TFLOP/s (no mask, causal, document, sliding 1024,
  // ALiBi, softcap) to 491 / 412 / 185 / 328 / 213 / 120; with cp.async in its producer it was within 6% of the
  // sequential loop. The warp-specialised loop moves registers from its producer warpgroup to two consumer
  // warpgroups (setmaxnreg); with one (BM 64) every thread already has 255, so that shape keeps the sequential
  // loop, whatever FLEXGRAD_FLEX_WGMMA_PIPE asks (a tuning knob; the tests pass 2 across shapes).
  // FG_WGMMA_PIPE 3 overlaps each consumer's softmax of sub-tile j with its P V of sub-tile j - 1, as the pipelined
  // loop does, and its two consumer warpgroups take turns issuing their products (FG_WGMMA_PINGPONG;
  // FLEXGRAD_FLEX_WGMMA_PINGPONG=0 keeps them apart). The default for head dims up to 128 since session 21 (H200,
  // bf16 B4 H16 S4096 D128, FLEXGRAD_FLEX_CUDNN=0, one call against pipe 2: no mask 1.137 -> 1.108 ms, causal
  // 0.722 -> 0.698, document 0.340 -> 0.324, sliding 1024 0.414 -> 0.405, ALiBi + causal 0.902 -> 0.865, softcap +
  // causal 1.934 -> 1.908, with approximate tanh 1.308 -> 1.284). Wider heads keep pipe 2: with a score_mod pipe 3
  // spills there (20-48 bytes, offline), and it was not timed.
  c.pipe = wgmma_pipe_env(/*fallback=*/c.bm == 128 ? (wide ? 2 : 3) : 0);
  if (c.pipe >= 2 && c.bm != 128) c.pipe = 0;
  c.pingpong = c.pipe == 3 && env_switch("FLEXGRAD_FLEX_WGMMA_PINGPONG").value_or(true);
  // FLEXGRAD_FLEX_WGMMA_PERSISTENT=1 (opt-in, written in session 19 without a GPU): the warp-specialised loops run
  // one CTA an SM, each running the grid's CTAs it takes from a queue (FgJobQueue), so that one's output stores
  // overlap the next one's Q, row parts and first K / V (fg_fwd_for_each_cta); =N caps the grid at N CTAs (tests).
  c.persistent = c.pipe >= 2 ? env_persistent("FLEXGRAD_FLEX_WGMMA_PERSISTENT").value_or(0) : 0;
  const bool small_kv = rows_for(p.block_kv, 128) <= 64;
  const bool pipe_spills = c.pipe == 1 && p.score_mod && std::max(c.e_pad, c.ev_pad) > 64;
  c.bn = wide || small_kv || pipe_spills ? 64 : 128;
  if (const int64_t bn = wgmma_bn_env(); bn != 0) {
    FG_CHECK(bn == 64 || !wide, ValueError,
             "FLEXGRAD_FLEX_WGMMA_BN=128 needs head dims up to 128 (the registers of O); got E={}, Ev={}", p.E, p.Ev);
    c.bn = small_kv ? 64 : bn;
  }
  c.min_blocks = 1;
  // FLEXGRAD_FLEX_WGMMA_TWO_CTAS=1 (opt-in, not yet timed): two CTAs an SM for head dims up to 64. Session 42's
  // profile of causal D 64 found the forward bound by latency (44% of issue slots busy with two consumer warps a
  // scheduler; the softmax's fixed-latency chains a third of the main loop's stalls; the once-per-CTA prologue and
  // epilogue ~15% of the samples). FlashAttention-3's answer, 192-row tiles, would put two q blocks of a BlockMask
  // (different kv lists) in one CTA; two CTAs an SM instead give four consumer warpgroups an SM, one CTA's
  // prologue and stores under the other's main loop. The registers (65536 / (384 x 2): 80 a thread at launch,
  // 32 / 104 by setmaxnreg) hold pipe 2's loop on 64-column sub-tiles, not pipe 3's overlap (flex_forward_wgmma.cuh).
  // Calls it cannot take raise: a tuning knob that silently did nothing would time the wrong kernel.
  if (env_switch("FLEXGRAD_FLEX_WGMMA_TWO_CTAS").value_or(false)) {
    const int64_t asked_pipe = wgmma_pipe_env(/*fallback=*/-1), asked_bn = wgmma_bn_env();  // -1, 0: unset
    auto shown = [](int64_t v, int64_t unset) { return v == unset ? std::string("unset") : std::to_string(v); };
    FG_CHECK(c.bm == 128 && std::max(c.e_pad, c.ev_pad) <= 64 && c.persistent == 0 &&
                 (asked_pipe == -1 || asked_pipe == 2) && asked_bn != 128,
             ValueError,
             "FLEXGRAD_FLEX_WGMMA_TWO_CTAS=1 runs head dims up to 64 on 128-row q tiles with FG_WGMMA_PIPE 2, BN 64 and "
             "the grid launch; got E={}, Ev={}, q rows a CTA {} (BlockMask q blocks of {}), FLEXGRAD_FLEX_WGMMA_PIPE {}, "
             "FLEXGRAD_FLEX_WGMMA_BN {}, persistent {}",
             p.E, p.Ev, c.bm, p.block_q, shown(asked_pipe, -1), shown(asked_bn, 0), c.persistent);
    c.pipe = 2;
    c.pingpong = false;
    c.bn = 64;
    c.min_blocks = 2;
  }
  c.smem = wgmma_smem(c);
  // The mods' row / column parts take a few KiB of static shared memory on top.
  constexpr size_t kStaticReserve = 8192;
  FG_CHECK(c.smem + kStaticReserve <= smem_limit, NotImplementedError,
           "flex_attention on CUDA: the Wgmma forward kernel needs {} bytes of shared memory per block for E={}, "
           "Ev={}; this device allows {}", c.smem + kStaticReserve, p.E, p.Ev, smem_limit);
  return c;
}

// Auto's use of flex_fwd_wgmma: where it runs and wastes nothing (head dims multiples of 64). Sessions 7-8 kept
// score_mods with a tanh on flex_fwd_mma (softcap + causal 120 TFLOP/s there, 105 on wgmma); since then the
// wgmma kernel is the faster one there too (H200, bf16 B4 H16 S4096 D128, session 17, our kernels: softcap + causal
// forward 1.870 ms on wgmma against 2.165 on mma.sync, and with approximate tanh 1.302 against 1.767).
// FLEXGRAD_FLEX_WGMMA=0 keeps Auto on flex_fwd_mma, =1 takes wgmma wherever it runs (A/B).
bool wgmma_preferred(const FlexProblem& p, const std::string& arch) {
  const std::optional<bool> forced = env_switch("FLEXGRAD_FLEX_WGMMA");
  if (forced == false) return false;
  return wgmma_unsupported(p, arch).empty() && p.E % 64 == 0 && p.Ev % 64 == 0;
}

void flex_forward_cuda(const FlexProblem& p, FlexForwardOutputs& o) {
  if (p.B == 0 || p.Hq == 0 || p.Lq == 0) return;
  // The one place the CUDA forward kernel is chosen (FlexCudaForward).
  if (p.cuda_forward == FlexCudaForward::SplitKv ||
      (p.cuda_forward == FlexCudaForward::Auto && split_kv_preferred(p))) {
    flex_split_kv_forward(p, o);
    return;
  }
  const int device = p.q.device().index;
  DeviceGuard guard(device);
  int smem_optin = 0;
  FG_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const std::string arch = jit::target_arch(device);
  const bool wgmma = p.cuda_forward == FlexCudaForward::Wgmma ||
                     (p.cuda_forward == FlexCudaForward::Auto && wgmma_preferred(p, arch));
  const TileConfig cfg = wgmma ? choose_wgmma_config(p, static_cast<size_t>(smem_optin), arch)
                               : choose_config(p, static_cast<size_t>(smem_optin));
  const DType dt = p.q.dtype();
  FG_CHECK(p.q.strides()[3] == 1 && p.k.strides()[3] == 1 && p.v.strides()[3] == 1, ValueError,
           "flex_attention on CUDA: q, k, v need a contiguous last dim (strides {}, {}, {})", p.q.strides()[3],
           p.k.strides()[3], p.v.strides()[3]);
  FG_CHECK(o.out.is_contiguous() && o.lse.is_contiguous() && o.max_scores.is_contiguous(), ValueError,
           "flex_attention on CUDA: the outputs must be contiguous");

  FwdParams a{};
  flex::fill_problem_params(a, p);
  a.out = o.out.data_ptr();
  a.lse = o.lse.data_ptr();
  a.mx = o.max_scores.data_ptr();
  a.tiles_per_qblock = to_i32((p.block_q + cfg.bm - 1) / cfg.bm, "q tiles per block");
  const int64_t nqb = (p.Lq + p.block_q - 1) / p.block_q;
  a.n_qtiles = to_i32(nqb * a.tiles_per_qblock, "q tiles");
  FG_CHECK(p.Hq <= 65535 && p.B <= 65535, NotImplementedError,
           "flex_attention on CUDA: at most 65535 heads and batches per launch; got Hq={}, B={}", p.Hq, p.B);

  const bool vec = cfg.mma && p.E % 8 == 0 && p.Ev % 8 == 0 && vec_ok(p.q, p.E) &&
                   (p.Lkv == 0 || (vec_ok(p.k, p.E) && vec_ok(p.v, p.Ev)));
  std::vector<std::string> defines = {
      "FG_ELEM " + std::to_string(flex::abi_dtype(dt)),
      "FG_E " + std::to_string(cfg.e_pad),
      "FG_EV " + std::to_string(cfg.ev_pad),
      "FG_BM " + std::to_string(cfg.bm),
      "FG_BN " + std::to_string(cfg.bn),
      "FG_WARPS " + std::to_string(cfg.warps),
      "FG_VEC " + std::string(vec ? "1" : "0"),
      "FG_MIN_BLOCKS " + std::to_string(cfg.min_blocks),
  };
  if (cfg.wgmma) defines.push_back("FG_WGMMA_PIPE " + std::to_string(cfg.pipe));
  if (cfg.pingpong) defines.push_back("FG_WGMMA_PINGPONG 1");
  if (cfg.persistent > 0) defines.push_back("FG_WGMMA_PERSISTENT 1");
  // A pure mask_mod alone runs a mods step with no bounds test and a bounds pass on edge sub-tiles only
  // (fg_frag_mask_step, flex_forward_common.cuh); FLEXGRAD_FLEX_FWD_MASK_STEP=0 keeps the step with bounds (A/B).
  if (!env_switch("FLEXGRAD_FLEX_FWD_MASK_STEP").value_or(true)) defines.push_back("FG_FWD_MASK_BOUNDS_IN_STEP 1");
  // The wgmma forward of a program without a score_mod keeps S unscaled and puts a positive, finite scale into the
  // softmax's exponent (FG_FWD_RAW_SOFTMAX, flex_forward_common.cuh; session 26): 2-8% off the forward of no mask,
  // causal, document, sliding window and D 64 on an H100 (session 27, three alternating rounds).
  // FLEXGRAD_FLEX_FWD_RAW_SOFTMAX=0 keeps the scaled scores (A/B); other calls are unchanged by it.
  if (cfg.wgmma && !p.score_mod && p.scale > 0 && std::isfinite(p.scale) &&
      env_switch("FLEXGRAD_FLEX_FWD_RAW_SOFTMAX").value_or(true))
    defines.push_back("FG_FWD_RAW_SOFTMAX 1");
  // The warp-specialised loop's producer loads whole K / V sub-tiles with TMA where the tensors allow a map.
  WgmmaTmaMaps maps;
  const bool tma = cfg.wgmma && cfg.pipe >= 2 && vec && p.Lkv > 0 && wgmma_tma_env();
  if (tma) {
    wgmma_tma_maps(p, cfg, maps);
    defines.push_back("FG_WGMMA_TMA 1");
  }
  flex::ModContext ctx = flex::make_mod_context(p, /*backward=*/false);
  // Under approx_math a score_mod of the form c * f(k score) (softcap) has its factors folded into the scale and the
  // exponent's constant by the tensor-core kernels (FG_FWD_SCORE_AFFINE, flex_forward_common.cuh);
  // FLEXGRAD_FLEX_AFFINE_FOLD=0 keeps the whole program an entry (A/B).
  const bool fold = flex::affine_fold(ctx, cfg.mma, defines);
  // The bounded max (flex_forward_common.cuh, kFgBoundedMax): where the folded form's core is bounded (softcap's
  // tanh), the inputs are bf16 and the call returns no max_scores, the tensor-core kernels' online softmax keeps no
  // running max and O no rescale. FLEXGRAD_FLEX_FWD_BOUNDED_MAX=0 keeps the running max (A/B).
  const bool bounded_max_env = env_switch("FLEXGRAD_FLEX_FWD_BOUNDED_MAX").value_or(true);
  if (fold && ctx.facts.core_bounded && p.q.dtype() == kBFloat16 && !p.max_scores_wanted && bounded_max_env) {
    defines.push_back("FG_FWD_MAX_SCORES_UNUSED 1");
    ++g_bounded_max_calls;
  }
  // The lazy rescale (flex_forward_common.cuh, FG_FWD_LAZY_RESCALE): a row keeps its running max while its new max
  // exceeds it by at most 2^8 in P's units, and O is rescaled only where a row of the warp moved it. The wgmma
  // forward of calls that return no max_scores (the kept max is stale); opt-in (FLEXGRAD_FLEX_FWD_LAZY_RESCALE=1):
  // session 40 timed it on an H100, 5-6% off no mask's forward (which Auto gives to cuDNN), level or slower on the
  // other cases (docs/flex_cuda_notes.md).
  if (cfg.wgmma && !p.max_scores_wanted && env_switch("FLEXGRAD_FLEX_FWD_LAZY_RESCALE").value_or(false)) {
    defines.push_back("FG_FWD_LAZY_RESCALE 1");
    ++g_lazy_rescale_calls;
  }
  const char* kernel = cfg.wgmma ? "flex_fwd_wgmma" : cfg.mma ? "flex_fwd_mma" : "flex_fwd_simt";
  jit::JitSource src;
  src.name = "flex_forward";
  // mods, defines, the shared device helpers, then the kernel template.
  src.code = flex::assemble(ctx, defines, {"flex_mma.cuh", cfg.wgmma ? "flex_forward_wgmma.cuh" : "flex_forward.cuh"});
  src.kernels = {kernel};
  auto mod = jit::get_module(src, device);
  void* args[] = {&a, &ctx.args, &maps};  // the maps only when FG_WGMMA_TMA (the kernel's third parameter)
  // FG_WGMMA_PIPE 2 and 3 add their producer warpgroup to the consumer warps.
  const unsigned threads =
      cfg.mma ? static_cast<unsigned>(cfg.warps * 32 + (cfg.wgmma && cfg.pipe >= 2 ? 128 : 0)) : 256u;
  // A persistent launch's queue (FgJobQueue): its counter, zeroed.
  Tensor job_counter;
  if (cfg.persistent > 0) {
    job_counter = zeros({1}, TensorOptions().dtype(kInt32).device(p.q.device()));
    a.job_counter = static_cast<int32_t*>(job_counter.data_ptr());
  }
  const jit::Dim3 grid =
      cfg.persistent > 0
          ? jit::Dim3{persistent_ctas(static_cast<int64_t>(a.n_qtiles) * p.Hq * p.B, cfg.persistent, device)}
          : jit::Dim3{static_cast<unsigned>(a.n_qtiles), static_cast<unsigned>(p.Hq), static_cast<unsigned>(p.B)};
  jit::launch(mod->function(kernel), grid, jit::Dim3{threads, 1, 1}, cfg.smem, args, device);
  flex::check_mod_errors(ctx);
}

}  // namespace

FG_REGISTER_KERNEL(flex_forward_stub, CUDA, &flex_forward_cuda);

namespace flex {
int64_t bounded_max_calls() { return g_bounded_max_calls.load(); }
int64_t lazy_rescale_calls() { return g_lazy_rescale_calls.load(); }
}  // namespace flex

}  // namespace fg::cuda
