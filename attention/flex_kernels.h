// The problem a flex_attention kernel solves, in the form every backend consumes, and the kernel
// stubs (one implementation per device, chosen by DispatchStub).
#pragma once
#include <memory>
#include <vector>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/mod_grad.h"
#include "flexgrad/attention/mod_program.h"
#include "flexgrad/attention/visited_blocks.h"
#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/tensor.h"

namespace fg {

// Block sparsity in CSR-like form: for each (b, h, row block) a count and a list of column blocks,
// for partial blocks (mask evaluated) and full blocks (mask skipped). int32 contiguous tensors
// [Bm, Hm, rows] and [Bm, Hm, rows, max_cols]; Bm/Hm are 1 when broadcast.
struct BlockLists {
  Tensor num, idx, full_num, full_idx;
  int64_t Bm = 1, Hm = 1, rows = 0;
};

// On the CPU, q/k/v are contiguous: float64 and bfloat16 inputs keep their dtype (the CPU kernels multiply
// bf16 on AVX-512 BF16 hardware, else convert to float32 themselves), others are float32. On CUDA
// they keep the input dtype (bf16/f16 run on tensor cores with float32 accumulation) and their strides:
// the last dim is contiguous (stride 1), the pointer and the other strides are multiples of 16 bytes,
// else make_problem copies to contiguous. Block lists live on the inputs' device.
struct FlexProblem {
  Tensor q, k, v;
  int64_t B = 0, Hq = 0, Lq = 0, E = 0, Bkv = 0, Hkv = 0, Lkv = 0, Ev = 0;
  double scale = 1.0;
  std::shared_ptr<const ModProgram> score_mod;         // null: identity
  std::shared_ptr<const ModProgram> mask_mod;          // evaluated on partial blocks only
  std::shared_ptr<const ScoreModBackward> score_grad;  // null: identity (d/dscore = 1, no captures)
  int64_t block_q = 128, block_kv = 128;
  BlockLists kv_lists;  // rows = q blocks, entries = kv blocks (forward, dQ)
  BlockLists q_lists;   // rows = kv blocks, entries = q blocks (dK, dV)
  // The lists' visited blocks over (Bm, Hm, rows) as the host knows them without waiting (null: not counted);
  // kernel choices that change speed only read it (the CUDA backward's persistent launch).
  std::shared_ptr<const VisitedBlocks> visited;
  bool deterministic = true;  // FlexKernelOptions::deterministic
  FlexCudaForward cuda_forward = FlexCudaForward::Auto;  // FlexKernelOptions::cuda_forward
  FlexCudaBackward cuda_backward = FlexCudaBackward::Auto;  // FlexKernelOptions::cuda_backward
  int64_t kv_splits = 0;                                 // FlexKernelOptions::kv_splits
  bool approx_math = false;                              // FlexKernelOptions::approx_math
  // FlexAttentionOptions::return_max_scores: false lets a kernel leave FlexForwardOutputs::max_scores unspecified
  // (the CUDA tensor-core forward's bounded max, flex_forward_cuda.cpp); true elsewhere.
  bool max_scores_wanted = true;
  int64_t group() const { return Hkv > 0 ? Hq / Hkv : 1; }  // Hkv = 0 only with Hq = 0 (no rows)
  bool has_rows() const { return B > 0 && Hq > 0 && Lq > 0; }
};

struct FlexForwardOutputs {
  Tensor out;         // [B, Hq, Lq, Ev] contiguous, dtype of FlexProblem::q
  Tensor lse;         // [B, Hq, Lq] float32 (float64 for float64 problems), natural log
  Tensor max_scores;  // [B, Hq, Lq] as lse
};

struct FlexBackwardOutputs {
  Tensor dq, dk, dv;           // shapes of q, k, v, contiguous; dtype of FlexProblem::q
  std::vector<Tensor> dcaps;   // per captured slot of the score_mod (undefined where not needed), float64
};

using FlexForwardFn = void (*)(const FlexProblem&, FlexForwardOutputs&);
// dlse may be undefined. needs_cap[i]: whether captured slot i wants a gradient.
using FlexBackwardFn = void (*)(const FlexProblem&, const Tensor& out, const Tensor& lse, const Tensor& dout,
                                const Tensor& dlse, const std::vector<bool>& needs_cap, FlexBackwardOutputs&);
FG_DECLARE_STUB(FlexForwardFn, flex_forward_stub);
FG_DECLARE_STUB(FlexBackwardFn, flex_backward_stub);

}  // namespace fg
