// Device helpers shared by the FlexAttention kernel templates (forward and backward): half/bf16
// packing, tensor-core mma.sync, ldmatrix, cp.async, shared-memory addressing, exp2, quad reductions.
//
// Compiled by NVRTC only, after flex_abi.cuh: no headers, inline PTX and built-in types (sm_80+).
//
// Fragment layouts (PTX ISA "Matrix Fragments for mma.m16n8k16", 16-bit A/B, f32 C/D). In a warp,
// lane = 4 * g + t with g = lane >> 2 (the "group", 0..7) and t = lane & 3 (0..3). A register of
// .b32 holds two 16-bit elements, the lower-numbered column (or k) in the low half.
//
//   A (16 x 16, row-major, M x K), 4 x .b32 per lane:
//     a[0] = A[g    ][2t, 2t+1]      a[2] = A[g    ][2t+8, 2t+9]
//     a[1] = A[g + 8][2t, 2t+1]      a[3] = A[g + 8][2t+8, 2t+9]
//   B (16 x 8, "col": element (k, n) with k fastest), 2 x .b32 per lane:
//     b[0] = B[2t, 2t+1  ][g]        b[1] = B[2t+8, 2t+9][g]
//   C / D (16 x 8, f32), 4 x float per lane:
//     c[0], c[1] = C[g    ][2t, 2t+1]
//     c[2], c[3] = C[g + 8][2t, 2t+1]
//
// So a C fragment row is spread over the 4 lanes of a quad (same g): row reductions are a local
// reduction then two xor-shuffles (1, 2). Two adjacent C fragments (n-blocks 2j, 2j+1) of one 16-row
// tile are exactly the A fragment of a k16 step (fg_pack_c_to_a below): P = softmax(S) feeds P V from
// registers without touching shared memory.
//
// ldmatrix.x4: lanes 8j .. 8j+7 give the row addresses (16 contiguous bytes each) of 8 x 8 matrix j;
// register r[j] of lane (4g + t) then holds row g, columns 2t, 2t+1 of matrix j. With .trans it holds
// the transposed element pair: rows 2t, 2t+1 of column g. fg_ldsm_* below take the per-lane address.
#pragma once

// ---- shared-memory addresses -------------------------------------------------------------------
// 32-bit shared-window address of a generic pointer into shared memory (what ldmatrix / cp.async take).
__device__ __forceinline__ unsigned fg_smem_addr(const void* p) {
  unsigned r;
  asm("{ .reg .u64 a; cvta.to.shared.u64 a, %1; cvt.u32.u64 %0, a; }" : "=r"(r) : "l"(p));
  return r;
}

// XOR swizzle of 16-byte chunks for tiles whose rows are a multiple of 128 bytes: chunk c of row r
// lives at chunk c ^ (r & 7), so the 8 rows an ldmatrix reads hit 8 different bank groups. Returns
// the element offset of (row, col) for 16-bit elements, `row_elems` per row (multiple of 64).
__device__ __forceinline__ int fg_swizzle_b16(int row, int col, int row_elems) {
  const int chunk = (col >> 3) ^ (row & 7);
  return row * row_elems + (chunk << 3) + (col & 7);
}
// The alternative the templates use for any head dim (16..256): pad each row by 16 bytes. A row of
// 2*E + 16 bytes is an odd multiple of 16 bytes, so 8 consecutive rows start in 8 distinct 16-byte
// bank groups: ldmatrix and 16-byte cp.async stores are conflict-free.
#define FG_SMEM_PAD_B16 8

