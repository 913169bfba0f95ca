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
//   #define FG_MASK_ELEM_PURE 0|1       fg_mask_elem reads no capture and has no Int op that can fail
//                                       (op_has_effects): the kernels may evaluate it where it is not used
//   #define FG_SCORE_ELEM_PURE 0|1      the same of fg_score_elem and fg_score_elem_dscore (1 without a score_mod)
//   #define FG_SCORE_ELEM_FAST 0|1      float code only, where the element part is pure and divides by a constant whose
//                                       corrected form const_division.h proves (not under approx_math):
//     __device__ bool fg_score_elem_fast_ok(float score, const FgScoreRow<float>& r, const FgScoreCol<float>& c,
//                                           int b, int h, int q, int kv, const FgModArgs& a);
//         whether every such dividend of the entry is in the form's range (fg_div_corrected_ok)
//     __device__ float fg_score_elem_fast(<the same parameters>);   fg_score_elem<float> with those divisions in the
//         corrected form, the same bits where fg_score_elem_fast_ok holds
//   #define FG_SCORE_ELEM_DSCORE_FAST 0|1   the same of fg_score_elem_dscore (backward modules; the merged program):
//     fg_score_elem_dscore_fast_ok(<fg_score_elem_fast_ok's parameters>), fg_score_elem_dscore_fast(<...>, float* dscore)
//   #define FG_DSCORE_IS_CONSTANT 0|1   and FG_DSCORE_CONSTANT (a double literal) when it is
//   #define FG_DSCORE_FINITE 0|1        a varying d score_mod / d score, finite wherever the score is not NaN, of a
//                                       score_mod that is NaN where the score is (float_ranges.h): the backward may
//                                       multiply dS by it untested (FG_SCORE_CORE_DSCORE_FINITE: the same of
//                                       the affine form's core)
//   #define FG_HAS_CAP_GRAD 0|1         some captured float tensor can receive a gradient
//   #define FG_SCORE_AFFINE 0|1         under approx_math, the score_mod as out_factor * core(in_factor * score)
//                                       (affine_score.h) with FG_SCORE_IN_FACTOR, FG_SCORE_OUT_FACTOR and
//                                       fg_score_core (forward modules) / fg_score_core_dscore (backward ones):
//                                       the tensor-core kernels fold the factors into their own constants
//   template <class T> __device__ __forceinline__ T fg_score_mod(T score, int b, int h, int q, int kv, const FgModArgs& a);
//   __device__ __forceinline__ bool fg_mask_mod(int b, int h, int q, int kv, const FgModArgs& a);
//   // the same two in parts, for tile loops: a value that needs neither kv nor the score is computed once
//   // per q row (FgScoreRow / FgMaskRow), one that needs kv but neither q nor the score once per kv column
//   // (FgScoreCol / FgMaskCol), the rest per element; fg_score_mod(s, b, h, q, kv, a) is
//   // fg_score_elem(s, fg_score_row(b, h, q, a), fg_score_col(b, h, kv, a), b, h, q, kv, a), likewise the mask
//   template <class T> struct FgScoreRow; template <class T> struct FgScoreCol;   (FgMaskRow, FgMaskCol)
//   template <class T> FgScoreRow<T> fg_score_row(int b, int h, int q, const FgModArgs& a);   (fg_mask_row)
//   template <class T> FgScoreCol<T> fg_score_col(int b, int h, int kv, const FgModArgs& a);  (fg_mask_col)
//   template <class T> T fg_score_elem(T score, const FgScoreRow<T>&, const FgScoreCol<T>&, int b, int h, int q,
//                                      int kv, const FgModArgs& a);                          (fg_mask_elem -> bool)
//   // d score_mod / d score at the pre-mod score
//   template <class T> __device__ __forceinline__ T fg_dscore(T score, int b, int h, int q, int kv, const FgModArgs& a);
//   // both at once, for the backward's elements: returns fg_score_elem(score, r, c, ...) and stores
//   // fg_dscore(score, ...) in *dscore, bit for bit, from ONE program (ScoreModBackward::value_and_dscore) when
//   // the derivative is not constant, so a subexpression of both (the softcap's tanh) is computed once. Its
//   // row / column parts are then the same FgScoreRow / FgScoreCol, which carry what either output needs.
//   template <class T> T fg_score_elem_dscore(T score, const FgScoreRow<T>& r, const FgScoreCol<T>& c, int b, int h,
//                                             int q, int kv, const FgModArgs& a, T* dscore);
//   // for each capture-gradient term whose capture slot needs a gradient:
//   //   sink.add(slot, linear index into that capture (row-major over its sizes), grad * d mod / d cap)
//   // `grad` is dL/d(modified score); `score` is the pre-mod score.
//   template <class T, class Sink> __device__ __forceinline__ void fg_cap_grad(T score, T grad, int b, int h, int q,
//                                                                           int kv, const FgModArgs& a, const Sink& sink);
//
// A part may raise (a captured read out of range), so a kernel evaluates a row's or a column's part only
// where it evaluates some element of that row or column (kernels/flex_mod_parts.cuh).
//
// Captured reads are specialised on the capture's dtype (known when tracing); integer add / sub / mul / neg
// are spelled in 32 bits where interval arithmetic over the operands (b, h, q, kv are non-negative 32-bit
// ints, int32 and bool captures bounded) proves the exact result fits, which gives the same value.
//
// Semantics are the op table's, identical to the CPU evaluators: ints are 64-bit, Python `//` and `%`,
// integer division by zero reports through the error flag like an out-of-range index (and yields 0),
// captured reads index with Python rules ([-n, n), negative wraps) and report anything else through
// FgModArgs::error, never reading out of bounds.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "flexgrad/attention/mod_grad.h"
#include "flexgrad/attention/mod_program.h"

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
  // FlexKernelOptions::approx_math: float (not double) code spells tanh and division with the op table's
  // approximations (cuda_f32_approx: fg_tanh_approx, tanh.approx.f32; fg_fdiv_full, div.full.f32) in every
  // function emitted here.
  bool approx_math = false;
  // Float code divides by a constant in const_division.h's branch-free forms (a multiplication by a power of two's
  // reciprocal, the double product, and FG_SCORE_ELEM_FAST's corrected form: the same bits as __fdiv_rn); false:
  // __fdiv_rn throughout (FLEXGRAD_FLEX_CONST_DIVISION=0, an A/B switch).
  bool const_division = true;
  // fg_cap_grad calls sink.add(slot, ...) with the KERNEL slot of the capture (as fg_cap_load_*).
};

// What the text says of the programs, for a host's kernel choices: the values of its #defines of these names,
// from the code that emits them (so a host never reads them back from the text).
struct CudaModsFacts {
  bool mask_elem_pure = true;       // FG_MASK_ELEM_PURE (1 without a mask_mod)
  bool dscore_finite = false;       // FG_DSCORE_FINITE
  bool affine_form = false;         // FG_SCORE_AFFINE
  bool core_bounded = false;        // FG_SCORE_CORE_LO and FG_SCORE_CORE_HI are defined
  bool core_dscore_finite = false;  // FG_SCORE_CORE_DSCORE_FINITE (defined in the affine form's backward modules)
};
struct CudaMods {
  std::string text;
  CudaModsFacts facts;
};

// The CUDA C++ text described above, with its facts.
CudaMods emit_cuda_mods_and_facts(const CudaModsInput& in);
// The text alone.
std::string emit_cuda_mods(const CudaModsInput& in);

}  // namespace fg
