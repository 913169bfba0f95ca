// FlexAttention forward for short queries on CUDA (decoding): split-KV ("flash-decoding") with the GQA
// group packed into the query tile. Compiled by NVRTC after flex_abi.cuh, the generated mods and
// flex_mma.cuh; bf16 / f16 only (tensor cores, f32 accumulation).
//
// Why a second forward kernel: with one or a few query rows per head, the tiled forward (flex_forward.cuh)
// runs one mostly-empty 128-row tile per (head, batch) and reads each K/V head once per query head, on a
// grid far smaller than the GPU. Decoding is bound by memory bandwidth, so this kernel
//  - packs the `pack` query heads that share a K/V head (the GQA group, when the BlockMask is the same for
//    all heads) and their q rows into one 16 * MF-row tile: each K/V head is read once per row tile;
//  - splits the kv blocks of the BlockMask row into `splits` ranges, one CTA each, so that there are enough
//    CTAs to fill every SM; each CTA writes f32 partials (unnormalised O, row max, row sum) and the last CTA
//    of a tile to finish (an atomic count per tile) combines them by their log-sum-exp: no second kernel
//    (splits == 1 writes the output directly; with FG_CLUSTER 2, the two CTAs of a tile form a thread-block
//    cluster and merge through distributed shared memory instead: no partials in global memory, no fence, no
//    count, each CTA writing half of the tile's output columns);
//  - inside a CTA, each warp streams its share of the CTA's range in 16-column kv slices through its own
//    FG_STAGES-deep cp.async pipeline (no CTA barrier in the loop: a warp never waits for another, and up to
//    FG_STAGES slices per warp are in flight while it waits), runs S = Q K^T and O += P V on each with
//    mma.sync m16n8k16 and its own online softmax; the warps' (m, l, O) are combined at the end. The share:
//    warp w takes the listed blocks w, w + FG_WARPS, ... when the range has at least 2 * FG_WARPS of them, else
//    the slices w, w + FG_WARPS, ... (so a short range still keeps every warp busy). Block-wise, a warp's
//    cursor steps over the other warps' blocks in one move; slice-wise it walks each of their slices, which
//    cost 8-warp CTAs 20% on paged caches (64-token pages: two block changes per slice taken).
// K/V are read in place wherever the BlockMask points: through a PagedAttention-converted mask those are
// the physical pages (block_kv = page size), so a paged cache is read without any gather copy.
//
// Semantics are the tiled kernel's: partial blocks apply the mask_mod, full blocks skip it; out-of-range
// rows and columns never reach a mod; the non-finite rule of fg_row_end (flex_mma.cuh, applied again in the
// merge below) holds across warps and splits because each partial carries a NaN flag.
//
// Configuration macros (attention/cuda/flex_decode_cuda.cpp):
//   FG_ELEM       FG_DT_BFLOAT16 | FG_DT_FLOAT16
//   FG_E, FG_EV   head dims padded to 16 (the real ones are kernel params)
//   FG_MF         m16 fragments per warp: the tile has 16 * FG_MF packed rows
//   FG_WARPS      warps per CTA, each with its own pipeline
//   FG_STAGES     slices per warp pipeline (its depth)
//   FG_VEC        1 when every q/k/v row starts 16-byte aligned and E, Ev are multiples of 8
//   FG_MIN_BLOCKS __launch_bounds__ minimum CTAs per SM
//   FG_CLUSTER    0, or 2 (splits == 2, sm_90+): the two CTAs of a tile merge through a thread-block cluster
#pragma once

#ifndef FG_CLUSTER
#define FG_CLUSTER 0
#endif

#define FG_IS_BF16 (FG_ELEM == FG_DT_BFLOAT16)
#define FG_NT (FG_WARPS * 32)
#define FG_BM (16 * FG_MF)
#define FG_SLICE 16
#define FG_LDK (FG_E + FG_SMEM_PAD_B16)
#define FG_LDV (FG_EV + FG_SMEM_PAD_B16)

