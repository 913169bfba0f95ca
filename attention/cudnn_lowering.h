// Lowering a flex_attention call to cuDNN's fused SDPA (the cuDNN backend, FlexBackend::Cudnn).
//
// cuDNN's flash attention computes softmax(scale * Q K^T [+ bias] [+ ALiBi]) V under a diagonal band mask;
// flex_attention computes any traced score_mod and mask_mod. lower_to_cudnn reads the traced programs
// (never the callables' names) and either describes the call as cuDNN SDPA parameters or says, in
// `declined`, which part does not lower. It runs on the host with no GPU and no cuDNN (the unit tests are
// CPU tests); the cuDNN graphs (attention/cuda/cudnn_sdpa.*) take a CudnnSdpaSpec.
//
// What lowers:
//   mask_mod   no mask, or a conjunction (&) of comparisons of q_idx - kv_idx with integer constants
//              (q >= kv, q - kv <= w, abs(q - kv) <= w, kv <= q + r, ...): a band lo <= q_idx - kv_idx <= hi,
//              cuDNN's top-left diagonal band (right bound -lo >= 0, left bound hi + 1 > 0). The BlockMask must
//              agree with it block by block: a block it skips (empty) holds no allowed entry and a block it
//              marks full holds no masked one (otherwise flex_attention's result differs from the band's).
//   score_mod  identity; score * c or score / c with c a constant (folded into the scale); score + c[...] with c a
//              captured float tensor indexed by a subset of (b, h, q_idx, kv_idx) in that order (a bias broadcast
//              to [B, H, Lq, Lkv], read by cuDNN in q's dtype, so a float32 bias is rounded to bf16/fp16 where the
//              fused kernels add it in float32; learnable: dBias, computed in q's dtype too); score + slope(h) *
//              (kv_idx - q_idx) with slope a captured c[h] or a function of h alone (ALiBi; cuDNN requires the
//              causal band with it); any other score_mod built from ops with a cuDNN pointwise mode
//              (op_semantics.h, OpInfo::cudnn) on the score, float constants and b / h / q_idx / kv_idx, with
//              integer values below 2^31 (cuDNN's score-modifier subgraph; our derivative is its backward chain):
//              softcap, score + (q_idx - kv_idx), where(q_idx >= kv_idx, score, 2 * score), ... Captured tensors
//              lower only as the bias and the ALiBi slopes above.
//   shapes     bf16 / fp16, head dims multiples of 8 up to 256, Bkv == B (GQA: Hq a multiple of Hkv),
//              every query row with at least one allowed key (cuDNN's softmax of an empty row is not
//              flex_attention's out 0 / lse -inf).
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "flexgrad/attention/block_mask.h"
#include "flexgrad/attention/mod_program.h"

namespace fg {

struct CudnnSdpaSpec {
  // The band, cuDNN's top-left alignment: (q, kv) is kept iff kv <= q + right_bound (when set) and
  // kv > q - left_bound (when set). Causal is right_bound 0 without left bound.
  std::optional<int64_t> right_bound, left_bound;

  enum class Bias : uint8_t { None, Tensor, Alibi };
  Bias bias = Bias::None;
  // Tensor: the score program's capture `bias_capture`; bias_dim[r] is the capture dim indexed by role r
  // (0 b, 1 h, 2 q_idx, 3 kv_idx), -1 where the bias is broadcast over that role.
  int32_t bias_capture = -1;
  std::array<int, 4> bias_dim{-1, -1, -1, -1};
  bool bias_learnable = false;  // the capture requires grad: the backward graph computes dBias
  // Alibi: score + slope[h] * (kv_idx - q_idx); the slopes are the capture `alibi_capture` (1-D, indexed
  // by h) or, when it is -1, `alibi_slopes` (Hq values the program gives).
  int32_t alibi_capture = -1;
  std::vector<double> alibi_slopes;

  // score_mod `score * c` (or `score / c`), c a constant: cuDNN's scale is multiplied by it.
  double score_scale = 1.0;

  // Any other score_mod whose ops all have a cuDNN pointwise mode (OpInfo::cudnn), as cuDNN's score-modifier
  // subgraph on the scaled score: `pointwise` computes the score_mod (output 0) and d score_mod / d score (output 1,
  // our symbolic derivative: cuDNN does no autodiff), sharing their common instructions; the backward graph
  // multiplies dS by output 1 everywhere (no select: the lowering admits only derivatives that stay finite on the
  // infinite scores cuDNN computes on padding, where dS is 0).
  std::shared_ptr<const ModProgram> pointwise;
  std::string pointwise_text;  // the score_mod's formula (describe(), the plan key)
  // Non-empty when the forward lowers but the backward does not (a derivative that may be inf / NaN on the infinite
  // scores cuDNN computes on padding): the backward plan fails with this reason, so Auto keeps a call that needs a
  // gradient on the fused kernels and a forced backward raises NotImplementedError.
  std::string pointwise_backward_declined;

  bool causal() const { return right_bound == 0 && !left_bound; }
  // "causal", "band [left 64, right 0] + bias cap0[h, q, kv]", ... (tests, messages, the plan cache key).
  std::string describe() const;
};

struct CudnnLowering {
  std::optional<CudnnSdpaSpec> spec;
  std::string declined;  // why it does not lower (empty when spec is set)
  bool lowers() const { return spec.has_value(); }
};

struct CudnnLoweringInput {
  const ModProgram* score_mod = nullptr;    // null: identity
  const BlockMask* block_mask = nullptr;    // null: every key allowed
  int64_t B = 0, Hq = 0, Lq = 0, E = 0;
  int64_t Bkv = 0, Hkv = 0, Lkv = 0, Ev = 0;
  DType dtype = kBFloat16;
};

CudnnLowering lower_to_cudnn(const CudnnLoweringInput& in);

}  // namespace fg
