// FlexAttention forward on CUDA: online softmax over the BlockMask's blocks, one CTA per
// (q tile, head, batch). Compiled by NVRTC after flex_abi.cuh, the generated mods and flex_mma.cuh.
//
// Two kernels, one per translation unit (the host picks by dtype):
//  - flex_fwd_mma  (bf16 / f16): FlashAttention-2 on tensor cores. Warps split the q tile by rows (16 * MF
//    rows each), S = Q K^T and O += P V by mma.sync m16n8k16 with f32 accumulators, P kept in registers
//    (the S fragment is the A fragment of P V), K and V tiles double-buffered with cp.async.
//  - flex_fwd_simt (f32 / f64): exact FMA arithmetic on CUDA cores (no TF32), register-tiled 4x4 per
//    thread, the golden-quality kernel for f64 and the exact path for f32.
// (The Hopper kernel flex_fwd_wgmma is in flex_forward_wgmma.cuh; the parameter block, the tile walk and the
// fragment-level online softmax all three use are in flex_forward_common.cuh.)
//
// Both walk the same tiles: the q block `qb` of the BlockMask is covered by ceil(block_q / BM) CTAs, each
// BM rows clipped to the block and to Lq; each listed kv block (partial ones first, then full ones) is
// visited in BN-column sub-tiles clipped to the block and to Lkv. Out-of-range rows and columns never
// reach a mod (a captured read there could report a bogus IndexError) and get -inf scores; loads
// outside the tensors are zero-filled, never read.
//
// Configuration macros (set by attention/cuda/flex_forward_cuda.cpp):
//   FG_ELEM        FG_DT_BFLOAT16 | FG_DT_FLOAT16 | FG_DT_FLOAT32 | FG_DT_FLOAT64
//   FG_E, FG_EV    head dims padded (to 16 for mma, to 4 for simt); the real ones are kernel params
//   FG_BM, FG_BN   q rows per CTA, kv columns per sub-tile
//   FG_WARPS       warps per CTA (mma; simt always uses 256 threads)
//   FG_VEC         1 when every q/k/v row starts 16-byte aligned and E, Ev are multiples of 8 (mma:
//                  cp.async 16 bytes; else element loads)
//   FG_MIN_BLOCKS  __launch_bounds__ minimum CTAs per SM
#pragma once
#include "flex_forward_common.cuh"

#if FG_ELEM == FG_DT_BFLOAT16 || FG_ELEM == FG_DT_FLOAT16
// =================================================================================================
// Tensor-core kernel (bf16 / f16)
// =================================================================================================
#define FG_IS_BF16 (FG_ELEM == FG_DT_BFLOAT16)
#define FG_NT (FG_WARPS * 32)
#define FG_MF (FG_BM / (16 * FG_WARPS))  // m16 fragments per warp
#define FG_LDQ (FG_E + FG_SMEM_PAD_B16)
#define FG_LDV (FG_EV + FG_SMEM_PAD_B16)

// FG_BN x COLS tiles of 16-bit elements: fg_load_rows (flex_mma.cuh) with every thread of the CTA.
template <int ROWS, int COLS, int LD>
__device__ __forceinline__ void fg_load_tile(fg_h16* s, const fg_h16* g, fg_i64 ld_g, int nrows, int cols) {
  fg_load_rows<ROWS>(s, LD, g, ld_g, nrows, cols, COLS, threadIdx.x, FG_NT);
}