// Host mirror: DecodeParams in attention/cuda/flex_decode_cuda.cpp (same declaration order and types).
struct FgDecParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;        // [B, Hq, Lq, Ev] contiguous, q's dtype (by the CTA when splits == 1, else by the tile's last CTA)
  float* lse;       // [B, Hq, Lq]
  float* mx;        // [B, Hq, Lq]
  float* part_o;    // [splits, B * Hq * Lq, Ev] unnormalised partial outputs (splits > 1)
  float* part_ml;   // [splits, B * Hq * Lq, 3]: row max, row sum, NaN flag (splits > 1)
  int* counters;    // [B, Hq / pack, n_row_tiles] CTAs of each tile done (splits > 1): 0 at launch, 0 again at the end
  fg_i64 q_sb, q_sh, q_sl;
  fg_i64 k_sb, k_sh, k_sl;
  fg_i64 v_sb, v_sh, v_sl;
  const int* num;
  const int* idx;
  const int* full_num;
  const int* full_idx;
  double scale;
  int B, Hq, Lq, Hkv, Lkv, Bkv, group;
  int E, Ev;
  int Bm, Hm, rows, idx_cols, full_cols;
  int block_q, block_kv;
  int pack;              // query heads per CTA (gridDim.y = Hq / pack)
  int tiles_per_qblock;  // row tiles per q block: ceil(pack * min(block_q, Lq) / BM)
  int n_row_tiles;       // (q blocks) * tiles_per_qblock
  int splits;            // kv ranges per row tile (gridDim.x = n_row_tiles * splits)
};

// A 16-column kv slice: columns [n0, min(n0 + 16, nend)) of one listed block (nend: the block's end,
// clipped to Lkv), `partial` when the block is a partial one. n0 < 0: no slice.
struct FgSlice {
  int n0, nend, partial;
};

// The walk over the listed blocks [i, i_end) of one BlockMask row, 16 columns at a time, visiting every
// `step`-th block (1: every block, the warps sharing the walk slice by slice; FG_WARPS: this warp's blocks).
// Every thread of a warp runs it (uniform control flow within each warp), so no thread has to tell the
// others where a stage's slices come from. The row's block indices come through a register cache: lane l
// holds entry base + l (v0) and base + 32 + l (v1), read with one coalesced load per 32 entries issued 32
// entries before they are needed (a block-wise walk, stepping FG_WARPS <= 32 entries, still moves through
// the cache in order).
// Reading them one by one put a dependent global load in front of every slice a warp issues (with 4 warps
// and 64-column blocks each warp's next slice is in the next block), which starved the copy pipelines.
struct FgSliceCursor {
  const int* partial;
  const int* full;
  int n_partial;
  int i, i_end;  // position in partial ++ full
  int step;      // blocks per move: 1 (slice-wise shares) or FG_WARPS (block-wise shares)
  int n0, nend;
  int base, v0, v1;
};
// Entry j of partial ++ full, -1 at or past i_end (never read).
__device__ __forceinline__ int fg_dec_entry_load(const FgSliceCursor& c, int j) {
  if (j >= c.i_end) return -1;
  return j < c.n_partial ? c.partial[j] : c.full[j - c.n_partial];
}
__device__ __forceinline__ int fg_dec_entry(FgSliceCursor& c, int j) {
  const int lane = threadIdx.x & 31;
  if (j < c.base || j >= c.base + 64) {  // the first read of a range: fill both halves
    c.base = j;
    c.v0 = fg_dec_entry_load(c, j + lane);
    c.v1 = fg_dec_entry_load(c, j + 32 + lane);
  } else if (j >= c.base + 32) {  // into the second half: shift, and prefetch the next 32 entries
    c.base += 32;
    c.v0 = c.v1;
    c.v1 = fg_dec_entry_load(c, c.base + 32 + lane);
  }
  return __shfl_sync(0xffffffffu, c.v0, j - c.base);
}
__device__ __forceinline__ void fg_dec_seek(const FgDecParams& p, FgSliceCursor& c) {
  for (; c.i < c.i_end; c.i += c.step) {
    const int blk = fg_dec_entry(c, c.i);
    const fg_i64 kv0 = (fg_i64)blk * p.block_kv;
    if (blk >= 0 && kv0 < p.Lkv) {
      c.n0 = (int)kv0;
      const fg_i64 e = kv0 + p.block_kv;
      c.nend = e < p.Lkv ? (int)e : p.Lkv;
      return;
    }
  }
}
__device__ __forceinline__ FgSlice fg_dec_take(const FgDecParams& p, FgSliceCursor& c) {
  FgSlice s;
  if (c.i >= c.i_end) {
    s.n0 = -1;
    s.nend = 0;
    s.partial = 0;
    return s;
  }
  s.n0 = c.n0;
  s.nend = c.nend;
  s.partial = c.i < c.n_partial;
  c.n0 += FG_SLICE;
  if (c.n0 >= c.nend) {
    c.i += c.step;
    fg_dec_seek(p, c);
  }
  return s;
}

