// What the FlexAttention forward kernels share (flex_forward.cuh's flex_fwd_mma / flex_fwd_simt and
// flex_forward_wgmma.cuh's flex_fwd_wgmma): the parameter block, the walk over the BlockMask's kv blocks, the
// modified score of one entry, and the online softmax of the tensor-core kernels on mma C fragments.
// NVRTC only, after flex_abi.cuh, the generated mods and flex_mma.cuh.
#pragma once
#include "flex_mod_parts.cuh"

// Host mirror: FwdParams in attention/cuda/flex_forward_cuda.cpp (same declaration order and types).
struct FgFwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;   // [B, Hq, Lq, Ev] contiguous, q's dtype
  void* lse;   // [B, Hq, Lq] float (double for f64)
  void* mx;    // [B, Hq, Lq] as lse
  fg_i64 q_sb, q_sh, q_sl;  // strides in elements (last dim contiguous)
  fg_i64 k_sb, k_sh, k_sl;
  fg_i64 v_sb, v_sh, v_sl;
  const int* num;       // BlockLists (null: no list of that kind)
  const int* idx;
  const int* full_num;
  const int* full_idx;
  double scale;
  int B, Hq, Lq, Hkv, Lkv, Bkv, group;
  int E, Ev;            // real head dims
  int Bm, Hm, rows, idx_cols, full_cols;
  int block_q, block_kv;
  int tiles_per_qblock; // ceil(block_q / BM)
  int n_qtiles;         // gridDim.x (of the grid; a persistent launch's own grid is smaller)
  int* job_counter;     // a persistent flex_fwd_wgmma's queue (FgJobQueue), zeroed by the host; else null
};

// ---- tile walk shared by the kernels -----------------------------------------------------------
struct FgRowTiles {
  const int* partial;
  const int* full;
  int n_partial, n_total;
};
struct FgTile {
  int i;     // position in partial ++ full (n_total: done)
  int n0;    // first kv column of this sub-tile
  int nend;  // end of the kv block, clipped to Lkv
};

__device__ __forceinline__ FgRowTiles fg_row_tiles(const FgFwdParams& p, int b, int h, int qb) {
  FgRowTiles r;
  r.partial = nullptr;
  r.full = nullptr;
  r.n_partial = 0;
  r.n_total = 0;
  if (qb >= p.rows) return r;
  const int bm = p.Bm == 1 ? 0 : b, hm = p.Hm == 1 ? 0 : h;
  const fg_i64 row = ((fg_i64)bm * p.Hm + hm) * p.rows + qb;
  int nf = 0;
  if (p.num != nullptr) {
    r.n_partial = p.num[row];
    r.partial = p.idx + row * p.idx_cols;
  }
  if (p.full_num != nullptr) {
    nf = p.full_num[row];
    r.full = p.full_idx + row * p.full_cols;
  }
  r.n_total = r.n_partial + nf;
  return r;
}

// Moves `t` to the first in-range kv block at position >= t.i (t.i == n_total when none is left).
__device__ __forceinline__ void fg_seek_block(const FgFwdParams& p, const FgRowTiles& r, FgTile& t) {
  for (; t.i < r.n_total; ++t.i) {
    const int blk = t.i < r.n_partial ? r.partial[t.i] : r.full[t.i - r.n_partial];
    const fg_i64 kv0 = (fg_i64)blk * p.block_kv;
    if (blk >= 0 && kv0 < p.Lkv) {
      t.n0 = (int)kv0;
      const fg_i64 e = kv0 + p.block_kv;
      t.nend = e < p.Lkv ? (int)e : p.Lkv;
      return;
    }
  }
}
__device__ __forceinline__ FgTile fg_first_tile(const FgFwdParams& p, const FgRowTiles& r) {
  FgTile t;
  t.i = 0;
  t.n0 = 0;
  t.nend = 0;
  fg_seek_block(p, r, t);
  return t;
}
template <int BN>
__device__ __forceinline__ FgTile fg_next_tile(const FgFwdParams& p, const FgRowTiles& r, FgTile t) {
  t.n0 += BN;
  if (t.n0 < t.nend) return t;
  ++t.i;
  fg_seek_block(p, r, t);
  return t;
}

