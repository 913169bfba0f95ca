// FlexAttention forward on Hopper (sm_90a only, bf16 / f16): flex_fwd_mma's algorithm (flex_forward.cuh) with
// warpgroup MMA (wgmma, flex_wgmma.cuh) in place of mma.sync. First step of issue 13's Hopper main loop; the
// host runs it when FlexKernelOptions::cuda_forward is Wgmma, or on Auto with FLEXGRAD_FLEX_WGMMA=1 until it
// beats flex_fwd_mma on every case (attention/cuda/flex_forward_cuda.cpp; on the H200 it is 12-39% faster except
// on softcap, 12% slower). Compiled by NVRTC after flex_abi.cuh,
// the generated mods and flex_mma.cuh.
//
// One CTA per BM = 64 * WG q rows (WG = FG_WARPS / 4 warpgroups of 4 warps; WG = 2 when the BlockMask's q
// blocks hold more than 64 rows), every warpgroup owning 64 rows; all of them share the K / V tiles.
//  - Q (BM x E), K and V (2 buffers of BN x E and BN x Ev each) live in shared memory as 128-byte-swizzled
//    64-column atoms (fg_sw128_atoms_offset, flex_mma.cuh), loaded by every thread with cp.async (element
//    copies without FG_VEC), K and V double-buffered as in flex_fwd_mma.
//  - S = Q K^T: E / 16 wgmma m64nBNk16 with both operands in shared memory (K-major), f32 accumulators.
//  - The scale, the mods, the bounds and the online softmax run on the accumulators with flex_fwd_mma's
//    code (flex_forward_common.cuh): warp w of the CTA holds rows 16 w .. 16 w + 15 exactly as mma.sync C
//    fragments (one m16 fragment per warp).
//  - O += P V: P packed into mma.sync A fragments in registers, V MN-major (transposed B) from shared memory,
//    one wgmma m64n64k16 per 64-column atom of Ev and k16 step.
// The tile walk (partial kv blocks then full ones, BN-column sub-tiles clipped to the block and Lkv), the mods'
// row / column parts, the bounds (out-of-range rows and columns never reach a mod), the non-finite rule, the
// lse / max outputs and the error flag of captured reads are flex_fwd_mma's, through the same functions.
// The next K (V) tile is loaded while the tensor cores run this tile's Q K^T (P V).
// Four main loops (the host's default: FG_WGMMA_PIPE 3 with ping-pong on 128-row tiles with head dims up to 128,
// 2 on wider ones, else the sequential one):
// FG_WGMMA_PIPE 0 is the one above (S, wait, softmax, P V, wait, with a CTA barrier before each product);
// FG_WGMMA_PIPE 1 overlaps them as
// FlashAttention-3's intra-warpgroup pipeline: S_j = Q K_j^T and P_{j-1} V_{j-1} are issued together and the
// softmax of S_j runs while P_{j-1} V_{j-1} is in flight (wgmma.wait_group 1); the schedule and why it is
// peeled are at the loop. FG_WGMMA_PIPE 2 is warp-specialised: a producer warpgroup loads K / V into two stages
// (TMA for whole sub-tiles with FG_WGMMA_TMA, else cp.async) signalled by mbarriers, and the two consumer
// warpgroups, no longer held together by CTA barriers, run the sequential loop's steps each at its own pace.
// FG_WGMMA_PIPE 3 is the same producer with FG_WGMMA_PIPE 1's intra-warpgroup overlap in each consumer (the
// softmax of S_j while P_{j-1} V_{j-1} runs), and FG_WGMMA_PINGPONG 1 makes its two consumer warpgroups take
// turns issuing their products (FlashAttention-3's inter-warpgroup schedule).
//
// Configuration macros (set by attention/cuda/flex_forward_cuda.cpp):
//   FG_ELEM        FG_DT_BFLOAT16 | FG_DT_FLOAT16
//   FG_E, FG_EV    head dims padded to multiples of 64 (zero columns); the real ones are kernel params
//   FG_BM          q rows per CTA: 64 or 128 (= 16 * FG_WARPS)
//   FG_BN          kv columns per sub-tile: 64 or 128 (the N of the Q K^T wgmma)
//   FG_WARPS       4 or 8 (one or two consumer warpgroups)
//   FG_VEC, FG_MIN_BLOCKS  as flex_fwd_mma
//   FG_WGMMA_PIPE  1: the pipelined main loop, 0: the sequential one, 2: the warp-specialised one (a producer
//                  warpgroup, FG_WARPS 8 only; FLEXGRAD_FLEX_WGMMA_PIPE), 3: the warp-specialised one with
//                  the consumers' intra-warpgroup overlap
//   FG_WGMMA_PINGPONG  1 (FG_WGMMA_PIPE 3 only): the consumer warpgroups issue their products in turn (named
//                  barriers 1 and 2; FLEXGRAD_FLEX_WGMMA_PINGPONG)
//   FG_WGMMA_TMA   1 (FG_WGMMA_PIPE 2 or 3, and FG_VEC only): the producer loads whole K / V sub-tiles with TMA through
//                  the tensor maps of the kernel's third parameter (one thread, one copy per 64-column atom);
//                  0 or undefined: cp.async by the producer's 128 threads
// Dynamic shared memory: (BM * E + 2 * BN * (E + Ev)) * 2 bytes + 1024 (the window is aligned to 1024 bytes
// here, which the swizzle needs). Static: the mods' row parts and one (sequential) or three (pipelined)
// sub-tiles of column parts.
#pragma once
#include "flex_forward_common.cuh"
#include "flex_wgmma.cuh"

#if !(FG_ELEM == FG_DT_BFLOAT16 || FG_ELEM == FG_DT_FLOAT16)
#error "flex_fwd_wgmma: bfloat16 / float16 only"
#endif
#if FG_E % 64 != 0 || FG_EV % 64 != 0 || FG_E > 256 || FG_EV > 256
#error "flex_fwd_wgmma: FG_E and FG_EV are multiples of 64 up to 256"
#endif
#if !(FG_BN == 64 || FG_BN == 128) || !(FG_WARPS == 4 || FG_WARPS == 8) || FG_BM != 16 * FG_WARPS
#error "flex_fwd_wgmma: FG_BN is 64 or 128, FG_WARPS 4 or 8, FG_BM 16 * FG_WARPS"
#endif