// ---- 16-bit float conversions ------------------------------------------------------------------
// Packs (lo, hi) into one .b32 of two bf16 / f16, round to nearest even. cvt's first source goes to
// the upper half.
__device__ __forceinline__ unsigned fg_pack_bf16x2(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ unsigned fg_pack_f16x2(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ unsigned short fg_float_to_bf16(float x) {
  unsigned short r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}
__device__ __forceinline__ unsigned short fg_float_to_f16(float x) {
  unsigned short r;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
  return r;
}
// (lo, hi) of a packed pair. fg_bf16_to_float / fg_f16_to_float (one element) are in flex_abi.cuh.
__device__ __forceinline__ void fg_unpack_bf16x2(unsigned v, float& lo, float& hi) {
  lo = __uint_as_float(v << 16);
  hi = __uint_as_float(v & 0xffff0000u);
}
__device__ __forceinline__ void fg_unpack_f16x2(unsigned v, float& lo, float& hi) {
  lo = fg_f16_to_float((unsigned short)(v & 0xffffu));
  hi = fg_f16_to_float((unsigned short)(v >> 16));
}

// The 16-bit element type of a kernel as a tag: FG_BF16 selects the bf16 instructions, else f16.
template <bool kBf16>
__device__ __forceinline__ unsigned fg_pack2(float lo, float hi) {
  return kBf16 ? fg_pack_bf16x2(lo, hi) : fg_pack_f16x2(lo, hi);
}
template <bool kBf16>
__device__ __forceinline__ void fg_unpack2(unsigned v, float& lo, float& hi) {
  if (kBf16) fg_unpack_bf16x2(v, lo, hi);
  else fg_unpack_f16x2(v, lo, hi);
}

// ---- tensor cores ------------------------------------------------------------------------------
// d = a * b + d, m16n8k16, f32 accumulators (layouts at the top of this file).
__device__ __forceinline__ void fg_mma_bf16(float* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void fg_mma_f16(float* d, const unsigned* a, const unsigned* b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <bool kBf16>
__device__ __forceinline__ void fg_mma(float* d, const unsigned* a, const unsigned* b) {
  if (kBf16) fg_mma_bf16(d, a, b);
  else fg_mma_f16(d, a, b);
}

// Two C fragments (n-blocks 2j and 2j+1 of a 16-row tile, 8 floats) -> the A fragment of k16 step j.
template <bool kBf16>
__device__ __forceinline__ void fg_pack_c_to_a(const float* c_lo, const float* c_hi, unsigned* a) {
  a[0] = fg_pack2<kBf16>(c_lo[0], c_lo[1]);
  a[1] = fg_pack2<kBf16>(c_lo[2], c_lo[3]);
  a[2] = fg_pack2<kBf16>(c_hi[0], c_hi[1]);
  a[3] = fg_pack2<kBf16>(c_hi[2], c_hi[3]);
}

// ---- ldmatrix (addresses from fg_smem_addr; each lane passes its own row address) -------------
__device__ __forceinline__ void fg_ldsm_x4(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void fg_ldsm_x4_trans(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
// x2: lanes 0..15 give the addresses (matrices 0 and 1); the others' addresses are ignored but must
// be valid shared addresses.
__device__ __forceinline__ void fg_ldsm_x2(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}
__device__ __forceinline__ void fg_ldsm_x2_trans(unsigned* r, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "r"(addr));
}

// Per-lane row addresses for the common operand shapes, for a row-major 16-bit tile with `ld`
// elements per row, the 16 x 16 sub-tile starting at (row0, col0):
//  - A operand (x4 -> a[0..3]): matrix j = lane >> 3 covers rows row0 + 8 (j & 1), cols col0 + 8 (j >> 1).
__device__ __forceinline__ int fg_ldsm_a_offset(int lane, int row0, int col0, int ld) {
  const int j = lane >> 3;
  return (row0 + ((j & 1) << 3) + (lane & 7)) * ld + col0 + ((j >> 1) << 3);
}
//  - B operand of two n8 blocks from an [n][k] tile (k contiguous, e.g. K for S = Q K^T), x4 ->
//    {b[0], b[1]} of n-block row0 .. row0+7 and {b[0], b[1]} of n-block row0+8 .. row0+15:
//    matrix j covers rows (n) row0 + 8 (j >> 1), cols (k) col0 + 8 (j & 1).
__device__ __forceinline__ int fg_ldsm_bt_offset(int lane, int row0, int col0, int ld) {
  const int j = lane >> 3;
  return (row0 + ((j >> 1) << 3) + (lane & 7)) * ld + col0 + ((j & 1) << 3);
}
//  - B operand of two n8 blocks from a [k][n] tile (n contiguous, e.g. V for O = P V), x4.trans ->
//    {b[0], b[1]} of n-block col0 .. col0+7 and of n-block col0+8 .. col0+15:
//    matrix j covers rows (k) row0 + 8 (j & 1), cols (n) col0 + 8 (j >> 1).
__device__ __forceinline__ int fg_ldsm_b_trans_offset(int lane, int row0, int col0, int ld) {
  const int j = lane >> 3;
  return (row0 + ((j & 1) << 3) + (lane & 7)) * ld + col0 + ((j >> 1) << 3);
}

// ---- cp.async (global -> shared, 16 bytes, L2 only) --------------------------------------------
// Copies 16 bytes, or writes 16 zero bytes when !valid (src is then not read; pass any valid pointer).
// FG_L2_PREFETCH (0, 64, 128 or 256; a template may define it) asks L2 to fetch that many bytes around each
// copy: for long streams (the decode kernel) fewer, larger DRAM requests.
#ifndef FG_L2_PREFETCH
#define FG_L2_PREFETCH 0
#endif
__device__ __forceinline__ void fg_cp_async16(unsigned smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
#if FG_L2_PREFETCH == 256
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes)
               : "memory");
#elif FG_L2_PREFETCH == 128
  asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes)
               : "memory");
#elif FG_L2_PREFETCH == 64
  asm volatile("cp.async.cg.shared.global.L2::64B [%0], [%1], 16, %2;" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes)
               : "memory");
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes)
               : "memory");