// The q rows of the grid's CTA x (blockIdx.x, or the one a persistent kernel runs): [m0, m_end), inside q block
// qb. Returns false when the CTA has no row.
__device__ __forceinline__ bool fg_tile_rows(const FgFwdParams& p, int BM, int x, int& qb, int& m0, int& m_end) {
  const int tile = p.n_qtiles - 1 - x;  // the last q tiles (longest under causal) first
  qb = tile / p.tiles_per_qblock;
  m0 = qb * p.block_q + (tile % p.tiles_per_qblock) * BM;
  int e = m0 + BM;
  const int blk_end = (qb + 1) * p.block_q;
  if (e > blk_end) e = blk_end;
  if (e > p.Lq) e = p.Lq;
  m_end = e;
  return m0 < m_end;
}
__device__ __forceinline__ bool fg_cta_rows(const FgFwdParams& p, int BM, int& qb, int& m0, int& m_end) {
  return fg_tile_rows(p, BM, (int)blockIdx.x, qb, m0, m_end);
}

// FG_FWD_SCORE_AFFINE: the generated code gave the score_mod's affine form (FG_SCORE_AFFINE, affine_score.h; only
// under approx_math): the tensor-core kernels' mods step multiplies q.k by scale FG_SCORE_IN_FACTOR and applies the
// core alone, the online softmax keeps the core's values (out_factor > 0 keeps their order, so its running max is
// the modified scores' over out_factor) and out_factor goes into the exponent's constant, as the raw softmax puts the
// scale there: softcap's step loses the two multiplications an entry by 1/20 and by 20 (FLEXGRAD_FLEX_AFFINE_FOLD=0
// defines FG_NO_AFFINE_FOLD: the full program, for a comparison).
#if FG_SCORE_AFFINE && !defined(FG_NO_AFFINE_FOLD)
#define FG_FWD_SCORE_AFFINE 1
#else
#define FG_FWD_SCORE_AFFINE 0
#endif

// The bounded max (FG_FWD_MAX_SCORES_UNUSED: the host's word that the call returns no max_scores and its inputs are
// bf16; the affine form with a bounded core, FG_SCORE_CORE_LO / _HI: softcap's tanh in [-1, 1]): the online softmax
// keeps no running max. Every core value u lies at or under FG_SCORE_CORE_HI, so P = exp(c (u - hi)) (c =
// out_factor) is at most 1 and at least exp(-c (hi - lo)) >= 2^-64 (the code generator gives the bounds only then),
// far above float's and bf16's smallest normal (2^-126; f16 P, whose range ends at 2^-14, is left out): no entry's
// max, no quad reduction of it, and no rescale of O (its factor is 1, folded away). The row's lse is c hi + ln l as
// before; a row with nothing kept has l = 0 and is reported empty (fg_frag_store), a NaN score makes l NaN (a NaN
// row, as with the running max). FLEXGRAD_FLEX_FWD_BOUNDED_MAX=0 keeps the running max (flex_forward_cuda.cpp).
#if FG_FWD_SCORE_AFFINE && defined(FG_SCORE_CORE_HI) && defined(FG_FWD_MAX_SCORES_UNUSED) && \
    FG_ELEM == FG_DT_BFLOAT16
constexpr bool kFgBoundedMax = true;
constexpr float kFgCoreHi = (float)FG_SCORE_CORE_HI;
#else
constexpr bool kFgBoundedMax = false;
constexpr float kFgCoreHi = 0.f;  // (unused)
#endif

// The modified, masked score of one entry (scale already applied), or -inf out of range. kCore: s is the affine
// form's scaled score and the result its core (FG_FWD_SCORE_AFFINE). kFast: fg_score_elem_fast (FG_SCORE_ELEM_FAST;
// the caller checked fg_score_elem_fast_ok).
template <class T, bool kCore = false, bool kFast = false>
__device__ __forceinline__ T fg_modded_score(T s, bool in_range, bool partial, const FgRowMods<T>& r,
                                             const FgColMods<T>& c, int b, int h, int qi, int kvi, const FgModArgs& args) {
  if (!in_range) return (T)fg_neg_inf();
#if FG_HAS_SCORE_MOD
#if FG_FWD_SCORE_AFFINE
  if constexpr (kCore)
    s = fg_score_core(s, b, h, qi, kvi, args);
  else
#endif
#if FG_SCORE_ELEM_FAST
  if constexpr (kFast)
    s = fg_score_elem_fast(s, r.s, c.s, b, h, qi, kvi, args);
  else
#endif
    s = fg_score_elem<T>(s, r.s, c.s, b, h, qi, kvi, args);
#endif
#if FG_HAS_MASK_MOD
  if (partial && !fg_mask_elem<T>(r.m, c.m, b, h, qi, kvi, args)) s = (T)fg_neg_inf();  // float parts in T, as the CPU
#endif
  return s;
}