extern "C" __global__ void __launch_bounds__(FG_NT, FG_MIN_BLOCKS)
    flex_fwd_mma(const FgFwdParams p, const FgModArgs args) {
  extern __shared__ __align__(16) unsigned char fg_smem_raw[];
  fg_h16* Qs = (fg_h16*)fg_smem_raw;
  fg_h16* Ks = Qs + FG_BM * FG_LDQ;      // 2 buffers of FG_BN x FG_LDQ
  fg_h16* Vs = Ks + 2 * FG_BN * FG_LDQ;  // 2 buffers of FG_BN x FG_LDV

  int qb, m0, m_end;
  if (!fg_cta_rows(p, FG_BM, qb, m0, m_end)) return;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / p.group, bk = p.Bkv == 1 ? 0 : b;
  const fg_h16* qg = (const fg_h16*)p.q + b * p.q_sb + h * p.q_sh + (fg_i64)m0 * p.q_sl;
  const fg_h16* kg = (const fg_h16*)p.k + bk * p.k_sb + hk * p.k_sh;
  const fg_h16* vg = (const fg_h16*)p.v + bk * p.v_sb + hk * p.v_sh;
  const FgRowTiles rt = fg_row_tiles(p, b, h, qb);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const int wrow = warp * (16 * FG_MF);  // first row of this warp in the tile
  const float scale = (float)p.scale;

  float o[FG_MF][FG_EV / 8][4];
  float m[FG_MF][2], l[FG_MF][2];
  bool saw_nan[FG_MF][2];  // a NaN score next to a +inf max (where the sum cannot show it); see the epilogue
  fg_frag_init(o, m, l, saw_nan);

  FgTile cur = fg_first_tile(p, rt);
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
  // The mods' row parts, once per CTA, and each sub-tile's column parts, in shared memory: registers are
  // all taken by the S and O fragments. Published by the loop's first barrier.
  __shared__ FgRowMods<float> row_mods[FG_BM];
  __shared__ FgColMods<float> col_mods[FG_BN];
  for (int r = threadIdx.x; r < FG_BM; r += FG_NT)
    if (m0 + r < m_end) fg_row_mods(row_mods[r], cur.i < rt.n_total, cur.i < rt.n_partial, b, h, m0 + r, args);
#endif
  fg_load_tile<FG_BM, FG_E, FG_LDQ>(Qs, qg, p.q_sl, m_end - m0, p.E);
  if (cur.i < rt.n_total) {
    fg_load_tile<FG_BN, FG_E, FG_LDQ>(Ks, kg + (fg_i64)cur.n0 * p.k_sl, p.k_sl, cur.nend - cur.n0, p.E);
  }
  fg_cp_async_commit();
  if (cur.i < rt.n_total) {
    fg_load_tile<FG_BN, FG_EV, FG_LDV>(Vs, vg + (fg_i64)cur.n0 * p.v_sl, p.v_sl, cur.nend - cur.n0, p.Ev);
  }
  fg_cp_async_commit();

  const unsigned qs_addr = fg_smem_addr(Qs);
  int buf = 0;
  while (cur.i < rt.n_total) {
    const FgTile nxt = fg_next_tile<FG_BN>(p, rt, cur);
    const bool partial = cur.i < rt.n_partial;
    fg_h16* Kb = Ks + buf * (FG_BN * FG_LDQ);
    fg_h16* Vb = Vs + buf * (FG_BN * FG_LDV);
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
    // (the previous tile's readers of col_mods are past the barrier before its P V)
    if (FG_HAS_SCORE_MOD || partial)
      for (int c = threadIdx.x; c < FG_BN; c += FG_NT)
        col_mods[c] = fg_col_mods<float>(cur.n0 + c < cur.nend, partial, b, h, cur.n0 + c, args);
#endif
    fg_cp_async_wait<1>();  // this tile's K (and Q) landed; its V may still be in flight
    __syncthreads();

    // S = Q K^T (f32 accumulators)
    float s[FG_MF][FG_BN / 8][4];
#pragma unroll
    for (int f = 0; f < FG_MF; ++f)
#pragma unroll
      for (int n = 0; n < FG_BN / 8; ++n) s[f][n][0] = s[f][n][1] = s[f][n][2] = s[f][n][3] = 0.f;
    const unsigned kb_addr = fg_smem_addr(Kb);
#pragma unroll
    for (int kk = 0; kk < FG_E / 16; ++kk) {
      unsigned a[FG_MF][4];
#pragma unroll
      for (int f = 0; f < FG_MF; ++f)
        fg_ldsm_x4(a[f], qs_addr + 2 * fg_ldsm_a_offset(lane, wrow + 16 * f, 16 * kk, FG_LDQ));
#pragma unroll
      for (int n2 = 0; n2 < FG_BN / 16; ++n2) {
        unsigned bk4[4];
        fg_ldsm_x4(bk4, kb_addr + 2 * fg_ldsm_bt_offset(lane, 16 * n2, 16 * kk, FG_LDQ));
#pragma unroll
        for (int f = 0; f < FG_MF; ++f) {
          fg_mma<FG_IS_BF16>(s[f][2 * n2], a[f], bk4);
          fg_mma<FG_IS_BF16>(s[f][2 * n2 + 1], a[f], bk4 + 2);
        }
      }
    }

    // Next tile's K into the other buffer (its last reader finished before this iteration's barrier).
    if (nxt.i < rt.n_total) {
      fg_load_tile<FG_BN, FG_E, FG_LDQ>(Ks + (buf ^ 1) * (FG_BN * FG_LDQ), kg + (fg_i64)nxt.n0 * p.k_sl, p.k_sl,
                                        nxt.nend - nxt.n0, p.E);
    }
    fg_cp_async_commit();

    // Scale, mods, bounds; then the online softmax update (flex_forward_common.cuh).
    const bool simple = !FG_HAS_SCORE_MOD && !(FG_HAS_MASK_MOD && partial) && m0 + FG_BM <= m_end &&
                        cur.n0 + FG_BN <= cur.nend;
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
    fg_frag_mod_scores(s, simple, partial, scale, wrow, g, t4, m0, m_end, cur, row_mods, col_mods, b, h, args);
#else
    fg_frag_mod_scores(s, simple, partial, scale, wrow, g, t4, m0, m_end, cur, nullptr, nullptr, b, h, args);
#endif
    fg_frag_softmax_update(s, o, m, l, saw_nan, simple, scale);

    fg_cp_async_wait<1>();  // this tile's V landed (the next K may be in flight)
    __syncthreads();

    // O += P V, P from registers (C fragments -> A fragments), V through ldmatrix.trans.
    const unsigned vb_addr = fg_smem_addr(Vb);
#pragma unroll
    for (int kk = 0; kk < FG_BN / 16; ++kk) {
      unsigned a[FG_MF][4];
#pragma unroll
      for (int f = 0; f < FG_MF; ++f) fg_pack_c_to_a<FG_IS_BF16>(s[f][2 * kk], s[f][2 * kk + 1], a[f]);
#pragma unroll
      for (int n2 = 0; n2 < FG_EV / 16; ++n2) {
        unsigned bv[4];
        fg_ldsm_x4_trans(bv, vb_addr + 2 * fg_ldsm_b_trans_offset(lane, 16 * kk, 16 * n2, FG_LDV));
#pragma unroll
        for (int f = 0; f < FG_MF; ++f) {
          fg_mma<FG_IS_BF16>(o[f][2 * n2], a[f], bv);
          fg_mma<FG_IS_BF16>(o[f][2 * n2 + 1], a[f], bv + 2);
        }
      }
    }

    if (nxt.i < rt.n_total) {
      fg_load_tile<FG_BN, FG_EV, FG_LDV>(Vs + (buf ^ 1) * (FG_BN * FG_LDV), vg + (fg_i64)nxt.n0 * p.v_sl, p.v_sl,
                                         nxt.nend - nxt.n0, p.Ev);
    }
    fg_cp_async_commit();
    cur = nxt;
    buf ^= 1;
  }
  fg_cp_async_wait<0>();

  // Epilogue: out = O / l (0 for empty rows), lse = m + ln l (-inf when empty), max_scores = m.
  fg_frag_store<FG_IS_BF16>(o, m, l, saw_nan, p, b, h, m0, m_end, wrow, g, t4);
}

