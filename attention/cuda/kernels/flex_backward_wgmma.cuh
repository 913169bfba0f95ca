// FlexAttention backward on Hopper (sm_90a only, bf16 / f16, head dims 64 or 128): the dK/dV and dQ kernels of
// flex_backward.cuh's tensor-core path with warpgroup MMA (wgmma, flex_wgmma.cuh) in place of mma.sync (issue
// 13's backward). The host (attention/cuda/flex_backward_cuda.cpp) runs them when FlexKernelOptions::cuda_backward
// is Wgmma, or on Auto with FLEXGRAD_FLEX_WGMMA_BWD=1. Compiled by NVRTC after flex_abi.cuh, the generated mods,
// the configuration macros (those of flex_backward.cuh with FG_USE_MMA 1, plus the ones below) and flex_mma.cuh.
//
// Everything but the two main kernels is flex_backward.cuh's, included here with FG_BWD_WGMMA 1: the parameter
// block, fg_bwd_preprocess and fg_bwd_cap_finalize, the walks (FgQWalk / FgKvWalk: partial blocks with the
// mask_mod, then full blocks, BlockMask blocks of any size split into 64-row steps clipped to the block and the
// sequence), the per-element fg_entry (mods in row / column parts, captured-gradient sinks, non-finite rules) and
// the epilogues. Every dQ / dK / dV element is written by one thread; no float atomics; reruns are bit-identical
// (except with FG_DQ_ATOMIC, below).
//
//   fg_bwd_dkdv_wgmma: a CTA of FG_WG_DKDV warpgroups owns FG_KV_TILE = 64 * FG_WG_DKDV kv rows (warpgroup w rows
//     64 w .. 64 w + 63; warp i of the CTA rows 16 i .. 16 i + 15, as the mma kernel's warps), K and V in shared
//     memory for the whole walk. Per q chunk of 64 rows (Q, dO, lse, delta double-buffered with cp.async, the
//     next chunk's loads issued before this chunk's products):
//       S^T = K Q^T and dP^T = V dO^T: wgmma m64n64k16, both operands in shared memory, K-major; both GEMMs are
//         issued before waiting on either;
//       fg_entry on the accumulators (their per-warp layout is mma.sync's C fragments: the mma kernel's element
//         code unchanged);
//       dV += P^T dO and dK += dS^T Q: A = P^T / dS^T packed from the accumulators into registers
//         (fg_pack_c_to_a), B = dO / Q MN-major (transposed B), one m64n64k16 per 64-column atom and k16 step;
//       with FG_DQ_ATOMIC also dQ (no dQ kernel, whose two score products recompute S and dP): dS^T to a shared
//         tile (KV_TILE x 64), warpgroup w multiplies dS (that tile as a transposed A operand) by K's column atom
//         w over the tile's 128 kv rows and adds the chunk's 64 x 64 result to p.dq_acc (float32) with
//         red.global.add.v2.f32 (in any order: not bit-reproducible); fg_bwd_dq_finalize scales and converts it.
//   fg_bwd_dq_wgmma: a CTA of FG_WG_DQ warpgroups owns FG_Q_TILE = 64 * FG_WG_DQ q rows (Q, dO in shared
//     memory); per kv chunk of 64 rows (K, V double-buffered): S = Q K^T, dP = dO V^T (ss, K-major), fg_entry
//     (captured-tensor gradients here), dQ += dS K (A = dS from registers, B = K MN-major).
//   fg_bwd_dkdv_wgmma_ws / fg_bwd_dq_wgmma_ws (FG_BWD_WS_DKDV / FG_BWD_WS_DQ, two consumer warpgroups): the same
//     tiles, walks and arithmetic (the same results, bit for bit) with a third, producer warpgroup that loads the
//     resident tile once and each chunk of the other side (TMA boxes from one thread; cp.async where a chunk is
//     clipped by its block's end), its lse2 / delta and mods' parts into FG_BWD_STAGES stages, published on full
//     mbarriers with the chunk's descriptor; the consumers wait on those and release a stage on its empty barrier,
//     so they neither copy, walk the block lists nor meet at a CTA barrier. setmaxnreg moves registers from the
//     producer (40) to the consumers (232). A translation unit holds one form of each kernel. With FG_DQ_ATOMIC the
//     dK/dV one sums dQ as the plain one does, a chunk behind: chunk n's dS^T rows go to tile n % 3 (three), and
//     each consumer warpgroup issues chunk n's dQ product with its chunk n + 1 gradient products (the turns order
//     the two warpgroups' stores before it) and adds its share with red.global as the plain kernel does.
// Shared operands are 128-byte-swizzled 64-column atoms (fg_sw128_atoms_offset, flex_mma.cuh) loaded with
// fg_load_rows (FG_VEC 1: cp.async; the host runs these kernels only on 16-byte-aligned rows) or TMA (the same
// layout: SWIZZLE_128B boxes of 64 columns x 64 rows).
//
// Configuration macros (attention/cuda/flex_backward_cuda.cpp), on top of flex_backward.cuh's:
//   FG_WG_DKDV, FG_WG_DQ   warpgroups per CTA of each kernel: 1 or 2 (2 when the BlockMask's kv / q blocks hold
//                          more than 64 rows); FG_KV_TILE = 64 FG_WG_DKDV, FG_Q_TILE = 64 FG_WG_DQ, chunks 64
//   FG_VEC 1
//   FG_DQ_ATOMIC           1: dQ summed by the dK/dV kernel with float atomics (the host: only where the call is
//                          not deterministic; two warpgroups, E 128, no captured gradients), 0: the dQ kernel
//   FG_BWD_WS_DKDV, FG_BWD_WS_DQ   1: the warp-specialised form of that kernel (two warpgroups; the dK/dV one with
//                          FG_DQ_ATOMIC too); FG_BWD_STAGES (2-4, default 3) its stages
//   FG_BWD_PINGPONG        1: the warp-specialised kernels' consumer warpgroups take turns at their products (below)
//   FG_BWD_DQ_DELTA        1: fg_bwd_dq_wgmma_ws computes its rows' delta and lse2 (fg_row_dot_quad: bit for bit
//                          fg_bwd_preprocess's) and writes them for the dK/dV kernel, which the host then launches
//                          after it, with no preprocess (needs FG_BWD_WS_DQ and FG_PRE_VEC)
// Head dims: 64 or 128 (dK, dV and the four products' accumulators stay in registers: at E = Ev = 256 the dK/dV
// kernel would need 320 a thread). Dynamic shared memory (bytes, + 1024 to align the window for the swizzle):
//   dK/dV: 2 (KV_TILE (E + Ev) + 2 * 64 (E + Ev)) + 1024 (lse, delta) + 1024 (+ 2 KV_TILE 64 with FG_DQ_ATOMIC);
//   dQ: 2 (Q_TILE (E + Ev) + 2 * 64 (E + Ev)) + 1024;
//   the warp-specialised forms: FG_BWD_STAGES chunks in place of 2 (and FG_BWD_STAGES x 512 bytes of lse, delta);
//   with FG_DQ_ATOMIC + 3 KV_TILE 64 x 2 (three dS^T tiles) + 1024 (their alignment).
#pragma once
#ifndef FG_BWD_WGMMA
#define FG_BWD_WGMMA 1
#endif
#ifndef FG_DQ_ATOMIC
#define FG_DQ_ATOMIC 0
#endif
#ifndef FG_BWD_WS_DKDV
#define FG_BWD_WS_DKDV 0
#endif
#ifndef FG_BWD_WS_DQ
#define FG_BWD_WS_DQ 0
#endif
#ifndef FG_BWD_DQ_DELTA
#define FG_BWD_DQ_DELTA 0
#endif
#ifndef FG_DQ_TMA_ADD
#define FG_DQ_TMA_ADD 0
#endif
#include "flex_backward.cuh"
#include "flex_wgmma.cuh"

#if !FG_USE_MMA || !(FG_IN_DTYPE == FG_DT_BFLOAT16 || FG_IN_DTYPE == FG_DT_FLOAT16) || !FG_BWD_WGMMA
#error "flex_backward_wgmma: bfloat16 / float16 with FG_USE_MMA 1 and FG_BWD_WGMMA 1 only"
#endif
#if FG_BWD_DQ_DELTA && !(FG_BWD_WS_DQ && FG_PRE_VEC)
#error "FG_BWD_DQ_DELTA: the warp-specialised dQ kernel with FG_PRE_VEC"
#endif
#if !(FG_E == 64 || FG_E == 128) || !(FG_EV == 64 || FG_EV == 128)
#error "flex_backward_wgmma: FG_E and FG_EV are 64 or 128"
#endif
#if !(FG_WG_DKDV == 1 || FG_WG_DKDV == 2) || !(FG_WG_DQ == 1 || FG_WG_DQ == 2) || FG_KV_TILE != 64 * FG_WG_DKDV || \
    FG_Q_TILE != 64 * FG_WG_DQ || FG_Q_CHUNK != 64 || FG_KV_CHUNK != 64
#error "flex_backward_wgmma: 1 or 2 warpgroups a CTA, tiles of 64 rows a warpgroup, chunks of 64 rows"
#endif
#if !FG_VEC
#error "flex_backward_wgmma: FG_VEC 1 (cp.async loads)"
#endif
#if FG_DQ_ATOMIC && !(FG_WG_DKDV == 2 && FG_E == 128 && FG_CAP_MODE == 0)
#error "flex_backward_wgmma: the fused dQ (FG_DQ_ATOMIC) needs two dK/dV warpgroups, E 128 and no captured gradients"
#endif
#if FG_DQ_TMA_ADD && !(FG_DQ_ATOMIC && FG_BWD_WS_DKDV)
#error "flex_backward_wgmma: FG_DQ_TMA_ADD is the warp-specialised fused dQ's (FG_DQ_ATOMIC, FG_BWD_WS_DKDV)"
#endif

#define FG_NT_DKDV (128 * FG_WG_DKDV)
#define FG_NT_DQ (128 * FG_WG_DQ)
#define FG_CHUNK_ATOM_B (64 * 128)  // bytes of one 64 x 64 atom (a chunk's share of a 64-column slab)

// Descriptors. K-major: rows of 64 k (8-row groups 1024 bytes apart), k16 step j of atom a at 32 j bytes into its
// rows. MN-major: k16 step kk is rows 16 kk .. 16 kk + 15 (2048 bytes each) of a 64-row atom.
__device__ __forceinline__ unsigned long long fg_desc_kmajor(unsigned base, int atom_bytes, int kk) {
  return fg_gmma_desc_sw128(base + (kk >> 2) * atom_bytes + 32 * (kk & 3), 16, 1024);
}
__device__ __forceinline__ unsigned long long fg_desc_mnmajor(unsigned base, int atom_bytes, int a, int kk) {
  return fg_gmma_desc_sw128(base + a * atom_bytes + 2048 * kk, 1024, 1024);
}

// Keeps the A fragments of an in-flight wgmma (register operand) live and unmoved until after its wait, as
// fg_wgmma_fence_operands does for accumulators.
template <int N>
__device__ __forceinline__ void fg_wgmma_fence_a(unsigned (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(a[i][j])::"memory");
}

// The 1024-byte-aligned start of the dynamic window (the host adds 1024 bytes; static shared memory, the mods'
// parts, comes first and shifts it).
__device__ __forceinline__ unsigned char* fg_aligned_smem(unsigned char* raw) {
  return raw + ((1024u - (fg_smem_addr(raw) & 1023u)) & 1023u);
}