// FG_FWD_RAW_SOFTMAX (the host's default since session 27 for the wgmma forward of programs without a score_mod whose
// scale is positive and finite; FLEXGRAD_FLEX_FWD_RAW_SOFTMAX=0 leaves it out): S stays unscaled (q.k); the running
// max m is the raw scores', and the scale goes into the exponent's constant, exp2(s c - m c) with c = scale log2 e,
// as FlashAttention-3 does. No entry is then multiplied by the scale, nor selected between its scaled and unscaled
// value (the FMUL and FSEL an entry of a full sub-tile in the causal forward's SASS, of ~7.5 instructions before P V;
// H100, session 26). fl(scale x) is monotonic in x for scale > 0, so fl(scale m) is the scaled scores' max exactly:
// the epilogue reports it and lse = fl(scale m) + ln l. On an H100 (session 27) 2-11% off the forward of no mask,
// the document mask, the sliding window and D 64.
#ifndef FG_FWD_RAW_SOFTMAX
#define FG_FWD_RAW_SOFTMAX 0
#endif
#if FG_FWD_RAW_SOFTMAX && FG_HAS_SCORE_MOD
#error "FG_FWD_RAW_SOFTMAX: a score_mod reads the scaled score"
#endif
// FG_FWD_LAZY_RESCALE (opt-in, FLEXGRAD_FLEX_FWD_LAZY_RESCALE=1; the host defines it for the wgmma forward of calls
// that return no max_scores): the online softmax keeps a row's running max while the row's new max exceeds it by at
// most kFgLazyGrowth in the exponent's units (log2), as FlashAttention-4 does, so P's entries stay at or under
// 2^kFgLazyGrowth = 256 (bf16 and f16 hold that, and float32 sums of them are far from overflowing) and O needs no
// rescale for that sub-tile; fg_frag_rescale_o skips its multiplications where no row of the warp moved its max (a
// warp vote). out = O / l and lse = m + ln l are unchanged in exact arithmetic (l and O carry the same factor); the
// reported max would be stale, hence no max_scores. Any difference that is not finite (a first max, an empty row, an
// infinite score) takes the exact path.
#ifndef FG_FWD_LAZY_RESCALE
#define FG_FWD_LAZY_RESCALE 0
#endif
constexpr float kFgLazyGrowth = 8.f;
// The factor from the values the online softmax keeps to the modified scores: the exponent's constant is it times
// log2 e, and the epilogue reports the max times it. The scale with the raw softmax, the affine form's out_factor,
// else 1.
__device__ __forceinline__ float fg_softmax_factor(float scale) {
#if FG_FWD_RAW_SOFTMAX
  return scale;
#elif FG_FWD_SCORE_AFFINE
  (void)scale;
  return (float)FG_SCORE_OUT_FACTOR;
#else
  (void)scale;
  return 1.f;
#endif
}

// ---- online softmax on tensor-core accumulator fragments (flex_fwd_mma, flex_fwd_wgmma) -------------
// A warp's share of a q tile: MF m16 fragments, fragment f holding rows wrow + 16 f + g and + 8 of the tile
// (lane = 4 g + t4); S of one kv sub-tile as NB n8 C fragments per m16 fragment (s[f][n][2 hf + c]: row
// wrow + 16 f + g + 8 hf, column 8 n + 2 t4 + c), O as NO of them (flex_mma.cuh's layouts). wgmma
// accumulators have the same per-warp layout (flex_wgmma.cuh), so both kernels run this code.

template <int MF, int NO>
__device__ __forceinline__ void fg_frag_init(float (&o)[MF][NO][4], float (&m)[MF][2], float (&l)[MF][2],
                                             bool (&saw_nan)[MF][2]) {
#pragma unroll
  for (int f = 0; f < MF; ++f) {
#pragma unroll
    for (int n = 0; n < NO; ++n) o[f][n][0] = o[f][n][1] = o[f][n][2] = o[f][n][3] = 0.f;
    m[f][0] = m[f][1] = fg_neg_inf();
    l[f][0] = l[f][1] = 0.f;
    saw_nan[f][0] = saw_nan[f][1] = false;
  }
}