// One slice of K and V rows into a warp's buffers (the warp's 32 lanes share the copies), zero-filled past
// the slice's end.
__device__ __forceinline__ void fg_dec_load_slice(const FgDecParams& p, const FgSlice& sl, fg_h16* Kb, fg_h16* Vb,
                                                  const fg_h16* kg, const fg_h16* vg, int lane) {
  const int rows = sl.nend - sl.n0 < FG_SLICE ? sl.nend - sl.n0 : FG_SLICE;
  fg_load_rows<FG_SLICE>(Kb, FG_LDK, kg + (fg_i64)sl.n0 * p.k_sl, p.k_sl, rows, p.E, FG_E, lane, 32);
  fg_load_rows<FG_SLICE>(Vb, FG_LDV, vg + (fg_i64)sl.n0 * p.v_sl, p.v_sl, rows, p.Ev, FG_EV, lane, 32);
}
// This warp's next slice: the cursor's next one; slice-wise, the other warps' FG_WARPS - 1 are then skipped.
__device__ __forceinline__ FgSlice fg_dec_take_mine(const FgDecParams& p, FgSliceCursor& c) {
  const FgSlice s = fg_dec_take(p, c);
  if (c.step == 1) {
#pragma unroll
    for (int w = 1; w < FG_WARPS; ++w) fg_dec_take(p, c);
  }
  return s;
}

// Weight of a partial with row max `m` in a combination whose max is `mx` (0 for an empty partial).
__device__ __forceinline__ float fg_dec_weight(float m, float mx) {
  return m == fg_neg_inf() ? 0.f : fg_exp2((m - mx) * FG_LOG2E);
}

// Column `col` of global row `grow` of the output, and from column 0 its lse and max, at the end of its softmax.
__device__ __forceinline__ void fg_dec_store(const FgDecParams& p, fg_i64 grow, int col, float osum,
                                             const FgRowEnd<float>& e) {
  if (col < p.Ev) {
    const float x = osum * e.inv;
    ((fg_h16*)p.out)[grow * p.Ev + col] = FG_IS_BF16 ? fg_float_to_bf16(x) : fg_float_to_f16(x);
  }
  if (col == 0) {
    p.lse[grow] = e.lse;
    p.mx[grow] = e.max;
  }
}

#if FG_CLUSTER
// Thread-block clusters (sm_90): this CTA's rank, a barrier over every thread of the cluster (release / acquire:
// shared-memory writes before it are seen by the other CTA's reads after it), and 4-byte reads of another
// CTA's shared memory at the address `smem_addr` has there.
__device__ __forceinline__ unsigned fg_cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ void fg_cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ float fg_cluster_ld_f32(const float* p, unsigned rank) {
  unsigned remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(fg_smem_addr(p)), "r"(rank));
  float v;
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
  return v;
}
#endif

extern "C" __global__ void __launch_bounds__(FG_NT, FG_MIN_BLOCKS)
#if FG_CLUSTER
    __cluster_dims__(FG_CLUSTER, 1, 1)