#if FG_DQ_ATOMIC
// ---- the fused dQ (FG_DQ_ATOMIC), shared by fg_bwd_dkdv_wgmma and fg_bwd_dkdv_wgmma_ws
// Two float32 adds at 8-byte-aligned `dst`, performed in L2 (no return value).
__device__ __forceinline__ void fg_red_add_v2(float* dst, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(dst), "f"(a), "f"(b) : "memory");
}
// This warp's dS^T (its 16 kv rows x the chunk's 64 q columns, packed as the dK product's A operand) into the
// shared tile `st` (one swizzled atom of KV_TILE x 64) that the dQ product reads as its transposed A operand; then
// the async-proxy fence that lets wgmma see the stores. The caller joins the two warpgroups before that product.
__device__ __forceinline__ void fg_dkdv_store_dst(fg_s* st, const unsigned (&ad)[FG_Q_CHUNK / 16][4], int kr0, int g,
                                                  int t) {
#pragma unroll
  for (int kq = 0; kq < FG_Q_CHUNK / 16; ++kq) {
    const int c = 16 * kq + 2 * t;
    *(unsigned*)(st + fg_sw128_atoms_offset<FG_KV_TILE>(kr0 + g, c)) = ad[kq][0];
    *(unsigned*)(st + fg_sw128_atoms_offset<FG_KV_TILE>(kr0 + g + 8, c)) = ad[kq][1];
    *(unsigned*)(st + fg_sw128_atoms_offset<FG_KV_TILE>(kr0 + g, c + 8)) = ad[kq][2];
    *(unsigned*)(st + fg_sw128_atoms_offset<FG_KV_TILE>(kr0 + g + 8, c + 8)) = ad[kq][3];
  }
  fg_fence_proxy_async();
}
// dQ[:, 64 wg .. 64 wg + 63] of the chunk's rows, this chunk's share: dS K with A = dS^T from the shared tile at
// st_addr (MN-major), B = K's column atom wg (MN-major), k = the tile's 128 kv rows of both warpgroups. After a
// fg_wgmma_fence; not committed.
__device__ __forceinline__ void fg_dkdv_issue_dq(float (&dqc)[32], unsigned st_addr, unsigned k_addr, int wg) {
#pragma unroll
  for (int kk = 0; kk < FG_KV_TILE / 16; ++kk)
    fg_wgmma_m64n64k16_ss<1, FG_BF16, 1>(dqc, fg_desc_mnmajor(st_addr, 0, 0, kk),
                                         fg_desc_mnmajor(k_addr, FG_KV_TILE * 128, wg, kk), kk > 0);
}
// Adds the completed product (m64n64 accumulator layout: this thread's rows 16 (warp % 4) + g (+ 8), columns 8 j +
// 2 t (+ 1)) to rows q0 .. q0 + nq - 1 of (b, h)'s float32 dQ sums, columns 64 wg ..; rows past nq are left alone.
__device__ __forceinline__ void fg_dq_red_add(const FgBwdParams& p, const float (&dqc)[32], int b, int h, fg_i64 q0,
                                              int nq, int warp, int g, int t, int wg) {
  const fg_i64 drow0 = ((fg_i64)b * p.Hq + h) * p.Lq + q0;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int i = 16 * (warp & 3) + g + 8 * hf;
    if (i >= nq) continue;
    float* dst = p.dq_acc + (drow0 + i) * FG_E + 64 * wg + 2 * t;
#pragma unroll
    for (int j = 0; j < 8; ++j) fg_red_add_v2(dst + 8 * j, dqc[4 * j + 2 * hf], dqc[4 * j + 2 * hf + 1]);
  }
}
#endif

// ---- the products both kernels issue (the dK/dV kernels from a q chunk, the dQ kernels from a kv chunk)
// The score pair: x = A_x B_x^T over E columns and y = A_y B_y^T over Ev columns for the warpgroup's 64 rows, both
// operands K-major in shared memory: A in atoms of A_ROWS rows at ax, ay (the tile's K and V, or Q and dO), B the
// chunk's atoms at bx, by. Two commit groups, not waited for. No zeroing: the first k16 step does not accumulate.
// dK/dV: S^T = K Q^T and dP^T = V dO^T (A_ROWS = FG_KV_TILE); dQ: S = Q K^T and dP = dO V^T (A_ROWS = FG_Q_TILE).
template <int A_ROWS, int N>
__device__ __forceinline__ void fg_issue_score_pair(float (&x)[N][4], float (&y)[N][4], unsigned ax, unsigned bx,
                                                    unsigned ay, unsigned by) {
  fg_wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < FG_E / 16; ++kk)
    fg_wgmma_m64n64k16_ss<0, FG_BF16>(&x[0][0], fg_desc_kmajor(ax, A_ROWS * 128, kk),
                                      fg_desc_kmajor(bx, FG_CHUNK_ATOM_B, kk), kk > 0);
  fg_wgmma_commit();
#pragma unroll
  for (int kk = 0; kk < FG_EV / 16; ++kk)
    fg_wgmma_m64n64k16_ss<0, FG_BF16>(&y[0][0], fg_desc_kmajor(ay, A_ROWS * 128, kk),
                                      fg_desc_kmajor(by, FG_CHUNK_ATOM_B, kk), kk > 0);
  fg_wgmma_commit();
}
// A gradient product: acc (COLS columns) += a B, a the K16 k16 steps' register A operands (packed from the element
// step), B the chunk's rows of COLS columns at b_addr (MN-major). After a fg_wgmma_fence; not committed.
// dV += P^T dO and dK += dS^T Q (k = the chunk's q rows); dQ += dS K (k = the chunk's kv rows).
template <int K16, int COLS>
__device__ __forceinline__ void fg_issue_grad(float (&acc)[COLS / 8][4], unsigned (&a)[K16][4], unsigned b_addr) {
#pragma unroll
  for (int k = 0; k < K16; ++k)
#pragma unroll
    for (int atom = 0; atom < COLS / 64; ++atom)
      fg_wgmma_m64n64k16_rs<1, FG_BF16>(&acc[8 * atom][0], a[k], fg_desc_mnmajor(b_addr, FG_CHUNK_ATOM_B, atom, k), 1);
}

