// FlexAttention backward on CUDA: the kernel template (NVRTC only, no headers). The host
// (attention/cuda/flex_backward_cuda.cpp) prepends flex_abi.cuh, the generated mods and these macros:
//
//   FG_IN_DTYPE     FG_DT_FLOAT16 / FG_DT_BFLOAT16 / FG_DT_FLOAT32 / FG_DT_FLOAT64: q, k, v, out, dout, dq, dk, dv
//   FG_E, FG_EV     head dims of q/k and of v
//   FG_NT           threads per block
//   FG_BQ, FG_BKV   SIMT tile: rows of q and of k/v per step (both kernels)
//   FG_KV_TILE, FG_Q_CHUNK   MMA dK/dV: kv rows owned by a block (16 per warp), q rows per step
//   FG_Q_TILE, FG_KV_CHUNK   MMA dQ: q rows owned by a block (16 per warp), kv rows per step
//   FG_USE_MMA      1: bf16/f16 tensor-core kernels (mma.sync m16n8k16, fp32 accumulation); 0: SIMT kernels
//                   (exact fp32 FFMA, or float64), which also serve bf16/f16 head dims the MMA kernels lack
//   FG_CAP_MODE     0 no captured-tensor gradient; 1 deterministic fixed point; 2 float64 atomics
//   FG_BWD_WGMMA    1: included by flex_backward_wgmma.cuh (Hopper), which replaces the mma.sync dK/dV and dQ
//                   kernels with fg_bwd_dkdv_wgmma / fg_bwd_dq_wgmma and keeps the rest of this file
//
// Kernels, launched in this order by the host:
//   fg_bwd_preprocess   delta = rowsum(dO * O) - dlse                       one warp per row
//   fg_bwd_dkdv         dK, dV per (kv batch, kv head, kv tile): loops over the q heads of the GQA group,
//                       the q batches broadcast onto it and the q blocks of the transposed BlockMask lists
//                       (partial blocks with fg_mask_mod, then full blocks); with FG_CAP_MODE 1 it also
//                       records max |captured-gradient contribution| per capture
//   fg_bwd_dq           dQ (and captured-tensor gradients) per (batch, head, q tile) over the kv lists
//   fg_bwd_cap_finalize fixed-point accumulators -> float64
// Every dQ/dK/dV element is written by exactly one thread of one block, so no float atomics are needed
// and reruns are bit-identical. A BlockMask block larger than a kernel tile is split into several
// blocks / steps, the last one clipped at the block's end and at the sequence end, so any BlockMask
// block size works with any tile.
//
// Captured-tensor gradients, FG_CAP_MODE 1: every contribution v is added as the integer llrint(v * 2^s)
// into an int64 accumulator (atomicAdd on the two's complement bits, so the sum is order-free and
// reruns are bit-identical). The host picks s from M = max |v| (from the dK/dV pass: an atomicMax on the
// bits of non-negative floats, also order-free) and N = the number of contributions, as the largest s
// with 2 * 1.01 * N * M * 2^s <= 2^62, so no partial sum can overflow. Each contribution is rounded to
// the quantum 2^-s, about N * M * 2^-61: the absolute error of an element is at most (its number of
// contributions) * 2^-(s+1) and is typically far smaller (rounding errors of random sign). A
// non-finite contribution makes that capture's gradient NaN.
#pragma once

#ifndef FG_IN_DTYPE
#error "FG_IN_DTYPE must be defined by the host"
#endif
#include "flex_mod_parts.cuh"

// ---- element types: fg_t computes (float, or double for float64), fg_s is what memory holds
#if FG_IN_DTYPE == FG_DT_FLOAT64
typedef double fg_t;
typedef double fg_s;
#elif FG_IN_DTYPE == FG_DT_FLOAT32
typedef float fg_t;
typedef float fg_s;
#else
typedef float fg_t;
typedef unsigned short fg_s;  // bf16 / f16 bits
#endif

__device__ __forceinline__ fg_t fg_ld(const fg_s* p) {
#if FG_IN_DTYPE == FG_DT_BFLOAT16
  return fg_bf16_to_float(*p);
#elif FG_IN_DTYPE == FG_DT_FLOAT16
  return fg_f16_to_float(*p);
#else
  return *p;
#endif
}
__device__ __forceinline__ fg_s fg_cvt_out(fg_t x) {
#if FG_IN_DTYPE == FG_DT_BFLOAT16
  unsigned short r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
#elif FG_IN_DTYPE == FG_DT_FLOAT16
  unsigned short r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
#else
  return x;
#endif
}
__device__ __forceinline__ float fg_exp(float x) { return expf(x); }
__device__ __forceinline__ double fg_exp(double x) { return exp(x); }
#define FG_NEG_INF (-__int_as_float(0x7f800000))

// ---- the problem (host mirror: BwdParams in flex_backward_cuda.cpp; 8-byte fields only)
struct FgLists {  // FlexProblem::BlockLists on the device; null pointers for absent lists
  const int* num;
  const int* idx;
  const int* full_num;
  const int* full_idx;
  fg_i64 Bm, Hm, rows, cols, full_cols;
};

struct FgBwdParams {
  const fg_s* q;
  const fg_s* k;
  const fg_s* v;
  const fg_s* out;   // [B, Hq, Lq, Ev] contiguous
  const fg_s* dout;  // [B, Hq, Lq, Ev] contiguous
  const fg_t* lse;   // [B, Hq, Lq]
  const fg_t* dlse;  // [B, Hq, Lq] or null
  fg_t* delta;       // [B, Hq, Lq] scratch
  fg_t* lse2;        // [B, Hq, Lq] scratch: fg_lse2(lse), by fg_bwd_preprocess (once a row, not once an entry)
  fg_s* dq;          // contiguous, shapes of q, k, v
  fg_s* dk;
  fg_s* dv;
  fg_i64 qs_b, qs_h, qs_l, ks_b, ks_h, ks_l, vs_b, vs_h, vs_l;  // element strides (last dim is 1)
  fg_i64 B, Hq, Lq, Bkv, Hkv, Lkv, G;
  fg_i64 block_q, block_kv;  // BlockMask block sizes
  fg_i64 sub_q, sub_kv;      // kernel tiles per BlockMask block: ceil(block / tile)
  double scale;
  FgLists kvl;  // rows: q blocks (dQ)
  FgLists ql;   // rows: kv blocks (dK, dV)
  void* cap_acc[FG_MAX_CAPTURES];  // FG_CAP_MODE 1: fg_u64 accumulators; 2: double
  unsigned* cap_max;               // [FG_MAX_CAPTURES] float bits of max |contribution|
  double cap_scale[FG_MAX_CAPTURES];
  fg_i64 cap_numel[FG_MAX_CAPTURES];
  float* dq_acc;  // [B, Hq, Lq, E] float32 zeroed by the host where the wgmma dK/dV kernel sums dQ (FG_DQ_ATOMIC)
  // The wgmma dK/dV kernel's grid: 0 = (kv tiles, Hkv, Bkv), tiles fastest; n > 0 = one dimension in groups of n
  // (kv batch, kv head) pairs, the pairs of a group fastest, then the tiles (fg_bwd_dkdv_wgmma).
  fg_i64 dkdv_group;
  int* job_counters;  // [2] zeroed by the host for persistent warp-specialised kernels: the dK/dV and dQ queues
  unsigned char* quad_live;  // FG_BWD_SKIP_EMPTY: [B, Hq, ceil(Lq / 64), ceil(Lkv / 64)] (flex_backward_wgmma.cuh)
};

struct FgRow {
  const int* partial;
  const int* full;
  int n_partial, n_full;
  __device__ __forceinline__ int size() const { return n_partial + n_full; }
  __device__ __forceinline__ int at(int i) const { return i < n_partial ? partial[i] : full[i - n_partial]; }
};

__device__ __forceinline__ FgRow fg_row(const FgLists& l, fg_i64 b, fg_i64 h, fg_i64 row) {
  FgRow r;
  r.partial = nullptr;
  r.full = nullptr;
  r.n_partial = 0;
  r.n_full = 0;
  if (row >= l.rows) return r;
  const fg_i64 lin = ((l.Bm == 1 ? 0 : b) * l.Hm + (l.Hm == 1 ? 0 : h)) * l.rows + row;
  if (l.num != nullptr) {
    r.n_partial = l.num[lin];
    r.partial = l.idx + lin * l.cols;
  }
  if (l.full_num != nullptr) {
    r.n_full = l.full_num[lin];
    r.full = l.full_idx + lin * l.full_cols;
  }
  return r;
}

// ---- capture-gradient sinks (the Sink interface of flex_abi.cuh)
// All lanes of a warp that reach one sink.add call site hit the same capture slot; lanes that also share
// the index (bias[h]) are summed with shuffles first so the atomics do not serialise on one address.
__device__ __forceinline__ int fg_lane() { return threadIdx.x & 31; }

struct FgMaxSink {  // dK/dV pass: max |contribution| per capture, order-free
  unsigned* cap_max;
  __device__ void add(int cap, fg_i64, double value) const {
    float a = (float)fabs(value);
    unsigned bits = (a == a) ? __float_as_uint(a) : 0x7fffffffu;  // NaN -> above +inf
    const unsigned act = __activemask();
    const unsigned m = __reduce_max_sync(act, bits);
    if (fg_lane() == __ffs(act) - 1) atomicMax(cap_max + cap, m);
  }
};

struct FgFixedSink {  // dQ pass, deterministic: int64 fixed point
  void* const* acc;
  const double* scale;
  __device__ void add(int cap, fg_i64 index, double value) const {
    long long x = llrint(value * scale[cap]);
    fg_u64* dst = (fg_u64*)acc[cap] + index;
    const unsigned act = __activemask();
    const unsigned peers = __match_any_sync(act, (unsigned long long)index);
    if (act == 0xffffffffu && peers == act) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(act, x, o);
      if (fg_lane() == 0 && x != 0) atomicAdd(dst, (fg_u64)x);
    } else if (x != 0) {
      atomicAdd(dst, (fg_u64)x);
    }
  }
};

struct FgAtomicSink {  // dQ pass, p.deterministic == false: float64 atomics
  void* const* acc;
  __device__ void add(int cap, fg_i64 index, double value) const {
    double* dst = (double*)acc[cap] + index;
    const unsigned act = __activemask();
    const unsigned peers = __match_any_sync(act, (unsigned long long)index);
    if (act == 0xffffffffu && peers == act) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) value += __shfl_xor_sync(act, value, o);
      if (fg_lane() == 0 && value != 0.0) atomicAdd(dst, value);
    } else if (value != 0.0) {
      atomicAdd(dst, value);
    }
  }
};

// Each pass's sink, by FG_CAP_MODE (0: no captured gradient; the kernels' sink pointer is then null and
// never followed). The dK/dV pass records the max |contribution| per capture in the deterministic mode (1),
// which scales that mode's fixed point; the dQ pass adds the contributions (1: fixed point, 2: atomics).
__device__ __forceinline__ FgMaxSink fg_dkdv_sink(const FgBwdParams& p) {
  FgMaxSink s;
  s.cap_max = p.cap_max;
  return s;
}
#if FG_CAP_MODE == 1
typedef FgFixedSink FgDqSink;
__device__ __forceinline__ FgDqSink fg_dq_sink(const FgBwdParams& p) {
  FgDqSink s;
  s.acc = p.cap_acc;
  s.scale = p.cap_scale;
  return s;
}
#elif FG_CAP_MODE == 2
typedef FgAtomicSink FgDqSink;
__device__ __forceinline__ FgDqSink fg_dq_sink(const FgBwdParams& p) {
  FgDqSink s;
  s.acc = p.cap_acc;
  return s;
}
#else
typedef FgMaxSink FgDqSink;
__device__ __forceinline__ FgDqSink fg_dq_sink(const FgBwdParams&) {
  FgDqSink s;
  s.cap_max = nullptr;
  return s;
}
#endif