#if !defined(FG_WGMMA_PIPE) || !(FG_WGMMA_PIPE >= 0 && FG_WGMMA_PIPE <= 3)
#error "flex_fwd_wgmma: FG_WGMMA_PIPE is 0, 1, 2 or 3 (set by the host)"
#endif
// The warp-specialised loops (a producer warpgroup feeding two consumer warpgroups): 2, and 3 with the
// consumers' intra-warpgroup overlap.
#define FG_WGMMA_WS (FG_WGMMA_PIPE >= 2)
#ifndef FG_WGMMA_PINGPONG
#define FG_WGMMA_PINGPONG 0
#endif
#if FG_WGMMA_PINGPONG && FG_WGMMA_PIPE != 3
#error "flex_fwd_wgmma: FG_WGMMA_PINGPONG orders FG_WGMMA_PIPE 3's consumers"
#endif

#define FG_IS_BF16 (FG_ELEM == FG_DT_BFLOAT16)
#define FG_NT (FG_WARPS * 32)  // the consumer threads (all but the warp-specialised loops' producer warpgroup)
#if FG_WGMMA_WS
#if FG_WARPS != 8
#error "flex_fwd_wgmma: FG_WGMMA_PIPE 2 and 3 run two consumer warpgroups (FG_WARPS 8)"
#endif
#define FG_NT_LAUNCH (FG_NT + 128)  // + the producer warpgroup
#else
#if defined(FG_WGMMA_TMA) && FG_WGMMA_TMA
#error "flex_fwd_wgmma: FG_WGMMA_TMA needs FG_WGMMA_PIPE 2 or 3"
#endif
#define FG_NT_LAUNCH FG_NT
#endif

// ROWS x COLS tiles (COLS a multiple of 64) as swizzled atoms, every thread of the CTA copying.
template <int ROWS, int COLS>
__device__ __forceinline__ void fg_load_tile_sw128(fg_h16* s, const fg_h16* g, fg_i64 ld_g, int nrows, int cols) {
  fg_load_rows<ROWS, true>(s, 0, g, ld_g, nrows, cols, COLS, threadIdx.x, FG_NT);
}

// S = Q K^T of one sub-tile, issued and committed: this warpgroup's Q rows at q_addr, the K stage at k_addr;
// k16 step kk is 32 * (kk % 4) bytes into the rows of atom kk / 4.
__device__ __forceinline__ void fg_issue_qk(float (&s)[1][FG_BN / 8][4], unsigned q_addr, unsigned k_addr) {
#pragma unroll
  for (int kk = 0; kk < FG_E / 16; ++kk) {
    const unsigned atom = kk >> 2, jj = kk & 3;
    fg_wgmma_ss<FG_BN, 0, FG_IS_BF16>(&s[0][0][0], fg_gmma_desc_sw128(q_addr + atom * (FG_BM * 128) + 32 * jj, 16, 1024),
                                      fg_gmma_desc_sw128(k_addr + atom * (FG_BN * 128) + 32 * jj, 16, 1024), kk > 0);
  }
  fg_wgmma_commit();
}
// O += P V of one sub-tile, issued and committed: P as A fragments, the V stage at v_addr; k16 step kk is rows
// 16 kk .. 16 kk + 15 of every V atom (2048 bytes each).
__device__ __forceinline__ void fg_issue_pv(float (&o)[1][FG_EV / 8][4], const unsigned (&pa)[FG_BN / 16][4],
                                            unsigned v_addr) {
#pragma unroll
  for (int kk = 0; kk < FG_BN / 16; ++kk)
#pragma unroll
    for (int a = 0; a < FG_EV / 64; ++a)
      fg_wgmma_m64n64k16_rs<1, FG_IS_BF16>(&o[0][8 * a][0], pa[kk],
                                           fg_gmma_desc_sw128(v_addr + a * (FG_BN * 128) + 2048 * kk, 1024, 1024), 1);
  fg_wgmma_commit();
}

#ifndef FG_WGMMA_TMA
#define FG_WGMMA_TMA 0
#endif
#if FG_WGMMA_TMA
#if !FG_VEC
#error "flex_fwd_wgmma: FG_WGMMA_TMA needs FG_VEC"
#endif
// K's and V's maps (FgTmaMap, flex_wgmma.cuh) are 4-d (E, Lkv, Hkv, Bkv) with the tensors' own strides, box
// (64, FG_BN, 1, 1), 128-byte swizzle.
struct FgTmaMaps {
  FgTmaMap k, v;
};
#define FG_FWD_WGMMA_EXTRA_PARAMS , const __grid_constant__ FgTmaMaps maps
#else
#define FG_FWD_WGMMA_EXTRA_PARAMS
#endif

#if FG_WGMMA_WS
// The registers setmaxnreg gives each role. ptxas launches the kernel with 65536 / FG_NT_LAUNCH rounded down to
// 8 a thread (168 for 384 threads); setmaxnreg.inc blocks until the CTA's pool holds the registers asked for,
// and only the producer's decrease fills it, so a split the launch does not cover hangs the kernel (as 232 / 48
// did). 224 / 56 spills nowhere but took the no-mask forward from 491 to 456 TFLOP/s on the H200 (session 13),
// so the consumers keep 232 and the producer's column parts of a captured mask spill 32 bytes.
//
// Two CTAs an SM (FG_MIN_BLOCKS 2, FLEXGRAD_FLEX_WGMMA_TWO_CTAS=1: head dims up to 64, BN 64, FG_WGMMA_PIPE 2) halve
// the pool: launched at 65536 / (384 * 2) rounded down to 8 = 80 a thread, the split is 32 / 104 (32 / 104 spilled
// causal's loop 4 bytes offline, 24 / 104 28 bytes; 104 do not hold pipe 3's S_j, P_{j-1} and O: 48-92 bytes
// spilled and the wgmma serialised, C7512).
#if FG_MIN_BLOCKS == 2
#if FG_WGMMA_PIPE != 2 || FG_E > 64 || FG_EV > 64 || FG_BN != 64 || (defined(FG_WGMMA_PERSISTENT) && FG_WGMMA_PERSISTENT)
#error "flex_fwd_wgmma: two CTAs an SM (FG_MIN_BLOCKS 2) take FG_WGMMA_PIPE 2, head dims up to 64, FG_BN 64, the grid"
#endif
#define FG_WS_PRODUCER_REGS 32
#define FG_WS_CONSUMER_REGS 104
#elif FG_MIN_BLOCKS == 1
#define FG_WS_PRODUCER_REGS 40
#define FG_WS_CONSUMER_REGS 232
#else
#error "flex_fwd_wgmma: the warp-specialised loops run one or two CTAs an SM (FG_MIN_BLOCKS 1 or 2)"
#endif
#define FG_WS_LAUNCH_REGS (65536 / FG_NT_LAUNCH / FG_MIN_BLOCKS / 8 * 8)
static_assert(128 * (FG_WS_LAUNCH_REGS - FG_WS_PRODUCER_REGS) >= FG_NT * (FG_WS_CONSUMER_REGS - FG_WS_LAUNCH_REGS),
              "setmaxnreg: the consumers' registers must come from the producer's");