// ---- the steps of one q chunk, shared by fg_bwd_dkdv_wgmma and fg_bwd_dkdv_wgmma_ws
// P^T and dS^T from the element step, packed as the gradient products' register A operands (fenced).
__device__ __forceinline__ void fg_dkdv_pack(const float (&st)[FG_NQN][4], const float (&dpt)[FG_NQN][4],
                                             unsigned (&ap)[FG_Q_CHUNK / 16][4], unsigned (&ad)[FG_Q_CHUNK / 16][4]) {
#pragma unroll
  for (int kq = 0; kq < FG_Q_CHUNK / 16; ++kq) {
    fg_pack_c_to_a<FG_BF16>(st[2 * kq], st[2 * kq + 1], ap[kq]);
    fg_pack_c_to_a<FG_BF16>(dpt[2 * kq], dpt[2 * kq + 1], ad[kq]);
  }
  fg_wgmma_fence_a(ap);
  fg_wgmma_fence_a(ad);
}
// dV += P^T dO and dK += dS^T Q (k = the chunk's q rows), after a fg_wgmma_fence; not committed.
__device__ __forceinline__ void fg_dkdv_issue_grads(float (&dk)[FG_E / 8][4], float (&dv)[FG_EV / 8][4],
                                                    unsigned (&ap)[FG_Q_CHUNK / 16][4],
                                                    unsigned (&ad)[FG_Q_CHUNK / 16][4], unsigned q_addr,
                                                    unsigned o_addr) {
  fg_issue_grad<FG_Q_CHUNK / 16, FG_EV>(dv, ap, o_addr);
  fg_issue_grad<FG_Q_CHUNK / 16, FG_E>(dk, ad, q_addr);
}
#if !FG_BWD_WS_DKDV  // (a translation unit compiles the kernel the host launches, not both forms)
extern "C" __global__ void __launch_bounds__(FG_NT_DKDV, 1)
    fg_bwd_dkdv_wgmma(const FgBwdParams p, const FgModArgs args) {
  extern __shared__ __align__(16) unsigned char fg_smem_raw[];
  unsigned char* const smem = fg_aligned_smem(fg_smem_raw);
  fg_s* Ks = (fg_s*)smem;                            // E / 64 atoms of KV_TILE x 64
  fg_s* Vs = Ks + FG_KV_TILE * FG_E;                 // Ev / 64 atoms of KV_TILE x 64
  fg_s* Qs = Vs + FG_KV_TILE * FG_EV;                // 2 buffers of E / 64 atoms of 64 x 64
  fg_s* Os = Qs + 2 * FG_Q_CHUNK * FG_E;             // 2 buffers of Ev / 64 atoms (dO)
  float* Ls = (float*)(Os + 2 * FG_Q_CHUNK * FG_EV);  // 2 x [Q_CHUNK] lse2
  float* Ds = Ls + 2 * FG_Q_CHUNK;                    // 2 x [Q_CHUNK] delta
#if FG_DQ_ATOMIC
  fg_s* St = (fg_s*)(Ds + 2 * FG_Q_CHUNK);            // dS^T: KV_TILE x 64 (one atom; 1024-byte aligned)
#endif

  fg_i64 bk, hk, mb, kv0;
  int nkv;
  if (!fg_dkdv_cta(p, bk, hk, mb, kv0, nkv)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int kr0 = warp * 16;  // this warp's kv rows in the tile
  const int wg = warp >> 2;   // its warpgroup: rows 64 wg .. 64 wg + 63

  fg_load_rows<FG_KV_TILE, true>(Ks, 0, p.k + bk * p.ks_b + hk * p.ks_h + kv0 * p.ks_l, p.ks_l, nkv, FG_E, FG_E,
                                 threadIdx.x, FG_NT_DKDV);
  fg_load_rows<FG_KV_TILE, true>(Vs, 0, p.v + bk * p.vs_b + hk * p.vs_h + kv0 * p.vs_l, p.vs_l, nkv, FG_EV, FG_EV,
                                 threadIdx.x, FG_NT_DKDV);

  FgQWalk w;
  w.start(p, bk, hk, mb);
  auto issue = [&](const FgQWalk& s, int buf) {
    const int n = s.nq();
    fg_load_rows<FG_Q_CHUNK, true>(Qs + buf * FG_Q_CHUNK * FG_E, 0, p.q + s.b * p.qs_b + s.h * p.qs_h + s.q0 * p.qs_l,
                                   p.qs_l, n, FG_E, FG_E, threadIdx.x, FG_NT_DKDV);
    const fg_i64 row0 = (s.b * p.Hq + s.h) * p.Lq + s.q0;
    fg_load_rows<FG_Q_CHUNK, true>(Os + buf * FG_Q_CHUNK * FG_EV, 0, p.dout + row0 * FG_EV, FG_EV, n, FG_EV, FG_EV,
                                   threadIdx.x, FG_NT_DKDV);
    for (int i = threadIdx.x; i < 2 * FG_Q_CHUNK; i += FG_NT_DKDV) {
      const int r = i % FG_Q_CHUNK;
      const bool ok = r < n;
      const fg_t* src = i < FG_Q_CHUNK ? p.lse2 : p.delta;
      float* dst = (i < FG_Q_CHUNK ? Ls : Ds) + buf * FG_Q_CHUNK + r;
      fg_cp_async4(fg_smem_addr(dst), ok ? src + row0 + r : src, ok);
    }
  };
  if (!w.done()) issue(w, 0);
  fg_cp_async_commit();  // with K and V

  float dk[FG_E / 8][4], dv[FG_EV / 8][4];  // m64n64 accumulators: atom a = dk[8 a .. 8 a + 7]
  fg_zero_frags(dk);
  fg_zero_frags(dv);
  const FgMaxSink max_sink = fg_dkdv_sink(p);
  const FgMaxSink* sink = FG_CAP_MODE == 1 ? &max_sink : nullptr;
  const float scale = (float)p.scale;
  // This warpgroup's 64 rows of K and V: 8 KiB into each atom (a multiple of 1024 bytes: the swizzle phase holds).
  const unsigned k_addr = fg_smem_addr(Ks) + wg * FG_CHUNK_ATOM_B, v_addr = fg_smem_addr(Vs) + wg * FG_CHUNK_ATOM_B;

#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
  // The mods' row parts of the q chunks, double-buffered as Q: a chunk's are computed (their captured reads
  // issued) while the previous chunk's score products run, off the path from one chunk's barrier to its
  // products. (The buffer's last readers, the element step two chunks back, are past that chunk's closing
  // barrier; the chunk's own opening barrier publishes them.)
  __shared__ FgRowMods<float> q_mods[2][FG_Q_CHUNK];
  auto row_parts = [&](const FgQWalk& s, int buf) {
    for (int i = threadIdx.x; i < s.nq(); i += FG_NT_DKDV)
      fg_row_mods(q_mods[buf][i], true, s.partial(), (int)s.b, (int)s.h, (int)(s.q0 + i), args);
  };
  if (!w.done()) row_parts(w, 0);
#endif
  for (int it = 0; !w.done(); ++it) {
    const int buf = it & 1;
    const int b = (int)w.b, h = (int)w.h, nq = w.nq();
    const fg_i64 q0 = w.q0;
    const bool partial = w.partial();
    // The next chunk into the other buffer (its last readers, the previous chunk's products, completed before
    // that chunk's closing barrier).
    w.next(p);
    if (!w.done()) issue(w, buf ^ 1);
    fg_cp_async_commit();
    fg_cp_async_wait<1>();   // this chunk (and K, V) landed
    fg_fence_proxy_async();  // this thread's cp.async writes become visible to wgmma (the async proxy)
    __syncthreads();
    const unsigned q_addr = fg_smem_addr(Qs + buf * FG_Q_CHUNK * FG_E);
    const unsigned o_addr = fg_smem_addr(Os + buf * FG_Q_CHUNK * FG_EV);

    // S^T = K Q^T and dP^T = V dO^T for this warpgroup's 64 kv rows, both in flight before either is waited on.
    float st[FG_NQN][4], dpt[FG_NQN][4];
    fg_issue_score_pair<FG_KV_TILE>(st, dpt, k_addr, q_addr, v_addr, o_addr);
    // While they run: this chunk's column parts and the next chunk's row parts (captured reads wait on memory).
    FgColMods<float> cm[2];
    fg_dkdv_col_parts(cm, kr0, g, nkv, partial, b, h, kv0, args);
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
    if (!w.done()) row_parts(w, buf ^ 1);
#endif
    fg_wgmma_wait<0>();
    fg_wgmma_fence_operands<FG_Q_CHUNK / 2>(&st[0][0]);
    fg_wgmma_fence_operands<FG_Q_CHUNK / 2>(&dpt[0][0]);

    // element-wise: st <- P^T, dpt <- dS^T (pre-mod), as fg_bwd_dkdv
    fg_dkdv_elements(st, dpt, Ls + buf * FG_Q_CHUNK, Ds + buf * FG_Q_CHUNK, FG_BWD_MODS(q_mods[buf]), cm, kr0, g, t, nq,
                     nkv, partial, b, h, q0, kv0, scale, args, sink);
    // dV += P^T dO, dK += dS^T Q (k = the chunk's q rows): A from registers, B MN-major.
    unsigned ap[FG_Q_CHUNK / 16][4], ad[FG_Q_CHUNK / 16][4];
    fg_dkdv_pack(st, dpt, ap, ad);
#if FG_DQ_ATOMIC
    // dS^T into the shared tile the dQ product reads, before `ad` becomes an in-flight product's register operand.
    fg_dkdv_store_dst(St, ad, kr0, g, t);
    fg_named_sync(1, FG_NT_DKDV);  // both warpgroups' rows are in
#endif
    fg_wgmma_fence();
    fg_dkdv_issue_grads(dk, dv, ap, ad, q_addr, o_addr);
#if FG_DQ_ATOMIC
    float dqc[32];
    fg_dkdv_issue_dq(dqc, fg_smem_addr(St), fg_smem_addr(Ks), wg);
#endif
    fg_wgmma_commit();
    fg_wgmma_wait<0>();
    fg_wgmma_fence_operands<FG_EV / 2>(&dv[0][0]);
    fg_wgmma_fence_operands<FG_E / 2>(&dk[0][0]);
    fg_wgmma_fence_a(ap);
    fg_wgmma_fence_a(ad);
#if FG_DQ_ATOMIC
    fg_wgmma_fence_operands<32>(dqc);
    fg_dq_red_add(p, dqc, b, h, q0, nq, warp, g, t, wg);
#endif
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }
  fg_cp_async_wait<0>();

  fg_dkdv_store(p, dk, dv, (bk * p.Hkv + hk) * p.Lkv + kv0, kr0, g, t, nkv, scale);
}
#endif  // !FG_BWD_WS_DKDV

#if FG_BWD_WS_DKDV || FG_BWD_WS_DQ
// ---- the warp-specialised kernels (FG_BWD_WS_DKDV, FG_BWD_WS_DQ): a producer warpgroup after two consumer ones
#ifndef FG_BWD_STAGES
#define FG_BWD_STAGES 3
#endif
#ifndef FG_BWD_PERSISTENT
#define FG_BWD_PERSISTENT 0
#endif
// FG_BWD_TILE_PREFETCH (the default in the persistent kernels; FLEXGRAD_FLEX_BWD_TILE_PREFETCH=0 keeps the previous
// order): a persistent kernel's next grid CTA starts before the current one ends. Before, the producer waited for the
// consumers to release the resident tile (after the last chunk's gradient products) before it took the next grid CTA
// from the queue, read its block list, loaded its resident tile and its first chunk, while the consumers, done, waited:
// ncu (session 33, the bench's document mask, H100) put 13.5% of the dQ kernel's warp samples at its first-chunk wait
// and 8.2% of the dK/dV kernel's at its K / V wait, 2.6-3.5% at the queue. Now the producer takes the next grid CTA and
// walks to its first block as soon as it has published the current one's end, waits for the release only before it
// loads the resident tile (fg_resident_wait), and the consumers release that tile as soon as the last chunk's score
// products (the only ones that read it) have completed (FgBwdChunk::last), not after its element step and gradient
// products: the two kernels 7% and 5.5% shorter there (queue waits under 1%). Same products in the same order: the
// same bits. The grid launch runs one grid CTA a CTA: nothing to start early, so it keeps the previous code.
#if !FG_BWD_PERSISTENT || FG_DQ_ATOMIC
#undef FG_BWD_TILE_PREFETCH
#define FG_BWD_TILE_PREFETCH 0  // (one grid CTA a CTA: nothing to start early; the fused dQ's products read K)
#elif !defined(FG_BWD_TILE_PREFETCH)
#define FG_BWD_TILE_PREFETCH 1
#endif
// 384 threads launch with 168 registers each; the producer gives back what the consumers take. Persistent
// (fg_for_each_cta), the dQ kernel's producer (its walk, the CTA loop and queue) spilled 64-84 bytes at 40 and
// 16-24 at 56, where its consumers, at 224, spill nothing: it splits 56 / 224; the dK/dV kernel's consumers spill at
// 224 (56-192 bytes), so its producer keeps 40 and spills 108-124 bytes there (ptxas, nvcc 13.0).
#define FG_BWD_WS_PRODUCER_REGS 40
#define FG_BWD_WS_CONSUMER_REGS 232
#if FG_BWD_PERSISTENT
#define FG_BWD_WS_DQ_PRODUCER_REGS 56
#define FG_BWD_WS_DQ_CONSUMER_REGS 224
#else
#define FG_BWD_WS_DQ_PRODUCER_REGS FG_BWD_WS_PRODUCER_REGS
#define FG_BWD_WS_DQ_CONSUMER_REGS FG_BWD_WS_CONSUMER_REGS
#endif
static_assert(128 * (168 - FG_BWD_WS_PRODUCER_REGS) >= 256 * (FG_BWD_WS_CONSUMER_REGS - 168) &&
                  128 * (168 - FG_BWD_WS_DQ_PRODUCER_REGS) >= 256 * (FG_BWD_WS_DQ_CONSUMER_REGS - 168),
              "setmaxnreg: the consumers' registers must come from the producer's");
// FG_BWD_SKIP_EMPTY (opt-in, FLEXGRAD_FLEX_BWD_SKIP_EMPTY=1; BlockMask blocks of multiples of 64 rows both ways):
// a partial block's 64-row chunk, or a consumer warpgroup's 64 x 64 quadrant of it, often holds no entry the mask_mod
// keeps (the bench's documents of 64-319 tokens: 130 of the 472 quadrants of the 118 visited 128 x 128 blocks, 35 of
// the 236 chunks wholly; causal: one quadrant of each diagonal block). fg_bwd_quad_live evaluates the mask_mod (pure:
// nothing read, nothing that can fail, FG_MASK_ELEM_PURE) over the quadrants of the partial blocks before the
// backward's kernels and writes a byte a quadrant (FgBwdParams::quad_live); the producers read a chunk's bytes: a
// chunk with nothing kept gets no stage (no copies, no products), a published one carries a bit a consumer warpgroup
// (FgBwdChunk::live), and a dQ warpgroup whose bit is clear skips the chunk. Skipped products would add only zeros
// (and 0 * inf where an input the mask drops is not finite). The dK/dV consumers skip only whole chunks;
// FG_BWD_SKIP_DKDV_WG (opt-in, FLEXGRAD_FLEX_BWD_SKIP_DKDV_WG=1) has them skip their own empty quadrant too, which
// made ptxas spill in them (15-57 local-memory instructions against 0-15; document mask, sm_90a, nvcc 13.0).
// Measured slower on an H100 (flex_backward_cuda.cpp gives the figures), so opt-in: session 28's producers evaluated
// the mask and voted on a named barrier (documents 45% slower); the table took that cost away and left the skip
// still 5-9% slower than computing every chunk.
#if defined(FG_BWD_SKIP_EMPTY) && FG_BWD_SKIP_EMPTY && FG_HAS_MASK_MOD && FG_MASK_ELEM_PURE
#define FG_BWD_SKIP 1
#else
#define FG_BWD_SKIP 0
#endif
#if !FG_BWD_SKIP
#undef FG_BWD_SKIP_DKDV_WG
#endif
// Ping-pong (FG_BWD_PINGPONG; flex_backward_cuda.cpp chooses it): the two consumer warpgroups of each
// warp-specialised kernel take turns issuing their products (named barriers 1 and 2, as the forward's
// FG_WGMMA_PINGPONG): a turn at a chunk's score products (S and dP), another at its gradient products (dQ; dK and
// dV), so that one warpgroup's element step runs while the other's products hold the tensor cores; without turns
// both tended to step at once and leave them idle (ncu, session 30: tensor pipe 50-61% active, no pipe saturated).
// Both warpgroups walk the same chunks, so they take as many turns; not with FG_BWD_SKIP (a warpgroup skips its
// empty quadrants). The same products in the same order: the same bits.
#ifndef FG_BWD_PINGPONG
#define FG_BWD_PINGPONG 0
#endif
#if FG_BWD_PINGPONG && FG_BWD_SKIP
#error "FG_BWD_PINGPONG: not with FG_BWD_SKIP_EMPTY (the warpgroups' turns would differ)"
#endif
// Consumer warpgroup wg waits for its turn (barrier 1 + wg: its own 128 threads and the other's 128 arriving), and
// passes it (arrives at the other's). Warpgroup 1 passes a turn before its first (fg_turns_begin) so that
// warpgroup 0 goes first; warpgroup 0 takes warpgroup 1's last one at the end (fg_turns_end): no barrier is left
// half-arrived at exit. Turns run on from grid CTA to grid CTA of a persistent kernel. Without FG_BWD_PINGPONG the
// four do nothing.
__device__ __forceinline__ void fg_turn_take(int wg) {
  if (FG_BWD_PINGPONG) fg_named_sync(1 + wg, 256);
}
__device__ __forceinline__ void fg_turn_pass(int wg) {
  if (FG_BWD_PINGPONG) fg_named_arrive(2 - wg, 256);
}
__device__ __forceinline__ void fg_turns_begin(int wg) {
  if (FG_BWD_PINGPONG && wg == 1) fg_named_arrive(1, 256);
}
__device__ __forceinline__ void fg_turns_end(int wg) {
  if (FG_BWD_PINGPONG && wg == 0) fg_named_sync(1, 256);
}
#if FG_BWD_SKIP
// The quadrant table's byte of (b, h) for the 64 x 64 quadrant at rows q0, columns kv0 (multiples of 64).
__device__ __forceinline__ unsigned char* fg_quad_live(const FgBwdParams& p, fg_i64 b, fg_i64 h, fg_i64 q0,
                                                       fg_i64 kv0) {
  const fg_i64 nq64 = (p.Lq + 63) / 64, nk64 = (p.Lkv + 63) / 64;
  return p.quad_live + ((b * p.Hq + h) * nq64 + q0 / 64) * nk64 + kv0 / 64;
}
// Fills the table: CTA (q block mb, h, b) evaluates the mask_mod over the 64 x 64 quadrants of the row's
// partial kv blocks, a column a thread (its column part in a register, the 64 rows' parts in shared memory), and
// writes 1 where the quadrant keeps an entry, 0 where it keeps none. Entries past Lq / Lkv count as dropped.
extern "C" __global__ void __launch_bounds__(256) fg_bwd_quad_live(const FgBwdParams p, const FgModArgs args) {
  __shared__ FgMaskRow<float> rows[64];
  const fg_i64 mb = blockIdx.x;
  const int h = (int)blockIdx.y, b = (int)blockIdx.z;
  const FgRow row = fg_row(p.kvl, b, h, mb);
  const fg_i64 q_lo = mb * p.block_q, q_hi = min(q_lo + p.block_q, p.Lq);
  const int c = threadIdx.x & 63, r0 = threadIdx.x >> 6;
  for (fg_i64 qa = q_lo; qa < q_hi; qa += 64) {
    const int nr = (int)min((fg_i64)64, q_hi - qa);
    __syncthreads();  // (the previous quadrant row's parts are read)
    if (threadIdx.x < nr) rows[threadIdx.x] = fg_mask_row<float>(b, h, (int)(qa + threadIdx.x), args);
    __syncthreads();
    for (int i = 0; i < row.n_partial; ++i) {
      const fg_i64 k_lo = (fg_i64)row.partial[i] * p.block_kv, k_hi = min(k_lo + p.block_kv, p.Lkv);
      for (fg_i64 ka = k_lo; ka < k_hi; ka += 64) {
        bool any = false;
        if (ka + c < k_hi) {
          const FgMaskCol<float> col = fg_mask_col<float>(b, h, (int)(ka + c), args);
          for (int r = r0; r < nr; r += 4)
            any = any || fg_mask_elem<float>(rows[r], col, b, h, (int)(qa + r), (int)(ka + c), args);
        }
        const int live = __syncthreads_or(any);
        if (threadIdx.x == 0) *fg_quad_live(p, b, h, qa, ka) = live != 0;
      }
    }
  }
}
#endif
// Initialises the resident tile's barriers (`tile`: the producer threads' 128 cp.async completions of the tile
// loaded once a grid CTA; `tile_free`: the 8 consumer warps done with it), the stages' full barriers (two arrivals
// from each of the 128 producer threads: its cp.async completion (noinc) and its publishing arrival, or that one
// counting twice where it issued no cp.async; plus the TMA bytes thread 0 expects) and empty ones (the 8 consumer
// warps), a persistent kernel's queue, then a CTA barrier (the only one).
__device__ __forceinline__ void fg_ws_init_barriers(unsigned long long* tile, unsigned long long* tile_free,
                                                    unsigned long long* full, unsigned long long* empty,
                                                    FgJobQueue* queue) {
  if (threadIdx.x == 0) {
    if (queue != nullptr) fg_job_queue_init(*queue, 12);  // every warp reads the grid CTA: 8 consumer, 4 producer
    fg_mbar_init(fg_smem_addr(tile), 128);
    fg_mbar_init(fg_smem_addr(tile_free), 8);
    for (int st = 0; st < FG_BWD_STAGES; ++st) {
      fg_mbar_init(fg_smem_addr(&full[st]), FG_WS_FULL_COUNT);
      fg_mbar_init(fg_smem_addr(&empty[st]), 8);
    }
    fg_mbar_fence_init();
  }
  __syncthreads();
}
// Runs body(cta) for each CTA of an nx x ny x nz grid this CTA stands for: itself, or with FG_BWD_PERSISTENT (a
// grid of one CTA an SM) the grid CTAs it takes from `queue` (FgJobQueue; `lead`: the warpgroup that takes them,
// the producer, each once `tile_free` has completed `tiles_run` phases: the resident tile is free; `counter` the
// launch's zeroed counter), x fastest, so that one's epilogue (the stores) overlaps the next one's resident tile
// and first chunks. Each grid CTA still runs once, on one CTA, with the same arithmetic:
// the results are the same bits either way. `body` returns early for a CTA with nothing to do. (32-bit: a grid's CTAs
// number fewer than 2^31, and the producer's 40 registers spilled more with 64-bit ones.)
template <class F>
__device__ __forceinline__ void fg_for_each_cta(FgJobQueue* queue, int* counter, bool lead,
                                                unsigned long long* tile_free, const int& tiles_run, unsigned nx,
                                                unsigned ny, unsigned nz, F&& body) {
#if FG_BWD_PERSISTENT
  for (int it = 0;; ++it) {
    const int job = fg_job_take(*queue, it, counter, (int)(nx * ny * nz), lead, fg_smem_addr(tile_free),
                                FG_BWD_TILE_PREFETCH ? 0 : tiles_run);
    if (job < 0) break;
    FgCta c;
    c.x = (unsigned)job % nx;
    c.y = (unsigned)job / nx % ny;
    c.z = (unsigned)job / (nx * ny);
    body(c);
  }
#else
  (void)queue, (void)counter, (void)lead, (void)tile_free, (void)tiles_run, (void)nx, (void)ny, (void)nz;
  body(fg_this_cta());
#endif
}

// With FG_BWD_TILE_PREFETCH, the producer's wait before it loads grid CTA `tiles_run`'s resident tile: the consumers
// are done with the previous one's (without it, fg_for_each_cta waited before taking the grid CTA).
__device__ __forceinline__ void fg_resident_wait(unsigned long long* tile_free, int tiles_run) {
  if (FG_BWD_TILE_PREFETCH && tiles_run > 0) fg_mbar_wait(fg_smem_addr(tile_free), (tiles_run - 1) & 1);
}
// A consumer warp's release of the resident tile (once a grid CTA; `released` remembers it).
__device__ __forceinline__ void fg_resident_release(unsigned long long* tile_free, bool& released) {
  __syncwarp();
  if ((threadIdx.x & 31) == 0) fg_mbar_arrive(fg_smem_addr(tile_free));
  released = true;
}

#endif

#if FG_BWD_WS_DKDV
// The warp-specialised dK/dV kernel: the same tile, walk and arithmetic as fg_bwd_dkdv_wgmma (so the same results,
// bit for bit), with the copies taken off the computing warps. A third warpgroup, the producer, loads K and V once
// and each q chunk's Q, dO (TMA from one thread: one box per 64-column atom), lse2 and delta (cp.async) and mods'
// row parts into FG_BWD_STAGES stages, and publishes each on a full mbarrier with the chunk's (b, h, q0, rows,
// partial); the two consumer warpgroups wait on those barriers and release a stage on its empty barrier once
// their products have read it, so neither copies, walks the block lists or meets the other at a CTA barrier.
// Registers move from the producer to the consumers with setmaxnreg (FG_BWD_WS_*_REGS).
#if FG_WG_DKDV != 2
#error "fg_bwd_dkdv_wgmma_ws: two consumer warpgroups"
#endif
#if FG_DQ_ATOMIC && defined(FG_BWD_SKIP_DKDV_WG)
#error "fg_bwd_dkdv_wgmma_ws: the fused dQ joins both warpgroups every chunk (not with FG_BWD_SKIP_DKDV_WG)"
#endif
// Q's map is 4-d (E, Lq, Hq, B) with q's strides, dO's (Ev, Lq, Hq, B) contiguous; boxes of 64 columns x 64 rows,
// 128-byte swizzle (attention/cuda/tma_map.h), zeros outside the tensor. dq_acc (FG_DQ_TMA_ADD only): the fused dQ's
// float32 sums (E, Lq, Hq, B), boxes of 32 columns x 64 rows, 128-byte swizzle.
struct FgBwdQMaps {
  FgTmaMap q, dout, dq_acc;
};
// What the producer publishes with a stage; rows == 0: the walk is over.
struct FgBwdChunk {
  fg_i64 q0;
  int b, h, rows, partial;
  int live;  // FG_BWD_SKIP: bit w set where consumer warpgroup w's quadrant has an entry to compute
  int last;  // no chunk of this grid CTA follows (FG_BWD_TILE_PREFETCH: K and V may go once its scores are done)
};
#if FG_DQ_ATOMIC
// The fused dQ of the warp-specialised kernel runs a chunk behind: chunk n's dQ product is issued in the
// warpgroup's turn at chunk n + 1's gradient products (or in one turn more after the grid CTA's last chunk), when
// both warpgroups' dS^T rows of chunk n are in (the turns order them: each stored its rows before its own turn at
// chunk n's gradient products). Without the turns (FG_BWD_PINGPONG 0) the warpgroups meet first (barrier 3).
struct FgDqPending {
  fg_i64 q0;
  int b, h, rows;
};
// The dS^T tile of chunk n (n >= 0): tile n % 3 of the three at St.
__device__ __forceinline__ fg_s* fg_dst_tile(fg_s* St, int n) { return St + (n % 3) * FG_KV_TILE * 64; }
// Issues (committed, not waited for) the dQ product of chunk n_dq - 1, whose dS^T rows are in tile (n_dq - 1) % 3.
__device__ __forceinline__ void fg_dkdv_pending_dq(float (&dqc)[32], fg_s* St, fg_s* Ks, int n_dq, int wg) {
  if (!FG_BWD_PINGPONG) fg_named_sync(3, FG_NT_DKDV);
  fg_wgmma_fence();
  fg_dkdv_issue_dq(dqc, fg_smem_addr(fg_dst_tile(St, n_dq + 2)), fg_smem_addr(Ks), wg);  // (n_dq + 2: n_dq - 1 mod 3)
  fg_wgmma_commit();
}
// FG_DQ_TMA_ADD: the adds go through the TMA unit instead of 4096 red.global.add.v2 a warpgroup a chunk (ncu,
// session 35, no mask: the kernel bound by L2 at 83% of its throughput with them). The warpgroup stores its 64 x 64
// share to its float32 staging tile (`stg`, 16 KiB: two boxes of 64 rows x 32 columns, 128-byte rows with the
// 128-byte swizzle: 16-byte unit u of row r at u ^ (r % 8)), rows past nq as zeros (they may hold 0 x inf; the map
// drops rows past Lq, and zeros added to the next block's rows change nothing), then its first thread adds both boxes
// with one TMA reduce each. Before the tile is written again that thread waits for their reads (fg_dq_stage_free,
// before a barrier the whole warpgroup passes before its next store).
// A staging tile: 64 rows x 64 float32 columns as two boxes of 32 columns (128-byte rows, the swizzle's width); the
// host's fused_dq_smem counts FG_DQ_STAGE_BYTES a warpgroup.
#define FG_DQ_STAGE_BOX_BYTES (64 * 32 * 4)
#define FG_DQ_STAGE_BYTES (2 * FG_DQ_STAGE_BOX_BYTES)
__device__ __forceinline__ void fg_dq_tma_add(const FgTmaMap* map, float* stg, const float (&dqc)[32], int b, int h,
                                              fg_i64 q0, int nq, int warp, int g, int t, int wg) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int r = 16 * (warp & 3) + g + 8 * hf;  // (r % 8 == g)
    const bool keep = r < nq;
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // columns 8 j + 2 t, + 1: box j / 4, 16-byte unit 2 (j % 4) + t / 2 of the row
      const int unit = (2 * (j & 3) + (t >> 1)) ^ g;
      unsigned char* const at = (unsigned char*)stg + (j >> 2) * FG_DQ_STAGE_BOX_BYTES + r * 128 + unit * 16;
      float2* d = (float2*)(at + 8 * (t & 1));
      *d = keep ? make_float2(dqc[4 * j + 2 * hf], dqc[4 * j + 2 * hf + 1]) : make_float2(0.f, 0.f);
    }
  }
  fg_fence_proxy_async();  // the stores, seen by the TMA unit (the async proxy)
  fg_named_sync(4 + wg, 128);
  if ((threadIdx.x & 127) == 0) {
    fg_tma_reduce_add_4d(map, fg_smem_addr(stg), 64 * wg, (int)q0, h, b);
    fg_tma_reduce_add_4d(map, fg_smem_addr(stg) + FG_DQ_STAGE_BOX_BYTES, 64 * wg + 32, (int)q0, h, b);
    fg_bulk_commit();
  }
}
// The staging tile's previous adds have read it (the warpgroup's first thread; a barrier of the whole warpgroup must
// follow before the next store).
__device__ __forceinline__ void fg_dq_stage_free() {
  if (FG_DQ_TMA_ADD && (threadIdx.x & 127) == 0) fg_bulk_wait_read<0>();
}
// Adds the pending chunk's dQ product to the float32 sums: through the TMA unit (FG_DQ_TMA_ADD; stg: the
// warpgroup's staging tile) or with red.global. (pend.rows 0: the grid CTA's first chunk, nothing to add.)
__device__ __forceinline__ void fg_dq_add_pending(const FgBwdParams& p, const FgBwdQMaps& maps, float* stg,
                                                  const float (&dqc)[32], const FgDqPending& pend, int warp, int g,
                                                  int t, int wg) {
#if FG_DQ_TMA_ADD
  if (pend.rows > 0) fg_dq_tma_add(&maps.dq_acc, stg, dqc, pend.b, pend.h, pend.q0, pend.rows, warp, g, t, wg);
#else
  fg_dq_red_add(p, dqc, pend.b, pend.h, pend.q0, pend.rows, warp, g, t, wg);
#endif
}
#endif