// A sink that defers (the dQ kernels' element step, fg_dq_elements): fg_entry hands it the entry's scaled score
// and dS w.r.t. the modified score instead of calling fg_cap_grad, and the step replays them in a rolled loop
// afterwards: one copy of the generated gradient code and of the sink's shuffles and atomics per kernel instead
// of one per entry (ptxas took 3-6 s for a dQ kernel with captured gradients when every entry had its own).
// `score` / `grad` are the thread's arrays of the chunk's entries, `k` this entry's slot.
struct FgCapDefer {
  fg_t* score;
  fg_t* grad;
  int k;
};
template <class Sink>
__device__ __forceinline__ void fg_entry_cap(const Sink& sink, fg_t s, fg_t ds, int b, int h, int qi, int kj,
                                             const FgModArgs& args) {
  fg_cap_grad<fg_t, Sink>(s, ds, b, h, qi, kj, args, sink);
}
__device__ __forceinline__ void fg_entry_cap(const FgCapDefer& d, fg_t s, fg_t ds, int, int, int, int,
                                             const FgModArgs&) {
  d.score[d.k] = s;
  d.grad[d.k] = ds;
}

// exp2 of the kernels: ex2.approx on the tensor-core path (bf16/f16 probabilities), exp2f / exp2 else.
__device__ __forceinline__ float fg_exp2_t(float x) {
#if FG_USE_MMA
  return fg_exp2(x);
#else
  return exp2f(x);
#endif
}
__device__ __forceinline__ double fg_exp2_t(double x) { return exp2(x); }
#define FG_LOG2E_D 1.4426950408889634

// ---- FG_BWD_LEAN_STEP 1 (the host's default since session 27; FLEXGRAD_FLEX_BWD_LEAN_STEP=0 leaves it out): four
// cuts to the tensor-core kernels' element steps, each found in their SASS (sm_90a, nvcc 13.0; docs/flex_cuda_notes.md,
// session 27). The same values where an entry is valid, up to one rounding of P's exponent (FG_BWD_SCALE_IN_EXP).
//   FG_BWD_SCALE_IN_EXP  without a score_mod the step takes q.k as the product left it and the scale goes into the
//                        exponent's factor, P = 2^(q.k (scale log2 e) - lse2): one FFMA an entry for an FMUL and an
//                        FFMA (with a score_mod the step needs scale q.k, the score_mod's argument)
//   FG_BWD_ROW_PAIRS     the dK/dV step (its general copy, below) reads a lane's two q rows' lse2 and delta
//                        (adjacent: rows 2t, 2t + 1 of an 8-row group) with one 8-byte load each, for all four of
//                        their entries: rows past the chunk's end hold stale values that only invalid entries see,
//                        whose P and dS are discarded. Each entry read both, predicated on its own validity: 2 loads
//                        an entry, now 1/2
//   FG_DQ_P_EARLY        fg_dq_chunk_elements (the split entry): P is finished (fenced) before dP is waited for,
//                        so its exponentials overlap the dP product (NVVM had moved them after the wait), and an
//                        invalid entry's P is -0, which dS tests, in place of a validity bitmask (which ptxas
//                        packed and unpacked in ~3 instructions an entry)
//   FG_BWD_INTERIOR_STEP a chunk whose entries (a warp's rows of them) all lie inside the sequence in a full block
//                        runs a copy of the step without bounds or mask_mod (fg_dkdv_elements, fg_dq_elements,
//                        fg_dq_chunk_elements): no comparisons, and no validity to select on. (The copy is chosen
//                        for a warp, for a lane in the mma.sync dQ kernel, for a warpgroup where the copies hold the
//                        wgmma waits.)
#ifndef FG_BWD_LEAN_STEP
#define FG_BWD_LEAN_STEP 0
#endif
#define FG_BWD_SCALE_IN_EXP (FG_BWD_LEAN_STEP && FG_USE_MMA && !FG_HAS_SCORE_MOD)
#ifndef FG_BWD_ROW_PAIRS  // (the last three may also be set one by one, for a comparison)
#define FG_BWD_ROW_PAIRS FG_BWD_LEAN_STEP
#endif
#ifndef FG_DQ_P_EARLY
#define FG_DQ_P_EARLY FG_BWD_LEAN_STEP
#endif
#ifndef FG_BWD_INTERIOR_STEP
#define FG_BWD_INTERIOR_STEP FG_BWD_LEAN_STEP
#endif
// The dK/dV step's pairs and interior copy: not in the plain wgmma dK/dV kernel (one or two warpgroups), which holds
// its walk and prefetch beside dK, dV and the products at 255 registers: with the copy ptxas spilled 36-372 bytes
// there (0-32 without), with the pairs alone 20-68; the warp-specialised consumers (232 registers) and the mma.sync
// kernel spill no more with both (ModCodegen.BackwardLeanStepCompiles).
#define FG_BWD_PLAIN_WGMMA_DKDV (FG_BWD_WGMMA && !FG_BWD_WS_DKDV)
#define FG_DKDV_INTERIOR_STEP (FG_BWD_INTERIOR_STEP && !FG_BWD_PLAIN_WGMMA_DKDV)
#define FG_DKDV_ROW_PAIRS (FG_BWD_ROW_PAIRS && !FG_BWD_PLAIN_WGMMA_DKDV)
// FG_BWD_SCORE_AFFINE: the generated code gave the score_mod's affine form (FG_SCORE_AFFINE, affine_score.h; only
// under approx_math, for a merged element step without capture gradients): the tensor-core kernels' step takes
// x = q.k (scale FG_SCORE_IN_FACTOR) as its score, the core's value u and d score_mod / d score come from
// fg_score_core_dscore, and P = 2^(u (FG_SCORE_OUT_FACTOR log2 e) - lse2): softcap's step loses its two
// multiplications an entry by 1/20 and by 20 in both kernels, as the forward's (flex_forward_common.cuh;
// FLEXGRAD_FLEX_AFFINE_FOLD=0 defines FG_NO_AFFINE_FOLD).
#if FG_SCORE_AFFINE && !defined(FG_NO_AFFINE_FOLD) && FG_USE_MMA && FG_HAS_SCORE_MOD && !FG_DSCORE_IS_CONSTANT && \
    FG_CAP_MODE == 0
#define FG_BWD_SCORE_AFFINE 1
#else
#define FG_BWD_SCORE_AFFINE 0
#endif
// An element step's score from q.k (what fg_entry takes as s) and the factor of P's exponent (its exp_factor).
__device__ __forceinline__ fg_t fg_entry_score(fg_t qk, fg_t scale) {
#if FG_BWD_SCALE_IN_EXP
  (void)scale;
  return qk;
#elif FG_BWD_SCORE_AFFINE
  return qk * (scale * (fg_t)FG_SCORE_IN_FACTOR);
#else
  return qk * scale;
#endif
}
__device__ __forceinline__ fg_t fg_exp_factor(fg_t scale) {
#if FG_BWD_SCALE_IN_EXP
  return scale * (fg_t)FG_LOG2E_D;
#elif FG_BWD_SCORE_AFFINE
  (void)scale;
  return (fg_t)(FG_SCORE_OUT_FACTOR * FG_LOG2E_D);
#else
  (void)scale;
  return (fg_t)FG_LOG2E_D;
#endif
}
// The modified score (the core's value with FG_BWD_SCORE_AFFINE, in the units fg_exp_factor expects) and d score_mod
// / d score of one entry from its step score s, in one call.
// kFast: fg_score_elem_dscore_fast (FG_SCORE_ELEM_DSCORE_FAST; the caller checked its dividends: fg_dkdv_fast_ok,
// fg_dq_fast_ok).
template <bool kFast = false>
__device__ __forceinline__ fg_t fg_entry_mod_dscore(fg_t s, const FgRowMods<fg_t>& r, const FgColMods<fg_t>& c, int b,
                                                    int h, int qi, int kj, const FgModArgs& args, fg_t* dscore) {
#if FG_BWD_SCORE_AFFINE
  (void)r;
  (void)c;
  return fg_score_core_dscore(s, b, h, qi, kj, args, dscore);
#else
#if FG_SCORE_ELEM_DSCORE_FAST && FG_IN_DTYPE != FG_DT_FLOAT64
  if constexpr (kFast) return fg_score_elem_dscore_fast(s, r.s, c.s, b, h, qi, kj, args, dscore);
#endif
  return fg_score_elem_dscore<fg_t>(s, r.s, c.s, b, h, qi, kj, args, dscore);
#endif
}
// lse in log2 units; +inf for an empty row (lse = -inf) so that 2^(s - lse2) = 0 there.
__device__ __forceinline__ fg_t fg_lse2(fg_t lse) {
  return lse == (fg_t)FG_NEG_INF ? -(fg_t)FG_NEG_INF : lse * (fg_t)FG_LOG2E_D;
}

// An entry's mask_mod: `valid` (inside the sequence and the block) comes out false where a partial block's
// mask_mod drops it. Where fg_mask_elem has no effect (FG_MASK_ELEM_PURE: no captured read, nothing that can fail)
// it is evaluated for every entry, out-of-range ones included (their row / column parts hold whatever the buffers
// held; the result is discarded), and selected: the element steps then compile to predicated code. Guarded by the
// entry's validity, ptxas branched around each entry (BSSY / BSYNC, no two entries' exp2 overlapping): in the
// document mask's dK/dV step (sm_90a, nvcc 13.0) ~24 instructions and three branches an entry against ~15.
#if FG_HAS_MASK_MOD
__device__ __forceinline__ void fg_mask_entry(bool& valid, bool partial, const FgRowMods<fg_t>& r,
                                              const FgColMods<fg_t>& c, int b, int h, int qi, int kj,
                                              const FgModArgs& args) {
#if FG_MASK_ELEM_PURE
  // (&& and ||, not & and |: an out-of-range entry's parts may be registers never written, whose value the
  // compiler may treat as poison; a select on `valid` keeps it out of the result. Value-initialising the register
  // parts instead made the float32 SIMT backward at head dim 256 fail to launch on an H100, session 22.)
  const bool keep = fg_mask_elem<fg_t>(r.m, c.m, b, h, qi, kj, args);
  valid = valid && (!partial || keep);
#else
  if (valid && partial) valid = fg_mask_elem<fg_t>(r.m, c.m, b, h, qi, kj, args);
#endif
}
#endif

