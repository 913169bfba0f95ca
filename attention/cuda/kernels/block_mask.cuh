// create_block_mask on CUDA: classifies every (b, h, q block, kv block) of the mask as empty, partial or
// full by evaluating the generated fg_mask_mod (mod_codegen.h) on each entry. NVRTC only, after
// flex_abi.cuh and the generated mods; no headers.
//
// One CTA per evaluated tile. Masks that ignore b (or h) are evaluated for one b (h) only (Be = 1,
// He = 1) and the result is written to every (b, h) plane it stands for. Entries past Q_LEN / KV_LEN
// count as masked (as PyTorch and the CPU: a block that sticks out is never full).
// Output: block bits int32 [B, H, nq, nkv] (attention/block_mask_kernels.h): 0 empty, 1 partial, 2 full.
#ifndef FG_BM_THREADS
#define FG_BM_THREADS 256
#endif

// Host mirror: BlockMaskShape in attention/cuda/block_mask_cuda.cpp (same layout).
struct FgBlockMaskShape {
  fg_i64 B, H;           // planes of the output
  fg_i64 Be, He;         // planes evaluated (B or 1, H or 1)
  fg_i64 q_len, kv_len;
  int bq, bkv;           // BLOCK_SIZE
  int nq, nkv;           // blocks per dim
};

extern "C" __global__ void __launch_bounds__(FG_BM_THREADS)
    fg_block_mask_classify(const FgModArgs args, const FgBlockMaskShape s, int* __restrict__ bits) {
  fg_i64 tile = blockIdx.x;
  const int kb = (int)(tile % s.nkv);
  tile /= s.nkv;
  const int qb = (int)(tile % s.nq);
  tile /= s.nq;
  const int he = (int)(tile % s.He);
  const int be = (int)(tile / s.He);

  const fg_i64 q0 = (fg_i64)qb * s.bq, kv0 = (fg_i64)kb * s.bkv;
  const int nq = (int)(s.q_len - q0 < s.bq ? s.q_len - q0 : s.bq);
  const int nkv = (int)(s.kv_len - kv0 < s.bkv ? s.kv_len - kv0 : s.bkv);
  // Padding entries are masked ones.
  bool any_false = nq < s.bq || nkv < s.bkv, any_true = false;
  const int n = nq * nkv;
  for (int i = threadIdx.x; i < n; i += FG_BM_THREADS) {
    const int qi = i / nkv, ki = i - qi * nkv;
    const bool allowed = fg_mask_mod(be, he, (int)q0 + qi, (int)kv0 + ki, args);
    any_true |= allowed;
    any_false |= !allowed;
  }
  any_true = __syncthreads_or(any_true);
  any_false = __syncthreads_or(any_false);
  const int kind = any_true ? (any_false ? 1 : 2) : 0;

  // The (b, h) planes this tile stands for: itself, or every b (h) when the mask ignores b (h).
  const fg_i64 nb = s.Be == s.B ? 1 : s.B, nh = s.He == s.H ? 1 : s.H;
  const fg_i64 plane = (fg_i64)s.nq * s.nkv, at = (fg_i64)qb * s.nkv + kb;
  for (fg_i64 j = threadIdx.x; j < nb * nh; j += FG_BM_THREADS) {
    const fg_i64 b = nb == 1 ? be : j / nh, h = nh == 1 ? he : j % nh;
    bits[(b * s.H + h) * plane + at] = kind;
  }
}