#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
// Calls fn(v, row parts, column parts, qi, kvi, kv_in) on each entry v = s[f][n][2 hf + c] of the thread (kv_in:
// kAllIn, or its column inside the sub-tile): the thread's row parts are read into registers once and a column's
// once for all its rows (ptxas had re-read both from shared memory for every entry). A part outside the range is
// read too, harmlessly: the callers never keep what it gives there.
template <bool kAllIn, int MF, int NB, class Fn>
__device__ __forceinline__ void fg_frag_for_each_entry(float (&s)[MF][NB][4], int wrow, int g, int t4, int m0,
                                                       const FgTile& cur, const FgRowMods<float>* row_mods,
                                                       const FgColMods<float>* col_mods, Fn&& fn) {
  FgRowMods<float> rm[MF][2];
#pragma unroll
  for (int f = 0; f < MF; ++f)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) rm[f][hf] = row_mods[wrow + 16 * f + g + 8 * hf];
#pragma unroll
  for (int n = 0; n < NB; ++n) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = 8 * n + 2 * t4 + c, kvi = cur.n0 + col;
      const bool kv_in = kAllIn || kvi < cur.nend;
      const FgColMods<float> cm = col_mods[col];
#pragma unroll
      for (int f = 0; f < MF; ++f)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int row = wrow + 16 * f + g + 8 * hf, qi = m0 + row;
          fn(s[f][n][2 * hf + c], rm[f][hf], cm, qi, kvi, kv_in);
        }
    }
  }
}
#endif

// fg_frag_mod_scores' mods step; kAllIn: every row of the warp and every column of the sub-tile in range.
template <bool kAllIn, int MF, int NB>
__device__ __forceinline__ void fg_frag_mods_step(float (&s)[MF][NB][4], bool partial, float scale, int wrow, int g,
                                                  int t4, int m0, int m_end, const FgTile& cur,
                                                  const FgRowMods<float>* row_mods, const FgColMods<float>* col_mods,
                                                  int b, int h, const FgModArgs& args) {
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
#if FG_SCORE_ELEM_FAST && !FG_FWD_SCORE_AFFINE
  // A division by a constant in its corrected form for every entry of the thread when every dividend is in the form's
  // range (one test a thread and sub-tile), else in the exact form that needs no range: no branch an entry either way.
  // (The dividends are pure; an entry out of range may be tested on whatever S holds there, which can only send the
  // thread to the exact form.)
  bool fast = true;
  fg_frag_for_each_entry<kAllIn>(
      s, wrow, g, t4, m0, cur, row_mods, col_mods,
      [&](float& v, const FgRowMods<float>& rm, const FgColMods<float>& cm, int qi, int kvi, bool) {
        fast &= fg_score_elem_fast_ok(v * scale, rm.s, cm.s, b, h, qi, kvi, args);
      });
  if (fast) {
    fg_frag_for_each_entry<kAllIn>(
        s, wrow, g, t4, m0, cur, row_mods, col_mods,
        [&](float& v, const FgRowMods<float>& rm, const FgColMods<float>& cm, int qi, int kvi, bool kv_in) {
          v = fg_modded_score<float, false, true>(v * scale, kv_in && (kAllIn || qi < m_end), partial, rm, cm, b, h, qi,
                                                  kvi, args);
        });
    return;
  }
#endif
  fg_frag_for_each_entry<kAllIn>(
      s, wrow, g, t4, m0, cur, row_mods, col_mods,
      [&](float& v, const FgRowMods<float>& rm, const FgColMods<float>& cm, int qi, int kvi, bool kv_in) {
        v = fg_modded_score<float, FG_FWD_SCORE_AFFINE>(v * scale, kv_in && (kAllIn || qi < m_end), partial, rm, cm,
                                                        b, h, qi, kvi, args);
      });
#endif
}