// One (b, h, q, kv) entry of the backward from s = scale q.k (pre-mod score) and dp = dO_q . v_kv.
// `valid` is false outside the sequence or the BlockMask block; partial blocks also ask the mask_mod.
// `r` / `c` are the mods' row and column parts (flex_mod_parts.cuh) of qi and kj.
// Returns P; *ds_out receives dS * d score_mod / d score, and the captured-gradient contributions
// (dS w.r.t. the modified score times d mod / d cap) go to `sink` when it is not null.
// With a score_mod whose derivative depends on the element, the modified score and d score_mod / d score
// come from one fg_score_elem_dscore call (one tanh for the softcap, not one here and one in fg_dscore).
// That evaluates the derivative on every valid element, also where dS is 0; it reads only what the
// score_mod reads, so it raises nowhere the score_mod does not. The product is still skipped where dS is 0
// (0 * an infinite derivative would be NaN).
#define FG_ENTRY_MERGED (FG_HAS_SCORE_MOD && !FG_DSCORE_IS_CONSTANT)
// FG_BWD_DSCORE_FINITE: the generated code proved d score_mod / d score finite wherever the score is not NaN, and the
// score_mod NaN where it is (FG_DSCORE_FINITE, or FG_SCORE_CORE_DSCORE_FINITE for the affine form's core:
// attention/float_ranges.h). Then dS * d needs no test of dS for zero first (0 * d differs from 0 only for an
// infinite or NaN d; where the score is NaN, P and dS are NaN already): the interior copies of the tensor-core
// steps (kAllValid, FG_BWD_INTERIOR_STEP) take the product untested. (Not the copies that select on validity: an
// invalid entry's d comes from whatever its registers held and needs the selection too, and with both ptxas kept
// the validity bits in a register, +1.5 instructions an entry in the dQ step of a diagonal chunk.)
// Not with captured-tensor gradients (their sinks take dS before the product). The same values up to the sign of a
// zero. The host's FLEXGRAD_FLEX_BWD_FINITE_DSCORE=0 defines FG_NO_FINITE_DSCORE.
#if defined(FG_NO_FINITE_DSCORE) || !FG_ENTRY_MERGED || FG_CAP_MODE != 0
#define FG_BWD_DSCORE_FINITE 0
#elif FG_BWD_SCORE_AFFINE
#define FG_BWD_DSCORE_FINITE FG_SCORE_CORE_DSCORE_FINITE
#else
#define FG_BWD_DSCORE_FINITE FG_DSCORE_FINITE
#endif
// Where d score_mod / d score is a constant and no captured tensor takes a gradient, dS needs nothing of the
// element but P, dP and validity: fg_entry splits into fg_entry_p (P, from the score alone) and fg_entry_ds,
// so that a kernel can compute P while its dP product is still running (the wgmma dQ kernel). The two halves
// compute exactly what fg_entry computes for such programs (kept beside it: the dK/dV kernels, at their
// register limit, keep fg_entry's code shape, which ptxas allocates with fewer spills).
#define FG_SPLIT_ENTRY (FG_CAP_MODE == 0 && FG_DSCORE_IS_CONSTANT)
#if FG_SPLIT_ENTRY
// P of one entry; `valid` (in: inside the sequence and the block) comes out false where a partial block's
// mask_mod drops it. P = 0 where not valid.
// (FG_DQ_P_EARLY: P = -0 where not valid, which fg_entry_ds tests.)
#if FG_DQ_P_EARLY
#define FG_P_INVALID (-(fg_t)0)
#else
#define FG_P_INVALID ((fg_t)0)
#endif
__device__ __forceinline__ fg_t fg_entry_p(fg_t s, fg_t exp_factor, fg_t lse2, bool& valid, bool partial,
                                           const FgRowMods<fg_t>& r, const FgColMods<fg_t>& c, int b, int h, int qi,
                                           int kj, const FgModArgs& args) {
#if FG_HAS_MASK_MOD
  fg_mask_entry(valid, partial, r, c, b, h, qi, kj, args);
#endif
#if FG_HAS_SCORE_MOD || !FG_USE_MMA
  if (!valid) return FG_P_INVALID;
#if FG_HAS_SCORE_MOD
  const fg_t sm = fg_score_elem<fg_t>(s, r.s, c.s, b, h, qi, kj, args);
#else
  const fg_t sm = s;
#endif
  return fg_exp2_t(sm * exp_factor - lse2);
#else
  // Without a score_mod nothing here reads memory and ex2.approx is one instruction: P is computed for every
  // entry and selected (fewer instructions than predicating each one; the same value where valid). (fg_entry,
  // which the dK/dV kernels run at their register limit, keeps the predicated form: ptxas spilled more there.)
  const fg_t e = fg_exp2_t(s * exp_factor - lse2);
  return valid ? e : FG_P_INVALID;
#endif
}
// dS of one entry from its P (fg_entry_p), dP, the row's delta and its validity.
__device__ __forceinline__ fg_t fg_entry_ds(fg_t p, fg_t dp, fg_t delta, bool valid) {
  fg_t ds = valid ? p * (dp - delta) : (fg_t)0;  // w.r.t. the modified score
  return ds * (fg_t)FG_DSCORE_CONSTANT;
}
#if FG_DQ_P_EARLY
// The same from a P that is -0 where the entry is not valid (a valid entry's P, 2^x, is never -0): a bit test where
// the validity bit was. (Not p * (dp - delta) alone: 0 * a non-finite dP of a masked entry would be NaN.)
__device__ __forceinline__ fg_t fg_entry_ds(fg_t p, fg_t dp, fg_t delta) {
  return fg_entry_ds(p, dp, delta, __float_as_uint(p) != 0x80000000u);
}
#endif
#endif
template <class Sink, bool kAllValid = false, bool kFast = false>
__device__ __forceinline__ fg_t fg_entry(fg_t s, fg_t exp_factor, fg_t dp, fg_t lse2, fg_t delta, bool valid,
                                         bool partial, const FgRowMods<fg_t>& r, const FgColMods<fg_t>& c, int b,
                                         int h, int qi, int kj, const FgModArgs& args, fg_t* ds_out,
                                         const Sink* sink) {
#if FG_HAS_MASK_MOD
  fg_mask_entry(valid, partial, r, c, b, h, qi, kj, args);
#endif
  fg_t p = 0, ds = 0;
#if FG_ENTRY_MERGED
  fg_t dscore = 0;  // d score_mod / d score at s
#endif
#if FG_ENTRY_MERGED && FG_SCORE_ELEM_PURE
  // The merged element reads nothing and cannot fail (FG_SCORE_ELEM_PURE): it is computed for every entry and
  // selected, as fg_mask_entry's pure masks, so that ptxas predicates the step. Guarded by `valid`, a softcap's
  // step with tanh.approx and div.full (FlexKernelOptions::approx_math) went straight-line inside the guard and
  // the warp-specialised dK/dV consumers spilled 156 bytes within it (~26 instructions an entry); selected, none
  // (~20; the exact tanhf and __fdiv_rn ~45 -> ~38; sm_90a, nvcc 13.0, offline). Same values where valid, 0 elsewhere.
  {
    const fg_t sm = fg_entry_mod_dscore<kFast>(s, r, c, b, h, qi, kj, args, &dscore);
    const fg_t e = fg_exp2_t(sm * exp_factor - lse2);
    p = valid ? e : (fg_t)0;
    ds = valid ? e * (dp - delta) : (fg_t)0;  // w.r.t. the modified score
  }
#else
  if (valid) {
#if FG_ENTRY_MERGED
    const fg_t sm = fg_entry_mod_dscore<kFast>(s, r, c, b, h, qi, kj, args, &dscore);
#elif FG_HAS_SCORE_MOD
    const fg_t sm = fg_score_elem<fg_t>(s, r.s, c.s, b, h, qi, kj, args);
#else
    const fg_t sm = s;
#endif
    p = fg_exp2_t(sm * exp_factor - lse2);
    ds = p * (dp - delta);  // w.r.t. the modified score
  }
#endif
#if FG_CAP_MODE != 0
  if (sink != nullptr && ds != (fg_t)0) fg_entry_cap(*sink, s, ds, b, h, qi, kj, args);
#endif
#if FG_DSCORE_IS_CONSTANT
  ds *= (fg_t)FG_DSCORE_CONSTANT;
#elif FG_ENTRY_MERGED
  if ((FG_BWD_DSCORE_FINITE && kAllValid) || ds != (fg_t)0) ds *= dscore;
#else
  if (ds != (fg_t)0) ds *= fg_dscore<fg_t>(s, b, h, qi, kj, args);
#endif
  *ds_out = ds;
  return p;
}

// Row r's delta from its rowsum(dO * O): less dlse where the lse has a gradient. (fg_bwd_preprocess's, and the
// warp-specialised dQ kernel's with FG_BWD_DQ_DELTA: one expression, so the same bits.)
__device__ __forceinline__ fg_t fg_row_delta(const FgBwdParams& p, fg_i64 r, fg_t dot) {
  return p.dlse != nullptr ? dot - p.dlse[r] : dot;
}

