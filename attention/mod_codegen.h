// Code generation: ModPrograms lowered to CUDA C++ device functions that the FlexAttention kernel
// templates call (the contract is attention/cuda/kernels/flex_abi.cuh). Plain C++ (emits text), so it
// builds and is tested without a CUDA toolkit; each op's CUDA spelling comes from the op table
// (attention/op_semantics.h), the one place an op's meaning is defined.
//
// emit_cuda_mods() always defines all of these (identity / all-true / zero when a program is absent),
// with T = float for half, bf16 and float32 kernels and T = double for float64 ones:
//
//   #define FG_HAS_SCORE_MOD 0|1
//   #define FG_HAS_MASK_MOD 0|1
//   #define FG_DSCORE_IS_CONSTANT 0|1   and FG_DSCORE_CONSTANT (a double literal) when it is
//   #define FG_HAS_CAP_GRAD 0|1         some captured float tensor can receive a gradient
//   template <class T> __device__ __forceinline__ T fg_score_mod(T score, int b, int h, int q, int kv, const FgModArgs& a);
//   __device__ __forceinline__ bool fg_mask_mod(int b, int h, int q, int kv, const FgModArgs& a);
//   // d score_mod / d score at the pre-mod score
//   template <class T> __device__ __forceinline__ T fg_dscore(T score, int b, int h, int q, int kv, const FgModArgs& a);
//   // for each capture-gradient term whose capture slot needs a gradient:
//   //   sink.add(slot, linear index into that capture (row-major over its sizes), grad * d mod / d cap)
//   // `grad` is dL/d(modified score); `score` is the pre-mod score.
//   template <class T, class Sink> __device__ __forceinline__ void fg_cap_grad(T score, T grad, int b, int h, int q,
//                                                                           int kv, const FgModArgs& a, const Sink& sink);
//
// Semantics are the op table's, identical to the CPU evaluators: ints are 64-bit, Python `//` and `%`,
// integer division by zero reports through the error flag like an out-of-range index (and yields 0),
// captured reads index with Python rules ([-n, n), negative wraps) and report anything else through
// FgModArgs::error, never reading out of bounds.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "attention/mod_grad.h"
#include "attention/mod_program.h"

namespace fg {

struct CudaModsInput {
  const ModProgram* score_mod = nullptr;          // null: identity
  const ModProgram* mask_mod = nullptr;           // null: every entry allowed
  const ScoreModBackward* score_grad = nullptr;   // null: no backward functions (forward-only modules)
  // Slot of each program capture in the kernel's one FgModArgs (a flex call merges the score and
  // mask captures into one list): score_slots[i] is where score_mod->captures()[i] lives, mask_slots[i]
  // mask_mod->captures()[i], grad_slots[i] score_grad->program.captures()[i]. Empty means identity
  // (for grad_slots: each capture's position in score_grad->captures, the forward's list).
  std::vector<int> score_slots, mask_slots, grad_slots;
  std::vector<bool> grad_needed;  // per score_grad->captures slot: emit its fg_cap_grad terms
  // fg_cap_grad calls sink.add(slot, ...) with the KERNEL slot of the capture (as fg_cap_load_*).
};

// The CUDA C++ text described above.
std::string emit_cuda_mods(const CudaModsInput& in);

}  // namespace fg