#endif
    flex_decode_mma(const FgDecParams p, const FgModArgs args) {
  extern __shared__ __align__(16) unsigned char fg_smem_raw[];
  fg_h16* Qs = (fg_h16*)fg_smem_raw;                             // FG_BM x FG_LDK
  fg_h16* Ks = Qs + FG_BM * FG_LDK;                              // FG_WARPS x FG_STAGES x 16 x FG_LDK
  fg_h16* Vs = Ks + FG_WARPS * FG_STAGES * FG_SLICE * FG_LDK;    // FG_WARPS x FG_STAGES x 16 x FG_LDV
  __shared__ FgSlice slices[FG_WARPS][FG_STAGES];  // the slice in each buffer of each warp
  __shared__ int row_h[FG_BM], row_q[FG_BM];  // head and q index of each packed row (row_q -1: padding)

  const int tile = (int)blockIdx.x / p.splits, split = (int)blockIdx.x % p.splits;
  const int qb = tile / p.tiles_per_qblock, lt = tile % p.tiles_per_qblock;
  const int b = blockIdx.z, h0 = (int)blockIdx.y * p.pack;
  const int q0 = qb * p.block_q;
  const int nq = p.Lq - q0 < p.block_q ? p.Lq - q0 : p.block_q;  // q rows of this q block
  const int packed = p.pack * nq;
  const int r0 = lt * FG_BM;
  if (r0 >= packed) return;
  for (int r = threadIdx.x; r < FG_BM; r += FG_NT) {
    const int pr = r0 + r;
    row_h[r] = pr < packed ? h0 + pr / nq : h0;
    row_q[r] = pr < packed ? q0 + pr % nq : -1;
  }
  const int hk = h0 / p.group, bk = p.Bkv == 1 ? 0 : b;
  const fg_h16* kg = (const fg_h16*)p.k + bk * p.k_sb + hk * p.k_sh;
  const fg_h16* vg = (const fg_h16*)p.v + bk * p.v_sb + hk * p.v_sh;

  // This CTA's range of the row's listed blocks (partial ones first, then full ones).
  FgSliceCursor cur;
  {
    const int bm = p.Bm == 1 ? 0 : b, hm = p.Hm == 1 ? 0 : h0;  // pack > 1 only when the mask ignores h
    const fg_i64 row = ((fg_i64)bm * p.Hm + hm) * p.rows + qb;
    int np = 0, nf = 0;
    cur.partial = nullptr;
    cur.full = nullptr;
    if (p.num != nullptr && qb < p.rows) {
      np = p.num[row];
      cur.partial = p.idx + row * p.idx_cols;
    }
    if (p.full_num != nullptr && qb < p.rows) {
      nf = p.full_num[row];
      cur.full = p.full_idx + row * p.full_cols;
    }
    cur.n_partial = np;
    const int per = (np + nf + p.splits - 1) / p.splits;
    const int start = split * per;
    cur.i_end = start + per < np + nf ? start + per : np + nf;
    cur.step = cur.i_end - start >= 2 * FG_WARPS ? FG_WARPS : 1;
    cur.i = cur.step == 1 ? start : start + (int)(threadIdx.x >> 5);  // block-wise: warp w starts at block w
    cur.n0 = cur.nend = 0;
    cur.base = -(1 << 30);  // nothing cached yet
    cur.v0 = cur.v1 = -1;
    fg_dec_seek(p, cur);
  }

  // Q rows of the tile (gathered: each packed row is its own head / q index).
  __syncthreads();  // row_h / row_q
  {
    constexpr int ch = FG_E / 8;
    for (int c = threadIdx.x; c < FG_BM * ch; c += FG_NT) {
      const int r = c / ch, col = (c % ch) * 8;
      fg_h16* dst = Qs + r * FG_LDK + col;
      const fg_h16* src = (const fg_h16*)p.q + b * p.q_sb + row_h[r] * p.q_sh + (fg_i64)(row_q[r] < 0 ? 0 : row_q[r]) * p.q_sl;
#if FG_VEC
      const bool ok = row_q[r] >= 0 && col < p.E;
      fg_cp_async16(fg_smem_addr(dst), ok ? (const void*)(src + col) : (const void*)p.q, ok);
#else
#pragma unroll
      for (int j = 0; j < 8; ++j) dst[j] = (row_q[r] >= 0 && col + j < p.E) ? src[col + j] : (fg_h16)0;
#endif
    }
  }
  fg_cp_async_commit();  // Q: the oldest group of every thread
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t4 = lane & 3;
  const float scale = (float)p.scale;
  float o[FG_MF][FG_EV / 8][4];
  float m[FG_MF][2], l[FG_MF][2];
  bool saw_nan[FG_MF][2];
#pragma unroll
  for (int f = 0; f < FG_MF; ++f) {
#pragma unroll
    for (int n = 0; n < FG_EV / 8; ++n) o[f][n][0] = o[f][n][1] = o[f][n][2] = o[f][n][3] = 0.f;
    m[f][0] = m[f][1] = fg_neg_inf();
    l[f][0] = l[f][1] = 0.f;
    saw_nan[f][0] = saw_nan[f][1] = false;
  }
  const unsigned qs_addr = fg_smem_addr(Qs);

  // This warp's pipeline: its slices in order through FG_STAGES buffers. Slice j's copies are the (j + 1)-th
  // group of each lane (group 0 is Q); empty groups keep the count when the range runs out.
  if (cur.step == 1)
    for (int w = 0; w < warp; ++w) fg_dec_take(p, cur);  // slice-wise: warp w starts at slice w
  fg_h16* Kw0 = Ks + warp * FG_STAGES * FG_SLICE * FG_LDK;
  fg_h16* Vw0 = Vs + warp * FG_STAGES * FG_SLICE * FG_LDV;
  int issued = 0;  // slices issued (they come in order: the first empty one ends the range)
#pragma unroll
  for (int st = 0; st < FG_STAGES - 1; ++st) {
    const FgSlice sl = fg_dec_take_mine(p, cur);
    if (lane == 0) slices[warp][st] = sl;
    if (sl.n0 >= 0) {
      fg_dec_load_slice(p, sl, Kw0 + st * FG_SLICE * FG_LDK, Vw0 + st * FG_SLICE * FG_LDV, kg, vg, lane);
      ++issued;
    }
    fg_cp_async_commit();
  }
  fg_cp_async_wait<FG_STAGES - 1>();  // Q landed (for this thread's copies) ...
  __syncthreads();                    // ... and for every thread's: the only CTA barrier before the end

  for (int j = 0; j < issued; ++j) {
    {
      // Refill the buffer slice j - 1 used (its readers passed the __syncwarp that ended iteration j - 1).
      const int nb = (j + FG_STAGES - 1) % FG_STAGES;
      const FgSlice sl = fg_dec_take_mine(p, cur);
      if (lane == 0) slices[warp][nb] = sl;
      if (sl.n0 >= 0) {
        fg_dec_load_slice(p, sl, Kw0 + nb * FG_SLICE * FG_LDK, Vw0 + nb * FG_SLICE * FG_LDV, kg, vg, lane);
        ++issued;
      }
      fg_cp_async_commit();
    }
    fg_cp_async_wait<FG_STAGES - 1>();  // slice j landed (the FG_STAGES - 1 newer ones may be in flight)
    __syncwarp();                       // ... for every lane of the warp
    const int buf = j % FG_STAGES;
    const FgSlice sl = slices[warp][buf];
    const fg_h16* Kw = Kw0 + buf * FG_SLICE * FG_LDK;
    const fg_h16* Vw = Vw0 + buf * FG_SLICE * FG_LDV;

    // S = Q K^T over this warp's 16 columns.
    float s[FG_MF][2][4];
#pragma unroll
    for (int f = 0; f < FG_MF; ++f)
#pragma unroll
      for (int n = 0; n < 2; ++n) s[f][n][0] = s[f][n][1] = s[f][n][2] = s[f][n][3] = 0.f;
    const unsigned kb_addr = fg_smem_addr(Kw);
#pragma unroll
    for (int kk = 0; kk < FG_E / 16; ++kk) {
      unsigned bk4[4];
      fg_ldsm_x4(bk4, kb_addr + 2 * fg_ldsm_bt_offset(lane, 0, 16 * kk, FG_LDK));
#pragma unroll
      for (int f = 0; f < FG_MF; ++f) {
        unsigned a[4];
        fg_ldsm_x4(a, qs_addr + 2 * fg_ldsm_a_offset(lane, 16 * f, 16 * kk, FG_LDK));
        fg_mma<FG_IS_BF16>(s[f][0], a, bk4);
        fg_mma<FG_IS_BF16>(s[f][1], a, bk4 + 2);
      }
    }

    // Scale, mods (the whole mod per entry: decoding has few rows, and each entry it evaluates is one the
    // CPU evaluates too), bounds; then the online softmax update of rows g and g + 8 of each fragment.
    const bool full_slice = sl.n0 + FG_SLICE <= sl.nend;
#pragma unroll
    for (int f = 0; f < FG_MF; ++f) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = 16 * f + g + 8 * hf, qi = row_q[row], h = row_h[row];
        float mx = fg_neg_inf();
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int kvi = sl.n0 + 8 * n + 2 * t4 + c;
            float& v = s[f][n][2 * hf + c];
            if (qi < 0 || (!full_slice && kvi >= sl.nend)) {
              v = fg_neg_inf();
            } else {
              v *= scale;
#if FG_HAS_SCORE_MOD
              v = fg_score_mod<float>(v, b, h, qi, kvi, args);
#endif
#if FG_HAS_MASK_MOD
              if (sl.partial && !fg_mask_mod(b, h, qi, kvi, args)) v = fg_neg_inf();
#endif
            }
            mx = fmaxf(mx, v);
          }
        }
        mx = fg_quad_max(mx);
        const float m_new = fmaxf(m[f][hf], mx);
        if (m_new == -fg_neg_inf()) {  // exp(inf - inf) below hides whether a NaN was there too
#pragma unroll
          for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int c = 0; c < 2; ++c) saw_nan[f][hf] |= s[f][n][2 * hf + c] != s[f][n][2 * hf + c];
        }
        const float m_use = m_new == fg_neg_inf() ? 0.f : m_new;
        const float corr = fg_exp2((m[f][hf] - m_use) * FG_LOG2E);
        const float ms = m_use * FG_LOG2E;
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float e = fg_exp2(fmaf(s[f][n][2 * hf + c], FG_LOG2E, -ms));
            s[f][n][2 * hf + c] = e;
            sum += e;
          }
        }
        l[f][hf] = l[f][hf] * corr + sum;
        m[f][hf] = m_new;