// delta = rowsum(out * dout) (- dlse) and lse2 = fg_lse2(lse), a row per `lanes` lanes. With FG_PRE_VEC (16-bit
// inputs whose rows of FG_EV elements are 16-byte aligned, FG_EV a multiple of 8; the host checks) a lane loads 8
// elements at once and a warp takes FG_PRE_ROWS rows (4 at Ev 64, 2 at 128): a warp a row with 2-byte loads read O
// and dO at ~2.6 TB/s on the H200 (ncu, session 11: 51 us of the document backward's ~1.07 ms). The host launches
// FG_PRE_ROWS rows a warp, 8 warps a CTA.
#ifndef FG_PRE_VEC
#define FG_PRE_VEC 0
#endif
#if FG_PRE_VEC
#if FG_IN_DTYPE == FG_DT_FLOAT64 || FG_IN_DTYPE == FG_DT_FLOAT32 || FG_EV % 8 != 0
#error "fg_bwd_preprocess: FG_PRE_VEC takes 16-bit inputs with FG_EV a multiple of 8"
#endif
#define FG_PRE_VECS (FG_EV / 8)  // 16-byte vectors a row
#define FG_PRE_ROWS (FG_PRE_VECS < 32 && 32 % FG_PRE_VECS == 0 ? 32 / FG_PRE_VECS : 1)
__device__ __forceinline__ float fg_dot8(const uint4& a, const uint4& b) {
  const unsigned x[4] = {a.x, a.y, a.z, a.w}, y[4] = {b.x, b.y, b.z, b.w};
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float a0, a1, b0, b1;
    fg_unpack2<FG_IN_DTYPE == FG_DT_BFLOAT16>(x[i], a0, a1);
    fg_unpack2<FG_IN_DTYPE == FG_DT_BFLOAT16>(y[i], b0, b1);
    acc = fmaf(a0, b0, acc);
    acc = fmaf(a1, b1, acc);
  }
  return acc;
}
// The same delta sum of one row by a quad (lanes t = 0..3 of 4 consecutive), bit for bit: lane s of the preprocess
// holds fg_dot8 of vector s and the butterfly adds lane s ^ m for m = FG_PRE_VECS / 2 .. 1; here lane t adds its
// vectors t + 4 k in that order for m down to 4, then the quad's shuffles do m = 2 and 1. Every lane of the warp
// calls it (it shuffles); `valid` false reads nothing and gives the quad 0. Used by fg_bwd_dq_wgmma_ws
// (FG_BWD_DQ_DELTA, flex_backward_wgmma.cuh).
#if FG_PRE_VECS >= 4 && FG_PRE_ROWS > 1
__device__ __forceinline__ float fg_row_dot_quad(const fg_s* o_row, const fg_s* d_row, bool valid, int t) {
  constexpr int n = FG_PRE_VECS / 4;
  const uint4* o = (const uint4*)o_row;
  const uint4* d = (const uint4*)d_row;
  float v[n];
#pragma unroll
  for (int k = 0; k < n; ++k) v[k] = valid ? fg_dot8(o[t + 4 * k], d[t + 4 * k]) : 0.f;
#pragma unroll
  for (int m = n / 2; m >= 1; m /= 2)
#pragma unroll
    for (int k = 0; k < m; ++k) v[k] = v[k] + v[k + m];
  float acc = v[0];
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  return acc;
}
#endif
#else
#define FG_PRE_ROWS 1
#endif
extern "C" __global__ void fg_bwd_preprocess(const FgBwdParams p) {
  constexpr int lanes = 32 / FG_PRE_ROWS;  // a row's lanes: a power of two
  const fg_i64 rows = p.B * p.Hq * p.Lq;
  const fg_i64 r = ((fg_i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32) * FG_PRE_ROWS + fg_lane() / lanes;
  const int sub = fg_lane() % lanes;
  fg_t acc = 0;
  if (r < rows) {
#if FG_PRE_VEC
    const uint4* o = (const uint4*)(p.out + r * FG_EV);
    const uint4* d = (const uint4*)(p.dout + r * FG_EV);
    for (int v = sub; v < FG_PRE_VECS; v += lanes) acc += fg_dot8(o[v], d[v]);
#else
    const fg_s* o = p.out + r * FG_EV;
    const fg_s* d = p.dout + r * FG_EV;
    for (int e = sub; e < FG_EV; e += lanes) acc += fg_ld(o + e) * fg_ld(d + e);
#endif
  }
#pragma unroll
  for (int s = lanes / 2; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);  // within the row's lanes
  if (sub == 0 && r < rows) {
    p.delta[r] = fg_row_delta(p, r, acc);
    p.lse2[r] = fg_lse2(p.lse[r]);
  }
}

// ---- fixed point -> float64 (FG_CAP_MODE 1)
extern "C" __global__ void fg_bwd_cap_finalize(const fg_u64* acc, double* out, fg_i64 n, double inv_scale, int nonfinite) {
  const fg_i64 i = (fg_i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = nonfinite ? __longlong_as_double(0x7ff8000000000000ll) : (double)(long long)acc[i] * inv_scale;
}

#if !FG_USE_MMA
// ================= SIMT kernels: exact fp32 FFMA (or float64), any head dim up to 256 =================
// Shared memory: K [BKV][E+1], V [BKV][EV+1], Q [BQ][E+1], dO [BQ][EV+1], P and dS [BQ][BKV+1], lse and
// delta [BQ], all fg_t (rows padded by one element against bank conflicts). Each thread owns a fixed
// set of the dK/dV (or dQ) accumulator elements, in registers.
#define FG_EP (FG_E + 1)
#define FG_EVP (FG_EV + 1)
#define FG_BKVP (FG_BKV + 1)
#define FG_SQ (FG_BQ / 16)   // score rows per thread (16 x 16 thread grid over the tile)
#define FG_SK (FG_BKV / 16)  // score cols per thread

struct FgSimtSmem {
  fg_t *K, *V, *Q, *dO, *P, *dS, *lse, *delta;
};
__device__ __forceinline__ FgSimtSmem fg_simt_smem(fg_t* base) {
  FgSimtSmem s;
  s.K = base;
  s.V = s.K + FG_BKV * FG_EP;
  s.Q = s.V + FG_BKV * FG_EVP;
  s.dO = s.Q + FG_BQ * FG_EP;
  s.P = s.dO + FG_BQ * FG_EVP;
  s.dS = s.P + FG_BQ * FG_BKVP;
  s.lse = s.dS + FG_BQ * FG_BKVP;
  s.delta = s.lse + FG_BQ;
  return s;
}

// rows [r0, r0 + n) of a [L, D] slice with row stride ld into dst [ROWS][D + 1]; rows past n are zero.
template <int ROWS, int D>
__device__ __forceinline__ void fg_simt_load(fg_t* dst, const fg_s* src, fg_i64 ld, fg_i64 r0, int n) {
  for (int i = threadIdx.x; i < ROWS * D; i += FG_NT) {
    const int r = i / D, c = i % D;
    dst[r * (D + 1) + c] = r < n ? fg_ld(src + (r0 + r) * ld + c) : (fg_t)0;
  }
}

// The score tile: S = scale Q K^T, dP = dO V^T, then P and dS (pre-mod) into shared memory.
template <class Sink>
__device__ __forceinline__ void fg_simt_scores(const FgBwdParams& p, const FgModArgs& args, const FgSimtSmem& sm,
                                               int b, int h, fg_i64 q0, int nq, fg_i64 kv0, int nkv, bool partial,
                                               const Sink* sink) {
  const int ti = threadIdx.x / 16, tj = threadIdx.x % 16;
  fg_t s[FG_SQ][FG_SK], dp[FG_SQ][FG_SK];
#pragma unroll
  for (int a = 0; a < FG_SQ; ++a)
#pragma unroll
    for (int c = 0; c < FG_SK; ++c) s[a][c] = dp[a][c] = 0;
  for (int e = 0; e < FG_E; ++e) {
    fg_t qv[FG_SQ], kv[FG_SK];
#pragma unroll
    for (int a = 0; a < FG_SQ; ++a) qv[a] = sm.Q[(ti + 16 * a) * FG_EP + e];
#pragma unroll
    for (int c = 0; c < FG_SK; ++c) kv[c] = sm.K[(tj + 16 * c) * FG_EP + e];
#pragma unroll
    for (int a = 0; a < FG_SQ; ++a)
#pragma unroll
      for (int c = 0; c < FG_SK; ++c) s[a][c] += qv[a] * kv[c];
  }
  for (int e = 0; e < FG_EV; ++e) {
    fg_t ov[FG_SQ], vv[FG_SK];
#pragma unroll
    for (int a = 0; a < FG_SQ; ++a) ov[a] = sm.dO[(ti + 16 * a) * FG_EVP + e];
#pragma unroll
    for (int c = 0; c < FG_SK; ++c) vv[c] = sm.V[(tj + 16 * c) * FG_EVP + e];
#pragma unroll
    for (int a = 0; a < FG_SQ; ++a)
#pragma unroll
      for (int c = 0; c < FG_SK; ++c) dp[a][c] += ov[a] * vv[c];
  }
  FgRowMods<fg_t> rm[FG_SQ];
#pragma unroll
  for (int a = 0; a < FG_SQ; ++a)
    if (ti + 16 * a < nq) fg_row_mods(rm[a], true, partial, b, h, (int)(q0 + ti + 16 * a), args);
#pragma unroll
  for (int c = 0; c < FG_SK; ++c) {
    const int j = tj + 16 * c;
    const FgColMods<fg_t> cm = fg_col_mods<fg_t>(j < nkv, partial, b, h, (int)(kv0 + j), args);
#pragma unroll
    for (int a = 0; a < FG_SQ; ++a) {
      const int i = ti + 16 * a;
      fg_t ds;
      const fg_t pv = fg_entry<Sink>(s[a][c] * (fg_t)p.scale, (fg_t)FG_LOG2E_D, dp[a][c], sm.lse[i], sm.delta[i],
                                     i < nq && j < nkv, partial, rm[a], cm, b, h, (int)(q0 + i), (int)(kv0 + j), args,
                                     &ds, sink);
      sm.P[i * FG_BKVP + j] = pv;
      sm.dS[i * FG_BKVP + j] = ds;
    }
  }
}

// Q, dO, lse (as lse2) and delta of rows [q0, q0 + nq) of (b, h); rows past nq give P = 0.
__device__ __forceinline__ void fg_simt_load_q(const FgBwdParams& p, const FgSimtSmem& sm, fg_i64 b, fg_i64 h,
                                               fg_i64 q0, int nq) {
  fg_simt_load<FG_BQ, FG_E>(sm.Q, p.q + b * p.qs_b + h * p.qs_h, p.qs_l, q0, nq);
  const fg_i64 row0 = (b * p.Hq + h) * p.Lq + q0;
  fg_simt_load<FG_BQ, FG_EV>(sm.dO, p.dout + row0 * FG_EV, FG_EV, 0, nq);
  for (int i = threadIdx.x; i < FG_BQ; i += FG_NT) {
    sm.lse[i] = i < nq ? p.lse2[row0 + i] : -(fg_t)FG_NEG_INF;
    sm.delta[i] = i < nq ? p.delta[row0 + i] : (fg_t)0;
  }
}

#define FG_NKACC ((FG_BKV * FG_E + FG_NT - 1) / FG_NT)
#define FG_NVACC ((FG_BKV * FG_EV + FG_NT - 1) / FG_NT)

extern "C" __global__ void __launch_bounds__(FG_NT) fg_bwd_dkdv(const FgBwdParams p, const FgModArgs args) {
  extern __shared__ __align__(16) unsigned char fg_smem_raw[];
  const FgSimtSmem sm = fg_simt_smem((fg_t*)fg_smem_raw);
  const fg_i64 mb = blockIdx.x / p.sub_kv;  // BlockMask kv block
  const fg_i64 kv0 = mb * p.block_kv + (blockIdx.x % p.sub_kv) * FG_BKV;
  const fg_i64 kv_end = min(min(mb * p.block_kv + p.block_kv, kv0 + (fg_i64)FG_BKV), p.Lkv);
  if (kv0 >= kv_end) return;
  const int nkv = (int)(kv_end - kv0);
  const fg_i64 hk = blockIdx.y, bk = blockIdx.z;
  fg_simt_load<FG_BKV, FG_E>(sm.K, p.k + bk * p.ks_b + hk * p.ks_h, p.ks_l, kv0, nkv);
  fg_simt_load<FG_BKV, FG_EV>(sm.V, p.v + bk * p.vs_b + hk * p.vs_h, p.vs_l, kv0, nkv);
  fg_t dk[FG_NKACC], dv[FG_NVACC];
#pragma unroll
  for (int r = 0; r < FG_NKACC; ++r) dk[r] = 0;
#pragma unroll
  for (int r = 0; r < FG_NVACC; ++r) dv[r] = 0;
  const FgMaxSink max_sink = fg_dkdv_sink(p);
  const FgMaxSink* sink = FG_CAP_MODE == 1 ? &max_sink : nullptr;
  const fg_i64 b_lo = p.Bkv == 1 ? 0 : bk, b_hi = p.Bkv == 1 ? p.B : bk + 1;
  for (fg_i64 b = b_lo; b < b_hi; ++b) {
    for (fg_i64 h = hk * p.G; h < (hk + 1) * p.G; ++h) {
      const FgRow row = fg_row(p.ql, b, h, mb);
      for (int bi = 0; bi < row.size(); ++bi) {
        const fg_i64 qlo = (fg_i64)row.at(bi) * p.block_q, qhi = min(qlo + p.block_q, p.Lq);
        for (fg_i64 q0 = qlo; q0 < qhi; q0 += FG_BQ) {
          const int nq = (int)min((fg_i64)FG_BQ, qhi - q0);
          __syncthreads();  // the previous tile's readers are done
          fg_simt_load_q(p, sm, b, h, q0, nq);
          __syncthreads();
          fg_simt_scores<FgMaxSink>(p, args, sm, (int)b, (int)h, q0, nq, kv0, nkv, bi < row.n_partial, sink);
          __syncthreads();
          // dV += P^T dO, dK += dS^T Q (scale applied at the end)
#pragma unroll
          for (int r = 0; r < FG_NVACC; ++r) {
            const int idx = threadIdx.x + r * FG_NT, j = idx / FG_EV, e = idx % FG_EV;
            if (idx < FG_BKV * FG_EV) {
              fg_t a = dv[r];
              for (int i = 0; i < nq; ++i) a += sm.P[i * FG_BKVP + j] * sm.dO[i * FG_EVP + e];
              dv[r] = a;
            }
          }
#pragma unroll
          for (int r = 0; r < FG_NKACC; ++r) {
            const int idx = threadIdx.x + r * FG_NT, j = idx / FG_E, e = idx % FG_E;
            if (idx < FG_BKV * FG_E) {
              fg_t a = dk[r];
              for (int i = 0; i < nq; ++i) a += sm.dS[i * FG_BKVP + j] * sm.Q[i * FG_EP + e];
              dk[r] = a;
            }
          }
        }
      }
    }
  }
  const fg_i64 kvrow = (bk * p.Hkv + hk) * p.Lkv + kv0;
#pragma unroll
  for (int r = 0; r < FG_NVACC; ++r) {
    const int idx = threadIdx.x + r * FG_NT, j = idx / FG_EV, e = idx % FG_EV;
    if (idx < FG_BKV * FG_EV && j < nkv) p.dv[(kvrow + j) * FG_EV + e] = fg_cvt_out(dv[r]);
  }
#pragma unroll
  for (int r = 0; r < FG_NKACC; ++r) {
    const int idx = threadIdx.x + r * FG_NT, j = idx / FG_E, e = idx % FG_E;
    if (idx < FG_BKV * FG_E && j < nkv) p.dk[(kvrow + j) * FG_E + e] = fg_cvt_out(dk[r] * (fg_t)p.scale);
  }
}

#define FG_NQACC ((FG_BQ * FG_E + FG_NT - 1) / FG_NT)

extern "C" __global__ void __launch_bounds__(FG_NT) fg_bwd_dq(const FgBwdParams p, const FgModArgs args) {
  extern __shared__ __align__(16) unsigned char fg_smem_raw[];
  const FgSimtSmem sm = fg_simt_smem((fg_t*)fg_smem_raw);
  const fg_i64 mb = blockIdx.x / p.sub_q;  // BlockMask q block
  const fg_i64 q0 = mb * p.block_q + (blockIdx.x % p.sub_q) * FG_BQ;
  const fg_i64 q_end = min(min(mb * p.block_q + p.block_q, q0 + (fg_i64)FG_BQ), p.Lq);
  if (q0 >= q_end) return;
  const int nq = (int)(q_end - q0);
  const fg_i64 h = blockIdx.y, b = blockIdx.z;
  const fg_i64 bk = p.Bkv == 1 ? 0 : b, hk = h / p.G;
  fg_simt_load_q(p, sm, b, h, q0, nq);
  fg_t dq[FG_NQACC];
#pragma unroll
  for (int r = 0; r < FG_NQACC; ++r) dq[r] = 0;
  const FgDqSink cap_sink = fg_dq_sink(p);
  const FgDqSink* sink = FG_CAP_MODE != 0 ? &cap_sink : nullptr;
  const FgRow row = fg_row(p.kvl, b, h, mb);
  for (int bi = 0; bi < row.size(); ++bi) {
    const fg_i64 klo = (fg_i64)row.at(bi) * p.block_kv, khi = min(klo + p.block_kv, p.Lkv);
    for (fg_i64 kv0 = klo; kv0 < khi; kv0 += FG_BKV) {
      const int nkv = (int)min((fg_i64)FG_BKV, khi - kv0);
      __syncthreads();
      fg_simt_load<FG_BKV, FG_E>(sm.K, p.k + bk * p.ks_b + hk * p.ks_h, p.ks_l, kv0, nkv);
      fg_simt_load<FG_BKV, FG_EV>(sm.V, p.v + bk * p.vs_b + hk * p.vs_h, p.vs_l, kv0, nkv);
      __syncthreads();
      fg_simt_scores(p, args, sm, (int)b, (int)h, q0, nq, kv0, nkv, bi < row.n_partial, sink);
      __syncthreads();
#pragma unroll
      for (int r = 0; r < FG_NQACC; ++r) {  // dQ += dS K
        const int idx = threadIdx.x + r * FG_NT, i = idx / FG_E, e = idx % FG_E;
        if (idx < FG_BQ * FG_E) {
          fg_t a = dq[r];
          for (int j = 0; j < nkv; ++j) a += sm.dS[i * FG_BKVP + j] * sm.K[j * FG_EP + e];
          dq[r] = a;
        }
      }
    }
  }
  const fg_i64 row0 = (b * p.Hq + h) * p.Lq + q0;
#pragma unroll
  for (int r = 0; r < FG_NQACC; ++r) {
    const int idx = threadIdx.x + r * FG_NT, i = idx / FG_E, e = idx % FG_E;
    if (idx < FG_BQ * FG_E && i < nq) p.dq[(row0 + i) * FG_E + e] = fg_cvt_out(dq[r] * (fg_t)p.scale);
  }
}
#endif  // !FG_USE_MMA

#if FG_USE_MMA
// ================= tensor-core kernels: bf16 / f16, head dims multiples of 16 up to 128 =================
// As FlashAttention-2's backward, with dQ in its own kernel instead of float atomics.
//   fg_bwd_dkdv: warp w owns kv rows [16w, 16w + 16) of the block's FG_KV_TILE rows and keeps their dK
//     and dV accumulators (fp32) in registers. Per q chunk of FG_Q_CHUNK rows (Q, dO, lse, delta in
//     shared memory, double-buffered with cp.async): S^T = K Q^T and dP^T = V dO^T on tensor cores,
//     P^T and dS^T element-wise in registers, then dV += P^T dO and dK += dS^T Q with P^T / dS^T
//     repacked from accumulator to A-operand fragments (no shared-memory round trip).
//   fg_bwd_dq: warp w owns q rows [16w, 16w + 16) of FG_Q_TILE; per kv chunk of FG_KV_CHUNK rows (K, V
//     double-buffered): S = Q K^T, dP = dO V^T, dS element-wise (captured gradients here), dQ += dS K.
// Shared tiles are row-major with rows padded by 16 bytes (FG_SMEM_PAD_B16): conflict-free ldmatrix.
#define FG_BF16 (FG_IN_DTYPE == FG_DT_BFLOAT16)
#define FG_LDE (FG_E + FG_SMEM_PAD_B16)
#define FG_LDEV (FG_EV + FG_SMEM_PAD_B16)

__device__ __forceinline__ void fg_cp_async4(unsigned smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes) : "memory");
}