// The warp-specialised producer's load of sub-tile t's K or V (COLS = FG_E or FG_EV padded columns) into a stage
// buffer of COLS / 64 swizzled atoms, completing on the stage's full barrier `bar` (256 arrivals) once the copies
// have landed and each of the 128 producer threads has also arrived (fg_ws_publish, after whatever else the stage
// publishes: the column parts): with `tma`, thread 0 expects the bytes and issues one TMA box per atom through
// `map`, and each thread's publishing arrival counts twice; else the 128 threads copy with cp.async (zeros past the
// sub-tile's rows and the real columns), each thread's copies arriving once when they have landed (noinc: the
// arrival counts toward the 256, as Q's do; compute-sanitizer's synccheck reported the form that raised the
// pending count instead, cp.async.mbarrier.arrive without .noinc, as a barrier "missing wait").
template <int COLS>
__device__ __forceinline__ void fg_ws_issue_subtile(fg_h16* dst, const void* map, const fg_h16* g, fg_i64 ld_g, int cols,
                                                    const FgTile& t, int hk, int bk, unsigned bar, bool tma, int pt) {
  if (tma) {
    if (pt == 0) {
      fg_mbar_expect_tx(bar, FG_BN * COLS * 2);
#pragma unroll
      for (int a = 0; a < COLS / 64; ++a) fg_tma_load_4d(fg_smem_addr(dst + a * (FG_BN * 64)), map, 64 * a, t.n0, hk, bk, bar);
    }
  } else {
    fg_load_rows<FG_BN, true>(dst, 0, g + (fg_i64)t.n0 * ld_g, ld_g, t.nend - t.n0, cols, COLS, pt, 128);
    fg_cp_async_mbar_arrive(bar);
  }
}
#if FG_WGMMA_TMA
#define FG_WS_MAP(x) (&maps.x)
#else
#define FG_WS_MAP(x) nullptr
#endif
#endif

#if FG_WGMMA_WS
#ifndef FG_WGMMA_PERSISTENT
#define FG_WGMMA_PERSISTENT 0
#endif
// Runs body(x, h, b) for each CTA of the grid (n_qtiles, Hq, B) this CTA stands for: itself, or with
// FG_WGMMA_PERSISTENT (a grid of one CTA an SM) the grid CTAs it takes from `queue` (FgJobQueue, flex_wgmma.cuh;
// `lead`: the producer warpgroup, which takes them from p.job_counter once `tile_free` has completed `tiles_run`
// phases: Q and the row parts are free), x fastest, so that one's epilogue (the output stores)
// overlaps the next one's Q, row parts and first K / V. Each grid CTA still runs once, on one CTA, with the same
// arithmetic: the same bits either way. `body` returns early for a CTA with no rows.
template <class F>
__device__ __forceinline__ void fg_fwd_for_each_cta(const FgFwdParams& p, FgJobQueue* queue, bool lead,
                                                    unsigned long long* tile_free, const int& tiles_run, F&& body) {
#if FG_WGMMA_PERSISTENT
  const int nx = p.n_qtiles;
  for (int it = 0;; ++it) {
    const int job = fg_job_take(*queue, it, p.job_counter, nx * p.Hq * p.B, lead, fg_smem_addr(tile_free), tiles_run);
    if (job < 0) break;
    body(job % nx, job / nx % p.Hq, job / (nx * p.Hq));
  }
#else
  (void)queue, (void)lead, (void)tile_free, (void)tiles_run;
  body((int)blockIdx.x, (int)blockIdx.y, (int)blockIdx.z);
#endif
}
#elif defined(FG_WGMMA_PERSISTENT) && FG_WGMMA_PERSISTENT
#error "flex_fwd_wgmma: FG_WGMMA_PERSISTENT needs a warp-specialised loop (FG_WGMMA_PIPE 2 or 3)"
#endif

