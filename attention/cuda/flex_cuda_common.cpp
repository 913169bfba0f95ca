// Host glue shared by every FlexAttention launch on CUDA (attention/cuda/flex_cuda_common.h).
#include "flexgrad/attention/cuda/flex_cuda_common.h"

#include <cuda_runtime.h>

#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

#include "flexgrad/attention/mod_codegen.h"
#include "flexgrad/attention/op_semantics.h"
#include "flexgrad/tensor/cuda/cuda_check.h"

namespace fg::cuda::flex {

// The host mirrors must match flex_abi.cuh byte for byte (the kernels receive them as parameters).
static_assert(sizeof(FgCapture) == 8 + 2 * 8 * kMaxRank + 8, "FgCapture layout");
static_assert(offsetof(FgCapture, ndim) == 8 + 2 * 8 * kMaxRank, "FgCapture layout");
static_assert(sizeof(FgError) == 32, "FgError layout");
static_assert(offsetof(FgModArgs, error) == sizeof(FgCapture) * kMaxCaptures, "FgModArgs layout");

bool rows_aligned16(const Tensor& t) {
  const int64_t es = static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && (t.stride(d) * es) % 16 != 0) return false;
  }
  return true;
}

bool vec_ok(const Tensor& t, int64_t last) {
  return rows_aligned16(t) && (last * static_cast<int64_t>(t.element_size())) % 16 == 0;
}

int32_t to_i32(int64_t x, const char* what) {
  FG_CHECK(x >= 0 && x <= INT32_MAX, NotImplementedError,
           "flex_attention on CUDA: {} = {} does not fit the kernel's 32-bit indices", what, x);
  return static_cast<int32_t>(x);
}

int abi_dtype(DType t) { return static_cast<int>(t); }  // flex_abi.cuh's FG_DT_* follow fg::DType's order

namespace {

// emit_cuda_mods_and_facts(in), memoised. Its text is a function of the programs' structure
// (ModProgram::structure_key), of which kernel slot each capture list's tensors take (tensor identity: the slots, and
// for the derivative's lists the slot of each tensor in `kernel_captures`), of the derivative's terms and flags, and
// of approx_math and const_division; the key holds all of them, so a repeated call (a training step, a decoding step)
// takes the text from the memo instead of running the code generator (~20 us of host time a call, spent while the GPU
// waits for the call's first kernel).
CudaMods cuda_mods(const CudaModsInput& in, const std::vector<CaptureRef>& kernel_captures) {
  std::string key;
  auto put = [&key](const auto& v) { key.append(reinterpret_cast<const char*>(&v), sizeof v); };
  auto put_ints = [&](const std::vector<int>& v) {
    put(v.size());
    for (int x : v) put(x);
  };
  auto put_program = [&](const ModProgram* p) {
    const std::string k = p ? p->structure_key() : std::string();
    put(k.size());
    key += k;
  };
  auto put_slots_by_identity = [&](const std::vector<CaptureRef>& caps) {
    put(caps.size());
    for (const CaptureRef& c : caps) {
      int slot = -1;
      for (size_t i = 0; i < kernel_captures.size(); ++i)
        if (kernel_captures[i].tensor.impl() == c.tensor.impl()) slot = static_cast<int>(i);
      put(slot);
    }
  };
  put(in.approx_math);
  put(in.const_division);
  put_program(in.score_mod);
  put_program(in.mask_mod);
  put_ints(in.score_slots);
  put_ints(in.mask_slots);
  put_ints(in.grad_slots);
  put(in.grad_needed.size());
  for (bool b : in.grad_needed) put(b);
  put(in.score_grad != nullptr);
  if (const ScoreModBackward* g = in.score_grad) {
    put_program(&g->program);
    put_program(&g->value_and_dscore);
    put_slots_by_identity(g->captures);
    put_slots_by_identity(g->value_and_dscore.captures());
    put(g->terms.size());
    for (const CaptureGradTerm& t : g->terms) {
      put(t.capture);
      put(t.ndim);
      put(t.index_output);
      put(t.deriv_output);
    }
    put(g->dscore_is_constant);
    put(std::bit_cast<uint64_t>(g->dscore_constant));
  }
  static std::mutex mu;
  static std::unordered_map<std::string, CudaMods> memo;
  {
    std::lock_guard lock(mu);
    if (auto it = memo.find(key); it != memo.end()) return it->second;
  }
  CudaMods mods = emit_cuda_mods_and_facts(in);  // (outside the lock: it may throw, and it is the slow part)
  std::lock_guard lock(mu);
  if (memo.size() >= 1024) memo.clear();  // a bound (~10 KiB an entry) for programs made afresh without end
  return memo.emplace(std::move(key), std::move(mods)).first->second;
}

}  // namespace