// Rows [r0, r0 + n) of a [L, D] 16-bit slice (row stride ld elements) -> dst [ROWS][D + pad] by cp.async;
// rows past n are zero-filled.
template <int ROWS, int D, int NT>
__device__ __forceinline__ void fg_mma_load(fg_s* dst, const fg_s* src, fg_i64 ld, fg_i64 r0, int n) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < ROWS * CH; i += NT) {
    const int r = i / CH, c = i % CH;
    const bool ok = r < n;
    fg_cp_async16(fg_smem_addr(dst + r * (D + FG_SMEM_PAD_B16) + c * 8), ok ? src + (r0 + r) * ld + c * 8 : src, ok);
  }
}

// Walks the (b, h, block, chunk) steps of one dK/dV block: the q heads of the GQA group, the batches
// broadcast onto the kv batch, the q blocks of the transposed list (partial first), FG_Q_CHUNK rows at a
// time clipped to the block and to Lq. Uniform across the block.
struct FgQWalk {
  fg_i64 b, b_hi, h, h_lo, h_hi, mb, q0, qhi;
  int bi;
  FgRow row;
  __device__ __forceinline__ bool done() const { return b >= b_hi; }
  __device__ __forceinline__ bool partial() const { return bi < row.n_partial; }
  __device__ __forceinline__ int nq() const { return (int)min((fg_i64)FG_Q_CHUNK, qhi - q0); }
  __device__ void settle(const FgBwdParams& p) {  // first chunk at or after (b, h, bi)
    while (b < b_hi) {
      for (; bi < row.size(); ++bi) {
        const fg_i64 qlo = (fg_i64)row.at(bi) * p.block_q;
        qhi = min(qlo + p.block_q, p.Lq);
        if (qlo < qhi) {
          q0 = qlo;
          return;
        }
      }
      if (++h == h_hi) {
        h = h_lo;
        ++b;
      }
      if (b < b_hi) {
        row = fg_row(p.ql, b, h, mb);
        bi = 0;
      }
    }
  }
  __device__ void start(const FgBwdParams& p, fg_i64 bk, fg_i64 hk, fg_i64 mb_) {
    mb = mb_;
    b = p.Bkv == 1 ? 0 : bk;
    b_hi = p.Bkv == 1 ? p.B : bk + 1;
    h_lo = h = hk * p.G;
    h_hi = h_lo + p.G;
    row = fg_row(p.ql, b, h, mb);
    bi = 0;
    settle(p);
  }
  // True only where no chunk follows this one (false may still be the last: rows and blocks past the sequence).
  __device__ __forceinline__ bool last() const {
    return q0 + FG_Q_CHUNK >= qhi && bi + 1 >= row.size() && h + 1 == h_hi && b + 1 >= b_hi;
  }
  __device__ void next(const FgBwdParams& p) {
    q0 += FG_Q_CHUNK;
    if (q0 < qhi) return;
    ++bi;
    settle(p);
  }
};

// The kv chunks of one dQ block: kv blocks of its list row (partial first), FG_KV_CHUNK rows at a time.
struct FgKvWalk {
  fg_i64 kv0, khi;
  int bi;
  FgRow row;
  __device__ __forceinline__ bool done() const { return bi >= row.size(); }
  __device__ __forceinline__ bool partial() const { return bi < row.n_partial; }
  __device__ __forceinline__ int nkv() const { return (int)min((fg_i64)FG_KV_CHUNK, khi - kv0); }
  __device__ void settle(const FgBwdParams& p) {
    for (; bi < row.size(); ++bi) {
      const fg_i64 klo = (fg_i64)row.at(bi) * p.block_kv;
      khi = min(klo + p.block_kv, p.Lkv);
      if (klo < khi) {
        kv0 = klo;
        return;
      }
    }
  }
  __device__ void start(const FgBwdParams& p, fg_i64 b, fg_i64 h, fg_i64 mb) {  // q block mb of (b, h)
    row = fg_row(p.kvl, b, h, mb);
    bi = 0;
    settle(p);
  }
  // True only where no chunk follows this one (false may still be the last: blocks past the sequence).
  __device__ __forceinline__ bool last() const { return kv0 + FG_KV_CHUNK >= khi && bi + 1 >= row.size(); }
  __device__ void next(const FgBwdParams& p) {
    kv0 += FG_KV_CHUNK;
    if (kv0 < khi) return;
    ++bi;
    settle(p);
  }
};

#define FG_NQN (FG_Q_CHUNK / 8)   // n8 blocks of S^T in dK/dV
#define FG_NKN (FG_KV_CHUNK / 8)  // n8 blocks of S in dQ

#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
#define FG_BWD_MODS(x) (x)
#else
#define FG_BWD_MODS(x) nullptr  // (the mods' parts are not kept without mods)
#endif

// The column parts of a lane's two kv rows kr0 + g (+ 8) for one q chunk of the dK/dV kernels (b and h change
// along the walk, so per chunk; the wgmma kernel computes them while the chunk's score products run).
__device__ __forceinline__ void fg_dkdv_col_parts(FgColMods<float> (&cm)[2], int kr0, int g, int nkv, bool partial,
                                                  int b, int h, fg_i64 kv0, const FgModArgs& args) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = kr0 + g + 8 * half;
    cm[half] = fg_col_mods<float>(j < nkv, partial, b, h, (int)(kv0 + j), args);
  }
}

// A CTA of a kernel's grid: its own (fg_this_cta), or one a persistent kernel runs in its place
// (fg_for_each_cta, flex_backward_wgmma.cuh).
struct FgCta {
  unsigned x, y, z;
};
__device__ __forceinline__ FgCta fg_this_cta() {
  FgCta c;
  c.x = blockIdx.x;
  c.y = blockIdx.y;
  c.z = blockIdx.z;
  return c;
}
// The dK/dV kernels' CTA `c`: kv batch bk, head hk, BlockMask kv block mb and its rows kv0 .. kv0 + nkv (a tile of
// FG_KV_TILE); false for a tile past its block's end. With FgBwdParams::dkdv_group n > 0 (the wgmma kernels; the
// mma.sync ones launch the 3-d grid) the grid is one dimension in groups of n pairs, the pairs fastest: the
// CTAs running at once hold a few kv tiles of many heads rather than every tile of a few heads, so that the fused
// dQ's atomics of CTAs running together rarely meet on one dQ row.
__device__ __forceinline__ bool fg_dkdv_tile(const FgBwdParams& p, const FgCta& c, fg_i64& bk, fg_i64& hk, fg_i64& mb,
                                             fg_i64& kv0, int& nkv) {
  fg_i64 tile;
  if (p.dkdv_group == 0) {
    tile = c.x;
    hk = c.y;
    bk = c.z;
  } else {
    const fg_i64 ntile = (p.Lkv + p.block_kv - 1) / p.block_kv * p.sub_kv, nbh = p.Bkv * p.Hkv;
    const fg_i64 grp = c.x / (p.dkdv_group * ntile), in = c.x - grp * p.dkdv_group * ntile;
    const fg_i64 gsize = min(p.dkdv_group, nbh - grp * p.dkdv_group);
    tile = in / gsize;
    const fg_i64 bh = grp * p.dkdv_group + in % gsize;
    bk = bh / p.Hkv;
    hk = bh % p.Hkv;
  }
  mb = tile / p.sub_kv;
  kv0 = mb * p.block_kv + (tile % p.sub_kv) * FG_KV_TILE;
  const fg_i64 kv_end = min(min(mb * p.block_kv + p.block_kv, kv0 + (fg_i64)FG_KV_TILE), p.Lkv);
  nkv = (int)(kv_end - kv0);
  return kv0 < kv_end;
}
__device__ __forceinline__ bool fg_dkdv_cta(const FgBwdParams& p, fg_i64& bk, fg_i64& hk, fg_i64& mb, fg_i64& kv0,
                                            int& nkv) {
  return fg_dkdv_tile(p, fg_this_cta(), bk, hk, mb, kv0, nkv);
}
// The dQ kernels' CTA `c` of a grid nx wide: BlockMask q block mb and its rows q0 .. q0 + nq (a tile of FG_Q_TILE);
// false for a tile past its block's end. Last q blocks first: under a causal mask they have the most kv blocks
// (longest jobs start first).
__device__ __forceinline__ bool fg_dq_tile(const FgBwdParams& p, const FgCta& c, fg_i64 nx, fg_i64& mb, fg_i64& q0,
                                           int& nq) {
  const fg_i64 bx = nx - 1 - c.x;
  mb = bx / p.sub_q;
  q0 = mb * p.block_q + (bx % p.sub_q) * FG_Q_TILE;
  const fg_i64 q_end = min(min(mb * p.block_q + p.block_q, q0 + (fg_i64)FG_Q_TILE), p.Lq);
  nq = (int)(q_end - q0);
  return q0 < q_end;
}
__device__ __forceinline__ bool fg_dq_cta(const FgBwdParams& p, fg_i64& mb, fg_i64& q0, int& nq) {
  return fg_dq_tile(p, fg_this_cta(), gridDim.x, mb, q0, nq);
}
// The tensor-core kernels' epilogues (mma.sync and wgmma alike: C-fragment accumulators, one writer per element).
// The lane's dK (scaled) and dV rows kr0 + g (+ 8) of the tile starting at row `kvrow` of [Bkv, Hkv, Lkv].
__device__ __forceinline__ void fg_dkdv_store(const FgBwdParams& p, const float (&dk)[FG_E / 8][4],
                                              const float (&dv)[FG_EV / 8][4], fg_i64 kvrow, int kr0, int g, int t,
                                              int nkv, float scale) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = kr0 + g + half * 8;
    if (j >= nkv) continue;
    unsigned* dvr = (unsigned*)(p.dv + (kvrow + j) * FG_EV);
    unsigned* dkr = (unsigned*)(p.dk + (kvrow + j) * FG_E);