#pragma unroll
        for (int n = 0; n < FG_EV / 8; ++n) {
          o[f][n][2 * hf] *= corr;
          o[f][n][2 * hf + 1] *= corr;
        }
      }
    }

    // O += P V (P from registers, V through ldmatrix.trans).
    const unsigned vb_addr = fg_smem_addr(Vw);
    unsigned a[FG_MF][4];
#pragma unroll
    for (int f = 0; f < FG_MF; ++f) fg_pack_c_to_a<FG_IS_BF16>(s[f][0], s[f][1], a[f]);
#pragma unroll
    for (int n2 = 0; n2 < FG_EV / 16; ++n2) {
      unsigned bv[4];
      fg_ldsm_x4_trans(bv, vb_addr + 2 * fg_ldsm_b_trans_offset(lane, 0, 16 * n2, FG_LDV));
#pragma unroll
      for (int f = 0; f < FG_MF; ++f) {
        fg_mma<FG_IS_BF16>(o[f][2 * n2], a[f], bv);
        fg_mma<FG_IS_BF16>(o[f][2 * n2 + 1], a[f], bv + 2);
      }
    }
    __syncwarp();  // buffer `buf` is read: the next iteration may refill it
  }
  fg_cp_async_wait<0>();
  __syncthreads();  // every warp's buffers are free: reused below for the warps' partials

  // Combine the warps: per row the max over warps, each warp's O and l weighted by exp(m_w - max).
  float* red_ml = (float*)Ks;                  // [FG_WARPS][FG_BM][3]: m, l, NaN flag
  float* red_o = red_ml + FG_WARPS * FG_BM * 3;  // [FG_WARPS][FG_BM][FG_EV]