extern "C" __global__ void __launch_bounds__(FG_NT_LAUNCH, FG_MIN_BLOCKS)
    flex_fwd_wgmma(const FgFwdParams p, const FgModArgs args FG_FWD_WGMMA_EXTRA_PARAMS) {
  extern __shared__ __align__(16) unsigned char fg_smem_raw[];
  // The 128-byte swizzle is a function of the address bits: atoms must start 1024-byte aligned, which the
  // dynamic window (placed after any static shared memory) does not promise. The host adds 1024 bytes.
  unsigned char* const smem = fg_smem_raw + ((1024u - (fg_smem_addr(fg_smem_raw) & 1023u)) & 1023u);
  fg_h16* Qs = (fg_h16*)smem;             // E / 64 atoms of BM x 64
  fg_h16* Ks = Qs + FG_BM * FG_E;         // 2 buffers of E / 64 atoms of BN x 64
  fg_h16* Vs = Ks + 2 * FG_BN * FG_E;     // 2 buffers of Ev / 64 atoms of BN x 64

#if !FG_WGMMA_WS  // (the warp-specialised loops set these per grid CTA: fg_fwd_for_each_cta)
  int qb, m0, m_end;
  if (!fg_cta_rows(p, FG_BM, qb, m0, m_end)) return;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / p.group, bk = p.Bkv == 1 ? 0 : b;
  const fg_h16* qg = (const fg_h16*)p.q + b * p.q_sb + h * p.q_sh + (fg_i64)m0 * p.q_sl;
  const fg_h16* kg = (const fg_h16*)p.k + bk * p.k_sb + hk * p.k_sh;
  const fg_h16* vg = (const fg_h16*)p.v + bk * p.v_sb + hk * p.v_sh;
  const FgRowTiles rt = fg_row_tiles(p, b, h, qb);
#endif

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int wrow = warp * 16;        // first row of this warp in the tile (one m16 fragment per warp)
  const int wg = warp >> 2;          // its warpgroup: rows 64 wg .. 64 wg + 63
  const float scale = (float)p.scale;

  float o[1][FG_EV / 8][4];  // the P V accumulators: Ev / 64 m64n64 atoms, atom a = o[0][8 a .. 8 a + 7]
  float m[1][2], l[1][2];
  bool saw_nan[1][2];        // a NaN score next to a +inf max (fg_row_end)
#if !FG_WGMMA_WS
  fg_frag_init(o, m, l, saw_nan);
#endif

#if FG_WGMMA_PIPE == 1
  FgTile cur = fg_first_tile(p, rt);
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
  // The mods' row parts once per CTA; the column parts of sub-tile j in col_mods[j % 3], written before barrier
  // j - 1 (which publishes them; barrier j - 2 retired sub-tile j - 3's readers). Three buffers rather than two
  // written after a barrier: ptxas serializes every wgmma (C7520) when a captured read's error path (an atomic,
  // flex_abi.cuh) runs divergently between a barrier and the next wgmma.
  __shared__ FgRowMods<float> row_mods[FG_BM];
  __shared__ FgColMods<float> col_mods[3][FG_BN];
  for (int r = threadIdx.x; r < FG_BM; r += FG_NT)
    if (m0 + r < m_end) fg_row_mods(row_mods[r], cur.i < rt.n_total, cur.i < rt.n_partial, b, h, m0 + r, args);
  if (cur.i < rt.n_total && (FG_HAS_SCORE_MOD || cur.i < rt.n_partial))
    for (int c = threadIdx.x; c < FG_BN; c += FG_NT)
      col_mods[0][c] = fg_col_mods<float>(cur.n0 + c < cur.nend, cur.i < rt.n_partial, b, h, cur.n0 + c, args);
  __syncthreads();  // reconverge before the loads (else C7520, as below)
#endif
  fg_load_tile_sw128<FG_BM, FG_E>(Qs, qg, p.q_sl, m_end - m0, p.E);
  if (cur.i < rt.n_total) {
    fg_load_tile_sw128<FG_BN, FG_E>(Ks, kg + (fg_i64)cur.n0 * p.k_sl, p.k_sl, cur.nend - cur.n0, p.E);
  }
  fg_cp_async_commit();

  // This warpgroup's 64 rows of Q: 8 KiB into each Q atom (a multiple of 1024 bytes, so the swizzle phase holds).
  const unsigned q_addr = fg_smem_addr(Qs) + wg * (64 * 128);
  float s[1][FG_BN / 8][4];          // S_j, then P_j in f32
  unsigned pa[FG_BN / 16][4] = {};  // P_{j-1} as A fragments (k16 step kk = C fragments 2 kk, 2 kk + 1)
  float corr[1][2];                 // O's factor for sub-tile j (fg_frag_softmax_p)

  // S = Q K_j^T from K buffer j & 1; O += P V_j from V buffer j & 1.
  auto issue_s = [&](int j) { fg_issue_qk(s, q_addr, fg_smem_addr(Ks + (j & 1) * (FG_BN * FG_E))); };
  auto issue_pv = [&](int j) { fg_issue_pv(o, pa, fg_smem_addr(Vs + (j & 1) * (FG_BN * FG_EV))); };
  // Scale, mods, bounds of S_j and the online softmax (flex_forward_common.cuh, as flex_fwd_mma), O untouched.
  auto softmax = [&](const FgTile& t, int j) {
    const bool partial = t.i < rt.n_partial;
    const bool simple = !FG_HAS_SCORE_MOD && !(FG_HAS_MASK_MOD && partial) && m0 + FG_BM <= m_end &&
                        t.n0 + FG_BN <= t.nend;
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
    fg_frag_mod_scores(s, simple, partial, scale, wrow, g, t4, m0, m_end, t, row_mods, col_mods[j % 3], b, h, args);
#else
    (void)j;
    fg_frag_mod_scores(s, simple, partial, scale, wrow, g, t4, m0, m_end, t, nullptr, nullptr, b, h, args);
#endif
    fg_frag_softmax_p(s, m, l, saw_nan, corr, simple, scale);
  };
  // K_{j+1} (over K_{j-1}) and V_j (over V_{j-2}); the callers' barrier retired their last readers.
  auto load_kv = [&](const FgTile& t, const FgTile& tn, int j) {
    if (tn.i < rt.n_total)
      fg_load_tile_sw128<FG_BN, FG_E>(Ks + ((j + 1) & 1) * (FG_BN * FG_E), kg + (fg_i64)tn.n0 * p.k_sl, p.k_sl,
                                      tn.nend - tn.n0, p.E);
    fg_load_tile_sw128<FG_BN, FG_EV>(Vs + (j & 1) * (FG_BN * FG_EV), vg + (fg_i64)t.n0 * p.v_sl, p.v_sl,
                                     t.nend - t.n0, p.Ev);
    fg_cp_async_commit();
  };
  // Barrier of iteration j: sub-tile j + 1's column parts into col_mods[(j + 1) % 3] first (last read by
  // sub-tile j - 2, before barrier j - 1), then K_j and V_{j-1} landed for every thread, col_mods published,
  // every warpgroup past iteration j - 1.
  auto barrier = [&](const FgTile& tn, int j) {
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
    if (tn.i < rt.n_total && (FG_HAS_SCORE_MOD || tn.i < rt.n_partial))
      for (int c = threadIdx.x; c < FG_BN; c += FG_NT)
        col_mods[(j + 1) % 3][c] = fg_col_mods<float>(tn.n0 + c < tn.nend, tn.i < rt.n_partial, b, h, tn.n0 + c, args);
#else
    (void)tn;
    (void)j;
#endif
    fg_cp_async_wait<0>();
    fg_fence_proxy_async();  // this thread's cp.async / st.shared writes become visible to wgmma (async proxy)
    __syncthreads();
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < FG_BN / 16; ++kk) fg_pack_c_to_a<FG_IS_BF16>(s[0][2 * kk], s[0][2 * kk + 1], pa[kk]);
  };

  // The schedule (FA3's intra-warpgroup overlap): sub-tile 0's S and softmax alone, then per sub-tile j >= 1
  //   barrier;  O *= corr_{j-1};  issue S_j = Q K_j^T;  issue O += P_{j-1} V_{j-1};  cp.async K_{j+1}, V_j;
  //   wait for S_j only (wait_group 1);  mods + softmax -> P_j, corr_j while P_{j-1} V_{j-1} runs;
  //   wait for P V (O, and P_{j-1}'s registers);  pack P_j
  // and the last P V after the loop. The first and last iterations are peeled: a wgmma issued under a branch,
  // or O rescaled under one, makes ptxas serialize every wgmma of the kernel (C7514).
  if (cur.i < rt.n_total) {
    FgTile nxt = fg_next_tile<FG_BN>(p, rt, cur);
    int j = 0;
    barrier(nxt, j);
    fg_wgmma_fence();
    issue_s(j);
    load_kv(cur, nxt, j);
    fg_wgmma_wait<0>();
    fg_wgmma_fence_operands<FG_BN / 2>(&s[0][0][0]);
    softmax(cur, j);
    pack_p();
    while (nxt.i < rt.n_total) {
      cur = nxt;
      nxt = fg_next_tile<FG_BN>(p, rt, cur);
      ++j;
      barrier(nxt, j);
      fg_frag_rescale_o(o, corr);  // before this stage's wgmma: O is not in flight
      fg_wgmma_fence();
      issue_s(j);
      issue_pv(j - 1);
      load_kv(cur, nxt, j);
      fg_wgmma_wait<1>();  // S_j (P_{j-1} V_{j-1} may still run)
      fg_wgmma_fence_operands<FG_BN / 2>(&s[0][0][0]);
      softmax(cur, j);
      fg_wgmma_wait<0>();  // P_{j-1} V_{j-1}: O and pa are free
      fg_wgmma_fence_operands<FG_EV / 2>(&o[0][0][0]);
      fg_wgmma_fence_operands_u<FG_BN / 4>(&pa[0][0]);
      pack_p();
    }
    barrier(nxt, j + 1);  // V_j landed (nxt is past the end: no column parts)
    fg_frag_rescale_o(o, corr);
    fg_wgmma_fence();
    issue_pv(j);
    fg_wgmma_wait<0>();
    fg_wgmma_fence_operands<FG_EV / 2>(&o[0][0][0]);
  }