#pragma unroll
    for (int nb = 0; nb < FG_EV / 8; ++nb) dvr[nb * 4 + t] = fg_pack2<FG_BF16>(dv[nb][2 * half], dv[nb][2 * half + 1]);
#pragma unroll
    for (int nb = 0; nb < FG_E / 8; ++nb)
      dkr[nb * 4 + t] = fg_pack2<FG_BF16>(dk[nb][2 * half] * scale, dk[nb][2 * half + 1] * scale);
  }
}
// The lane's dQ rows qr0 + g (+ 8) (scaled) of the tile starting at row `row0` of [B, Hq, Lq].
__device__ __forceinline__ void fg_dq_store(const FgBwdParams& p, const float (&dq)[FG_E / 8][4], fg_i64 row0, int qr0,
                                            int g, int t, const bool (&rv)[2], float scale) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    if (!rv[hf]) continue;
    unsigned* dqr = (unsigned*)(p.dq + (row0 + qr0 + g + 8 * hf) * FG_E);
#pragma unroll
    for (int nb = 0; nb < FG_E / 8; ++nb)
      dqr[nb * 4 + t] = fg_pack2<FG_BF16>(dq[nb][2 * hf] * scale, dq[nb][2 * hf + 1] * scale);
  }
}

#if FG_SCORE_ELEM_DSCORE_FAST
// Whether every dividend of the lane's entries of a dK/dV tile (fg_dkdv_entries' layout) is in the corrected form's
// range (fg_score_elem_dscore_fast_ok). Entries outside the sequence are tested on whatever their registers and parts
// hold: that can only send the lane to the exact form.
__device__ __forceinline__ bool fg_dkdv_fast_ok(const float (&st)[FG_NQN][4], const FgRowMods<float>* q_mods,
                                                const FgColMods<float> (&cm)[2], int kr0, int g, int t, int b, int h,
                                                fg_i64 q0, fg_i64 kv0, float scale, const FgModArgs& args) {
  bool ok = true;
#pragma unroll
  for (int nb = 0; nb < FG_NQN; ++nb)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int i = nb * 8 + 2 * t + c;
      const FgRowMods<float>& rm = q_mods[i];
#pragma unroll
      for (int half = 0; half < 2; ++half)
        ok &= fg_score_elem_dscore_fast_ok(fg_entry_score(st[nb][2 * half + c], scale), rm.s, cm[half].s, b, h,
                                           (int)(q0 + i), (int)(kv0 + kr0 + g + 8 * half), args);
    }
  return ok;
}
#endif

// The dK/dV kernels' element step (fg_bwd_dkdv, fg_bwd_dkdv_wgmma) on a warp's transposed tile as C fragments,
// kv rows kr0 + g (+ 8) against the chunk's q rows: st <- P^T, dpt <- dS^T (pre-mod). Lb / Db: the chunk's
// lse2 (fg_lse2) and delta; q_mods: the chunk's row parts (null without mods); cm: the lane's two column parts
// (fg_dkdv_col_parts). Q row by q row its row parts and the two entries. kInterior: every entry of the warp's
// rows is inside the sequence and a full block (no bounds, no mask_mod).
template <bool kInterior, class Sink, bool kFast = false>
__device__ __forceinline__ void fg_dkdv_entries(float (&st)[FG_NQN][4], float (&dpt)[FG_NQN][4], const float* Lb,
                                                const float* Db, const FgRowMods<float>* q_mods,
                                                const FgColMods<float> (&cm)[2], int kr0, int g, int t, int nq,
                                                int nkv, bool partial, int b, int h, fg_i64 q0, fg_i64 kv0,
                                                float scale, const FgModArgs& args, const Sink* sink) {
  const float ef = fg_exp_factor(scale);
#pragma unroll
  for (int nb = 0; nb < FG_NQN; ++nb) {
#if FG_DKDV_ROW_PAIRS
    // The general copy only: in the interior one (no predicate to share a load between entries) ptxas hoisted all
    // sixteen pairs and spilled (36 bytes with the document mask, 12 with the approximate softcap).
    constexpr bool pairs = !kInterior;
    // (8-byte aligned: the chunk's rows start 64 floats apart, each pair at an even row)
    const float2 l2_pair = pairs ? *reinterpret_cast<const float2*>(Lb + nb * 8 + 2 * t) : float2{};
    const float2 delta_pair = pairs ? *reinterpret_cast<const float2*>(Db + nb * 8 + 2 * t) : float2{};
#endif
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int i = nb * 8 + 2 * t + c;  // q row in the chunk
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
      const FgRowMods<float>& rm = q_mods[i];
#else
      (void)q_mods;
      const FgRowMods<float> rm;
#endif
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = 2 * half + c;
        const int j = kr0 + g + 8 * half;  // kv row in the tile
        const bool valid = kInterior || (i < nq && j < nkv);
#if FG_DKDV_ROW_PAIRS
        const float l2 = !pairs ? Lb[i] : c == 0 ? l2_pair.x : l2_pair.y;
        const float delta = !pairs ? Db[i] : c == 0 ? delta_pair.x : delta_pair.y;
#else
        const float l2 = valid ? Lb[i] : 0.f, delta = Db[i];
#endif
        float ds;
        st[nb][r] = fg_entry<Sink, kInterior, kFast>(fg_entry_score(st[nb][r], scale), ef, dpt[nb][r], l2, delta,
                                                     valid, !kInterior && partial, rm, cm[half], b, h, (int)(q0 + i),
                                                     (int)(kv0 + j), args, &ds, sink);
        dpt[nb][r] = ds;
      }
    }
  }
}
// fg_dkdv_entries' interior or general copy; kFast: the fast element functions (fg_dkdv_elements).
template <bool kFast, class Sink>
__device__ __forceinline__ void fg_dkdv_step(float (&st)[FG_NQN][4], float (&dpt)[FG_NQN][4], const float* Lb,
                                             const float* Db, const FgRowMods<float>* q_mods,
                                             const FgColMods<float> (&cm)[2], int kr0, int g, int t, int nq, int nkv,
                                             bool partial, int b, int h, fg_i64 q0, fg_i64 kv0, float scale,
                                             const FgModArgs& args, const Sink* sink) {
#if FG_DKDV_INTERIOR_STEP
  if (!partial && nq == FG_Q_CHUNK && kr0 + 16 <= nkv) {  // (the same for the whole warp)
    fg_dkdv_entries<true, Sink, kFast>(st, dpt, Lb, Db, q_mods, cm, kr0, g, t, nq, nkv, partial, b, h, q0, kv0, scale,
                                       args, sink);
    return;
  }
#endif
  fg_dkdv_entries<false, Sink, kFast>(st, dpt, Lb, Db, q_mods, cm, kr0, g, t, nq, nkv, partial, b, h, q0, kv0, scale,
                                      args, sink);
}
template <class Sink>
__device__ __forceinline__ void fg_dkdv_elements(float (&st)[FG_NQN][4], float (&dpt)[FG_NQN][4], const float* Lb,
                                                 const float* Db, const FgRowMods<float>* q_mods,
                                                 const FgColMods<float> (&cm)[2], int kr0, int g, int t, int nq,
                                                 int nkv, bool partial, int b, int h, fg_i64 q0, fg_i64 kv0,
                                                 float scale, const FgModArgs& args, const Sink* sink) {
#if FG_SCORE_ELEM_DSCORE_FAST
  // A division by a constant in its corrected form when every dividend of the lane's entries is in its range (one test
  // a lane and chunk, as the forward's fg_frag_mods_step), else in the exact form: no branch an entry either way.
  if (fg_dkdv_fast_ok(st, q_mods, cm, kr0, g, t, b, h, q0, kv0, scale, args)) {
    fg_dkdv_step<true>(st, dpt, Lb, Db, q_mods, cm, kr0, g, t, nq, nkv, partial, b, h, q0, kv0, scale, args, sink);
    return;
  }
#endif
  fg_dkdv_step<false>(st, dpt, Lb, Db, q_mods, cm, kr0, g, t, nq, nkv, partial, b, h, q0, kv0, scale, args, sink);
}

// Visits a warp's dQ tile as C fragments, q rows qr0 + g (+ 8) against the chunk's kv rows: f(s[nb][r] entry
// index nb, r; the lane's row half hf; the kv row j in the chunk; its column parts cm), kv row by kv row.
template <class F>
__device__ __forceinline__ void fg_dq_for_each(const FgColMods<float>* kv_mods, int t, F&& f) {
#pragma unroll
  for (int nb = 0; nb < FG_NKN; ++nb) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int j = nb * 8 + 2 * t + c;  // kv row in the chunk
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
      const FgColMods<float> cm = kv_mods[j];  // once for both q rows
#else
      (void)kv_mods;
      const FgColMods<float> cm;
#endif
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) f(nb, 2 * hf + c, hf, j, cm);
    }
  }
}