#pragma unroll
  for (int f = 0; f < FG_MF; ++f) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = 16 * f + g + 8 * hf;
      const float lsum = fg_quad_sum(l[f][hf]);
      bool saw = saw_nan[f][hf];
      saw |= __shfl_xor_sync(0xffffffffu, (int)saw, 1) != 0;
      saw |= __shfl_xor_sync(0xffffffffu, (int)saw, 2) != 0;
      if (t4 == 0) {
        float* ml = red_ml + (warp * FG_BM + row) * 3;
        ml[0] = m[f][hf];
        ml[1] = lsum;
        ml[2] = (saw || (lsum != lsum && m[f][hf] != -fg_neg_inf())) ? 1.f : 0.f;
      }
      float* orow = red_o + (warp * FG_BM + row) * FG_EV;
#pragma unroll
      for (int n = 0; n < FG_EV / 8; ++n) {
        orow[8 * n + 2 * t4] = o[f][n][2 * hf];
        orow[8 * n + 2 * t4 + 1] = o[f][n][2 * hf + 1];
      }
    }
  }
  __syncthreads();

  const fg_i64 n_rows_total = (fg_i64)p.B * p.Hq * p.Lq;
  float* cta_o = red_o + FG_WARPS * FG_BM * FG_EV;  // FG_CLUSTER: [FG_BM][FG_EV] this CTA's combination
  float* cta_ml = cta_o + FG_BM * FG_EV;            // [FG_BM][3]
  for (int idx = threadIdx.x; idx < FG_BM * FG_EV; idx += FG_NT) {
    const int row = idx / FG_EV, col = idx % FG_EV;
    const int qi = row_q[row];
    if (qi < 0) continue;
    float mxw = fg_neg_inf();
#pragma unroll
    for (int w = 0; w < FG_WARPS; ++w) mxw = fmaxf(mxw, red_ml[(w * FG_BM + row) * 3]);
    float osum = 0.f, lsum = 0.f;
    bool nan_row = false;
#pragma unroll
    for (int w = 0; w < FG_WARPS; ++w) {
      const float* ml = red_ml + (w * FG_BM + row) * 3;
      const float wt = fg_dec_weight(ml[0], mxw);
      osum += wt * red_o[(w * FG_BM + row) * FG_EV + col];
      lsum += wt * ml[1];
      nan_row |= ml[2] != 0.f;
    }
    const fg_i64 grow = ((fg_i64)b * p.Hq + row_h[row]) * p.Lq + qi;
    if (p.splits == 1) {
      fg_dec_store(p, grow, col, osum, fg_row_end<float>(mxw, lsum, nan_row));
    } else if (FG_CLUSTER) {
      cta_o[row * FG_EV + col] = osum;
      if (col == 0) {
        cta_ml[row * 3] = mxw;
        cta_ml[row * 3 + 1] = lsum;
        cta_ml[row * 3 + 2] = nan_row ? 1.f : 0.f;
      }
    } else {
      const fg_i64 prow = (fg_i64)split * n_rows_total + grow;
      if (col < p.Ev) p.part_o[prow * p.Ev + col] = osum;
      if (col == 0) {
        p.part_ml[prow * 3] = mxw;
        p.part_ml[prow * 3 + 1] = lsum;
        p.part_ml[prow * 3 + 2] = nan_row ? 1.f : 0.f;
      }
    }
  }
  if (p.splits == 1) return;

