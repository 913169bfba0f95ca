// The split-KV FlexAttention forward for short queries (kernels/flex_decode.cuh): configuration, split count,
// workspace (partials, and per-tile counters kept zeroed across launches, when the kv blocks are split), one
// launch of flex_decode_mma.
#include "flexgrad/attention/cuda/flex_decode_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "flexgrad/attention/cuda/flex_cuda_common.h"
#include "flexgrad/tensor/cuda/cuda_api.h"
#include "flexgrad/tensor/cuda/cuda_check.h"

namespace fg::cuda {
namespace {

using flex::round_up;
using flex::to_i32;

// Host mirror of FgDecParams (kernels/flex_decode.cuh): same members, same order.
struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  float* mx;
  float* part_o;
  float* part_ml;
  int32_t* counters;
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
  int32_t pack;
  int32_t tiles_per_qblock;
  int32_t n_row_tiles;
  int32_t splits;
};
static_assert(sizeof(DecodeParams) == 264, "DecodeParams must mirror FgDecParams of flex_decode.cuh");

constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kPad = 8;  // FG_SMEM_PAD_B16

struct DecodeConfig {
  int64_t e_pad = 0, ev_pad = 0;
  int64_t pack = 1;    // query heads per CTA
  int64_t mf = 1;      // m16 fragments: 16 * mf packed rows per CTA
  int64_t warps = 4;   // each with its own pipeline of 16-column slices
  int64_t stages = 2;  // slices per warp pipeline
  int64_t min_blocks = 1;
  int64_t l2_prefetch = 0;  // FG_L2_PREFETCH: bytes L2 fetches around each 16-byte copy (0, 64, 128, 256)
  size_t smem = 0;
};

// Query heads that share one CTA: the whole GQA group when every head has the same block lists (so the
// CTA reads one row of them), else one.
int64_t heads_per_cta(const FlexProblem& p) { return p.kv_lists.Hm == 1 ? p.group() : 1; }
int64_t max_fragments(const FlexProblem& p) { return round_up(p.Ev, 16) <= 128 ? 2 : 1; }  // O stays in registers
int64_t packed_rows(const FlexProblem& p) { return heads_per_cta(p) * std::min(p.block_q, p.Lq); }

// One pipeline stage of every warp: a 16-row slice of K and of V each.
size_t stage_bytes(const DecodeConfig& c) {
  return static_cast<size_t>(c.warps * 16 * ((c.e_pad + kPad) + (c.ev_pad + kPad)) * 2);
}
// Q tile + max(pipeline stages, what the final combination keeps there: the warps' partials and the CTA's own,
// read by the other CTA of a cluster).
size_t decode_smem(const DecodeConfig& c) {
  const size_t q = static_cast<size_t>(16 * c.mf * (c.e_pad + kPad) * 2);
  const size_t red = static_cast<size_t>((c.warps + 1) * 16 * c.mf * (3 + c.ev_pad) * 4);
  return q + std::max(static_cast<size_t>(c.stages) * stage_bytes(c), red);
}

// Optional tuning override, FLEXGRAD_FLEX_DECODE_TILE="WARPS,STAGES,MIN_BLOCKS[,L2_PREFETCH]".
bool tile_override(DecodeConfig& c) {
  const char* env = std::getenv("FLEXGRAD_FLEX_DECODE_TILE");
  if (env == nullptr || *env == '\0') return false;
  long w = 0, st = 0, mb = 0, pf = c.l2_prefetch;
  const int n = std::sscanf(env, "%ld,%ld,%ld,%ld", &w, &st, &mb, &pf);
  FG_CHECK((n == 3 || n == 4) && w >= 1 && w <= 16 && st >= 2 && st <= 8 && mb >= 1 &&
               (pf == 0 || pf == 64 || pf == 128 || pf == 256),
           ValueError, "FLEXGRAD_FLEX_DECODE_TILE: expected \"WARPS,STAGES,MIN_BLOCKS[,L2_PREFETCH]\" with 1-16 warps, "
           "2-8 stages, MIN_BLOCKS >= 1 and L2_PREFETCH 0, 64, 128 or 256; got \"{}\"", env);
  c.warps = w;
  c.stages = st;
  c.min_blocks = mb;
  c.l2_prefetch = pf;
  return true;
}

DecodeConfig choose_config(const FlexProblem& p, int device) {
  DecodeConfig c;
  c.e_pad = round_up(p.E, 16);
  c.ev_pad = round_up(p.Ev, 16);
  c.pack = heads_per_cta(p);
  c.mf = packed_rows(p) <= 16 ? 1 : max_fragments(p);
  int block_optin = 0, sm_bytes = 0;
  FG_CUDA_CHECK(cudaDeviceGetAttribute(&block_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  FG_CUDA_CHECK(cudaDeviceGetAttribute(&sm_bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  if (tile_override(c)) {
    c.smem = decode_smem(c);
    FG_CHECK(c.smem <= static_cast<size_t>(block_optin), NotImplementedError,
             "FLEXGRAD_FLEX_DECODE_TILE: {} bytes of shared memory per block; this device allows {}", c.smem,
             block_optin);
    return c;
  }
  // Two slices in flight per warp; one CTA of 8 warps per SM where it fits (head dims up to 128: ~140 KB of
  // stages), else CTAs of 4 warps, two per SM where they fit; copies ask L2 for 128-byte lines. Measured on the
  // H200 (bench_decode_cuda with the FLEXGRAD_FLEX_DECODE_TILE sweep, bf16 D=128, GQA 4; docs/flex_cuda_notes.md,
  // sessions 5-12): 8 warps x 1 CTA beat 4 warps x 2 CTAs by 2-3% on B=8 S=8192 and match it elsewhere, once
  // each warp walks its own blocks (walking the other warps' slices cost it 20% on paged caches); 3 stages or
  // 3 CTAs per SM lose 2-8%; the 128-byte L2 prefetch adds 1-3% (256 bytes: 0-1%).
  c.l2_prefetch = 128;
  c.stages = 2;
  constexpr size_t kReservedPerCta = 1024;  // the runtime's shared memory per CTA
  for (const auto& [warps, blocks] : {std::pair<int64_t, int64_t>{8, 1}, {4, 2}, {4, 1}}) {
    c.warps = warps;
    c.min_blocks = blocks;
    c.smem = decode_smem(c);
    if (c.smem <= static_cast<size_t>(block_optin) &&
        static_cast<size_t>(blocks) * (c.smem + kReservedPerCta) <= static_cast<size_t>(sm_bytes))
      return c;
  }
  FG_FAIL(NotImplementedError,
          "flex_attention on CUDA (split-KV): E={}, Ev={} need {} bytes of shared memory per block; this device "
          "allows {}", p.E, p.Ev, c.smem, block_optin);
}

// kv ranges per query tile: enough CTAs to give every SM its resident CTAs once (one wave: each CTA then
// streams a long run of K/V), never more ranges than the longest block list has blocks.
int64_t choose_splits(const FlexProblem& p, const DecodeConfig& c, int64_t base_ctas, int device) {
  if (p.kv_splits > 0) return p.kv_splits;
  int sms = 0;
  FG_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t slots = static_cast<int64_t>(sms) * c.min_blocks;
  const BlockLists& bl = p.kv_lists;
  int64_t max_blocks = 0;
  if (bl.num.defined()) max_blocks += bl.idx.sizes()[3];
  if (bl.full_num.defined()) max_blocks += bl.full_idx.sizes()[3];
  const int64_t splits = std::max<int64_t>(1, slots / std::max<int64_t>(1, base_ctas));
  return std::max<int64_t>(1, std::min({splits, max_blocks, int64_t{128}}));
}

// The per-tile counters of split launches on `device`'s current stream: at least `n` of them, all 0. Zeroed
// once when (re)allocated; every launch leaves them 0 again (the last CTA of each tile resets its count), so
// a decode step costs no memset. Launches on one stream run in order, so they can share one buffer; a new
// stream gets its own. Buffers are never freed (a grown-out one may still be in use by a queued launch) and
// the map is leaked like the module cache: it must outlive static destructors that run after CUDA's.
int32_t* split_counters(int device, int64_t n) {
  static std::mutex mu;
  static auto* buffers = new std::map<std::pair<int, void*>, std::vector<Tensor>>();
  const std::lock_guard<std::mutex> lock(mu);
  std::vector<Tensor>& held = (*buffers)[{device, current_stream(device)}];
  if (held.empty() || held.back().numel() < n) {
    const int64_t size = std::max<int64_t>(n, held.empty() ? 1024 : 2 * held.back().numel());
    held.push_back(zeros({size}, TensorOptions().dtype(kInt32).device(Device(DeviceType::CUDA, device))));
  }
  return static_cast<int32_t*>(held.back().data_ptr());
}

// Whether the two CTAs of a tile split in two merge through a thread-block cluster (FG_CLUSTER 2: distributed
// shared memory instead of global partials, a fence and a count): on sm_90 and up; FLEXGRAD_FLEX_DECODE_CLUSTER=0
// keeps the global merge (A/B).
bool cluster_merge_wanted(int device) {
  int major = 0;
  FG_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 9 && flex::env_switch("FLEXGRAD_FLEX_DECODE_CLUSTER").value_or(true);
}

}  // namespace

std::string split_kv_unsupported(const FlexProblem& p) {
  const DType dt = p.q.dtype();
  if (dt != kBFloat16 && dt != kFloat16)
    return "the split-KV kernel runs bfloat16 and float16 (tensor cores); got " + std::string(dtype_name(dt)) +
           " (the tiled kernel runs it)";
  if (p.E < 1 || p.E > kMaxHeadDim || p.Ev < 1 || p.Ev > kMaxHeadDim)
    return "head dims up to " + std::to_string(kMaxHeadDim) + " are supported; got E=" + std::to_string(p.E) +
           ", Ev=" + std::to_string(p.Ev);
  return "";
}

bool split_kv_preferred(const FlexProblem& p) {
  return split_kv_unsupported(p).empty() && packed_rows(p) <= 16 * max_fragments(p);
}

void flex_split_kv_forward(const FlexProblem& p, FlexForwardOutputs& o) {
  const std::string why = split_kv_unsupported(p);
  FG_CHECK(why.empty(), NotImplementedError, "flex_attention on CUDA: {}", why);
  if (!p.has_rows()) return;
  const int device = p.q.device().index;
  DeviceGuard guard(device);
  FG_CHECK(p.q.strides()[3] == 1 && p.k.strides()[3] == 1 && p.v.strides()[3] == 1, ValueError,
           "flex_attention on CUDA: q, k, v need a contiguous last dim (strides {}, {}, {})", p.q.strides()[3],
           p.k.strides()[3], p.v.strides()[3]);
  FG_CHECK(o.out.is_contiguous() && o.lse.is_contiguous() && o.max_scores.is_contiguous(), ValueError,
           "flex_attention on CUDA: the outputs must be contiguous");
  const DecodeConfig cfg = choose_config(p, device);

  DecodeParams a{};
  flex::fill_problem_params(a, p);
  a.out = o.out.data_ptr();
  a.lse = static_cast<float*>(o.lse.data_ptr());
  a.mx = static_cast<float*>(o.max_scores.data_ptr());
  a.pack = to_i32(cfg.pack, "heads per CTA");
  const int64_t bm = 16 * cfg.mf;
  a.tiles_per_qblock = to_i32((cfg.pack * std::min(p.block_q, p.Lq) + bm - 1) / bm, "row tiles per q block");
  const int64_t nqb = (p.Lq + p.block_q - 1) / p.block_q;
  a.n_row_tiles = to_i32(nqb * a.tiles_per_qblock, "row tiles");
  const int64_t head_groups = p.Hq / cfg.pack;
  FG_CHECK(head_groups <= 65535 && p.B <= 65535, NotImplementedError,
           "flex_attention on CUDA (split-KV): at most 65535 head groups and batches per launch; got {} and B={}",
           head_groups, p.B);
  const int64_t splits = choose_splits(p, cfg, a.n_row_tiles * head_groups * p.B, device);
  a.splits = to_i32(splits, "kv splits");
  to_i32(a.n_row_tiles * splits, "grid size");
  const bool cluster = splits == 2 && cluster_merge_wanted(device);
  Tensor part_o, part_ml;
  if (splits > 1 && !cluster) {
    const int64_t rows_total = p.B * p.Hq * p.Lq;
    const auto opts = TensorOptions().dtype(kFloat32).device(p.q.device());
    part_o = empty({splits, rows_total, p.Ev}, opts);
    part_ml = empty({splits, rows_total, 3}, opts);
    a.part_o = static_cast<float*>(part_o.data_ptr());
    a.part_ml = static_cast<float*>(part_ml.data_ptr());
    a.counters = split_counters(device, p.B * head_groups * a.n_row_tiles);
  }

  const bool vec = p.E % 8 == 0 && p.Ev % 8 == 0 && flex::vec_ok(p.q, p.E) &&
                   (p.Lkv == 0 || (flex::vec_ok(p.k, p.E) && flex::vec_ok(p.v, p.Ev)));
  const std::vector<std::string> defines = {
      "FG_ELEM " + std::to_string(flex::abi_dtype(p.q.dtype())),
      "FG_E " + std::to_string(cfg.e_pad),
      "FG_EV " + std::to_string(cfg.ev_pad),
      "FG_MF " + std::to_string(cfg.mf),
      "FG_WARPS " + std::to_string(cfg.warps),
      "FG_STAGES " + std::to_string(cfg.stages),
      "FG_VEC " + std::string(vec ? "1" : "0"),
      "FG_MIN_BLOCKS " + std::to_string(cfg.min_blocks),
      "FG_L2_PREFETCH " + std::to_string(cfg.l2_prefetch),
      "FG_CLUSTER " + std::string(cluster ? "2" : "0"),
  };
  flex::ModContext ctx = flex::make_mod_context(p, /*backward=*/false);
  jit::JitSource src;
  src.name = "flex_decode";
  src.code = flex::assemble(ctx, defines, {"flex_mma.cuh", "flex_decode.cuh"});
  src.kernels = {"flex_decode_mma"};
  auto mod = jit::get_module(src, device);
  void* args[] = {&a, &ctx.args};
  jit::launch(mod->function("flex_decode_mma"),
              jit::Dim3{static_cast<unsigned>(a.n_row_tiles * splits), static_cast<unsigned>(head_groups),
                        static_cast<unsigned>(p.B)},
              jit::Dim3{static_cast<unsigned>(cfg.warps * 32), 1, 1}, cfg.smem, args, device);
  flex::check_mod_errors(ctx);
}

}  // namespace fg::cuda