extern "C" __global__ void __launch_bounds__(FG_NT_DKDV + 128, 1)
    fg_bwd_dkdv_wgmma_ws(const FgBwdParams p, const FgModArgs args, const __grid_constant__ FgBwdQMaps maps) {
  extern __shared__ __align__(16) unsigned char fg_smem_raw[];
  unsigned char* const smem = fg_aligned_smem(fg_smem_raw);
  fg_s* Ks = (fg_s*)smem;                                         // E / 64 atoms of KV_TILE x 64
  fg_s* Vs = Ks + FG_KV_TILE * FG_E;                              // Ev / 64 atoms of KV_TILE x 64
  fg_s* Qs = Vs + FG_KV_TILE * FG_EV;                             // FG_BWD_STAGES x E / 64 atoms of 64 x 64
  fg_s* Os = Qs + FG_BWD_STAGES * FG_Q_CHUNK * FG_E;              // FG_BWD_STAGES x Ev / 64 atoms (dO)
  float* Ls = (float*)(Os + FG_BWD_STAGES * FG_Q_CHUNK * FG_EV);  // FG_BWD_STAGES x [Q_CHUNK] lse2
  float* Ds = Ls + FG_BWD_STAGES * FG_Q_CHUNK;                    // FG_BWD_STAGES x [Q_CHUNK] delta
#if FG_DQ_ATOMIC
  // The fused dQ's dS^T tiles (three of KV_TILE x 64, one atom each, 1024-byte aligned): chunk n's rows go to tile
  // n % 3. Its dQ product is issued a chunk later (below), so tile n % 3 was last read by chunk n - 3's, which each
  // warpgroup waited for before its turn at chunk n - 1's gradient products: before either writes chunk n's rows.
  const unsigned st_at = (unsigned)((unsigned char*)(Ds + FG_BWD_STAGES * FG_Q_CHUNK) - smem);
  fg_s* St = (fg_s*)(smem + (st_at + 1023u) / 1024u * 1024u);
  // FG_DQ_TMA_ADD: this warpgroup's staging tile (FG_DQ_STAGE_BYTES) after them.
  unsigned char* const stage_at = (unsigned char*)(St + 3 * FG_KV_TILE * 64) + (threadIdx.x >> 7) * FG_DQ_STAGE_BYTES;
  float* const Dq_stage = FG_DQ_TMA_ADD ? (float*)stage_at : nullptr;
#endif
  // bar_kv: K and V landed (the producer's 128 threads); bar_kv_free: the consumers' 8 warps are done with them.
  __shared__ __align__(8) unsigned long long bar_kv, bar_kv_free, bar_full[FG_BWD_STAGES], bar_empty[FG_BWD_STAGES];
  __shared__ FgBwdChunk chunk[FG_BWD_STAGES];
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
  __shared__ FgRowMods<float> q_mods[FG_BWD_STAGES][FG_Q_CHUNK];
#endif

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ FgJobQueue queue_;  // a persistent kernel's (FG_BWD_PERSISTENT)
  FgJobQueue* const queue = FG_BWD_PERSISTENT ? &queue_ : nullptr;
  fg_ws_init_barriers(&bar_kv, &bar_kv_free, bar_full, bar_empty, queue);
  // The grid the host launches without FG_BWD_PERSISTENT (flex_backward_cuda.cpp).
  const fg_i64 ntile = (p.Lkv + p.block_kv - 1) / p.block_kv * p.sub_kv;
  const fg_i64 gx = p.dkdv_group == 0 ? ntile : ntile * p.Hkv * p.Bkv, gy = p.dkdv_group == 0 ? p.Hkv : 1,
               gz = p.dkdv_group == 0 ? p.Bkv : 1;

  if (warp >= FG_NT_DKDV / 32) {  // the producer warpgroup
    fg_setmaxnreg_dec<FG_BWD_WS_PRODUCER_REGS>();
    const int pt = threadIdx.x - FG_NT_DKDV;  // 0 .. 127
    int j = 0;   // the stage ring's position, continued from grid CTA to grid CTA
    int it = 0;  // the grid CTAs run so far
    fg_for_each_cta(queue, p.job_counters, true, &bar_kv_free, it, gx, gy, gz, [&](const FgCta& cta) {
      fg_i64 bk, hk, mb, kv0;
      int nkv;
      if (!fg_dkdv_tile(p, cta, bk, hk, mb, kv0, nkv)) return;
      // The walk starts before the wait below with FG_BWD_TILE_PREFETCH (its block list's reads overlap the current
      // grid CTA's end); else after the tile's copies, as before: kept live across them, the walk made the grid
      // kernels' producers spill 8-12 bytes (ptxas, nvcc 13.0), and =0 stays the previous code to compare with.
      FgQWalk w;
      if (FG_BWD_TILE_PREFETCH) w.start(p, bk, hk, mb);
      // K and V, once the previous grid CTA's last score products have read its (fg_resident_wait, or
      // fg_for_each_cta's wait without FG_BWD_TILE_PREFETCH).
      fg_resident_wait(&bar_kv_free, it);
      fg_load_rows<FG_KV_TILE, true>(Ks, 0, p.k + bk * p.ks_b + hk * p.ks_h + kv0 * p.ks_l, p.ks_l, nkv, FG_E, FG_E,
                                     pt, 128);
      fg_load_rows<FG_KV_TILE, true>(Vs, 0, p.v + bk * p.vs_b + hk * p.vs_h + kv0 * p.vs_l, p.vs_l, nkv, FG_EV, FG_EV,
                                     pt, 128);
      fg_cp_async_mbar_arrive(fg_smem_addr(&bar_kv));
      if (!FG_BWD_TILE_PREFETCH) w.start(p, bk, hk, mb);
      for (;; ++j) {
        const int st = j % FG_BWD_STAGES;
        if (j >= FG_BWD_STAGES) fg_mbar_wait(fg_smem_addr(&bar_empty[st]), (j / FG_BWD_STAGES - 1) & 1);
        const unsigned bar = fg_smem_addr(&bar_full[st]);
#if FG_BWD_SKIP
        // Partial chunks the mask keeps nothing of go by without a stage (the quadrant table's bits).
        int live = 3;
        while (!w.done() && w.partial()) {
          const unsigned char* t = fg_quad_live(p, w.b, w.h, w.q0, kv0);
          live = t[0] | (nkv > 64 ? t[1] << 1 : 0);
          if (live != 0) break;
          live = 3;
          w.next(p);
        }
#endif
        if (w.done()) {
          if (pt == 0) chunk[st].rows = 0;
          fg_ws_publish(bar, /*copies_arrive=*/false);
          ++j;
          break;
        }
        const int n = w.nq();
        const int b = (int)w.b, h = (int)w.h;
        const fg_i64 q0 = w.q0, row0 = (w.b * p.Hq + w.h) * p.Lq + q0;
        fg_s* qd = Qs + st * FG_Q_CHUNK * FG_E;
        fg_s* od = Os + st * FG_Q_CHUNK * FG_EV;
        // The kernels' contract is zeros past the chunk's rows (a masked q row's dO must not reach dV: 0 * inf).
        // TMA boxes are whole 64-row chunks, zeros only past Lq: a chunk clipped by its block's end is copied.
        if (n == FG_Q_CHUNK || q0 + n == p.Lq) {
          if (pt == 0) {
            fg_mbar_expect_tx(bar, FG_Q_CHUNK * (FG_E + FG_EV) * 2);
#pragma unroll
            for (int a = 0; a < FG_E / 64; ++a)
              fg_tma_load_4d(fg_smem_addr(qd + a * FG_Q_CHUNK * 64), &maps.q, 64 * a, (int)q0, h, b, bar);
#pragma unroll
            for (int a = 0; a < FG_EV / 64; ++a)
              fg_tma_load_4d(fg_smem_addr(od + a * FG_Q_CHUNK * 64), &maps.dout, 64 * a, (int)q0, h, b, bar);
          }
        } else {
          fg_load_rows<FG_Q_CHUNK, true>(qd, 0, p.q + w.b * p.qs_b + w.h * p.qs_h + q0 * p.qs_l, p.qs_l, n, FG_E, FG_E,
                                         pt, 128);
          fg_load_rows<FG_Q_CHUNK, true>(od, 0, p.dout + row0 * FG_EV, FG_EV, n, FG_EV, FG_EV, pt, 128);
        }
        {  // thread pt: lse2 (pt < 64) or delta of chunk row pt % 64
          const int r = pt % FG_Q_CHUNK;
          const bool ok = r < n;
          const fg_t* src = pt < FG_Q_CHUNK ? p.lse2 : p.delta;
          float* dst = (pt < FG_Q_CHUNK ? Ls : Ds) + st * FG_Q_CHUNK + r;
          fg_cp_async4(fg_smem_addr(dst), ok ? src + row0 + r : src, ok);
        }
        fg_cp_async_mbar_arrive(bar);
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
        if (pt < n) fg_row_mods(q_mods[st][pt], true, w.partial(), b, h, (int)(q0 + pt), args);
#endif
        if (pt == 0) {
          chunk[st].q0 = q0;
          chunk[st].b = b;
          chunk[st].h = h;
          chunk[st].rows = n;
          chunk[st].partial = w.partial() ? 1 : 0;
#if FG_BWD_TILE_PREFETCH
          chunk[st].last = w.last() ? 1 : 0;
#endif
#if FG_BWD_SKIP
          chunk[st].live = live;
#endif
        }
        fg_ws_publish(bar, /*copies_arrive=*/true);  // (lse2 / delta: every thread copied)
        w.next(p);
      }
      ++it;
    });
    fg_cp_async_wait<0>();
    return;
  }

  // The consumers: warp i of the CTA owns kv rows 16 i .. 16 i + 15 as in fg_bwd_dkdv_wgmma.
  fg_setmaxnreg_inc<FG_BWD_WS_CONSUMER_REGS>();
  const int g = lane >> 2, t = lane & 3;
  const int kr0 = warp * 16;
  const int wg = warp >> 2;
  int j = 0, it = 0;  // as the producer's
#if FG_DQ_ATOMIC
  int n_dq = 0;  // chunks computed (their dS^T tile: n_dq % 3), continued from grid CTA to grid CTA
#endif
  fg_turns_begin(wg);
  fg_for_each_cta(queue, p.job_counters, false, &bar_kv_free, it, gx, gy, gz, [&](const FgCta& cta) {
    fg_i64 bk, hk, mb, kv0;
    int nkv;
    if (!fg_dkdv_tile(p, cta, bk, hk, mb, kv0, nkv)) return;
    float dk[FG_E / 8][4], dv[FG_EV / 8][4];
    fg_zero_frags(dk);
    fg_zero_frags(dv);
    // (Set here, after the tile, rather than once above the loop: ptxas then spilled 4-52 bytes in the consumers
    // with document, ALiBi and softcap.)
    const FgMaxSink max_sink = fg_dkdv_sink(p);
    const FgMaxSink* sink = FG_CAP_MODE == 1 ? &max_sink : nullptr;
    const float scale = (float)p.scale;
    const unsigned k_addr = fg_smem_addr(Ks) + wg * FG_CHUNK_ATOM_B, v_addr = fg_smem_addr(Vs) + wg * FG_CHUNK_ATOM_B;
    bool kv_released = false;
#if FG_DQ_ATOMIC
    FgDqPending pend{0, 0, 0, 0};  // the previous chunk, whose dQ product is still to issue (rows 0: none)
#endif
    fg_mbar_wait(fg_smem_addr(&bar_kv), it & 1);
    for (;; ++j) {
      int st = j % FG_BWD_STAGES;
      fg_mbar_wait(fg_smem_addr(&bar_full[st]), (j / FG_BWD_STAGES) & 1);
#if FG_BWD_SKIP_DKDV_WG
      // Chunks the mask keeps nothing of in this warpgroup's quadrant: their stages go straight back.
      while (chunk[st].rows != 0 && !((chunk[st].live >> wg) & 1)) {
        __syncwarp();
        if (lane == 0) fg_mbar_arrive(fg_smem_addr(&bar_empty[st]));
        st = ++j % FG_BWD_STAGES;
        fg_mbar_wait(fg_smem_addr(&bar_full[st]), (j / FG_BWD_STAGES) & 1);
      }
#endif
      fg_fence_proxy_async();  // the producer's cp.async writes, acquired through the barrier, seen by wgmma
      const FgBwdChunk c = chunk[st];
      if (c.rows == 0) {  // the grid CTA's walk is over: its stage goes back too
        __syncwarp();
        if (lane == 0) fg_mbar_arrive(fg_smem_addr(&bar_empty[st]));
        ++j;
        break;
      }
      const bool partial = c.partial != 0;
      const unsigned q_addr = fg_smem_addr(Qs + st * FG_Q_CHUNK * FG_E);
      const unsigned o_addr = fg_smem_addr(Os + st * FG_Q_CHUNK * FG_EV);
      float st_[FG_NQN][4], dpt[FG_NQN][4];
      fg_turn_take(wg);
      fg_issue_score_pair<FG_KV_TILE>(st_, dpt, k_addr, q_addr, v_addr, o_addr);
      fg_turn_pass(wg);
      FgColMods<float> cm[2];
      fg_dkdv_col_parts(cm, kr0, g, nkv, partial, c.b, c.h, kv0, args);
      fg_wgmma_wait<0>();
      fg_wgmma_fence_operands<FG_Q_CHUNK / 2>(&st_[0][0]);
      fg_wgmma_fence_operands<FG_Q_CHUNK / 2>(&dpt[0][0]);
      // The grid CTA's last score products have read K and V: the producer may load the next one's.
      if (FG_BWD_TILE_PREFETCH && c.last) fg_resident_release(&bar_kv_free, kv_released);
      fg_dkdv_elements(st_, dpt, Ls + st * FG_Q_CHUNK, Ds + st * FG_Q_CHUNK, FG_BWD_MODS(q_mods[st]), cm, kr0, g, t,
                       c.rows, nkv, partial, c.b, c.h, c.q0, kv0, scale, args, sink);
      unsigned ap[FG_Q_CHUNK / 16][4], ad[FG_Q_CHUNK / 16][4];
      fg_dkdv_pack(st_, dpt, ap, ad);
#if FG_DQ_ATOMIC
      fg_dkdv_store_dst(fg_dst_tile(St, n_dq), ad, kr0, g, t);
      float dqc[32];
      fg_dq_stage_free();  // (the turn, or barrier 3, follows before the staging tile's next stores)
#endif
      fg_turn_take(wg);
      fg_wgmma_fence();
      fg_dkdv_issue_grads(dk, dv, ap, ad, q_addr, o_addr);
      fg_wgmma_commit();
#if FG_DQ_ATOMIC
      // The previous chunk's dQ product, in this turn: both warpgroups stored its dS^T rows before their turns at
      // its gradient products, so no meeting (which made the first warpgroup wait for the second's element step).
      // Issued on a grid CTA's first chunk too, where no chunk precedes (pend.rows 0: a stale tile's product, not
      // added): issued under a branch, ptxas spilled 256 bytes in the consumers (nvcc 13.0).
      fg_dkdv_pending_dq(dqc, St, Ks, n_dq, wg);
#endif
      fg_turn_pass(wg);
      fg_wgmma_wait<0>();
      fg_wgmma_fence_operands<FG_EV / 2>(&dv[0][0]);
      fg_wgmma_fence_operands<FG_E / 2>(&dk[0][0]);
      fg_wgmma_fence_a(ap);
      fg_wgmma_fence_a(ad);
#if FG_DQ_ATOMIC
      fg_wgmma_fence_operands<32>(dqc);
      fg_dq_add_pending(p, maps, Dq_stage, dqc, pend, warp, g, t, wg);
      pend = FgDqPending{c.q0, c.b, c.h, c.rows};
      ++n_dq;
#endif
      __syncwarp();
      if (lane == 0) fg_mbar_arrive(fg_smem_addr(&bar_empty[st]));  // this warp is done with the stage
    }
#if FG_DQ_ATOMIC
    if (pend.rows > 0) {  // the last chunk's dQ product: one turn more for each warpgroup, before K goes
      float dqc[32];
      fg_dq_stage_free();
      fg_turn_take(wg);
      fg_dkdv_pending_dq(dqc, St, Ks, n_dq, wg);
      fg_turn_pass(wg);
      fg_wgmma_wait<0>();
      fg_wgmma_fence_operands<32>(dqc);
      fg_dq_add_pending(p, maps, Dq_stage, dqc, pend, warp, g, t, wg);
    }
#endif
    // Every product that read K and V has completed: the producer may load the next grid CTA's while this one's
    // dK and dV go out (released above where the last chunk said so).
    if (!kv_released) fg_resident_release(&bar_kv_free, kv_released);
    fg_dkdv_store(p, dk, dv, (bk * p.Hkv + hk) * p.Lkv + kv0, kr0, g, t, nkv, scale);
    ++it;
  });
  fg_turns_end(wg);
#if FG_DQ_TMA_ADD
  if ((threadIdx.x & 127) == 0) fg_bulk_wait<0>();  // the last adds done before the CTA's shared memory goes
#endif
}
#endif  // FG_BWD_WS_DKDV