// Scale, mods and bounds of S (sub-tile `cur`, q rows [m0, m_end)), column by column: a column's mod parts
// serve every row of the thread. Nothing to do when `simple` (no mod reaches the tile and it is all in range:
// fg_frag_softmax_update scales it). row_mods / col_mods: the rows' and the sub-tile's columns' mod parts
// (shared memory; unused without mods).
// FG_FWD_MASK_STEP: the forward's bounds-free mask step (fg_frag_mask_step) for a pure mask_mod alone
// (FG_MASK_ELEM_PURE: its element part reads nothing and cannot fail) that reads captured tensors. Measured on an H100
// (session 26, forward ms, three alternating runs, against the step with bounds): the document mask (captured int64
// ids) 0.282-0.284 -> 0.265-0.272; but the sliding window, a mask of index arithmetic alone, 0.379-0.380 -> 0.424-0.445
// (causal unchanged), as session 15 saw a bounds-free copy of the step cost causal and sliding: ptxas lays out their
// hot loop differently (not yet compared in SASS), so masks without captures keep the step with bounds.
// FLEXGRAD_FLEX_FWD_MASK_STEP=0 defines FG_FWD_MASK_BOUNDS_IN_STEP (A/B).
#ifdef FG_FWD_MASK_BOUNDS_IN_STEP
#define FG_FWD_MASK_STEP 0
#else
#define FG_FWD_MASK_STEP (!FG_HAS_SCORE_MOD && FG_HAS_MASK_MOD && FG_MASK_ELEM_PURE && FG_MASK_READS_CAPTURES)
#endif
#if FG_FWD_MASK_STEP
// The step evaluates the mask for every entry of the sub-tile with no bounds test (an entry out of range computes from
// whatever its parts' buffers hold; the bounds pass (fg_frag_mod_scores), run only on sub-tiles that reach past the
// sequence, drops it), and selects: per entry the scale, the mask's compare and one select, where the step with
// bounds also tested the entry's row and column and combined them with `partial` (H100 SASS, document mask: 7
// instructions an entry before the softmax).
template <int MF, int NB>
__device__ __forceinline__ void fg_frag_mask_step(float (&s)[MF][NB][4], bool partial, float scale, int wrow, int g,
                                                  int t4, int m0, const FgTile& cur, const FgRowMods<float>* row_mods,
                                                  const FgColMods<float>* col_mods, int b, int h,
                                                  const FgModArgs& args) {
  fg_frag_for_each_entry<true>(
      s, wrow, g, t4, m0, cur, row_mods, col_mods,
      [&](float& v, const FgRowMods<float>& rm, const FgColMods<float>& cm, int qi, int kvi, bool) {
        const bool drop = partial && !fg_mask_elem<float>(rm.m, cm.m, b, h, qi, kvi, args);
        v = drop ? fg_neg_inf() : v * scale;
      });
}
#endif

// Calls fn(v, in) on each entry v of S, `in` whether its q row is inside [m0, m_end) and its column inside the
// sub-tile [cur.n0, cur.nend).
template <int MF, int NB, class Fn>
__device__ __forceinline__ void fg_frag_for_each_bounded(float (&s)[MF][NB][4], int wrow, int g, int t4, int m0,
                                                         int m_end, const FgTile& cur, Fn&& fn) {
#pragma unroll
  for (int n = 0; n < NB; ++n)
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int f = 0; f < MF; ++f)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const bool in = cur.n0 + 8 * n + 2 * t4 + c < cur.nend && m0 + wrow + 16 * f + g + 8 * hf < m_end;
          fn(s[f][n][2 * hf + c], in);
        }
}

// Whether every row of the warp and every column of the sub-tile is in range (a warp-uniform test).
template <int MF, int NB>
__device__ __forceinline__ bool fg_frag_interior(int wrow, int m0, int m_end, const FgTile& cur) {
  return m0 + wrow + 16 * MF <= m_end && cur.n0 + 8 * NB <= cur.nend;
}