#else
// =================================================================================================
// SIMT kernel (f32 / f64): 256 threads as 16 x 16; thread (ty, tx) owns rows ty*TM .. ty*TM+TM-1 of the
// tile, S columns tx + 16 j (j < BN/16: K rows read 16-byte vectors along E, conflict-free with the
// padded row stride) and O columns tx*TV .. tx*TV+TV-1 (V rows read as 16-byte vectors). A row lives in
// one half-warp (same ty), so row reductions are 4 xor-shuffles.
// =================================================================================================
#if FG_ELEM == FG_DT_FLOAT64
typedef double fg_t;
#else
typedef float fg_t;
#endif
#define FG_NT 256
#define FG_TM (FG_BM / 16)
#define FG_TN (FG_BN / 16)
#define FG_TV (FG_EV / 16)
#define FG_LDQ (FG_E + 4)   // keeps 16-byte vector reads aligned, rows on distinct banks
#define FG_LDP (FG_BN + 4)

__device__ __forceinline__ fg_t fg_exp(fg_t x) {
#if FG_ELEM == FG_DT_FLOAT64
  return exp(x);
#else
  return expf(x);
#endif
}
// Four consecutive elements from 16-byte-aligned shared memory.
__device__ __forceinline__ void fg_ld4(const fg_t* s, fg_t* r) {
#if FG_ELEM == FG_DT_FLOAT64
  const double2 a = *(const double2*)s, b = *(const double2*)(s + 2);
  r[0] = a.x; r[1] = a.y; r[2] = b.x; r[3] = b.y;
#else
  const float4 a = *(const float4*)s;
  r[0] = a.x; r[1] = a.y; r[2] = a.z; r[3] = a.w;
#endif
}
// nrows x cols rows of global (row stride ld_g) into shared [ROWS][LD], zero beyond; COLS = padded cols.
template <int ROWS, int COLS, int LD>
__device__ __forceinline__ void fg_load_rows(fg_t* s, const fg_t* g, fg_i64 ld_g, int nrows, int cols) {
  for (int c = threadIdx.x; c < ROWS * COLS; c += FG_NT) {
    const int r = c / COLS, col = c % COLS;
    s[r * LD + col] = (r < nrows && col < cols) ? g[r * ld_g + col] : (fg_t)0;
  }
}

