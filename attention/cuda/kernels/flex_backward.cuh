// FlexAttention backward on CUDA: the kernel template (NVRTC only, no headers). The host
// (attention/cuda/flex_backward_cuda.cpp) prepends flex_abi.cuh, the generated mods and these macros:
//
//   FG_IN_DTYPE     FG_DT_FLOAT16 / FG_DT_BFLOAT16 / FG_DT_FLOAT32 / FG_DT_FLOAT64: q, k, v, out, dout, dq, dk, dv
//   FG_E, FG_EV     head dims of q/k and of v
//   FG_BQ, FG_BKV   kernel tile (rows of q, rows of k/v); FG_NT threads per block
//   FG_USE_MMA      1: bf16/f16 tensor-core kernels (mma.sync m16n8k16, fp32 accumulation); 0: SIMT kernels
//                   (exact fp32 FFMA, or float64), which also serve bf16/f16 head dims the MMA kernels lack
//   FG_CAP_MODE     0 no captured-tensor gradient; 1 deterministic fixed point; 2 float64 atomics
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
// and reruns are bit-identical.
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

// The score of one (b, h, q, kv) entry and its gradient w.r.t. the pre-mod score. `valid` is false outside
// the sequence / the BlockMask block or where the mask (partial blocks) says no. Returns P; *ds receives
// dS * d score_mod / d score, and the capture-gradient contribution goes to `sink` (when it is not null).
template <class Sink>
__device__ __forceinline__ fg_t fg_entry(fg_t s, fg_t dp, fg_t lse, fg_t delta, bool valid, bool partial, int b, int h,
                                         int qi, int kj, const FgModArgs& args, fg_t* ds_out, const Sink* sink) {
  if (valid && partial) valid = fg_mask_mod(b, h, qi, kj, args);
  fg_t p = 0, ds = 0;
  if (valid && lse != (fg_t)FG_NEG_INF) {
    const fg_t sm = fg_score_mod<fg_t>(s, b, h, qi, kj, args);
    p = fg_exp(sm - lse);
    ds = p * (dp - delta);  // w.r.t. the modified score
  }
#if FG_CAP_MODE != 0
  if (sink != nullptr && ds != (fg_t)0) fg_cap_grad<fg_t, Sink>(s, ds, b, h, qi, kj, args, *sink);
#endif
  if (ds != (fg_t)0) {
#if FG_DSCORE_IS_CONSTANT
    ds *= (fg_t)FG_DSCORE_CONSTANT;
#else
    ds *= fg_dscore<fg_t>(s, b, h, qi, kj, args);
#endif
  }
  *ds_out = ds;
  return p;
}

// ---- preprocess: delta = rowsum(dO * O) - dlse, one warp per row
extern "C" __global__ void fg_bwd_preprocess(const FgBwdParams p) {
  const fg_i64 rows = p.B * p.Hq * p.Lq;
  const fg_i64 r = (fg_i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const fg_s* o = p.out + r * FG_EV;
  const fg_s* d = p.dout + r * FG_EV;
  fg_t acc = 0;
  for (int e = fg_lane(); e < FG_EV; e += 32) acc += fg_ld(o + e) * fg_ld(d + e);
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (fg_lane() == 0) p.delta[r] = p.dlse != nullptr ? acc - p.dlse[r] : acc;
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
#pragma unroll
  for (int a = 0; a < FG_SQ; ++a) {
    const int i = ti + 16 * a;
#pragma unroll
    for (int c = 0; c < FG_SK; ++c) {
      const int j = tj + 16 * c;
      fg_t ds;
      const fg_t pv = fg_entry<Sink>(s[a][c] * (fg_t)p.scale, dp[a][c], sm.lse[i], sm.delta[i], i < nq && j < nkv,
                                     partial, b, h, (int)(q0 + i), (int)(kv0 + j), args, &ds, sink);
      sm.P[i * FG_BKVP + j] = pv;
      sm.dS[i * FG_BKVP + j] = ds;
    }
  }
}

// Q, dO, lse and delta of rows [q0, q0 + nq) of (b, h); lse -inf past nq so those rows give P = 0.
__device__ __forceinline__ void fg_simt_load_q(const FgBwdParams& p, const FgSimtSmem& sm, fg_i64 b, fg_i64 h,
                                               fg_i64 q0, int nq) {
  fg_simt_load<FG_BQ, FG_E>(sm.Q, p.q + b * p.qs_b + h * p.qs_h, p.qs_l, q0, nq);
  const fg_i64 row0 = (b * p.Hq + h) * p.Lq + q0;
  fg_simt_load<FG_BQ, FG_EV>(sm.dO, p.dout + row0 * FG_EV, FG_EV, 0, nq);
  for (int i = threadIdx.x; i < FG_BQ; i += FG_NT) {
    sm.lse[i] = i < nq ? p.lse[row0 + i] : (fg_t)FG_NEG_INF;
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
#if FG_CAP_MODE == 1
  FgMaxSink max_sink;
  max_sink.cap_max = p.cap_max;
  const FgMaxSink* sink = &max_sink;
#else
  const FgMaxSink* sink = nullptr;
#endif
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
#if FG_CAP_MODE == 1
  FgFixedSink cap_sink;
  cap_sink.acc = p.cap_acc;
  cap_sink.scale = p.cap_scale;
  const FgFixedSink* sink = &cap_sink;
#elif FG_CAP_MODE == 2
  FgAtomicSink cap_sink;
  cap_sink.acc = p.cap_acc;
  const FgAtomicSink* sink = &cap_sink;
#else
  const FgMaxSink* sink = nullptr;
#endif
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