// The dQ kernels' element step (fg_bwd_dq, fg_bwd_dq_wgmma) on a warp's tile: s <- dS (pre-mod). l2 / dl / rv /
// rmods: the warp's two q rows' lse2, delta, validity and row parts; kv_mods: the chunk's column parts (null
// without mods). kInterior: every entry of the lane's rows is inside the sequence and a full block.
template <bool kInterior, class Sink, bool kFast = false>
__device__ __forceinline__ void fg_dq_entries(float (&s)[FG_NKN][4], const float (&dp)[FG_NKN][4], const float (&l2)[2],
                                              const float (&dl)[2], const bool (&rv)[2],
                                              const FgRowMods<float> (&rmods)[2], const FgColMods<float>* kv_mods,
                                              int qr0, int g, int t, int nkv, bool partial, int b, int h, fg_i64 q0,
                                              fg_i64 kv0, float scale, const FgModArgs& args, const Sink* sink) {
  const float ef = fg_exp_factor(scale);
#if FG_CAP_MODE != 0
  if (sink != nullptr) {
    // Captured gradients: the entries' contributions are recorded (FgCapDefer) and replayed below, entry by
    // entry in fg_dq_for_each's order, every lane of the warp at the same entry as the unrolled step had them
    // (the sinks' shuffles and atomics group the same lanes, so fixed-point sums are the same bits).
    float cs[FG_NKN * 4], cg[FG_NKN * 4];
    fg_dq_for_each(kv_mods, t, [&](int nb, int r, int hf, int j, const FgColMods<float>& cm) {
      const int i = qr0 + g + 8 * hf;  // q row in the tile
      const FgCapDefer defer{cs, cg, 4 * nb + r};
      cg[4 * nb + r] = 0.f;
      float ds;
      fg_entry<FgCapDefer, false, kFast>(fg_entry_score(s[nb][r], scale), ef, dp[nb][r], l2[hf], dl[hf],
                                         kInterior || (rv[hf] && j < nkv), !kInterior && partial, rmods[hf], cm, b, h,
                                         (int)(q0 + i), (int)(kv0 + j), args, &ds, &defer);
      s[nb][r] = ds;
    });
#pragma unroll 1
    for (int e = 0; e < FG_NKN * 4; ++e) {
      const int nb = e >> 2, c = (e >> 1) & 1, hf = e & 1;  // fg_dq_for_each's order: nb, c, hf
      const int k = 4 * nb + 2 * hf + c;
      if (cg[k] == 0.f) continue;
      const int i = qr0 + g + 8 * hf, j = nb * 8 + 2 * t + c;
      fg_cap_grad<float, Sink>(cs[k], cg[k], b, h, (int)(q0 + i), (int)(kv0 + j), args, *sink);
    }
    return;
  }
#endif
  fg_dq_for_each(kv_mods, t, [&](int nb, int r, int hf, int j, const FgColMods<float>& cm) {
    const int i = qr0 + g + 8 * hf;  // q row in the tile
    float ds;
    fg_entry<Sink, kInterior, kFast>(fg_entry_score(s[nb][r], scale), ef, dp[nb][r], l2[hf], dl[hf],
                                     kInterior || (rv[hf] && j < nkv), !kInterior && partial, rmods[hf], cm, b, h,
                                     (int)(q0 + i), (int)(kv0 + j), args, &ds, sink);
    s[nb][r] = ds;
  });
}
#if FG_SCORE_ELEM_DSCORE_FAST
// fg_dkdv_fast_ok's test on a warp's dQ tile (fg_dq_entries' layout).
__device__ __forceinline__ bool fg_dq_fast_ok(const float (&s)[FG_NKN][4], const FgRowMods<float> (&rmods)[2],
                                              const FgColMods<float>* kv_mods, int qr0, int g, int t, int b, int h,
                                              fg_i64 q0, fg_i64 kv0, float scale, const FgModArgs& args) {
  bool ok = true;
  fg_dq_for_each(kv_mods, t, [&](int nb, int r, int hf, int j, const FgColMods<float>& cm) {
    ok &= fg_score_elem_dscore_fast_ok(fg_entry_score(s[nb][r], scale), rmods[hf].s, cm.s, b, h,
                                       (int)(q0 + qr0 + g + 8 * hf), (int)(kv0 + j), args);
  });
  return ok;
}
#endif
// Whether a dQ chunk's step may take its interior copy (FG_BWD_INTERIOR_STEP): a full block, the chunk's kv rows
// all inside the sequence, the lane's two q rows too (a per-lane test: only a tile's last warp can diverge).
__device__ __forceinline__ bool fg_dq_interior(bool partial, int nkv, const bool (&rv)[2]) {
  return FG_BWD_INTERIOR_STEP && !partial && nkv == FG_KV_CHUNK && rv[0] && rv[1];
}
// fg_dq_entries' interior or general copy; kFast: the fast element functions (fg_dq_elements).
template <bool kFast, class Sink>
__device__ __forceinline__ void fg_dq_step(float (&s)[FG_NKN][4], const float (&dp)[FG_NKN][4], const float (&l2)[2],
                                           const float (&dl)[2], const bool (&rv)[2], const FgRowMods<float> (&rmods)[2],
                                           const FgColMods<float>* kv_mods, int qr0, int g, int t, int nkv, bool partial,
                                           int b, int h, fg_i64 q0, fg_i64 kv0, float scale, const FgModArgs& args,
                                           const Sink* sink) {
#if FG_BWD_INTERIOR_STEP
  if (fg_dq_interior(partial, nkv, rv)) {
    fg_dq_entries<true, Sink, kFast>(s, dp, l2, dl, rv, rmods, kv_mods, qr0, g, t, nkv, partial, b, h, q0, kv0, scale,
                                     args, sink);
    return;
  }
#endif
  fg_dq_entries<false, Sink, kFast>(s, dp, l2, dl, rv, rmods, kv_mods, qr0, g, t, nkv, partial, b, h, q0, kv0, scale,
                                    args, sink);
}
template <class Sink>
__device__ __forceinline__ void fg_dq_elements(float (&s)[FG_NKN][4], const float (&dp)[FG_NKN][4], const float (&l2)[2],
                                               const float (&dl)[2], const bool (&rv)[2],
                                               const FgRowMods<float> (&rmods)[2], const FgColMods<float>* kv_mods,
                                               int qr0, int g, int t, int nkv, bool partial, int b, int h, fg_i64 q0,
                                               fg_i64 kv0, float scale, const FgModArgs& args, const Sink* sink) {
#if FG_SCORE_ELEM_DSCORE_FAST
  if (fg_dq_fast_ok(s, rmods, kv_mods, qr0, g, t, b, h, q0, kv0, scale, args)) {  // as fg_dkdv_elements
    fg_dq_step<true>(s, dp, l2, dl, rv, rmods, kv_mods, qr0, g, t, nkv, partial, b, h, q0, kv0, scale, args, sink);
    return;
  }
#endif
  fg_dq_step<false>(s, dp, l2, dl, rv, rmods, kv_mods, qr0, g, t, nkv, partial, b, h, q0, kv0, scale, args, sink);
}

#if FG_SPLIT_ENTRY
// The two halves of fg_dq_entries (FG_SPLIT_ENTRY): s <- P from the scores alone, returning the entries' validity
// (bit 4 nb + r for s[nb][r]; with FG_DQ_P_EARLY 0, the validity being P's sign; kInterior: all valid); then
// s <- dS from P, dP and that validity. (The dK/dV kernel keeps the one-pass element: with its dK and dV
// accumulators, the split spills 20-76 bytes.)
template <bool kInterior>
__device__ __forceinline__ unsigned fg_dq_elements_p(float (&s)[FG_NKN][4], const float (&l2)[2], const bool (&rv)[2],
                                                     const FgRowMods<float> (&rmods)[2],
                                                     const FgColMods<float>* kv_mods, int qr0, int g, int t, int nkv,
                                                     bool partial, int b, int h, fg_i64 q0, fg_i64 kv0, float scale,
                                                     const FgModArgs& args) {
  static_assert(FG_NKN * 4 <= 32, "one validity bit per entry in 32 bits");
  const float ef = fg_exp_factor(scale);
  unsigned vm = 0;
  fg_dq_for_each(kv_mods, t, [&](int nb, int r, int hf, int j, const FgColMods<float>& cm) {
    const int i = qr0 + g + 8 * hf;  // q row in the tile
    bool valid = kInterior || (rv[hf] && j < nkv);
    s[nb][r] = fg_entry_p(fg_entry_score(s[nb][r], scale), ef, l2[hf], valid, !kInterior && partial, rmods[hf], cm, b,
                          h, (int)(q0 + i), (int)(kv0 + j), args);
#if !FG_DQ_P_EARLY
    vm |= (unsigned)valid << (4 * nb + r);
#endif
  });
  return vm;
}
template <bool kInterior>
__device__ __forceinline__ void fg_dq_elements_ds(float (&s)[FG_NKN][4], const float (&dp)[FG_NKN][4],
                                                  const float (&dl)[2], unsigned vm) {
#pragma unroll
  for (int nb = 0; nb < FG_NKN; ++nb)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if (kInterior) {
        s[nb][r] = fg_entry_ds(s[nb][r], dp[nb][r], dl[r >> 1], true);
        continue;
      }
#if FG_DQ_P_EARLY
      (void)vm;
      s[nb][r] = fg_entry_ds(s[nb][r], dp[nb][r], dl[r >> 1]);
#else
      s[nb][r] = fg_entry_ds(s[nb][r], dp[nb][r], dl[r >> 1], (vm >> (4 * nb + r)) & 1u);
#endif
    }
}
#endif  // FG_SPLIT_ENTRY

// flex_backward_wgmma.cuh (FG_BWD_WGMMA 1) brings its own dK/dV and dQ kernels and keeps everything above.
#if !FG_BWD_WGMMA
#define FG_NW (FG_NT / 32)