#if !FG_DQ_ATOMIC  // else the dK/dV kernel sums dQ
// ---- the steps of one kv chunk, shared by fg_bwd_dq_wgmma and fg_bwd_dq_wgmma_ws
// The element step once the chunk's score products (the two newest groups) are issued: s <- dS (pre-mod). Where
// the entry splits (FG_SPLIT_ENTRY), in two halves: s <- P as soon as S has landed, while dP is still being
// computed, then dS; else the one-pass step (fg_dq_entries) once both have landed (captured gradients to `sink`).
// kInterior: as fg_dq_entries's.
template <bool kInterior, class Sink>
__device__ __forceinline__ void fg_dq_chunk_entries(float (&s)[FG_NKN][4], float (&dp)[FG_NKN][4],
                                                    const float (&l2)[2], const float (&dl)[2], const bool (&rv)[2],
                                                    const FgRowMods<float> (&rmods)[2],
                                                    const FgColMods<float>* kv_mods, int qr0, int g, int t, int nkv,
                                                    bool partial, int b, int h, fg_i64 q0, fg_i64 kv0, float scale,
                                                    const FgModArgs& args, const Sink* sink) {
#if FG_SPLIT_ENTRY
  (void)sink;
  fg_wgmma_wait<1>();
  fg_wgmma_fence_operands<FG_KV_CHUNK / 2>(&s[0][0]);
  const unsigned vm =
      fg_dq_elements_p<kInterior>(s, l2, rv, rmods, kv_mods, qr0, g, t, nkv, partial, b, h, q0, kv0, scale, args);
#if FG_DQ_P_EARLY
  fg_wgmma_fence_operands<FG_KV_CHUNK / 2>(&s[0][0]);  // P finished here, not moved past the wait
#endif
  fg_wgmma_wait<0>();
  fg_wgmma_fence_operands<FG_KV_CHUNK / 2>(&dp[0][0]);
  fg_dq_elements_ds<kInterior>(s, dp, dl, vm);
#else
  fg_wgmma_wait<0>();
  fg_wgmma_fence_operands<FG_KV_CHUNK / 2>(&s[0][0]);
  fg_wgmma_fence_operands<FG_KV_CHUNK / 2>(&dp[0][0]);
#if FG_SCORE_ELEM_DSCORE_FAST
  if (fg_dq_fast_ok(s, rmods, kv_mods, qr0, g, t, b, h, q0, kv0, scale, args)) {  // as fg_dkdv_elements
    fg_dq_entries<kInterior, Sink, true>(s, dp, l2, dl, rv, rmods, kv_mods, qr0, g, t, nkv, partial, b, h, q0, kv0,
                                         scale, args, sink);
    return;
  }
#endif
  fg_dq_entries<kInterior>(s, dp, l2, dl, rv, rmods, kv_mods, qr0, g, t, nkv, partial, b, h, q0, kv0, scale, args,
                           sink);
#endif
}
// The step of a chunk of nkv kv rows against the tile's nq q rows, in its interior copy (FG_BWD_INTERIOR_STEP) where
// the chunk is a full block's and all 64 q rows of the lane's warpgroup (its warp's first: qr0) are inside the
// sequence. The choice is the warpgroup's, not the lane's (fg_dq_interior): the copies wait for the products, which
// every thread of a warpgroup does at once (wgmma.wait_group, .aligned), and a tile's last warp can hold rows on
// both sides of the sequence's end.
template <class Sink>
__device__ __forceinline__ void fg_dq_chunk_elements(float (&s)[FG_NKN][4], float (&dp)[FG_NKN][4],
                                                     const float (&l2)[2], const float (&dl)[2], const bool (&rv)[2],
                                                     const FgRowMods<float> (&rmods)[2],
                                                     const FgColMods<float>* kv_mods, int qr0, int g, int t, int nq,
                                                     int nkv, bool partial, int b, int h, fg_i64 q0, fg_i64 kv0,
                                                     float scale, const FgModArgs& args, const Sink* sink) {
#if FG_BWD_INTERIOR_STEP
  if (!partial && nkv == FG_KV_CHUNK && (qr0 & ~63) + 64 <= nq) {
    fg_dq_chunk_entries<true>(s, dp, l2, dl, rv, rmods, kv_mods, qr0, g, t, nkv, partial, b, h, q0, kv0, scale, args,
                              sink);
    return;
  }
#else
  (void)nq;
#endif
  fg_dq_chunk_entries<false>(s, dp, l2, dl, rv, rmods, kv_mods, qr0, g, t, nkv, partial, b, h, q0, kv0, scale, args,
                             sink);
}
// dQ += dS K (k = the chunk's kv rows; B = K MN-major at k_addr): dS packed into a16 (kept live until the product
// is waited for), one commit group, not waited for.
__device__ __forceinline__ void fg_dq_pack(const float (&s)[FG_NKN][4], unsigned (&a16)[FG_KV_CHUNK / 16][4]) {
#pragma unroll
  for (int kc = 0; kc < FG_KV_CHUNK / 16; ++kc) fg_pack_c_to_a<FG_BF16>(s[2 * kc], s[2 * kc + 1], a16[kc]);
  fg_wgmma_fence_a(a16);
}
__device__ __forceinline__ void fg_dq_issue_packed(float (&dq)[FG_E / 8][4], unsigned (&a16)[FG_KV_CHUNK / 16][4],
                                                   unsigned k_addr) {
  fg_wgmma_fence();
  fg_issue_grad<FG_KV_CHUNK / 16, FG_E>(dq, a16, k_addr);
  fg_wgmma_commit();
}
__device__ __forceinline__ void fg_dq_issue_grad(float (&dq)[FG_E / 8][4], const float (&s)[FG_NKN][4],
                                                 unsigned (&a16)[FG_KV_CHUNK / 16][4], unsigned k_addr) {
  fg_dq_pack(s, a16);
  fg_dq_issue_packed(dq, a16, k_addr);
}

