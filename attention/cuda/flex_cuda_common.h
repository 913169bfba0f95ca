// Internal to attention/cuda: what every FlexAttention launch on CUDA shares. The host mirrors of the
// kernel ABI (kernels/flex_abi.cuh), the merged capture list of a call, the generated translation unit,
// and the check of the device error flag after a kernel.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "flexgrad/attention/cuda/jit.h"
#include "flexgrad/attention/flex_kernels.h"
#include "flexgrad/attention/int_ranges.h"
#include "flexgrad/attention/mod_codegen.h"

namespace fg::cuda::flex {

// Host mirrors of flex_abi.cuh (same layout; static_asserts in the .cpp keep them in step).
constexpr int kMaxCaptures = 8;
constexpr int kMaxRank = 6;
struct FgCapture {
  const void* data = nullptr;
  int64_t sizes[kMaxRank] = {};
  int64_t strides[kMaxRank] = {};
  int ndim = 0;
  int dtype = 0;
};
struct FgError {
  int flag = 0, capture = 0, dim = 0, pad = 0;
  int64_t index = 0, size = 0;
};
struct FgModArgs {
  FgCapture caps[kMaxCaptures];
  FgError* error = nullptr;
};

// The mods of one flex call, ready to splice into a kernel template.
struct ModContext {
  std::string source;               // flex_abi.cuh + the generated mod functions
  FgModArgs args;                   // captures read in place on the device; error points into error_buf
  Tensor error_buf;                 // device FgError (zeroed), when a captured read or integer op can fail
  std::vector<CaptureRef> captures; // the merged list, in kernel slot order (for messages)
  CudaModsFacts facts;              // what the text says of the programs (mod_codegen.h), for the kernel choices
};

// Merges the score_mod, mask_mod and (backward) derivative captures by tensor identity, generates the mod
// functions (emit_cuda_mods) and fills the kernel arguments. DeviceError when a capture is not on q's
// device, NotImplementedError past kMaxCaptures captures or kMaxRank dims. `needs_cap` (per
// score_grad->captures slot) selects the capture-gradient terms; empty for the forward.
// The error flag (and check_mod_errors' synchronising read of it) exists only when some program can fail
// for b, h, q_idx, kv_idx inside the call's extents (int_ranges.h): q's batch and heads, Lq, Lkv here.
// p.approx_math (FlexKernelOptions::approx_math) goes to emit_cuda_mods: the text, hence the module key, differs.
ModContext make_mod_context(const FlexProblem& p, bool backward, const std::vector<bool>& needs_cap = {});
// The same for any set of programs (each may be null) run on `dev` for inputs inside `bounds`; `caller` names
// the API in messages (create_block_mask uses it with a mask program alone).
ModContext make_mod_context(const ModProgram* score_mod, const ModProgram* mask_mod, const ScoreModBackward* score_grad,
                            const std::vector<bool>& needs_cap, Device dev, const char* caller,
                            const IndexBounds& bounds, bool approx_math = false);

// After the kernels that used `ctx`: reads the error flag (a device->host copy, so it synchronises) and
// raises the IndexError / ValueError the CPU evaluators raise for the same read. No-op when nothing can fail.
void check_mod_errors(const ModContext& ctx);

// The translation unit: ctx.source, then `defines` (one "#define NAME VALUE" per entry), then an #include of
// each embedded kernel template in `templates` (files of attention/cuda/kernels/), in order.
std::string assemble(const ModContext& ctx, const std::vector<std::string>& defines,
                     std::initializer_list<const char*> templates);

// Whether every row of a 4-D tensor (last dim contiguous) starts 16-byte aligned: the pointer and the strides
// of dims 0-2 (where the size exceeds 1) are multiples of 16 bytes. The kernels' 16-byte copies need it.
bool rows_aligned16(const Tensor& t);

// ... and whether the kernels may use 16-byte copies for `t`: rows aligned and `last` (the row length in
// elements) a whole number of 16-byte vectors.
bool vec_ok(const Tensor& t, int64_t last);

// x as a kernel's 32-bit index; NotImplementedError naming `what` when it does not fit.
int32_t to_i32(int64_t x, const char* what);

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A 0 / 1 switch from the environment (the kernel-choice overrides, FLEXGRAD_FLEX_*): nullopt when unset or
// empty; ValueError naming the variable for any other value.
std::optional<bool> env_switch(const char* name);

// A persistent-launch setting from the environment (FLEXGRAD_FLEX_WGMMA_PERSISTENT, ..._BWD_PERSISTENT): nullopt
// when unset (the caller's default), 0 (the kernel's own grid), 1 (one CTA an SM), or N >= 2 (at most N CTAs:
// tests run many grid CTAs a CTA on small problems); ValueError naming the variable for anything else.
std::optional<int64_t> env_persistent(const char* name);
// The 1-D grid of a persistent launch of `jobs` grid CTAs under `setting` (env_persistent, > 0) on `device`.
unsigned persistent_ctas(int64_t jobs, int64_t setting, int device);
// How many backward calls of this process ran their dQ kernel on a second stream (FLEXGRAD_FLEX_BWD_CONCURRENT;
// flex_backward_cuda.cpp): the tests' way to see the option took effect, its results being the same bits.
int64_t concurrent_dq_calls();
// How many backward calls of this process had the warp-specialised dQ kernel compute the rows' delta itself, with no
// preprocess kernel (FG_BWD_DQ_DELTA; flex_backward_cuda.cpp): the tests' way to see it ran, its results being the
// preprocess's bits.
int64_t dq_delta_calls();
// Whether the backward's warp-specialised kernels launch persistent for `p` when FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT is
// unset: the mean visited rows of the other side a grid CTA, in both kernels, at most twelve 128-row blocks, from
// p.visited's count where the host has it (false where not). flex_backward_cuda.cpp gives the measurements.
bool persistent_pays(const FlexProblem& p);
// How many backward calls of this process launched the warp-specialised kernels persistent (FG_BWD_PERSISTENT:
// FLEXGRAD_FLEX_WGMMA_BWD_PERSISTENT, or chosen for a mask's short rows; flex_backward_cuda.cpp).
int64_t persistent_backward_calls();
// How many backward calls of this process ran the tensor-core kernels with the lean element steps (FG_BWD_LEAN_STEP,
// unless FLEXGRAD_FLEX_BWD_LEAN_STEP=0; flex_backward_cuda.cpp).
int64_t lean_step_backward_calls();

// How many backward calls of this process ran the warp-specialised kernels skipping the chunks the mask_mod keeps
// nothing of (FG_BWD_SKIP_EMPTY, opt-in: FLEXGRAD_FLEX_BWD_SKIP_EMPTY=1; flex_backward_cuda.cpp).
int64_t skip_empty_backward_calls();
// How many backward calls of this process multiplied dS by a varying d score_mod / d score without testing dS for
// zero (FG_BWD_DSCORE_FINITE, flex_backward.cuh: the derivative is provably finite; unless
// FLEXGRAD_FLEX_BWD_FINITE_DSCORE=0; flex_backward_cuda.cpp).
int64_t finite_dscore_backward_calls();
// How many backward calls of this process ran warp-specialised kernels whose consumer warpgroups take turns issuing
// their products (FG_BWD_PINGPONG, flex_backward_wgmma.cuh: by default where both head dims are 128;
// FLEXGRAD_FLEX_BWD_PINGPONG=1 / 0 forces it / drops it; flex_backward_cuda.cpp).
int64_t pingpong_backward_calls();
// How many backward calls of this process ran persistent warp-specialised kernels that start the next grid CTA
// before the current one ends (FG_BWD_TILE_PREFETCH, flex_backward_wgmma.cuh: the default there;
// FLEXGRAD_FLEX_BWD_TILE_PREFETCH=0 keeps the previous order; flex_backward_cuda.cpp).
int64_t tile_prefetch_backward_calls();
// How many backward calls of this process summed dQ in the dK/dV kernel with float atomics (FG_DQ_ATOMIC, no dQ
// kernel: calls that are not deterministic, on long rows or with FLEXGRAD_FLEX_WGMMA_BWD_FUSED_DQ=1;
// flex_backward_cuda.cpp), and how many of those in the warp-specialised dK/dV kernel.
int64_t fused_dq_backward_calls();
int64_t fused_dq_ws_backward_calls();
// Backward calls whose fused dQ added through the TMA unit (FG_DQ_TMA_ADD).
int64_t dq_tma_add_backward_calls();
// How many calls of this process (forward and backward counted apart) ran tensor-core kernels that fold the
// score_mod's affine form into their constants (FG_SCORE_AFFINE under approx_math, unless
// FLEXGRAD_FLEX_AFFINE_FOLD=0; flex_forward_common.cuh, flex_backward.cuh).
int64_t affine_fold_calls();
// How many forward calls of this process ran a tensor-core kernel with the bounded max (no running max: the affine
// form's bounded core, bf16, no max_scores returned; flex_forward_common.cuh, unless FLEXGRAD_FLEX_FWD_BOUNDED_MAX=0).
int64_t bounded_max_calls();
// How many forward calls of this process kept a row's running max while it grew by at most 2^8 in P's units
// (FG_FWD_LAZY_RESCALE, opt-in FLEXGRAD_FLEX_FWD_LAZY_RESCALE=1; flex_forward_cuda.cpp).
int64_t lazy_rescale_calls();
// Whether a call with this context folds the affine form (ctx.facts.affine_form, FLEXGRAD_FLEX_AFFINE_FOLD) into tensor-core
// kernels (`mma`); counts it, and adds FG_NO_AFFINE_FOLD to `defines` where the switch turns it off.
bool affine_fold(const ModContext& ctx, bool mma, std::vector<std::string>& defines);

// fg::DType -> FG_DT_* code of flex_abi.cuh.
int abi_dtype(DType t);

// The members every forward kernel's parameter block (host mirrors FwdParams, DecodeParams) shares, from the
// problem: q/k/v pointers and strides, the kv block lists, scale, sizes, the mask's shape and block sizes.
// NotImplementedError (to_i32) where a size does not fit the kernels' 32-bit indices.
template <class Params>
void fill_problem_params(Params& a, const FlexProblem& p) {
  a.q = p.q.data_ptr();
  a.k = p.Lkv > 0 ? p.k.data_ptr() : nullptr;
  a.v = p.Lkv > 0 ? p.v.data_ptr() : nullptr;
  a.q_sb = p.q.strides()[0], a.q_sh = p.q.strides()[1], a.q_sl = p.q.strides()[2];
  a.k_sb = p.k.strides()[0], a.k_sh = p.k.strides()[1], a.k_sl = p.k.strides()[2];
  a.v_sb = p.v.strides()[0], a.v_sh = p.v.strides()[1], a.v_sl = p.v.strides()[2];
  const BlockLists& bl = p.kv_lists;
  if (bl.num.defined()) {
    a.num = static_cast<const int32_t*>(bl.num.data_ptr());
    a.idx = static_cast<const int32_t*>(bl.idx.data_ptr());
    a.idx_cols = to_i32(bl.idx.sizes()[3], "block list width");
  }
  if (bl.full_num.defined()) {
    a.full_num = static_cast<const int32_t*>(bl.full_num.data_ptr());
    a.full_idx = static_cast<const int32_t*>(bl.full_idx.data_ptr());
    a.full_cols = to_i32(bl.full_idx.sizes()[3], "full block list width");
  }
  a.scale = p.scale;
  a.B = to_i32(p.B, "B"), a.Hq = to_i32(p.Hq, "Hq"), a.Lq = to_i32(p.Lq, "Lq");
  a.Hkv = to_i32(p.Hkv, "Hkv"), a.Lkv = to_i32(p.Lkv, "Lkv"), a.Bkv = to_i32(p.Bkv, "Bkv");
  a.group = to_i32(p.group(), "GQA group");
  a.E = to_i32(p.E, "E"), a.Ev = to_i32(p.Ev, "Ev");
  a.Bm = to_i32(bl.Bm, "block mask batch"), a.Hm = to_i32(bl.Hm, "block mask heads"), a.rows = to_i32(bl.rows, "rows");
  a.block_q = to_i32(p.block_q, "block_q"), a.block_kv = to_i32(p.block_kv, "block_kv");
}

}  // namespace fg::cuda::flex