ModContext make_mod_context(const ModProgram* score_mod, const ModProgram* mask_mod, const ScoreModBackward* score_grad,
                            const std::vector<bool>& needs_cap, Device dev, const char* caller,
                            const IndexBounds& bounds, bool approx_math) {
  ModContext ctx;
  // One kernel slot per distinct captured tensor (by identity), whichever program reads it.
  auto slot_of = [&](const CaptureRef& c) -> int {
    for (size_t i = 0; i < ctx.captures.size(); ++i)
      if (ctx.captures[i].tensor.impl() == c.tensor.impl()) return static_cast<int>(i);
    FG_CHECK(ctx.captures.size() < static_cast<size_t>(kMaxCaptures), NotImplementedError,
             "{} on CUDA: the mods capture more than {} tensors together", caller, kMaxCaptures);
    FG_CHECK(c.tensor.device() == dev, DeviceError,
             "{}: captured tensor '{}' is on {} but the kernels run on {}; move it to {} (captured tensors are read "
             "in place by the kernels)", caller, c.name, c.tensor.device(), dev, dev);
    FG_CHECK(c.tensor.dim() <= kMaxRank, NotImplementedError,
             "{} on CUDA: captured tensor '{}' has {} dims; at most {} are supported", caller, c.name, c.tensor.dim(),
             kMaxRank);
    ctx.captures.push_back(c);
    return static_cast<int>(ctx.captures.size() - 1);
  };
  auto slots_of = [&](const std::vector<CaptureRef>& caps) {
    std::vector<int> s;
    for (const CaptureRef& c : caps) s.push_back(slot_of(c));
    return s;
  };

  CudaModsInput in;
  in.approx_math = approx_math;
  in.const_division = env_switch("FLEXGRAD_FLEX_CONST_DIVISION").value_or(true);
  in.score_mod = score_mod;
  in.mask_mod = mask_mod;
  if (in.score_mod) in.score_slots = slots_of(in.score_mod->captures());
  if (in.mask_mod) in.mask_slots = slots_of(in.mask_mod->captures());
  if (score_grad) {
    in.score_grad = score_grad;
    in.grad_slots = slots_of(score_grad->program.captures());
    in.grad_needed = needs_cap;
    in.grad_needed.resize(score_grad->captures.size(), false);
  }
  const CudaMods mods = cuda_mods(in, ctx.captures);
  ctx.source = "#include \"flex_abi.cuh\"\n" + mods.text;
  ctx.facts = mods.facts;

  for (size_t i = 0; i < ctx.captures.size(); ++i) {
    const Tensor& t = ctx.captures[i].tensor;
    FgCapture& c = ctx.args.caps[i];
    c.data = t.numel() > 0 ? t.data_ptr() : nullptr;
    c.ndim = static_cast<int>(t.dim());
    c.dtype = abi_dtype(t.dtype());
    for (int64_t d = 0; d < t.dim(); ++d) {
      c.sizes[d] = t.size(d);
      c.strides[d] = t.stride(d);
    }
  }
  // Without a possible failure there is no flag to read back: the call does not synchronise.
  const bool may_fail = can_fail(in.score_mod, bounds) || can_fail(in.mask_mod, bounds) ||
                        (in.score_grad && can_fail(&in.score_grad->program, bounds));
  if (may_fail) {
    ctx.error_buf = zeros({static_cast<int64_t>(sizeof(FgError) / 8)}, TensorOptions().dtype(kInt64).device(dev));
    ctx.args.error = static_cast<FgError*>(ctx.error_buf.data_ptr());
  }
  return ctx;
}