#endif
}
__device__ __forceinline__ void fg_cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void fg_cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ---- math --------------------------------------------------------------------------------------
#define FG_LOG2E 1.4426950408889634f
#define FG_LN2 0.6931471805599453f
// 2^x, flushing denormals; exp2(-inf) = 0 exactly (what masked entries rely on).
__device__ __forceinline__ float fg_exp2(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
// Zeroes accumulators held as N C fragments (4 floats each: the backward's dK, dV, dQ).
template <int N>
__device__ __forceinline__ void fg_zero_frags(float (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = 0.f;
}
__device__ __forceinline__ float fg_neg_inf() { return __int_as_float(0xff800000); }

// Reductions over the 4 lanes of a quad (one C-fragment row) and over the whole warp.
__device__ __forceinline__ float fg_quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float fg_quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
template <class T>
__device__ __forceinline__ T fg_warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
template <class T>
__device__ __forceinline__ T fg_warp_max(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const T y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y > x ? y : x;
  }
  return x;
}

// The end of a row's online softmax, with PyTorch's non-finite rule (the CPU kernel's, flex_cpu.cpp):
//   a NaN score anywhere in the row        -> output, lse and max_scores NaN
//   every score -inf (or no block visited) -> output 0, lse -inf, max_scores -inf
//   a +inf score and no NaN                -> output NaN (inf - inf), lse +inf, max_scores +inf
// The running max skips NaN (fmax), so a NaN shows up in the sum instead: with a finite or -inf max every
// other term is finite, so a NaN sum means a NaN score; next to a +inf max the kernel looked (`saw_nan`).
__device__ __forceinline__ float fg_log_t(float x) { return logf(x); }
__device__ __forceinline__ double fg_log_t(double x) { return log(x); }
template <class T>
struct FgRowEnd {
  T inv, lse, max;
};
template <class T>
__device__ __forceinline__ FgRowEnd<T> fg_row_end(T m, T lsum, bool saw_nan) {
  const T inf = -(T)fg_neg_inf(), nan = inf - inf;
  const bool nan_row = saw_nan || (lsum != lsum && m != inf);
  FgRowEnd<T> e;
  if (nan_row) {
    e.inv = e.lse = e.max = nan;
  } else if (m == -inf) {
    e.inv = 0;
    e.lse = e.max = -inf;
  } else {
    e.inv = (T)1 / lsum;
    e.lse = m == inf ? inf : m + fg_log_t(lsum);
    e.max = m;
  }
  return e;
}

// ---- tile copies -------------------------------------------------------------------------------
typedef unsigned short fg_h16;

// Element offset of (row, col) in a tile of ROWS rows stored as 64-column atoms (ROWS x 64 each, atom a holding
// columns 64 a .. 64 a + 63), each 128-byte-swizzled (fg_swizzle_b16 with 64 elements a row): the operand layout
// of the Hopper wgmma (flex_wgmma.cuh). Atoms of 8-row multiples stay 1024-byte aligned after an aligned start.
template <int ROWS>
__device__ __forceinline__ int fg_sw128_atoms_offset(int row, int col) {
  return (col >> 6) * (ROWS * 64) + fg_swizzle_b16(row, col & 63, 64);
}

// Rows [0, ROWS) x columns [0, cols_pad) of 16-bit elements from global memory (row stride ld_g, the first
// `nrows` rows and `cols` columns real) into shared memory (row stride ld_s; or, with kSw128Atoms, the
// swizzled atoms of fg_sw128_atoms_offset, ld_s unused), zero elsewhere. Thread `tid` of `nthreads` (a CTA or a
// warp) copies every nthreads-th 16-byte chunk: cp.async when FG_VEC (the caller commits and waits), else
// element copies (a 16-byte chunk stays contiguous in both layouts).
template <int ROWS, bool kSw128Atoms = false>
__device__ __forceinline__ void fg_load_rows(fg_h16* s, int ld_s, const fg_h16* g, fg_i64 ld_g, int nrows, int cols,
                                             int cols_pad, int tid, int nthreads) {
  const int ch = cols_pad / 8;
#pragma unroll 4
  for (int c = tid; c < ROWS * ch; c += nthreads) {
    const int r = c / ch, col = (c % ch) * 8;
    fg_h16* dst = kSw128Atoms ? s + fg_sw128_atoms_offset<ROWS>(r, col) : s + r * ld_s + col;
#if FG_VEC
    const bool ok = r < nrows && col < cols;
    fg_cp_async16(fg_smem_addr(dst), ok ? (const void*)(g + r * ld_g + col) : (const void*)g, ok);
#else
#pragma unroll
    for (int j = 0; j < 8; ++j) dst[j] = (r < nrows && col + j < cols) ? g[r * ld_g + col + j] : (fg_h16)0;
#endif
  }
}