#elif FG_WGMMA_WS
  // Warp-specialised: an extra warpgroup is a producer that copies Q once and every sub-tile's K and V
  // (TMA from one thread for whole sub-tiles with FG_WGMMA_TMA, else cp.async by its 128 threads) into two
  // stages, evaluates the sub-tile's mod column parts, and signals each stage on an mbarrier when its copies
  // land (expected TMA bytes, cp.async.mbarrier.arrive); the consumer
  // warpgroups wait on those barriers, not on each other, so one warpgroup's softmax can run while the
  // other's products use the tensor cores. A consumer warp releases a stage's K (and its column parts) after
  // its mods and its V after its P V.
  __shared__ __align__(8) unsigned long long bar_q, bar_q_free, bar_k_full[2], bar_v_full[2], bar_k_free[2],
      bar_v_free[2];
  __shared__ FgJobQueue queue;  // FG_WGMMA_PERSISTENT's
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
  __shared__ FgRowMods<float> row_mods[FG_BM];
  __shared__ FgColMods<float> col_mods[2][FG_BN];
#endif
  if (threadIdx.x == 0) {
    // Q's barrier: the producer threads' 128 copy completions and their 128 arrivals after the copy loop and the
    // row parts (which release those and the element copies of !FG_VEC). Each K / V full barrier likewise: 128
    // cp.async completions and 128 arrivals (which release the column parts), or with TMA the bytes thread 0
    // expects and 128 double arrivals (fg_ws_issue_subtile, fg_ws_publish).
    fg_mbar_init(fg_smem_addr(&bar_q), 256);
    fg_mbar_init(fg_smem_addr(&bar_q_free), FG_WARPS);  // the consumer warps are done with Q and the row parts
    if (FG_WGMMA_PERSISTENT) fg_job_queue_init(queue, FG_WARPS + 4);  // read by every warp
    for (int st = 0; st < 2; ++st) {
      fg_mbar_init(fg_smem_addr(&bar_k_full[st]), FG_WS_FULL_COUNT);
      fg_mbar_init(fg_smem_addr(&bar_v_full[st]), FG_WS_FULL_COUNT);
      fg_mbar_init(fg_smem_addr(&bar_k_free[st]), FG_WARPS);
      fg_mbar_init(fg_smem_addr(&bar_v_free[st]), FG_WARPS);
    }
    fg_mbar_fence_init();
  }
  __syncthreads();  // barriers initialised: the only CTA-wide barrier

  if (warp >= FG_WARPS) {  // the producer warpgroup: its four warps copy (one warp's copy loop was the pace)
    // Registers move from the producer warpgroup to the consumers (setmaxnreg): ptxas gives a 384-thread
    // kernel 168 a thread, under which the consumers' accumulators spill and ptxas serialises the wgmma (C7512).
    // The consumers' increase waits until the producer's decrease has freed the registers (above the kernel).
    fg_setmaxnreg_dec<FG_WS_PRODUCER_REGS>();
    const int pt = threadIdx.x - FG_NT;  // 0 .. 127
    int j = 0;   // the stages' position, carried from grid CTA to grid CTA
    int it = 0;  // the grid CTAs run so far
    fg_fwd_for_each_cta(p, &queue, true, &bar_q_free, it, [&](int x, int h, int b) {
      int qb, m0, m_end;
      if (!fg_tile_rows(p, FG_BM, x, qb, m0, m_end)) return;
      const int hk = h / p.group, bk = p.Bkv == 1 ? 0 : b;
      const fg_h16* qg = (const fg_h16*)p.q + b * p.q_sb + h * p.q_sh + (fg_i64)m0 * p.q_sl;
      const fg_h16* kg = (const fg_h16*)p.k + bk * p.k_sb + hk * p.k_sh;
      const fg_h16* vg = (const fg_h16*)p.v + bk * p.v_sb + hk * p.v_sh;
      const FgRowTiles rt = fg_row_tiles(p, b, h, qb);
      // (The previous grid CTA's Q and row parts stay until its consumers have run their last mods step:
      // fg_fwd_for_each_cta waited.)
      fg_load_rows<FG_BM, true>(Qs, 0, qg, p.q_sl, m_end - m0, p.E, FG_E, pt, 128);
      fg_cp_async_mbar_arrive(fg_smem_addr(&bar_q));
      FgTile t = fg_first_tile(p, rt);
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
      // The row parts while Q is in flight (a captured mask's reads wait on memory as the copies do).
      for (int r = pt; r < FG_BM; r += 128)
        if (m0 + r < m_end) fg_row_mods(row_mods[r], t.i < rt.n_total, t.i < rt.n_partial, b, h, m0 + r, args);
#endif
      fg_mbar_arrive(fg_smem_addr(&bar_q));
      // V of sub-tile jv (stage jv & 1, free once sub-tile jv - 2's V is released).
      auto issue_v = [&](const FgTile& tv, int jv) {
        const int st = jv & 1;
        if (jv >= 2) fg_mbar_wait(fg_smem_addr(&bar_v_free[st]), ((jv >> 1) - 1) & 1);
        const bool tma = FG_WGMMA_TMA && tv.nend - tv.n0 == FG_BN;
        fg_ws_issue_subtile<FG_EV>(Vs + st * (FG_BN * FG_EV), FG_WS_MAP(v), vg, p.v_sl, p.Ev, tv, hk, bk,
                                   fg_smem_addr(&bar_v_full[st]), tma, pt);
        fg_ws_publish(fg_smem_addr(&bar_v_full[st]), !tma);
      };
#if FG_WGMMA_PIPE == 3
      // FlashAttention-3's order, K_0, K_1, V_0, K_2, V_1, ...: the consumers release V_{j-1} only at the end of
      // sub-tile j, and K_{j+1}'s stage is free from the middle of sub-tile j - 1 on; V first would hold K back.
      FgTile tv = t;
      const int j0 = j;
#endif
      for (; t.i < rt.n_total; ++j) {
        const int st = j & 1;
        const unsigned reuse_phase = ((j >> 1) - 1) & 1;  // the phase that freed this stage (sub-tile j - 2)
        if (j >= 2) fg_mbar_wait(fg_smem_addr(&bar_k_free[st]), reuse_phase);
        // TMA takes whole sub-tiles only: past a clipped sub-tile's end (a kv block shorter than BN) its box would
        // bring the next block's rows, where the kernels' contract is zeros (a masked column's V row must not
        // reach P V: 0 * inf). Past Lkv the tensor map itself yields zeros.
        const bool tma = FG_WGMMA_TMA && t.nend - t.n0 == FG_BN;
        fg_ws_issue_subtile<FG_E>(Ks + st * (FG_BN * FG_E), FG_WS_MAP(k), kg, p.k_sl, p.E, t, hk, bk,
                                  fg_smem_addr(&bar_k_full[st]), tma, pt);
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
        // The column parts while K is in flight; the arrival below publishes them with the stage.
        if (FG_HAS_SCORE_MOD || t.i < rt.n_partial)
          for (int c = pt; c < FG_BN; c += 128)
            col_mods[st][c] = fg_col_mods<float>(t.n0 + c < t.nend, t.i < rt.n_partial, b, h, t.n0 + c, args);
#endif
        fg_ws_publish(fg_smem_addr(&bar_k_full[st]), !tma);
#if FG_WGMMA_PIPE == 3
        if (j > j0) {
          issue_v(tv, j - 1);
          tv = t;
        }
#else
        issue_v(t, j);
#endif
        t = fg_next_tile<FG_BN>(p, rt, t);
      }
#if FG_WGMMA_PIPE == 3
      if (j > j0) issue_v(tv, j - 1);
#endif
      ++it;
    });
    fg_cp_async_wait<0>();
  } else {
    // The consumers: this warpgroup's 64 rows of Q (8 KiB into each Q atom).
    fg_setmaxnreg_inc<FG_WS_CONSUMER_REGS>();
    int j = 0, it = 0;  // as the producer's
#if FG_WGMMA_PIPE == 3 && FG_WGMMA_PINGPONG
    // The turns (named barriers 1 and 2) run on from grid CTA to grid CTA: warpgroup 0 issues first, each warpgroup
    // passes the turn after every issue, so warpgroup 0 may start the next grid CTA while warpgroup 1 stores this
    // one's rows; warpgroup 1 issues last, and warpgroup 0 takes that last turn at the end (no barrier is left
    // half-arrived at exit).
    if (wg == 1) fg_named_arrive(1, 2 * 128);
#endif
    fg_fwd_for_each_cta(p, &queue, false, &bar_q_free, it, [&](int x, int h, int b) {
      int qb, m0, m_end;
      if (!fg_tile_rows(p, FG_BM, x, qb, m0, m_end)) return;
      const FgRowTiles rt = fg_row_tiles(p, b, h, qb);
      fg_frag_init(o, m, l, saw_nan);
      const unsigned q_addr = fg_smem_addr(Qs) + wg * (64 * 128);
      fg_mbar_wait(fg_smem_addr(&bar_q), it & 1);
      FgTile cur = fg_first_tile(p, rt);
      // Scale, mods and bounds of S (sub-tile t, in stage st), then K and its column parts released (every consumer
      // warp arrives); returns whether the sub-tile was `simple` (the softmax then scales it).
      auto mods_step = [&](float (&s)[1][FG_BN / 8][4], const FgTile& t, int st) {
        const bool partial = t.i < rt.n_partial;
        const bool simple = !FG_HAS_SCORE_MOD && !(FG_HAS_MASK_MOD && partial) && m0 + FG_BM <= m_end &&
                            t.n0 + FG_BN <= t.nend;
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
        fg_frag_mod_scores(s, simple, partial, scale, wrow, g, t4, m0, m_end, t, row_mods, col_mods[st], b, h, args);
#else
        fg_frag_mod_scores(s, simple, partial, scale, wrow, g, t4, m0, m_end, t, nullptr, nullptr, b, h, args);
#endif
        __syncwarp();
        if (lane == 0) fg_mbar_arrive(fg_smem_addr(&bar_k_free[st]));
        return simple;
      };
#if FG_WGMMA_PIPE == 2
      for (; cur.i < rt.n_total; ++j) {
        const int st = j & 1;
        const unsigned phase = (j >> 1) & 1;
        const FgTile nxt = fg_next_tile<FG_BN>(p, rt, cur);
        fg_mbar_wait(fg_smem_addr(&bar_k_full[st]), phase);
        fg_fence_proxy_async();  // the producer's cp.async writes, acquired through the barrier, seen by wgmma

        float s[1][FG_BN / 8][4];  // no zeroing: the first step does not accumulate
        fg_wgmma_fence();
        fg_issue_qk(s, q_addr, fg_smem_addr(Ks + st * (FG_BN * FG_E)));
        fg_wgmma_wait<0>();
        fg_wgmma_fence_operands<FG_BN / 2>(&s[0][0][0]);

        const bool simple = mods_step(s, cur, st);
        fg_frag_softmax_update(s, o, m, l, saw_nan, simple, scale);
        unsigned pa[FG_BN / 16][4];
#pragma unroll
        for (int kk = 0; kk < FG_BN / 16; ++kk) fg_pack_c_to_a<FG_IS_BF16>(s[0][2 * kk], s[0][2 * kk + 1], pa[kk]);

        fg_mbar_wait(fg_smem_addr(&bar_v_full[st]), phase);
        fg_fence_proxy_async();
        fg_wgmma_fence();
        fg_issue_pv(o, pa, fg_smem_addr(Vs + st * (FG_BN * FG_EV)));
        fg_wgmma_wait<0>();
        fg_wgmma_fence_operands<FG_EV / 2>(&o[0][0][0]);
        __syncwarp();
        if (lane == 0) fg_mbar_arrive(fg_smem_addr(&bar_v_free[st]));
        cur = nxt;
      }
#else
      // FG_WGMMA_PIPE 3: FlashAttention-3's intra-warpgroup overlap on the producer's stages. Per sub-tile j >= 1
      //   wait K_j and V_{j-1};  O *= corr_{j-1};  issue S_j = Q K_j^T and O += P_{j-1} V_{j-1};
      //   wait for S_j only;  mods + softmax -> P_j, corr_j (while P_{j-1} V_{j-1} runs);  release K_j;
      //   wait for P V;  release V_{j-1};  pack P_j
      // with sub-tile 0's S and softmax before the loop and the last P V after it (peeled as FG_WGMMA_PIPE 1's:
      // a wgmma issued under a branch serialises them all). V_j is released one sub-tile later than in
      // FG_WGMMA_PIPE 2, so the producer loads K_{j+1} before V_j (FlashAttention-3's order).
      // With FG_WGMMA_PINGPONG the two warpgroups also take turns issuing their products (named barriers 1 and
      // 2), so that one's softmax runs while the other's products hold the tensor cores.
      if (cur.i < rt.n_total) {
        float s[1][FG_BN / 8][4];          // S_j, then P_j in f32
        unsigned pa[FG_BN / 16][4];       // P_{j-1} as A fragments
        float corr[1][2];                 // O's factor for the P V of the sub-tile last softmaxed
        const unsigned k_addr = fg_smem_addr(Ks), v_addr = fg_smem_addr(Vs);
        // Mods and bounds of S_j (stage st; K_j and its column parts released), then the online softmax.
        auto softmax = [&](const FgTile& t, int st) {
          const bool simple = mods_step(s, t, st);
          fg_frag_softmax_p(s, m, l, saw_nan, corr, simple, scale);
        };
        auto pack_p = [&]() {
#pragma unroll
          for (int kk = 0; kk < FG_BN / 16; ++kk) fg_pack_c_to_a<FG_IS_BF16>(s[0][2 * kk], s[0][2 * kk + 1], pa[kk]);
        };
        FgTile nxt = fg_next_tile<FG_BN>(p, rt, cur);
        fg_mbar_wait(fg_smem_addr(&bar_k_full[j & 1]), (j >> 1) & 1);
        fg_fence_proxy_async();
#if FG_WGMMA_PINGPONG
        fg_named_sync(1 + wg, 2 * 128);
#endif
        fg_wgmma_fence();
        fg_issue_qk(s, q_addr, k_addr + (j & 1) * (FG_BN * FG_E * 2));
#if FG_WGMMA_PINGPONG
        fg_named_arrive(2 - wg, 2 * 128);
#endif
        fg_wgmma_wait<0>();
        fg_wgmma_fence_operands<FG_BN / 2>(&s[0][0][0]);
        softmax(cur, j & 1);
        pack_p();
        while (nxt.i < rt.n_total) {
          cur = nxt;
          nxt = fg_next_tile<FG_BN>(p, rt, cur);
          ++j;
          const int st = j & 1, pst = st ^ 1;
          fg_mbar_wait(fg_smem_addr(&bar_k_full[st]), (j >> 1) & 1);
          fg_mbar_wait(fg_smem_addr(&bar_v_full[pst]), ((j - 1) >> 1) & 1);
          fg_fence_proxy_async();
          fg_frag_rescale_o(o, corr);  // O is not in flight
          // (Kept before the fence and the turn: moved past them, ptxas injected warpgroup.arrive, C7519.)
          fg_wgmma_fence_operands<FG_EV / 2>(&o[0][0][0]);
#if FG_WGMMA_PINGPONG
          fg_named_sync(1 + wg, 2 * 128);
#endif
          fg_wgmma_fence();
          fg_issue_qk(s, q_addr, k_addr + st * (FG_BN * FG_E * 2));
          fg_issue_pv(o, pa, v_addr + pst * (FG_BN * FG_EV * 2));
#if FG_WGMMA_PINGPONG
          fg_named_arrive(2 - wg, 2 * 128);
#endif
          fg_wgmma_wait<1>();  // S_j (P_{j-1} V_{j-1} may still run)
          fg_wgmma_fence_operands<FG_BN / 2>(&s[0][0][0]);
          softmax(cur, st);
          fg_wgmma_wait<0>();  // P_{j-1} V_{j-1}: O and pa are free, and V_{j-1}'s stage
          fg_wgmma_fence_operands<FG_EV / 2>(&o[0][0][0]);
          fg_wgmma_fence_operands_u<FG_BN / 4>(&pa[0][0]);
          __syncwarp();
          if (lane == 0) fg_mbar_arrive(fg_smem_addr(&bar_v_free[pst]));
          pack_p();
        }
        const int st = j & 1;
        fg_mbar_wait(fg_smem_addr(&bar_v_full[st]), (j >> 1) & 1);
        fg_fence_proxy_async();
        fg_frag_rescale_o(o, corr);
        fg_wgmma_fence_operands<FG_EV / 2>(&o[0][0][0]);
#if FG_WGMMA_PINGPONG
        fg_named_sync(1 + wg, 2 * 128);
#endif
        fg_wgmma_fence();
        fg_issue_pv(o, pa, v_addr + st * (FG_BN * FG_EV * 2));
#if FG_WGMMA_PINGPONG
        fg_named_arrive(2 - wg, 2 * 128);  // (warpgroup 1's last turn goes to the next grid CTA's first issue)
#endif
        fg_wgmma_wait<0>();
        fg_wgmma_fence_operands<FG_EV / 2>(&o[0][0][0]);
        __syncwarp();
        if (lane == 0) fg_mbar_arrive(fg_smem_addr(&bar_v_free[st]));  // (for the next grid CTA's producer)
        ++j;
      }
#endif
      // Q and the row parts are no longer read: the producer may load the next grid CTA's while these rows go out.
      __syncwarp();
      if (lane == 0) fg_mbar_arrive(fg_smem_addr(&bar_q_free));
      fg_frag_store<FG_IS_BF16>(o, m, l, saw_nan, p, b, h, m0, m_end, wrow, g, t4);
      ++it;
    });
#if FG_WGMMA_PIPE == 3 && FG_WGMMA_PINGPONG
    if (wg == 0) fg_named_sync(1, 2 * 128);
#endif
  }