#if FG_CLUSTER
  // The two CTAs of the tile (cluster ranks = splits 0 and 1) merge their combinations in split order, each
  // taking half of the output columns (and rank 0 the lse and max); the second barrier keeps both CTAs' shared
  // memory alive until the other has read it.
  fg_cluster_sync();
  {
    const unsigned rank = fg_cluster_rank(), other = rank ^ 1u;
    constexpr int half = FG_EV / 2;
    for (int idx = threadIdx.x; idx < FG_BM * half; idx += FG_NT) {
      const int row = idx / half, col = (int)rank * half + idx % half;
      const int qi = row_q[row];
      if (qi < 0) continue;
      float m[2], l[2], o[2];
      bool nan_row = false;
#pragma unroll
      for (int sp = 0; sp < 2; ++sp) {
        const float* ml = cta_ml + row * 3;
        const float* ov = cta_o + row * FG_EV + col;
        const bool mine = (unsigned)sp == rank;
        m[sp] = mine ? ml[0] : fg_cluster_ld_f32(ml, other);
        l[sp] = mine ? ml[1] : fg_cluster_ld_f32(ml + 1, other);
        nan_row |= (mine ? ml[2] : fg_cluster_ld_f32(ml + 2, other)) != 0.f;
        o[sp] = mine ? *ov : fg_cluster_ld_f32(ov, other);
      }
      const float mxs = fmaxf(m[0], m[1]);
      float osum = 0.f, lsum = 0.f;
#pragma unroll
      for (int sp = 0; sp < 2; ++sp) {
        const float w = fg_dec_weight(m[sp], mxs);
        osum += w * o[sp];
        lsum += w * l[sp];
      }
      fg_dec_store(p, ((fg_i64)b * p.Hq + row_h[row]) * p.Lq + qi, col, osum, fg_row_end<float>(mxs, lsum, nan_row));
    }
  }
  fg_cluster_sync();
  return;