ModContext make_mod_context(const FlexProblem& p, bool backward, const std::vector<bool>& needs_cap) {
  const IndexBounds bounds{p.q.size(0), p.q.size(1), p.q.size(2), p.k.size(2)};
  return make_mod_context(p.score_mod.get(), p.mask_mod.get(), backward ? p.score_grad.get() : nullptr, needs_cap,
                          p.q.device(), "flex_attention", bounds, p.approx_math);
}

namespace {
std::atomic<int64_t> g_affine_fold_calls{0};
}  // namespace

int64_t affine_fold_calls() { return g_affine_fold_calls.load(); }

bool affine_fold(const ModContext& ctx, bool mma, std::vector<std::string>& defines) {
  if (!ctx.facts.affine_form) return false;
  if (!env_switch("FLEXGRAD_FLEX_AFFINE_FOLD").value_or(true)) {
    defines.emplace_back("FG_NO_AFFINE_FOLD 1");
    return false;
  }
  if (mma) ++g_affine_fold_calls;
  return mma;
}

void check_mod_errors(const ModContext& ctx) {
  if (!ctx.error_buf.defined()) return;
  FgError e;
  Tensor host = ctx.error_buf.cpu();  // synchronises with the kernels on the current stream
  std::memcpy(&e, host.data_ptr(), sizeof e);
  if (e.flag == 0) return;
  if (e.flag == 1 && e.capture >= 0 && e.capture < static_cast<int>(ctx.captures.size())) {
    throw_capture_index_error(ctx.captures[e.capture], e.dim, e.index);
  }
  // The CPU evaluators' messages (op table, attention/op_semantics.h; layout in flex_abi.cuh).
  if (e.flag == 2) throw_int_division_by_zero(e.dim == 1 ? ExprOp::Mod : ExprOp::FloorDiv, e.index);
  if (e.flag == 3) throw_negative_int_power(e.index, e.size);
  FG_FAIL(Error, "flex_attention: a generated kernel reported error code {} (capture {}, dim {}, index {})", e.flag,
          e.capture, e.dim, e.index);
}

std::optional<bool> env_switch(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return std::nullopt;
  const std::string v(env);
  FG_CHECK(v == "0" || v == "1", ValueError, "{}: expected 0 or 1; got \"{}\"", name, v);
  return v == "1";
}

std::optional<int64_t> env_persistent(const char* name) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return std::nullopt;
  char* end = nullptr;
  const long long n = std::strtoll(env, &end, 10);
  FG_CHECK(end != env && *end == '\0' && n >= 0 && n <= (1LL << 31), ValueError,
           "{}: expected 0, 1 (one CTA an SM) or a CTA count >= 2; got \"{}\"", name, env);
  return n;
}

unsigned persistent_ctas(int64_t jobs, int64_t setting, int device) {
  // The kernels number the grid CTAs in 32 bits (FgJobQueue): past that they would run none.
  FG_CHECK(jobs <= INT32_MAX, NotImplementedError,
           "flex_attention on CUDA: a persistent launch numbers its grid CTAs in 32 bits, got {} of them", jobs);
  int64_t ctas = setting;
  if (setting == 1) {
    int sms = 0;
    FG_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    ctas = sms;
  }
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(jobs, ctas)));
}

std::string assemble(const ModContext& ctx, const std::vector<std::string>& defines,
                     std::initializer_list<const char*> templates) {
  std::string tu = ctx.source;
  tu += "\n// ---- configuration\n";
  for (const std::string& d : defines) tu += "#define " + d + "\n";
  // Included, not pasted: the embedded templates are fixed per build and already in the cache key (jit.h),
  // so the text hashed on every call stays a few kilobytes (decoding calls are short).
  for (const char* t : templates) tu += std::string("#include \"") + t + "\"\n";
  return tu;
}

}  // namespace fg::cuda::flex
