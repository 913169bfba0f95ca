// flex_attention: attention whose scores are reshaped by a traced score_mod and sparsified by a
// BlockMask, as torch.nn.attention.flex_attention.
//
//   q [B, Hq, Lq, E], k [Bkv, Hkv, Lkv, E], v [Bkv, Hkv, Lkv, Ev]  ->  out [B, Hq, Lq, Ev]
//   score = scale * q.k ; score = score_mod(score, b, h, q_idx, kv_idx) ; masked where mask_mod is false
//   out = softmax(score) @ v ; lse = logsumexp(score) (natural log; -inf for rows with no allowed key)
//
// Bkv may be 1 (K/V broadcast over the batch); Hq may be a multiple of Hkv when enable_gqa is set.
// Rows with no allowed key give out 0, lse -inf and zero gradients. The result is a node of the
// autograd tape: gradients flow to q, k, v and to captured float tensors that require grad. As for any
// saved tensor, changing q, k, v or a captured tensor in place between forward and backward makes the
// backward raise AutogradError (naming which) instead of returning a gradient of the changed values.
#pragma once
#include <optional>
#include <string>

#include "flexgrad/attention/block_mask.h"
#include "flexgrad/attention/expr.h"
#include "flexgrad/tensor/tensor.h"

namespace fg {

// Auto and Fused run the fused kernel of the inputs' device; a device or case that kernel cannot run raises
// (NotImplementedError saying why), never falls back silently to Reference. Reference runs only when asked for.
enum class FlexBackend : uint8_t {
  Auto,       // cuDNN where flex_attention.cpp's measured rule picks it (auto_cudnn_call: sm_90a, bf16/f16, the call
              // lowers and cuDNN builds its plans, >= 128 query rows, no max_scores; FLEXGRAD_FLEX_CUDNN=0|1
              // overrides), else the fused kernel of the inputs' device
  Fused,      // fused CPU or CUDA kernel: online softmax over the BlockMask's blocks, O(L*E) memory
  Reference,  // the IR over materialised scores with differentiable ops (the float64 golden path), O(L^2) memory
  Cudnn,      // cuDNN's fused SDPA (CUDA, bf16/f16) for the calls lower_to_cudnn accepts (attention/cudnn_lowering.h:
              // no mask, causal, diagonal bands, ALiBi, captured bias tensors); NotImplementedError with the
              // lowering's reason otherwise, and without cuDNN in the build or on the machine. With
              // kernel.deterministic its backward uses deterministic engines only (NotImplementedError if none)
};

// Which forward kernel runs on CUDA (ignored on the CPU).
enum class FlexCudaForward : uint8_t {
  Auto,     // SplitKv for short queries where it applies (decoding), else Tiled (or Wgmma, see there)
  Tiled,    // one CTA per (128-row q tile, head, batch), mma.sync (bf16/f16) or FMA (f32/f64): prefill and training
  SplitKv,  // flash-decoding: the GQA group packed into one query tile, kv blocks split across CTAs and the
            // partials merged by log-sum-exp; bf16/f16 only (NotImplementedError otherwise)
  Wgmma,    // Hopper: Tiled's algorithm on warpgroup MMA (wgmma), sm_90a and bf16/f16 only, head dims up to 256
            // (NotImplementedError otherwise). Auto picks it where it runs (sm_90a, bf16/f16, head dims multiples
            // of 64, not a decoding shape) unless the score_mod has a tanh, where Tiled measured faster;
            // FLEXGRAD_FLEX_WGMMA=0 keeps Auto off it, =1 takes it for tanh programs too
};

// Which backward kernels (dK/dV and dQ) run on CUDA (ignored on the CPU). Both are deterministic: every gradient
// element has one writer, no float atomics (unless FlexKernelOptions::deterministic is false, see there).
enum class FlexCudaBackward : uint8_t {
  Auto,   // Wgmma where it runs, else Tiled
  Tiled,  // mma.sync kernels (bf16/f16, head dims multiples of 16 up to 128), FMA kernels otherwise
  Wgmma,  // Hopper: the dK/dV and dQ kernels on warpgroup MMA (wgmma), sm_90a, bf16/f16, head dims 64 or 128 and
          // 16-byte-aligned rows (NotImplementedError otherwise). Auto picks it wherever it runs (faster than
          // Tiled on every case measured on the H200); FLEXGRAD_FLEX_WGMMA_BWD=0 keeps Auto on Tiled
};

struct FlexKernelOptions {
  FlexBackend backend = FlexBackend::Auto;
  int64_t block_q = 0;   // CPU tile sizes without a BlockMask (with one, its block sizes); 0 picks 128
  int64_t block_kv = 0;
  // The CUDA backward sums every gradient in a fixed order (bit-identical reruns). false lets it
  // accumulate captured-tensor gradients with float atomics instead (faster, not reproducible bit for bit), and
  // lets the Wgmma backward sum dQ with float atomics in its dK/dV kernel (bfloat16, head dim 128, constant
  // d score_mod / d score, no captured gradient; no dQ kernel): by default where those adds go through the TMA unit
  // and the dK/dV kernel launches as a grid (long rows, where it measured faster), wherever it can with
  // FLEXGRAD_FLEX_WGMMA_BWD_FUSED_DQ=1, nowhere with =0.
  // FlexBackend::Cudnn: deterministic engines only (NotImplementedError if cuDNN has none for the graph); false
  // lets cuDNN accumulate dQ with atomics (Auto, deciding at forward time, keeps our kernels where it has none).
  bool deterministic = true;
  FlexCudaForward cuda_forward = FlexCudaForward::Auto;
  FlexCudaBackward cuda_backward = FlexCudaBackward::Auto;
  int64_t kv_splits = 0;  // SplitKv: kv ranges per query tile; 0 picks them from the SM count and the grid
  // CUDA only: the generated code of the float kernels (bf16, f16, f32 inputs; float64 keeps exact math) spells
  // the mods' tanh as tanh.approx.f32 (max relative error ~2^-11: a softcap tensor-core kernel no longer waits on
  // the precise tanhf) and their float division as div.full.f32 (max error 2 ulp, what Triton's `/` computes in
  // PyTorch's own flex kernels; by a constant, one multiply instead of __fdiv_rn's refinement), in forward and
  // backward; their + - * may contract into fused multiply-adds (as Triton's do), and a score_mod of the form
  // c * f(k * score) (softcap's 20 * tanh(score / 20)) hands c and k to the tensor-core kernels, which fold them
  // into the scale and the exponent's constant (attention/affine_score.h: one rounding where the program has two).
  // Only values that stay continuous are approximated: one that is floored, compared, cast to an int or
  // decides a where (every value of a mask_mod) keeps the exact spelling. PyTorch's approximate softcap matches
  // the exact one to atol 5e-4, rtol 1e-3. The CPU backends compute exactly either way.
  bool approx_math = false;
};

struct FlexAttentionOptions {
  ScoreMod score_mod;                   // empty: identity
  std::optional<BlockMask> block_mask;  // empty: every key allowed
  std::optional<double> scale;          // default 1/sqrt(E)
  bool enable_gqa = false;
  bool return_lse = false;
  bool return_max_scores = false;  // per-row max of the modified scores (-inf for empty rows)
  FlexKernelOptions kernel;
};

struct FlexAttentionResult {
  Tensor out;         // [B, Hq, Lq, Ev], dtype of q
  Tensor lse;         // [B, Hq, Lq] float32 (float64 for float64 inputs), when requested
  Tensor max_scores;  // [B, Hq, Lq], when requested
};

// Under an AutocastGuard (ops/autocast.h) float32 q, k, v on its device type run in its half dtype and the
// output comes back in that dtype.
FlexAttentionResult flex_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                   const FlexAttentionOptions& options = {});

}  // namespace fg