#endif

  // The last CTA of this tile to finish merges every split's partials (the CUDA threadFenceReduction
  // pattern: partials visible device-wide before the count, read through L2 after it). It also sets the count
  // back to 0, so the counters stay zeroed between launches on a stream and no launch needs a memset first.
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  int* cnt = p.counters + ((fg_i64)b * gridDim.y + blockIdx.y) * p.n_row_tiles + tile;
  if (threadIdx.x == 0) is_last = atomicAdd(cnt, 1) == p.splits - 1;
  __syncthreads();
  if (!is_last) return;
  if (threadIdx.x == 0) *cnt = 0;  // every other CTA of the tile has counted: nobody reads it again this launch
  __threadfence();
  // A warp per row. Lane s takes split s (s < 32; more splits loop in rounds of 32), so each round of the
  // merge is one batch of independent L2 reads rather than a dependent read per split: the merge sits on the
  // kernel's critical path (it starts when the tile's slowest CTA ends).
  for (int row = warp; row < FG_BM; row += FG_WARPS) {
    const int qi = row_q[row];
    if (qi < 0) continue;
    const fg_i64 grow = ((fg_i64)b * p.Hq + row_h[row]) * p.Lq + qi;
    float mxs = fg_neg_inf();
    for (int s = lane; s < p.splits; s += 32) mxs = fmaxf(mxs, __ldcg(p.part_ml + ((fg_i64)s * n_rows_total + grow) * 3));
    mxs = fg_warp_max(mxs);
    float lsum = 0.f;
    bool nan_row = false;
    constexpr int kCols = (FG_EV + 31) / 32;  // output columns per lane
    float osum[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) osum[c] = 0.f;
    for (int s0 = 0; s0 < p.splits; s0 += 32) {
      float w = 0.f;  // split s0 + lane's weight
      if (s0 + lane < p.splits) {
        const float* ml = p.part_ml + ((fg_i64)(s0 + lane) * n_rows_total + grow) * 3;
        w = fg_dec_weight(__ldcg(ml), mxs);
        lsum += w * __ldcg(ml + 1);
        nan_row |= __ldcg(ml + 2) != 0.f;
      }
      const int ns = p.splits - s0 < 32 ? p.splits - s0 : 32;
#pragma unroll 4
      for (int j = 0; j < ns; ++j) {
        const float wj = __shfl_sync(0xffffffffu, w, j);
        const float* po = p.part_o + ((fg_i64)(s0 + j) * n_rows_total + grow) * p.Ev;
#pragma unroll
        for (int c = 0; c < kCols; ++c)
          if (lane + 32 * c < p.Ev) osum[c] += wj * __ldcg(po + lane + 32 * c);
      }
    }
    lsum = fg_warp_sum(lsum);
    nan_row = __any_sync(0xffffffffu, nan_row);
    const FgRowEnd<float> e = fg_row_end<float>(mxs, lsum, nan_row);
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int col = lane + 32 * c;
      if (col < p.Ev) {
        const float x = osum[c] * e.inv;
        ((fg_h16*)p.out)[grow * p.Ev + col] = FG_IS_BF16 ? fg_float_to_bf16(x) : fg_float_to_f16(x);
      }
    }
    if (lane == 0) {
      p.lse[grow] = e.lse;
      p.mx[grow] = e.max;
    }
  }
}