template <int MF, int NB>
__device__ __forceinline__ void fg_frag_mod_scores(float (&s)[MF][NB][4], bool simple, bool partial, float scale,
                                                   int wrow, int g, int t4, int m0, int m_end, const FgTile& cur,
                                                   const FgRowMods<float>* row_mods, const FgColMods<float>* col_mods,
                                                   int b, int h, const FgModArgs& args) {
#if FG_FWD_RAW_SOFTMAX
  scale = 1.f;  // the scores stay raw (the multiplications by it fold away)
#elif FG_FWD_SCORE_AFFINE
  scale *= (float)FG_SCORE_IN_FACTOR;  // the core's argument
#endif
#if FG_FWD_MASK_STEP
  if (!simple) {
    fg_frag_mask_step(s, partial, scale, wrow, g, t4, m0, cur, row_mods, col_mods, b, h, args);
    if (!fg_frag_interior<MF, NB>(wrow, m0, m_end, cur))  // the bounds pass: -inf outside the sequence
      fg_frag_for_each_bounded(s, wrow, g, t4, m0, m_end, cur, [](float& v, bool in) {
        if (!in) v = fg_neg_inf();
      });
  }
#elif FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
  if (!simple) {
#if FG_HAS_SCORE_MOD
    // Every visited sub-tile comes here: the bounds drop out of interior ones (warp-uniform test). H200, same
    // calls: ALiBi + causal forward +45-50%, softcap + causal +7-10%; for a mask_mod alone (a few partial
    // sub-tiles a row) the second copy of the step made causal 13-15% and sliding 8-13% slower, so not there.
    if (fg_frag_interior<MF, NB>(wrow, m0, m_end, cur))
      fg_frag_mods_step<true>(s, partial, scale, wrow, g, t4, m0, m_end, cur, row_mods, col_mods, b, h, args);
    else
#endif
      fg_frag_mods_step<false>(s, partial, scale, wrow, g, t4, m0, m_end, cur, row_mods, col_mods, b, h, args);
  }
#else
  if (!simple) {  // no mods: only the bounds
    fg_frag_for_each_bounded(s, wrow, g, t4, m0, m_end, cur,
                             [scale](float& v, bool in) { v = in ? v * scale : fg_neg_inf(); });
  }
#endif
}

// The online softmax update, row by row (rows g and g + 8 of each fragment): S becomes P = exp(S - m_new)
// (unnormalised), the per-lane partial sums l are rescaled, saw_nan notes a NaN next to a +inf max; corr is the
// factor O must be multiplied by (fg_frag_rescale_o) before P V is added. Split from the rescale so that the
// pipelined wgmma kernel can run it while a P V wgmma still writes O.
template <int MF, int NB>
__device__ __forceinline__ void fg_frag_softmax_p(float (&s)[MF][NB][4], float (&m)[MF][2], float (&l)[MF][2],
                                                  bool (&saw_nan)[MF][2], float (&corr)[MF][2], bool simple,
                                                  float scale) {
#pragma unroll
  for (int f = 0; f < MF; ++f) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float c2 = fg_softmax_factor(scale) * FG_LOG2E;  // the exponent's constant
      float ms;  // the row's max times c2
      if constexpr (kFgBoundedMax) {  // no running max (above; `simple` needs no score_mod, so it is false here)
        corr[f][hf] = 1.f;
        m[f][hf] = kFgCoreHi;
        ms = kFgCoreHi * c2;
      } else {
        float mx = fg_neg_inf();
#pragma unroll
        for (int n = 0; n < NB; ++n) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            if (!FG_FWD_RAW_SOFTMAX && simple) s[f][n][2 * hf + c] *= scale;
            mx = fmaxf(mx, s[f][n][2 * hf + c]);
          }
        }
        mx = fg_quad_max(mx);
        const float m_new = fmaxf(m[f][hf], mx);
        if (m_new == -fg_neg_inf()) {  // rare: exp(inf - inf) below hides whether a NaN was there too
#pragma unroll
          for (int n = 0; n < NB; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) saw_nan[f][hf] |= s[f][n][2 * hf + c] != s[f][n][2 * hf + c];
        }
        // (FG_FWD_LAZY_RESCALE: false for a NaN or infinite difference, so those rows take the exact path.)
        if (FG_FWD_LAZY_RESCALE && (m_new - m[f][hf]) * c2 <= kFgLazyGrowth) {
          corr[f][hf] = 1.f;  // the stale max stays: m[f][hf] is finite here
          ms = m[f][hf] * c2;
        } else {
          const float m_use = m_new == fg_neg_inf() ? 0.f : m_new;  // empty so far: keep exp2 NaN-free
          corr[f][hf] = fg_exp2((m[f][hf] - m_use) * c2);
          ms = m_use * c2;
          m[f][hf] = m_new;
        }
      }
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < NB; ++n) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float e = fg_exp2(fmaf(s[f][n][2 * hf + c], c2, -ms));
          s[f][n][2 * hf + c] = e;
          sum += e;
        }
      }
      l[f][hf] = l[f][hf] * corr[f][hf] + sum;  // per-lane partial sum; quad-reduced in the epilogue
    }
  }
}