#else
  FgTile cur = fg_first_tile(p, rt);
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
  // The mods' row parts once per CTA, each sub-tile's column parts, in shared memory (as flex_fwd_mma).
  __shared__ FgRowMods<float> row_mods[FG_BM];
  __shared__ FgColMods<float> col_mods[FG_BN];
  for (int r = threadIdx.x; r < FG_BM; r += FG_NT)
    if (m0 + r < m_end) fg_row_mods(row_mods[r], cur.i < rt.n_total, cur.i < rt.n_partial, b, h, m0 + r, args);
#endif
  fg_load_tile_sw128<FG_BM, FG_E>(Qs, qg, p.q_sl, m_end - m0, p.E);
  if (cur.i < rt.n_total) {
    fg_load_tile_sw128<FG_BN, FG_E>(Ks, kg + (fg_i64)cur.n0 * p.k_sl, p.k_sl, cur.nend - cur.n0, p.E);
  }
  fg_cp_async_commit();
  if (cur.i < rt.n_total) {
    fg_load_tile_sw128<FG_BN, FG_EV>(Vs, vg + (fg_i64)cur.n0 * p.v_sl, p.v_sl, cur.nend - cur.n0, p.Ev);
  }
  fg_cp_async_commit();

  // This warpgroup's 64 rows of Q: 8 KiB into each Q atom (a multiple of 1024 bytes, so the swizzle phase holds).
  const unsigned q_addr = fg_smem_addr(Qs) + wg * (64 * 128);
  int buf = 0;
  while (cur.i < rt.n_total) {
    const FgTile nxt = fg_next_tile<FG_BN>(p, rt, cur);
    const bool partial = cur.i < rt.n_partial;
    fg_h16* Kb = Ks + buf * (FG_BN * FG_E);
    fg_h16* Vb = Vs + buf * (FG_BN * FG_EV);
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
    // (the previous tile's readers of col_mods are past the barrier before its P V)
    if (FG_HAS_SCORE_MOD || partial)
      for (int c = threadIdx.x; c < FG_BN; c += FG_NT)
        col_mods[c] = fg_col_mods<float>(cur.n0 + c < cur.nend, partial, b, h, cur.n0 + c, args);
#endif
    fg_cp_async_wait<1>();   // this tile's K (and Q) landed; its V may still be in flight
    fg_fence_proxy_async();  // this thread's cp.async / st.shared writes become visible to wgmma (async proxy)
    __syncthreads();

    // S = Q K^T.
    float s[1][FG_BN / 8][4];  // no zeroing: the first step does not accumulate
    fg_wgmma_fence();
    fg_issue_qk(s, q_addr, fg_smem_addr(Kb));

    // Next tile's K into the other buffer while the tensor cores work (its last reader, the previous Q K^T,
    // completed before this iteration's barrier).
    if (nxt.i < rt.n_total) {
      fg_load_tile_sw128<FG_BN, FG_E>(Ks + (buf ^ 1) * (FG_BN * FG_E), kg + (fg_i64)nxt.n0 * p.k_sl, p.k_sl,
                                      nxt.nend - nxt.n0, p.E);
    }
    fg_cp_async_commit();
    fg_wgmma_wait<0>();
    fg_wgmma_fence_operands<FG_BN / 2>(&s[0][0][0]);

    // Scale, mods, bounds; the online softmax update (flex_forward_common.cuh, as flex_fwd_mma).
    const bool simple = !FG_HAS_SCORE_MOD && !(FG_HAS_MASK_MOD && partial) && m0 + FG_BM <= m_end &&
                        cur.n0 + FG_BN <= cur.nend;
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
    fg_frag_mod_scores(s, simple, partial, scale, wrow, g, t4, m0, m_end, cur, row_mods, col_mods, b, h, args);
#else
    fg_frag_mod_scores(s, simple, partial, scale, wrow, g, t4, m0, m_end, cur, nullptr, nullptr, b, h, args);
#endif
    fg_frag_softmax_update(s, o, m, l, saw_nan, simple, scale);

    // P as A fragments (k16 step kk = C fragments 2 kk, 2 kk + 1), before the barrier so S's registers free.
    unsigned pa[FG_BN / 16][4];
#pragma unroll
    for (int kk = 0; kk < FG_BN / 16; ++kk) fg_pack_c_to_a<FG_IS_BF16>(s[0][2 * kk], s[0][2 * kk + 1], pa[kk]);

    fg_cp_async_wait<1>();  // this tile's V landed (the next K may be in flight)
    fg_fence_proxy_async();
    __syncthreads();

    // O += P V.
    fg_wgmma_fence();
    fg_issue_pv(o, pa, fg_smem_addr(Vb));

    if (nxt.i < rt.n_total) {
      fg_load_tile_sw128<FG_BN, FG_EV>(Vs + (buf ^ 1) * (FG_BN * FG_EV), vg + (fg_i64)nxt.n0 * p.v_sl, p.v_sl,
                                       nxt.nend - nxt.n0, p.Ev);
    }
    fg_cp_async_commit();
    fg_wgmma_wait<0>();
    fg_wgmma_fence_operands<FG_EV / 2>(&o[0][0][0]);
    cur = nxt;
    buf ^= 1;
  }
#endif
#if !FG_WGMMA_WS  // (the warp-specialised consumers store their rows above)
  fg_cp_async_wait<0>();

  // Epilogue: out = O / l (0 for empty rows), lse = m + ln l (-inf when empty), max_scores = m.
  fg_frag_store<FG_IS_BF16>(o, m, l, saw_nan, p, b, h, m0, m_end, wrow, g, t4);
#endif
}