extern "C" __global__ void __launch_bounds__(FG_NT, FG_MIN_BLOCKS)
    flex_fwd_simt(const FgFwdParams p, const FgModArgs args) {
  extern __shared__ __align__(16) unsigned char fg_smem_raw[];
  fg_t* Qs = (fg_t*)fg_smem_raw;     // [BM][LDQ]
  fg_t* Ks = Qs + FG_BM * FG_LDQ;    // [BN][LDQ]
  fg_t* Vs = Ks + FG_BN * FG_LDQ;    // [BN][EV]
  fg_t* Ps = Vs + FG_BN * FG_EV;     // [BM][LDP]

  int qb, m0, m_end;
  if (!fg_cta_rows(p, FG_BM, qb, m0, m_end)) return;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / p.group, bk = p.Bkv == 1 ? 0 : b;
  const fg_t* qg = (const fg_t*)p.q + b * p.q_sb + h * p.q_sh + (fg_i64)m0 * p.q_sl;
  const fg_t* kg = (const fg_t*)p.k + bk * p.k_sb + hk * p.k_sh;
  const fg_t* vg = (const fg_t*)p.v + bk * p.v_sb + hk * p.v_sh;
  const FgRowTiles rt = fg_row_tiles(p, b, h, qb);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const fg_t scale = (fg_t)p.scale;
  const fg_t ninf = (fg_t)fg_neg_inf();

  fg_t o[FG_TM][FG_TV], m[FG_TM], l[FG_TM];
  bool saw_nan[FG_TM];  // see fg_row_end
#pragma unroll
  for (int i = 0; i < FG_TM; ++i) {
    m[i] = ninf;
    l[i] = 0;
    saw_nan[i] = false;
#pragma unroll
    for (int j = 0; j < FG_TV; ++j) o[i][j] = 0;
  }
  fg_load_rows<FG_BM, FG_E, FG_LDQ>(Qs, qg, p.q_sl, m_end - m0, p.E);
  FgRowMods<fg_t> rmods[FG_TM];
  {
    const FgTile first = fg_first_tile(p, rt);
#pragma unroll
    for (int i = 0; i < FG_TM; ++i) {
      const int qi = m0 + ty * FG_TM + i;
      if (qi < m_end) fg_row_mods(rmods[i], first.i < rt.n_total, first.i < rt.n_partial, b, h, qi, args);
    }
  }

  for (FgTile cur = fg_first_tile(p, rt); cur.i < rt.n_total; cur = fg_next_tile<FG_BN>(p, rt, cur)) {
    const bool partial = cur.i < rt.n_partial;
    __syncthreads();  // the previous tile's readers of Ks / Vs / Ps are done
    fg_load_rows<FG_BN, FG_E, FG_LDQ>(Ks, kg + (fg_i64)cur.n0 * p.k_sl, p.k_sl, cur.nend - cur.n0, p.E);
    fg_load_rows<FG_BN, FG_EV, FG_EV>(Vs, vg + (fg_i64)cur.n0 * p.v_sl, p.v_sl, cur.nend - cur.n0, p.Ev);
    __syncthreads();

    fg_t s[FG_TM][FG_TN];
#pragma unroll
    for (int i = 0; i < FG_TM; ++i)
#pragma unroll
      for (int j = 0; j < FG_TN; ++j) s[i][j] = 0;
#pragma unroll 2
    for (int e = 0; e < FG_E; e += 4) {
      fg_t qv[FG_TM][4], kv[FG_TN][4];
#pragma unroll
      for (int i = 0; i < FG_TM; ++i) fg_ld4(Qs + (ty * FG_TM + i) * FG_LDQ + e, qv[i]);
#pragma unroll
      for (int j = 0; j < FG_TN; ++j) fg_ld4(Ks + (tx + 16 * j) * FG_LDQ + e, kv[j]);
#pragma unroll
      for (int i = 0; i < FG_TM; ++i)
#pragma unroll
        for (int j = 0; j < FG_TN; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) s[i][j] = fma(qv[i][c], kv[j][c], s[i][j]);
    }

#pragma unroll
    for (int j = 0; j < FG_TN; ++j) {
      const int kvi = cur.n0 + tx + 16 * j;
      const bool kv_in = kvi < cur.nend;
      const FgColMods<fg_t> cm = fg_col_mods<fg_t>(kv_in, partial, b, h, kvi, args);
#pragma unroll
      for (int i = 0; i < FG_TM; ++i) {
        const int qi = m0 + ty * FG_TM + i;
        s[i][j] = fg_modded_score<fg_t>(s[i][j] * scale, kv_in && qi < m_end, partial, rmods[i], cm, b, h, qi, kvi, args);
      }
    }
#pragma unroll
    for (int i = 0; i < FG_TM; ++i) {
      fg_t mx = ninf;
#pragma unroll
      for (int j = 0; j < FG_TN; ++j) mx = s[i][j] > mx ? s[i][j] : mx;
#pragma unroll
      for (int w = 1; w < 16; w <<= 1) {
        const fg_t y = __shfl_xor_sync(0xffffffffu, mx, w);
        mx = y > mx ? y : mx;
      }
      const fg_t m_new = m[i] > mx ? m[i] : mx;
      if (m_new == -ninf) {
#pragma unroll
        for (int j = 0; j < FG_TN; ++j) saw_nan[i] |= s[i][j] != s[i][j];
      }
      const fg_t m_use = m_new == ninf ? (fg_t)0 : m_new;
      const fg_t corr = fg_exp(m[i] - m_use);
      fg_t sum = 0;
#pragma unroll
      for (int j = 0; j < FG_TN; ++j) {
        const fg_t e = fg_exp(s[i][j] - m_use);
        Ps[(ty * FG_TM + i) * FG_LDP + tx + 16 * j] = e;
        sum += e;
      }
      l[i] = l[i] * corr + sum;  // per-thread partial; reduced over the half-warp at the end
      m[i] = m_new;
#pragma unroll
      for (int j = 0; j < FG_TV; ++j) o[i][j] *= corr;
    }
    __syncthreads();

#pragma unroll 2
    for (int k = 0; k < FG_BN; k += 4) {
      fg_t pv[FG_TM][4];
#pragma unroll
      for (int i = 0; i < FG_TM; ++i) fg_ld4(Ps + (ty * FG_TM + i) * FG_LDP + k, pv[i]);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        fg_t vv[FG_TV];
        const fg_t* vrow = Vs + (k + c) * FG_EV + tx * FG_TV;
#if FG_TV % 4 == 0
#pragma unroll
        for (int j = 0; j < FG_TV; j += 4) fg_ld4(vrow + j, vv + j);
#else
#pragma unroll
        for (int j = 0; j < FG_TV; ++j) vv[j] = vrow[j];
#endif
#pragma unroll
        for (int i = 0; i < FG_TM; ++i)
#pragma unroll
          for (int j = 0; j < FG_TV; ++j) o[i][j] = fma(pv[i][c], vv[j], o[i][j]);
      }
    }
  }

  const fg_i64 row0 = ((fg_i64)b * p.Hq + h) * p.Lq;
  fg_t* out = (fg_t*)p.out;
#pragma unroll
  for (int i = 0; i < FG_TM; ++i) {
    fg_t lsum = l[i];
#pragma unroll
    for (int w = 1; w < 16; w <<= 1) lsum += __shfl_xor_sync(0xffffffffu, lsum, w);
    bool saw = saw_nan[i];
#pragma unroll
    for (int w = 1; w < 16; w <<= 1) saw |= __shfl_xor_sync(0xffffffffu, (int)saw, w) != 0;
    const int qi = m0 + ty * FG_TM + i;
    if (qi >= m_end) continue;
    const FgRowEnd<fg_t> e = fg_row_end(m[i], lsum, saw);
    const fg_t inv = e.inv;
#pragma unroll
    for (int j = 0; j < FG_TV; ++j) {
      const int col = tx * FG_TV + j;
      if (col < p.Ev) out[(row0 + qi) * p.Ev + col] = o[i][j] * inv;
    }
    if (tx == 0) {
      ((fg_t*)p.lse)[row0 + qi] = e.lse;
      ((fg_t*)p.mx)[row0 + qi] = e.max;
    }
  }
}
#endif