extern "C" __global__ void __launch_bounds__(FG_NT, 1) fg_bwd_dkdv(const FgBwdParams p, const FgModArgs args) {
  extern __shared__ __align__(16) unsigned char fg_smem_raw[];
  fg_s* Ks = (fg_s*)fg_smem_raw;                 // [KV_TILE][LDE]
  fg_s* Vs = Ks + FG_KV_TILE * FG_LDE;           // [KV_TILE][LDEV]
  fg_s* Qs = Vs + FG_KV_TILE * FG_LDEV;          // 2 x [Q_CHUNK][LDE]
  fg_s* Os = Qs + 2 * FG_Q_CHUNK * FG_LDE;       // 2 x [Q_CHUNK][LDEV] (dO)
  float* Ls = (float*)(Os + 2 * FG_Q_CHUNK * FG_LDEV);  // 2 x [Q_CHUNK] lse2
  float* Ds = Ls + 2 * FG_Q_CHUNK;                      // 2 x [Q_CHUNK] delta

  fg_i64 bk, hk, mb, kv0;
  int nkv;
  if (!fg_dkdv_cta(p, bk, hk, mb, kv0, nkv)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int kr0 = warp * 16;

  fg_mma_load<FG_KV_TILE, FG_E, FG_NT>(Ks, p.k + bk * p.ks_b + hk * p.ks_h, p.ks_l, kv0, nkv);
  fg_mma_load<FG_KV_TILE, FG_EV, FG_NT>(Vs, p.v + bk * p.vs_b + hk * p.vs_h, p.vs_l, kv0, nkv);

  FgQWalk w;
  w.start(p, bk, hk, mb);
  auto issue = [&](const FgQWalk& s, int buf) {
    const int n = s.nq();
    fg_mma_load<FG_Q_CHUNK, FG_E, FG_NT>(Qs + buf * FG_Q_CHUNK * FG_LDE, p.q + s.b * p.qs_b + s.h * p.qs_h, p.qs_l,
                                         s.q0, n);
    const fg_i64 row0 = (s.b * p.Hq + s.h) * p.Lq + s.q0;
    fg_mma_load<FG_Q_CHUNK, FG_EV, FG_NT>(Os + buf * FG_Q_CHUNK * FG_LDEV, p.dout + row0 * FG_EV, FG_EV, 0, n);
    for (int i = threadIdx.x; i < 2 * FG_Q_CHUNK; i += FG_NT) {
      const int r = i % FG_Q_CHUNK;
      const bool ok = r < n;
      const fg_t* src = i < FG_Q_CHUNK ? p.lse2 : p.delta;
      float* dst = (i < FG_Q_CHUNK ? Ls : Ds) + buf * FG_Q_CHUNK + r;
      fg_cp_async4(fg_smem_addr(dst), ok ? src + row0 + r : src, ok);
    }
  };
  if (!w.done()) issue(w, 0);
  fg_cp_async_commit();

  float dk[FG_E / 8][4], dv[FG_EV / 8][4];
  fg_zero_frags(dk);
  fg_zero_frags(dv);
  const FgMaxSink max_sink = fg_dkdv_sink(p);
  const FgMaxSink* sink = FG_CAP_MODE == 1 ? &max_sink : nullptr;
  const float scale = (float)p.scale;
  const unsigned ks_base = fg_smem_addr(Ks), vs_base = fg_smem_addr(Vs);

#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
  __shared__ FgRowMods<float> q_mods[FG_Q_CHUNK];  // the mods' row parts of the current q chunk
#endif
  for (int it = 0; !w.done(); ++it) {
    const int buf = it & 1;
    const int b = (int)w.b, h = (int)w.h, nq = w.nq();
    const fg_i64 q0 = w.q0;
    const bool partial = w.partial();
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
    // (the previous chunk's readers are past its closing barrier; the barrier below publishes these)
    for (int i = threadIdx.x; i < nq; i += FG_NT) fg_row_mods(q_mods[i], true, partial, b, h, (int)(q0 + i), args);
#endif
    w.next(p);
    if (!w.done()) issue(w, buf ^ 1);
    fg_cp_async_commit();
    fg_cp_async_wait<1>();
    __syncthreads();
    const fg_s* Qb = Qs + buf * FG_Q_CHUNK * FG_LDE;
    const fg_s* Ob = Os + buf * FG_Q_CHUNK * FG_LDEV;
    const unsigned qs_base = fg_smem_addr(Qb), os_base = fg_smem_addr(Ob);

    // S^T = K Q^T and dP^T = V dO^T for this warp's 16 kv rows
    float st[FG_NQN][4], dpt[FG_NQN][4];
#pragma unroll
    for (int i = 0; i < FG_NQN; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < FG_E / 16; ++kk) {
      unsigned a[4];
      fg_ldsm_x4(a, ks_base + 2 * fg_ldsm_a_offset(lane, kr0, kk * 16, FG_LDE));
#pragma unroll
      for (int nb = 0; nb < FG_NQN; nb += 2) {
        unsigned bq[4];
        fg_ldsm_x4(bq, qs_base + 2 * fg_ldsm_bt_offset(lane, nb * 8, kk * 16, FG_LDE));
        fg_mma<FG_BF16>(st[nb], a, bq);
        fg_mma<FG_BF16>(st[nb + 1], a, bq + 2);
      }
    }
#pragma unroll
    for (int kk = 0; kk < FG_EV / 16; ++kk) {
      unsigned a[4];
      fg_ldsm_x4(a, vs_base + 2 * fg_ldsm_a_offset(lane, kr0, kk * 16, FG_LDEV));
#pragma unroll
      for (int nb = 0; nb < FG_NQN; nb += 2) {
        unsigned bo[4];
        fg_ldsm_x4(bo, os_base + 2 * fg_ldsm_bt_offset(lane, nb * 8, kk * 16, FG_LDEV));
        fg_mma<FG_BF16>(dpt[nb], a, bo);
        fg_mma<FG_BF16>(dpt[nb + 1], a, bo + 2);
      }
    }
    // element-wise: st <- P^T, dpt <- dS^T (pre-mod)
    FgColMods<float> cm[2];
    fg_dkdv_col_parts(cm, kr0, g, nkv, partial, b, h, kv0, args);
    fg_dkdv_elements(st, dpt, Ls + buf * FG_Q_CHUNK, Ds + buf * FG_Q_CHUNK, FG_BWD_MODS(q_mods), cm, kr0, g, t, nq,
                     nkv, partial, b, h, q0, kv0, scale, args, sink);
    // dV += P^T dO, dK += dS^T Q (k = q rows of the chunk)
#pragma unroll
    for (int kq = 0; kq < FG_Q_CHUNK / 16; ++kq) {
      unsigned ap[4], ad[4];
      fg_pack_c_to_a<FG_BF16>(st[2 * kq], st[2 * kq + 1], ap);
      fg_pack_c_to_a<FG_BF16>(dpt[2 * kq], dpt[2 * kq + 1], ad);
#pragma unroll
      for (int nb = 0; nb < FG_EV / 8; nb += 2) {
        unsigned bo[4];
        fg_ldsm_x4_trans(bo, os_base + 2 * fg_ldsm_b_trans_offset(lane, kq * 16, nb * 8, FG_LDEV));
        fg_mma<FG_BF16>(dv[nb], ap, bo);
        fg_mma<FG_BF16>(dv[nb + 1], ap, bo + 2);
      }
#pragma unroll
      for (int nb = 0; nb < FG_E / 8; nb += 2) {
        unsigned bq[4];
        fg_ldsm_x4_trans(bq, qs_base + 2 * fg_ldsm_b_trans_offset(lane, kq * 16, nb * 8, FG_LDE));
        fg_mma<FG_BF16>(dk[nb], ad, bq);
        fg_mma<FG_BF16>(dk[nb + 1], ad, bq + 2);
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }
  fg_cp_async_wait<0>();

  fg_dkdv_store(p, dk, dv, (bk * p.Hkv + hk) * p.Lkv + kv0, kr0, g, t, nkv, scale);
}

extern "C" __global__ void __launch_bounds__(FG_NT, 1) fg_bwd_dq(const FgBwdParams p, const FgModArgs args) {
  extern __shared__ __align__(16) unsigned char fg_smem_raw[];
  fg_s* Qs = (fg_s*)fg_smem_raw;               // [Q_TILE][LDE]
  fg_s* Os = Qs + FG_Q_TILE * FG_LDE;          // [Q_TILE][LDEV] (dO)
  fg_s* Ks = Os + FG_Q_TILE * FG_LDEV;         // 2 x [KV_CHUNK][LDE]
  fg_s* Vs = Ks + 2 * FG_KV_CHUNK * FG_LDE;    // 2 x [KV_CHUNK][LDEV]

  fg_i64 mb, q0;
  int nq;
  if (!fg_dq_cta(p, mb, q0, nq)) return;
  const fg_i64 h = blockIdx.y, b = blockIdx.z;
  const fg_i64 bk = p.Bkv == 1 ? 0 : b, hk = h / p.G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int qr0 = warp * 16;
  const fg_i64 row0 = (b * p.Hq + h) * p.Lq + q0;

  fg_mma_load<FG_Q_TILE, FG_E, FG_NT>(Qs, p.q + b * p.qs_b + h * p.qs_h, p.qs_l, q0, nq);
  fg_mma_load<FG_Q_TILE, FG_EV, FG_NT>(Os, p.dout + row0 * FG_EV, FG_EV, 0, nq);
  const fg_s* kbase = p.k + bk * p.ks_b + hk * p.ks_h;
  const fg_s* vbase = p.v + bk * p.vs_b + hk * p.vs_h;
  FgKvWalk w;
  w.start(p, b, h, mb);
  auto issue = [&](const FgKvWalk& s, int buf) {
    fg_mma_load<FG_KV_CHUNK, FG_E, FG_NT>(Ks + buf * FG_KV_CHUNK * FG_LDE, kbase, p.ks_l, s.kv0, s.nkv());
    fg_mma_load<FG_KV_CHUNK, FG_EV, FG_NT>(Vs + buf * FG_KV_CHUNK * FG_LDEV, vbase, p.vs_l, s.kv0, s.nkv());
  };
  if (!w.done()) issue(w, 0);
  fg_cp_async_commit();

  // this lane's rows: qr0 + g and qr0 + g + 8
  float l2[2], dl[2];
  bool rv[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int i = qr0 + g + 8 * hf;
    rv[hf] = i < nq;
    l2[hf] = rv[hf] ? p.lse2[row0 + i] : 0.f;
    dl[hf] = rv[hf] ? p.delta[row0 + i] : 0.f;
  }
  // The mods' row parts of this lane's two q rows, once (the kv walk visits partial blocks first).
  FgRowMods<float> rmods[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf)
    if (rv[hf] && !w.done()) fg_row_mods(rmods[hf], true, w.partial(), (int)b, (int)h, (int)(q0 + qr0 + g + 8 * hf), args);
  float dq[FG_E / 8][4];
  fg_zero_frags(dq);
  const FgDqSink cap_sink = fg_dq_sink(p);
  const FgDqSink* sink = FG_CAP_MODE != 0 ? &cap_sink : nullptr;
  const float scale = (float)p.scale;
  const unsigned qs_base = fg_smem_addr(Qs), os_base = fg_smem_addr(Os);

#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
  __shared__ FgColMods<float> kv_mods[FG_KV_CHUNK];  // the mods' column parts of the current kv chunk
#endif
  for (int it = 0; !w.done(); ++it) {
    const int buf = it & 1;
    const fg_i64 kv0 = w.kv0;
    const int nkv = w.nkv();
    const bool partial = w.partial();
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
    // (the previous chunk's readers are past its closing barrier; the barrier below publishes these)
    for (int j = threadIdx.x; j < nkv; j += FG_NT) kv_mods[j] = fg_col_mods<float>(true, partial, (int)b, (int)h, (int)(kv0 + j), args);
#endif
    w.next(p);
    if (!w.done()) issue(w, buf ^ 1);
    fg_cp_async_commit();
    fg_cp_async_wait<1>();
    __syncthreads();
    const unsigned ks_base = fg_smem_addr(Ks + buf * FG_KV_CHUNK * FG_LDE);
    const unsigned vs_base = fg_smem_addr(Vs + buf * FG_KV_CHUNK * FG_LDEV);

    float s[FG_NKN][4], dp[FG_NKN][4];
#pragma unroll
    for (int i = 0; i < FG_NKN; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < FG_E / 16; ++kk) {
      unsigned a[4];
      fg_ldsm_x4(a, qs_base + 2 * fg_ldsm_a_offset(lane, qr0, kk * 16, FG_LDE));
#pragma unroll
      for (int nb = 0; nb < FG_NKN; nb += 2) {
        unsigned bk4[4];
        fg_ldsm_x4(bk4, ks_base + 2 * fg_ldsm_bt_offset(lane, nb * 8, kk * 16, FG_LDE));
        fg_mma<FG_BF16>(s[nb], a, bk4);
        fg_mma<FG_BF16>(s[nb + 1], a, bk4 + 2);
      }
    }
#pragma unroll
    for (int kk = 0; kk < FG_EV / 16; ++kk) {
      unsigned a[4];
      fg_ldsm_x4(a, os_base + 2 * fg_ldsm_a_offset(lane, qr0, kk * 16, FG_LDEV));
#pragma unroll
      for (int nb = 0; nb < FG_NKN; nb += 2) {
        unsigned bv[4];
        fg_ldsm_x4(bv, vs_base + 2 * fg_ldsm_bt_offset(lane, nb * 8, kk * 16, FG_LDEV));
        fg_mma<FG_BF16>(dp[nb], a, bv);
        fg_mma<FG_BF16>(dp[nb + 1], a, bv + 2);
      }
    }
    fg_dq_elements(s, dp, l2, dl, rv, rmods, FG_BWD_MODS(kv_mods), qr0, g, t, nkv, partial, (int)b, (int)h, q0, kv0, scale,
                   args, sink);
    // dQ += dS K (k = kv rows of the chunk)
#pragma unroll
    for (int kc = 0; kc < FG_KV_CHUNK / 16; ++kc) {
      unsigned a[4];
      fg_pack_c_to_a<FG_BF16>(s[2 * kc], s[2 * kc + 1], a);
#pragma unroll
      for (int nb = 0; nb < FG_E / 8; nb += 2) {
        unsigned bk4[4];
        fg_ldsm_x4_trans(bk4, ks_base + 2 * fg_ldsm_b_trans_offset(lane, kc * 16, nb * 8, FG_LDE));
        fg_mma<FG_BF16>(dq[nb], a, bk4);
        fg_mma<FG_BF16>(dq[nb + 1], a, bk4 + 2);
      }
    }
    __syncthreads();
  }
  fg_cp_async_wait<0>();
  fg_dq_store(p, dq, row0, qr0, g, t, rv, scale);
}
#endif  // !FG_BWD_WGMMA
#endif  // FG_USE_MMA