#if !FG_BWD_WS_DQ
extern "C" __global__ void __launch_bounds__(FG_NT_DQ, 1) fg_bwd_dq_wgmma(const FgBwdParams p, const FgModArgs args) {
  extern __shared__ __align__(16) unsigned char fg_smem_raw[];
  unsigned char* const smem = fg_aligned_smem(fg_smem_raw);
  fg_s* Qs = (fg_s*)smem;                   // E / 64 atoms of Q_TILE x 64
  fg_s* Os = Qs + FG_Q_TILE * FG_E;         // Ev / 64 atoms of Q_TILE x 64 (dO)
  fg_s* Ks = Os + FG_Q_TILE * FG_EV;        // 2 buffers of E / 64 atoms of 64 x 64
  fg_s* Vs = Ks + 2 * FG_KV_CHUNK * FG_E;   // 2 buffers of Ev / 64 atoms of 64 x 64

  fg_i64 mb, q0;
  int nq;
  if (!fg_dq_cta(p, mb, q0, nq)) return;
  const fg_i64 h = blockIdx.y, b = blockIdx.z;
  const fg_i64 bk = p.Bkv == 1 ? 0 : b, hk = h / p.G;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int qr0 = warp * 16;
  const int wg = warp >> 2;
  const fg_i64 row0 = (b * p.Hq + h) * p.Lq + q0;

  fg_load_rows<FG_Q_TILE, true>(Qs, 0, p.q + b * p.qs_b + h * p.qs_h + q0 * p.qs_l, p.qs_l, nq, FG_E, FG_E,
                                threadIdx.x, FG_NT_DQ);
  fg_load_rows<FG_Q_TILE, true>(Os, 0, p.dout + row0 * FG_EV, FG_EV, nq, FG_EV, FG_EV, threadIdx.x, FG_NT_DQ);
  const fg_s* kbase = p.k + bk * p.ks_b + hk * p.ks_h;
  const fg_s* vbase = p.v + bk * p.vs_b + hk * p.vs_h;
  FgKvWalk w;
  w.start(p, b, h, mb);
  auto issue = [&](const FgKvWalk& s, int buf) {
    fg_load_rows<FG_KV_CHUNK, true>(Ks + buf * FG_KV_CHUNK * FG_E, 0, kbase + s.kv0 * p.ks_l, p.ks_l, s.nkv(), FG_E,
                                    FG_E, threadIdx.x, FG_NT_DQ);
    fg_load_rows<FG_KV_CHUNK, true>(Vs + buf * FG_KV_CHUNK * FG_EV, 0, vbase + s.kv0 * p.vs_l, p.vs_l, s.nkv(), FG_EV,
                                    FG_EV, threadIdx.x, FG_NT_DQ);
  };
  if (!w.done()) issue(w, 0);
  fg_cp_async_commit();  // with Q and dO

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
#if !FG_SPLIT_ENTRY
  const FgDqSink cap_sink = fg_dq_sink(p);
  const FgDqSink* sink = FG_CAP_MODE != 0 ? &cap_sink : nullptr;
#else
  const FgDqSink* sink = nullptr;  // (no captured gradients where the entry splits)
#endif
  const float scale = (float)p.scale;
  // This warpgroup's 64 rows of Q and dO (8 KiB into each atom).
  const unsigned q_addr = fg_smem_addr(Qs) + wg * FG_CHUNK_ATOM_B, o_addr = fg_smem_addr(Os) + wg * FG_CHUNK_ATOM_B;

#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
  // The mods' column parts of the kv chunks, double-buffered as K and V and computed while the previous chunk's
  // score products run (as fg_bwd_dkdv_wgmma's row parts).
  __shared__ FgColMods<float> kv_mods[2][FG_KV_CHUNK];
  auto col_parts = [&](const FgKvWalk& s, int buf) {
    for (int j = threadIdx.x; j < s.nkv(); j += FG_NT_DQ)
      kv_mods[buf][j] = fg_col_mods<float>(true, s.partial(), (int)b, (int)h, (int)(s.kv0 + j), args);
  };
  if (!w.done()) col_parts(w, 0);
#endif
  // dS of the previous chunk, packed: the A operand of its dQ product, which is left running into the next
  // chunk (waited for once that chunk's score products are issued), so that the product overlaps the next
  // chunk's barrier and copies' wait instead of holding this warpgroup.
  unsigned a16[FG_KV_CHUNK / 16][4] = {};
  for (int it = 0; !w.done(); ++it) {
    const int buf = it & 1;
    const fg_i64 kv0 = w.kv0;
    const int nkv = w.nkv();
    const bool partial = w.partial();
    fg_cp_async_wait<0>();  // this chunk (issued one iteration ahead) landed
    fg_fence_proxy_async();
    __syncthreads();
    const unsigned k_addr = fg_smem_addr(Ks + buf * FG_KV_CHUNK * FG_E);
    const unsigned v_addr = fg_smem_addr(Vs + buf * FG_KV_CHUNK * FG_EV);

    // S = Q K^T and dP = dO V^T, both in flight before either is waited on.
    float s[FG_NKN][4], dp[FG_NKN][4];
    fg_issue_score_pair<FG_Q_TILE>(s, dp, q_addr, k_addr, o_addr, v_addr);
    // The previous chunk's dQ product (the oldest group) is done for this warpgroup, and after the barrier for
    // every one: the other buffer (that chunk's K, V) takes the next chunk.
    fg_wgmma_wait<2>();
    fg_wgmma_fence_operands<FG_E / 2>(&dq[0][0]);
    fg_wgmma_fence_a(a16);
    __syncthreads();
    w.next(p);
    if (!w.done()) issue(w, buf ^ 1);
    fg_cp_async_commit();
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
    if (!w.done()) col_parts(w, buf ^ 1);  // the next chunk's, while the products run
#endif
    fg_dq_chunk_elements(s, dp, l2, dl, rv, rmods, FG_BWD_MODS(kv_mods[buf]), qr0, g, t, nq, nkv, partial, (int)b,
                         (int)h, q0, kv0, scale, args, sink);
    // dQ += dS K (k = the chunk's kv rows): A from registers, B = K MN-major; waited for in the next iteration.
    fg_dq_issue_grad(dq, s, a16, k_addr);
  }
  fg_wgmma_wait<0>();
  fg_wgmma_fence_operands<FG_E / 2>(&dq[0][0]);
  fg_wgmma_fence_a(a16);
  fg_cp_async_wait<0>();
  fg_dq_store(p, dq, row0, qr0, g, t, rv, scale);
}
#endif  // !FG_BWD_WS_DQ