// O *= corr, row by row (fg_frag_softmax_p's factor). With FG_FWD_LAZY_RESCALE most sub-tiles move no row's max:
// the warp skips the multiplications when none of its rows has a factor other than 1 (all its lanes call this).
template <int MF, int NO>
__device__ __forceinline__ void fg_frag_rescale_o(float (&o)[MF][NO][4], const float (&corr)[MF][2]) {
#if FG_FWD_LAZY_RESCALE
  bool moved = false;
#pragma unroll
  for (int f = 0; f < MF; ++f) moved |= (corr[f][0] != 1.f) | (corr[f][1] != 1.f);
  if (!__any_sync(0xffffffffu, moved)) return;
#endif
#pragma unroll
  for (int f = 0; f < MF; ++f)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        o[f][n][2 * hf] *= corr[f][hf];
        o[f][n][2 * hf + 1] *= corr[f][hf];
      }
}

// Both at once (the kernels whose P V waits for the softmax).
template <int MF, int NB, int NO>
__device__ __forceinline__ void fg_frag_softmax_update(float (&s)[MF][NB][4], float (&o)[MF][NO][4], float (&m)[MF][2],
                                                       float (&l)[MF][2], bool (&saw_nan)[MF][2], bool simple,
                                                       float scale) {
  float corr[MF][2];
  fg_frag_softmax_p(s, m, l, saw_nan, corr, simple, scale);
  fg_frag_rescale_o(o, corr);
}

// Epilogue: out = O / l (0 for empty rows), lse = m + ln l (-inf when empty), max_scores = m, with
// fg_row_end's non-finite rule; rows at or past m_end are not written.
template <bool kBf16, int MF, int NO>
__device__ __forceinline__ void fg_frag_store(const float (&o)[MF][NO][4], const float (&m)[MF][2],
                                              const float (&l)[MF][2], const bool (&saw_nan)[MF][2],
                                              const FgFwdParams p, int b, int h, int m0, int m_end, int wrow, int g,
                                              int t4) {
  const fg_i64 row0 = ((fg_i64)b * p.Hq + h) * p.Lq;
  fg_h16* out = (fg_h16*)p.out;
#pragma unroll
  for (int f = 0; f < MF; ++f) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int qi = m0 + wrow + 16 * f + g + 8 * hf;
      const float lsum = fg_quad_sum(l[f][hf]);
      bool saw = saw_nan[f][hf];  // over the quad holding the row
      saw |= __shfl_xor_sync(0xffffffffu, (int)saw, 1) != 0;
      saw |= __shfl_xor_sync(0xffffffffu, (int)saw, 2) != 0;
      if (qi >= m_end) continue;
      // (The bounded max reports a row with nothing kept as the running max would: max -inf.)
      const float m_scaled = kFgBoundedMax && lsum == 0.f ? fg_neg_inf() : m[f][hf] * fg_softmax_factor((float)p.scale);
      const FgRowEnd<float> e = fg_row_end(m_scaled, lsum, saw);
      const float inv = e.inv;
      fg_h16* orow = out + (row0 + qi) * p.Ev;
#pragma unroll
      for (int n = 0; n < NO; ++n) {
        const int col = 8 * n + 2 * t4;
        const float x0 = o[f][n][2 * hf] * inv, x1 = o[f][n][2 * hf + 1] * inv;
        if ((p.Ev & 1) == 0 && col + 1 < p.Ev) {
          *(unsigned*)(orow + col) = fg_pack2<kBf16>(x0, x1);
        } else {
          if (col < p.Ev) orow[col] = kBf16 ? fg_float_to_bf16(x0) : fg_float_to_f16(x0);
          if (col + 1 < p.Ev) orow[col + 1] = kBf16 ? fg_float_to_bf16(x1) : fg_float_to_f16(x1);
        }
      }
      if (t4 == 0) {
        ((float*)p.lse)[row0 + qi] = e.lse;
        ((float*)p.mx)[row0 + qi] = e.max;
      }
    }
  }
}