#if FG_BWD_WS_DQ
// The warp-specialised dQ kernel: fg_bwd_dq_wgmma's tile, walk and arithmetic (the same results, bit for bit) with a
// producer warpgroup that loads Q and dO once and each kv chunk's K, V (TMA; cp.async where a chunk is clipped by
// its block's end) and mods' column parts into FG_BWD_STAGES stages on full mbarriers. A consumer warp releases a
// chunk's stage once that chunk's dQ product (which reads K, and runs on into the next chunk) has completed.
#if FG_WG_DQ != 2
#error "fg_bwd_dq_wgmma_ws: two consumer warpgroups"
#endif
// K's and V's maps are 4-d (E, Lkv, Hkv, Bkv) and (Ev, Lkv, Hkv, Bkv) with the tensors' strides; boxes as Q's.
struct FgBwdKvMaps {
  FgTmaMap k, v;
};
// What the producer publishes with a stage; rows == 0: the walk is over.
struct FgBwdKvChunk {
  fg_i64 kv0;
  int rows, partial;
  int live;  // as FgBwdChunk's
  int last;  // as FgBwdChunk's (Q and dO)
};

extern "C" __global__ void __launch_bounds__(FG_NT_DQ + 128, 1)
    fg_bwd_dq_wgmma_ws(const FgBwdParams p, const FgModArgs args, const __grid_constant__ FgBwdKvMaps maps) {
  extern __shared__ __align__(16) unsigned char fg_smem_raw[];
  unsigned char* const smem = fg_aligned_smem(fg_smem_raw);
  fg_s* Qs = (fg_s*)smem;                                // E / 64 atoms of Q_TILE x 64
  fg_s* Os = Qs + FG_Q_TILE * FG_E;                      // Ev / 64 atoms of Q_TILE x 64 (dO)
  fg_s* Ks = Os + FG_Q_TILE * FG_EV;                     // FG_BWD_STAGES x E / 64 atoms of 64 x 64
  fg_s* Vs = Ks + FG_BWD_STAGES * FG_KV_CHUNK * FG_E;    // FG_BWD_STAGES x Ev / 64 atoms of 64 x 64
  // bar_q: Q and dO landed (the producer's 128 threads); bar_q_free: the consumers' 8 warps are done with them.
  __shared__ __align__(8) unsigned long long bar_q, bar_q_free, bar_full[FG_BWD_STAGES], bar_empty[FG_BWD_STAGES];
  __shared__ FgBwdKvChunk chunk[FG_BWD_STAGES];
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
  __shared__ FgColMods<float> kv_mods[FG_BWD_STAGES][FG_KV_CHUNK];
#endif

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __shared__ FgJobQueue queue_;  // a persistent kernel's (FG_BWD_PERSISTENT)
  FgJobQueue* const queue = FG_BWD_PERSISTENT ? &queue_ : nullptr;
  fg_ws_init_barriers(&bar_q, &bar_q_free, bar_full, bar_empty, queue);
  // The grid the host launches without FG_BWD_PERSISTENT (flex_backward_cuda.cpp).
  const fg_i64 gx = (p.Lq + p.block_q - 1) / p.block_q * p.sub_q;

  if (warp >= FG_NT_DQ / 32) {  // the producer warpgroup
    fg_setmaxnreg_dec<FG_BWD_WS_DQ_PRODUCER_REGS>();
    const int pt = threadIdx.x - FG_NT_DQ;  // 0 .. 127
    int j = 0;   // the stage ring's position, continued from grid CTA to grid CTA
    int it = 0;  // the grid CTAs run so far
    fg_for_each_cta(queue, p.job_counters + 1, true, &bar_q_free, it, gx, p.Hq, p.B, [&](const FgCta& cta) {
      fg_i64 mb, q0;
      int nq;
      if (!fg_dq_tile(p, cta, gx, mb, q0, nq)) return;
      const fg_i64 h = cta.y, b = cta.z;
      const fg_i64 bk = p.Bkv == 1 ? 0 : b, hk = h / p.G;
      const fg_i64 row0 = (b * p.Hq + h) * p.Lq + q0;
      FgKvWalk w;
      if (FG_BWD_TILE_PREFETCH) w.start(p, b, h, mb);  // (before the wait below or after the copies: as the dK/dV one)
      // Q and dO, once the previous grid CTA's last score products have read its (fg_resident_wait, or
      // fg_for_each_cta's wait without FG_BWD_TILE_PREFETCH).
      fg_resident_wait(&bar_q_free, it);
      fg_load_rows<FG_Q_TILE, true>(Qs, 0, p.q + b * p.qs_b + h * p.qs_h + q0 * p.qs_l, p.qs_l, nq, FG_E, FG_E, pt,
                                    128);
      fg_load_rows<FG_Q_TILE, true>(Os, 0, p.dout + row0 * FG_EV, FG_EV, nq, FG_EV, FG_EV, pt, 128);
      fg_cp_async_mbar_arrive(fg_smem_addr(&bar_q));
      if (!FG_BWD_TILE_PREFETCH) w.start(p, b, h, mb);
      const fg_s* kbase = p.k + bk * p.ks_b + hk * p.ks_h;
      const fg_s* vbase = p.v + bk * p.vs_b + hk * p.vs_h;
      for (;; ++j) {
        const int st = j % FG_BWD_STAGES;
        if (j >= FG_BWD_STAGES) fg_mbar_wait(fg_smem_addr(&bar_empty[st]), (j / FG_BWD_STAGES - 1) & 1);
        const unsigned bar = fg_smem_addr(&bar_full[st]);
#if FG_BWD_SKIP
        // Partial chunks the mask keeps nothing of go by without a stage (the quadrant table's bits).
        int live = 3;
        while (!w.done() && w.partial()) {
          const unsigned char* t = fg_quad_live(p, b, h, q0, w.kv0);
          live = t[0] | (nq > 64 ? t[(p.Lkv + 63) / 64] << 1 : 0);
          if (live != 0) break;
          live = 3;
          w.next(p);
        }
#endif
        if (w.done()) {
          if (pt == 0) chunk[st].rows = 0;
          fg_ws_publish(bar, /*copies_arrive=*/false);
          ++j;
          break;
        }
        const int n = w.nkv();
        const fg_i64 kv0 = w.kv0;
        fg_s* kd = Ks + st * FG_KV_CHUNK * FG_E;
        fg_s* vd = Vs + st * FG_KV_CHUNK * FG_EV;
        // Zeros past the chunk's rows (a masked column's K row must not reach dQ: 0 * inf); TMA boxes are whole
        // 64-row chunks, zeros only past Lkv: a chunk clipped by its block's end is copied.
        const bool tma = n == FG_KV_CHUNK || kv0 + n == p.Lkv;
        if (tma) {
          if (pt == 0) {
            fg_mbar_expect_tx(bar, FG_KV_CHUNK * (FG_E + FG_EV) * 2);
#pragma unroll
            for (int a = 0; a < FG_E / 64; ++a)
              fg_tma_load_4d(fg_smem_addr(kd + a * FG_KV_CHUNK * 64), &maps.k, 64 * a, (int)kv0, (int)hk, (int)bk, bar);
#pragma unroll
            for (int a = 0; a < FG_EV / 64; ++a)
              fg_tma_load_4d(fg_smem_addr(vd + a * FG_KV_CHUNK * 64), &maps.v, 64 * a, (int)kv0, (int)hk, (int)bk, bar);
          }
        } else {
          fg_load_rows<FG_KV_CHUNK, true>(kd, 0, kbase + kv0 * p.ks_l, p.ks_l, n, FG_E, FG_E, pt, 128);
          fg_load_rows<FG_KV_CHUNK, true>(vd, 0, vbase + kv0 * p.vs_l, p.vs_l, n, FG_EV, FG_EV, pt, 128);
          fg_cp_async_mbar_arrive(bar);
        }
#if FG_HAS_SCORE_MOD || FG_HAS_MASK_MOD
        if (pt < n) kv_mods[st][pt] = fg_col_mods<float>(true, w.partial(), (int)b, (int)h, (int)(kv0 + pt), args);
#endif
        if (pt == 0) {
          chunk[st].kv0 = kv0;
          chunk[st].rows = n;
          chunk[st].partial = w.partial() ? 1 : 0;
#if FG_BWD_TILE_PREFETCH
          chunk[st].last = w.last() ? 1 : 0;
#endif
#if FG_BWD_SKIP
          chunk[st].live = live;
#endif
        }
        fg_ws_publish(bar, !tma);
        w.next(p);
      }
      ++it;
    });
    fg_cp_async_wait<0>();
    return;
  }

  // The consumers: warp i of the CTA owns q rows 16 i .. 16 i + 15 as in fg_bwd_dq_wgmma.
  fg_setmaxnreg_inc<FG_BWD_WS_DQ_CONSUMER_REGS>();
  const int g = lane >> 2, t = lane & 3;
  const int qr0 = warp * 16;
  const int wg = warp >> 2;
#if !FG_SPLIT_ENTRY
  const FgDqSink cap_sink = fg_dq_sink(p);
  const FgDqSink* sink = FG_CAP_MODE != 0 ? &cap_sink : nullptr;
#else
  const FgDqSink* sink = nullptr;  // (no captured gradients where the entry splits)
#endif
  const float scale = (float)p.scale;
  const unsigned q_addr = fg_smem_addr(Qs) + wg * FG_CHUNK_ATOM_B, o_addr = fg_smem_addr(Os) + wg * FG_CHUNK_ATOM_B;
  int j = 0, it = 0;  // as the producer's
  fg_turns_begin(wg);
  fg_for_each_cta(queue, p.job_counters + 1, false, &bar_q_free, it, gx, p.Hq, p.B, [&](const FgCta& cta) {
    fg_i64 mb, q0;
    int nq;
    if (!fg_dq_tile(p, cta, gx, mb, q0, nq)) return;
    const fg_i64 h = cta.y, b = cta.z;
    const fg_i64 row0 = (b * p.Hq + h) * p.Lq + q0;
    float l2[2], dl[2];
    bool rv[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int i = qr0 + g + 8 * hf;
      rv[hf] = i < nq;
#if FG_BWD_DQ_DELTA
      // The preprocess's delta and lse2 of the row, computed here from O and dO (the same sum, bit for bit) while the
      // producer's first loads are in flight, and written for the dK/dV kernel, which runs after this one.
      const fg_i64 r = row0 + (rv[hf] ? i : 0);
      const float dot = fg_row_dot_quad(p.out + r * FG_EV, p.dout + r * FG_EV, rv[hf], t);
      dl[hf] = rv[hf] ? fg_row_delta(p, r, dot) : 0.f;
      l2[hf] = rv[hf] ? fg_lse2(p.lse[r]) : 0.f;
      if (rv[hf] && t == 0) {
        p.delta[r] = dl[hf];
        p.lse2[r] = l2[hf];
      }
#else
      l2[hf] = rv[hf] ? p.lse2[row0 + i] : 0.f;
      dl[hf] = rv[hf] ? p.delta[row0 + i] : 0.f;
#endif
    }
    // The mods' row parts of this lane's two q rows, once a grid CTA (the kv walk visits partial blocks first: its
    // first chunk's flag says whether the row has any).
    const int j0 = j;
    fg_mbar_wait(fg_smem_addr(&bar_full[j0 % FG_BWD_STAGES]), (j0 / FG_BWD_STAGES) & 1);
    const FgBwdKvChunk first = chunk[j0 % FG_BWD_STAGES];
    FgRowMods<float> rmods[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      if (rv[hf] && first.rows > 0)
        fg_row_mods(rmods[hf], true, first.partial != 0, (int)b, (int)h, (int)(q0 + qr0 + g + 8 * hf), args);
    float dq[FG_E / 8][4];
    fg_zero_frags(dq);
    bool q_released = false;
    fg_mbar_wait(fg_smem_addr(&bar_q), it & 1);
    unsigned a16[FG_KV_CHUNK / 16][4] = {};
    for (;; ++j) {
      const int st = j % FG_BWD_STAGES;
      fg_mbar_wait(fg_smem_addr(&bar_full[st]), (j / FG_BWD_STAGES) & 1);
      fg_fence_proxy_async();  // the producer's cp.async writes, acquired through the barrier, seen by wgmma
      const FgBwdKvChunk c = chunk[st];
      if (c.rows == 0) break;
#if FG_BWD_SKIP
      if (!((c.live >> wg) & 1)) {  // the mask keeps nothing of this warpgroup's quadrant
        // The previous chunk's dQ product done, its stage goes back (this one's goes back with the next chunk).
        fg_wgmma_wait<0>();
        fg_wgmma_fence_operands<FG_E / 2>(&dq[0][0]);
        fg_wgmma_fence_a(a16);
        if (j > j0) {
          __syncwarp();
          if (lane == 0) fg_mbar_arrive(fg_smem_addr(&bar_empty[(j - 1) % FG_BWD_STAGES]));
        }
        if (FG_BWD_TILE_PREFETCH && c.last) fg_resident_release(&bar_q_free, q_released);
        continue;
      }
#endif
      const unsigned k_addr = fg_smem_addr(Ks + st * FG_KV_CHUNK * FG_E);
      const unsigned v_addr = fg_smem_addr(Vs + st * FG_KV_CHUNK * FG_EV);
      float s[FG_NKN][4], dp[FG_NKN][4];
      fg_turn_take(wg);
      fg_issue_score_pair<FG_Q_TILE>(s, dp, q_addr, k_addr, o_addr, v_addr);
      fg_turn_pass(wg);
      // The previous chunk's dQ product (the oldest group) is done: its stage goes back to the producer.
      fg_wgmma_wait<2>();
      fg_wgmma_fence_operands<FG_E / 2>(&dq[0][0]);
      fg_wgmma_fence_a(a16);
      if (j > j0) {
        __syncwarp();
        if (lane == 0) fg_mbar_arrive(fg_smem_addr(&bar_empty[(j - 1) % FG_BWD_STAGES]));
      }
      fg_dq_chunk_elements(s, dp, l2, dl, rv, rmods, FG_BWD_MODS(kv_mods[st]), qr0, g, t, nq, c.rows,
                           c.partial != 0, (int)b, (int)h, q0, c.kv0, scale, args, sink);
      // The grid CTA's last score products (waited for in the element step) have read Q and dO: the producer may
      // load the next one's.
      if (FG_BWD_TILE_PREFETCH && c.last) fg_resident_release(&bar_q_free, q_released);
      fg_dq_pack(s, a16);
      fg_turn_take(wg);
      fg_dq_issue_packed(dq, a16, k_addr);
      fg_turn_pass(wg);
    }
    fg_wgmma_wait<0>();
    fg_wgmma_fence_operands<FG_E / 2>(&dq[0][0]);
    fg_wgmma_fence_a(a16);
    // The last chunk's stage (its dQ product has completed) and the end marker's go back, then Q and dO (released
    // above where the last chunk said so): the producer may load the next grid CTA's while this one's dQ goes out.
    __syncwarp();
    if (lane == 0) {
      if (j > j0) fg_mbar_arrive(fg_smem_addr(&bar_empty[(j - 1) % FG_BWD_STAGES]));
      fg_mbar_arrive(fg_smem_addr(&bar_empty[j % FG_BWD_STAGES]));
    }
    if (!q_released) fg_resident_release(&bar_q_free, q_released);
    ++j;
    fg_dq_store(p, dq, row0, qr0, g, t, rv, scale);
    ++it;
  });
  fg_turns_end(wg);
}
#endif  // FG_BWD_WS_DQ
#endif  // !FG_DQ_ATOMIC

#if FG_DQ_ATOMIC
// dQ = scale * the float32 sums of the fused dK/dV kernel, in the input dtype.
extern "C" __global__ void fg_bwd_dq_finalize(const FgBwdParams p) {
  const fg_i64 n = p.B * p.Hq * p.Lq * FG_E / 4;
  const float scale = (float)p.scale;
  for (fg_i64 i = (fg_i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (fg_i64)gridDim.x * blockDim.x) {
    const float4 a = ((const float4*)p.dq_acc)[i];
    uint2 o;
    o.x = fg_pack2<FG_BF16>(a.x * scale, a.y * scale);
    o.y = fg_pack2<FG_BF16>(a.z * scale, a.w * scale);
    ((uint2*)p.dq)[i] = o;
  }
}
#endif
