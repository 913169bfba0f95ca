// The CUDA generator (attention/mod_codegen.h) on representative mods: the text has the contract's
// functions and macros, each op is spelled per precision, and (when the CUDA toolkit's NVRTC is present,
// no GPU needed) the text compiles together with flex_abi.cuh and a kernel that instantiates every
// generated function for float and double.
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "attention/mask_mods.h"
#include "attention/mod_codegen.h"
#include "attention/mod_grad.h"
#include "attention/mod_program.h"
#include "tests/attention/random_mods.h"
#include "tests/test_util.h"
#ifdef FLEXGRAD_WITH_CUDA
#include "attention/cuda/jit.h"
#endif

using namespace fg;

namespace {

bool has(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

// NVRTC through dlopen: the test needs the toolkit's compiler, not a GPU (and flexgrad links NVRTC
// privately). Returns "" on success, else the log; sets `available` false when NVRTC cannot be loaded.
struct Nvrtc {
  using CreateFn = int (*)(void**, const char*, const char*, int, const char* const*, const char* const*);
  using CompileFn = int (*)(void*, int, const char* const*);
  using LogSizeFn = int (*)(void*, size_t*);
  using LogFn = int (*)(void*, char*);
  using DestroyFn = int (*)(void**);
  void* lib = nullptr;
  CreateFn create = nullptr;
  CompileFn compile = nullptr;
  LogSizeFn log_size = nullptr;
  LogFn log = nullptr;
  DestroyFn destroy = nullptr;

  Nvrtc() {
    for (const char* name : {"libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12", "/usr/local/cuda/lib64/libnvrtc.so"}) {
      lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (lib) break;
    }
    if (!lib) return;
    create = reinterpret_cast<CreateFn>(dlsym(lib, "nvrtcCreateProgram"));
    compile = reinterpret_cast<CompileFn>(dlsym(lib, "nvrtcCompileProgram"));
    log_size = reinterpret_cast<LogSizeFn>(dlsym(lib, "nvrtcGetProgramLogSize"));
    log = reinterpret_cast<LogFn>(dlsym(lib, "nvrtcGetProgramLog"));
    destroy = reinterpret_cast<DestroyFn>(dlsym(lib, "nvrtcDestroyProgram"));
  }
  bool available() const { return create && compile && log_size && log && destroy; }

  std::string build(const std::string& code) const {
    void* prog = nullptr;
    if (create(&prog, code.c_str(), "codegen_test.cu", 0, nullptr, nullptr) != 0) return "nvrtcCreateProgram failed";
    const char* opts[] = {"--gpu-architecture=compute_80", "-std=c++17"};
    const int rc = compile(prog, 2, opts);
    size_t n = 0;
    log_size(prog, &n);
    std::string text(n, '\0');
    log(prog, text.data());
    destroy(&prog);
    return rc == 0 ? std::string() : "NVRTC failed:\n" + text + "\n---- source:\n" + code;
  }
};

const Nvrtc& nvrtc() {
  static Nvrtc n;
  return n;
}

// flex_abi.cuh + the generated mods + a kernel calling every function in both precisions.
std::string translation_unit(const std::string& mods) {
  std::string abi;
#ifdef FLEXGRAD_WITH_CUDA
  abi = std::string(cuda::jit::embedded_source("flex_abi.cuh"));
#endif
  return abi + "\n" + mods + R"(
struct TestSink {
  double* out;
  __device__ void add(int cap, fg_i64 i, double v) const { out[cap * 64 + i] += v; }
};
extern "C" __global__ void codegen_test(FgModArgs a, float* f, double* d, bool* m) {
  const int q = threadIdx.x, kv = threadIdx.y;
  f[0] = fg_score_mod<float>(0.5f, 0, 1, q, kv, a);
  d[0] = fg_score_mod<double>(0.5, 0, 1, q, kv, a);
  m[0] = fg_mask_mod(0, 1, q, kv, a);
  m[1] = fg_mask_mod_t<double>(0, 1, q, kv, a);
  f[1] = fg_dscore<float>(0.5f, 0, 1, q, kv, a);
  d[1] = fg_dscore<double>(0.5, 0, 1, q, kv, a);
  fg_cap_grad<float>(0.5f, 1.0f, 0, 1, q, kv, a, TestSink{d});
  fg_cap_grad<double>(0.5, 1.0, 0, 1, q, kv, a, TestSink{d});
#if FG_HAS_SCORE_MOD + FG_HAS_MASK_MOD + FG_DSCORE_IS_CONSTANT + FG_HAS_CAP_GRAD < 0
#error macros missing
#endif
}
)";
}

struct Generated {
  std::string text;
  std::string nvrtc_error;  // "" when it compiled (or NVRTC is absent: see compiled)
  bool compiled = false;
};

Generated generate(const ModProgram* score, const ModProgram* mask, bool with_grad, bool all_caps_need_grad = true) {
  CudaModsInput in;
  in.score_mod = score;
  in.mask_mod = mask;
  ScoreModBackward g;
  if (with_grad && score) {
    g = derive_score_mod(*score);
    in.score_grad = &g;
    in.grad_needed.assign(g.captures.size(), all_caps_need_grad);
  }
  Generated r;
  r.text = emit_cuda_mods(in);
#ifdef FLEXGRAD_WITH_CUDA
  if (nvrtc().available()) {
    r.nvrtc_error = nvrtc().build(translation_unit(r.text));
    r.compiled = r.nvrtc_error.empty();
  }
#endif
  return r;
}

void expect_compiles(const Generated& g) {
#ifdef FLEXGRAD_WITH_CUDA
  if (!nvrtc().available()) {
    std::cout << "[  NOTE    ] libnvrtc not loadable: generated CUDA checked as text only\n";
    return;
  }
  EXPECT_TRUE(g.compiled) << g.nvrtc_error;
#else
  std::cout << "[  NOTE    ] built without CUDA: generated CUDA checked as text only\n";
#endif
}

Tensor floats(std::vector<double> v, Shape s, DType dt = kFloat32) { return from_vector(v, s, dt); }

}  // namespace

TEST(ModCodegen, IdentityWhenAbsent) {
  Generated g = generate(nullptr, nullptr, false);
  EXPECT_TRUE(has(g.text, "#define FG_HAS_SCORE_MOD 0"));
  EXPECT_TRUE(has(g.text, "#define FG_HAS_MASK_MOD 0"));
  EXPECT_TRUE(has(g.text, "#define FG_DSCORE_IS_CONSTANT 1"));
  EXPECT_TRUE(has(g.text, "#define FG_DSCORE_CONSTANT 1.0"));
  EXPECT_TRUE(has(g.text, "#define FG_HAS_CAP_GRAD 0"));
  EXPECT_TRUE(has(g.text, "{ return score; }"));
  EXPECT_TRUE(has(g.text, "{ return true; }"));
  expect_compiles(g);
}

TEST(ModCodegen, SoftcapUsesPrecisePerPrecisionMath) {
  ModProgram p = trace_score_mod([](Expr s, Expr, Expr, Expr, Expr) { return 30.0 * tanh(s / 30.0); });
  Generated g = generate(&p, nullptr, true);
  EXPECT_TRUE(has(g.text, "#define FG_HAS_SCORE_MOD 1"));
  EXPECT_TRUE(has(g.text, "tanhf("));  // float specialisation
  EXPECT_TRUE(has(g.text, "tanh("));   // double specialisation
  EXPECT_TRUE(has(g.text, "fg_score_mod<float>"));
  EXPECT_TRUE(has(g.text, "fg_score_mod<double>"));
  EXPECT_TRUE(has(g.text, "#define FG_DSCORE_IS_CONSTANT 0"));  // 1 - tanh^2 depends on the score
  EXPECT_TRUE(has(g.text, "#define FG_HAS_CAP_GRAD 0"));
  EXPECT_FALSE(has(g.text, "__expf")) << "fast-math intrinsics would break CPU/GPU agreement";
  expect_compiles(g);
}

TEST(ModCodegen, AlibiWithComputedAndCapturedSlopes) {
  ModProgram computed = trace_score_mod([](Expr s, Expr, Expr h, Expr q, Expr kv) {
    return s + to_float(kv - q) * exp2(-8.0 * to_float(h + 1) / 4.0);
  });
  Generated g = generate(&computed, nullptr, true);
  EXPECT_TRUE(has(g.text, "exp2f("));
  EXPECT_TRUE(has(g.text, "fg_sub_i("));  // int64 subtraction wraps, never UB
  EXPECT_TRUE(has(g.text, "#define FG_DSCORE_IS_CONSTANT 1"));
  expect_compiles(g);

  Captured slopes(floats({0.5, 0.25, 0.125, 0.0625}, {4}), "slopes");
  ModProgram captured = trace_score_mod(
      [slopes](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + Expr(slopes[h]) * to_float(kv - q); });
  Generated gc = generate(&captured, nullptr, true);
  EXPECT_TRUE(has(gc.text, "fg_wrap_index(a, 0, 0,"));
  EXPECT_TRUE(has(gc.text, "fg_cap_load_f(a.caps[0]"));
  EXPECT_TRUE(has(gc.text, "#define FG_HAS_CAP_GRAD 1"));
  EXPECT_TRUE(has(gc.text, "sink.add(0, lin,"));
  expect_compiles(gc);
}

TEST(ModCodegen, DocumentMaskWithInt64Capture) {
  Captured doc(from_vector(std::vector<int64_t>{0, 0, 1, 1, 1, 2}, {6}, kInt64), "doc");
  ModProgram m = trace_mask_mod([doc](Expr, Expr, Expr q, Expr kv) { return (Expr(doc[q]) == Expr(doc[kv])) & (q >= kv); });
  Generated g = generate(nullptr, &m, false);
  EXPECT_TRUE(has(g.text, "#define FG_HAS_MASK_MOD 1"));
  EXPECT_TRUE(has(g.text, "fg_cap_load_i(a.caps[0]"));
  EXPECT_TRUE(has(g.text, "fg_mask_mod_t<float>"));
  EXPECT_TRUE(has(g.text, "fg_mask_mod_t<double>"));
  expect_compiles(g);
  // kernel slots: the mask's capture lives in slot 3 of the kernel's FgModArgs
  CudaModsInput in;
  in.mask_mod = &m;
  in.mask_slots = {3};
  const std::string text = emit_cuda_mods(in);
  EXPECT_TRUE(has(text, "fg_cap_load_i(a.caps[3]"));
  EXPECT_FALSE(has(text, "a.caps[0]"));
  in.mask_slots = {1, 2};
  EXPECT_THROW(emit_cuda_mods(in), ValueError);
}

TEST(ModCodegen, RelativeBiasTableGradient) {
  const int64_t H = 2, L = 4;
  std::vector<double> v(static_cast<size_t>(H * (2 * L - 1)));
  for (size_t i = 0; i < v.size(); ++i) v[i] = 0.1 * static_cast<double>(i);
  Captured table(floats(v, {H, 2 * L - 1}, kFloat64), "table");
  ModProgram p = trace_score_mod(
      [table](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + table[h][q - kv + (L - 1)]; });
  Generated g = generate(&p, nullptr, true);
  EXPECT_TRUE(has(g.text, "fg_wrap_index(a, 0, 1,"));
  EXPECT_TRUE(has(g.text, "a.caps[0].strides[1]"));  // strided read, any layout
  EXPECT_TRUE(has(g.text, "lin = lin * a.caps[0].sizes[1]"));  // row-major linear gradient index
  expect_compiles(g);
  // no gradient wanted: no terms
  Generated none = generate(&p, nullptr, true, /*all_caps_need_grad=*/false);
  EXPECT_TRUE(has(none.text, "#define FG_HAS_CAP_GRAD 0"));
  expect_compiles(none);
}

TEST(ModCodegen, CombinedMasksAndIntegerOps) {
  MaskMod causal = [](Expr, Expr, Expr q, Expr kv) { return q >= kv; };
  MaskMod window = [](Expr, Expr, Expr q, Expr kv) { return (q - kv) <= 16; };
  MaskMod prefix = [](Expr, Expr, Expr, Expr kv) { return kv < 4; };
  MaskMod blocks = [](Expr, Expr, Expr q, Expr kv) { return (floor_div(q, 8) == floor_div(kv, 8)) | (q % 3 == kv % -5); };
  ModProgram m = trace_mask_mod(or_masks(and_masks(causal, window), prefix, blocks));
  Generated g = generate(nullptr, &m, false);
  EXPECT_TRUE(has(g.text, "fg_floordiv_i(a,"));  // division by zero reports through the error flag
  EXPECT_TRUE(has(g.text, "fg_mod_i(a,"));
  EXPECT_TRUE(has(g.text, " | "));
  EXPECT_TRUE(has(g.text, " & "));
  expect_compiles(g);
}

TEST(ModCodegen, EdgeConstantsAreExact) {
  ModProgram p = trace_score_mod([](Expr s, Expr, Expr, Expr q, Expr) {
    return where(s > 1e300, Expr(INFINITY), where(s != s, Expr(-INFINITY), s * 0.1)) +
           to_float(q * 9007199254740993LL + std::numeric_limits<int64_t>::min());
  });
  Generated g = generate(&p, nullptr, true);
  EXPECT_TRUE(has(g.text, "__int_as_float(0x7f800000)"));                    // +inf as float
  EXPECT_TRUE(has(g.text, "__longlong_as_double((long long)0xfff0000000000000ULL)"));  // -inf as double
  EXPECT_TRUE(has(g.text, "9007199254740993LL"));     // not representable in double: kept as int64
  EXPECT_TRUE(has(g.text, "0x8000000000000000ULL"));  // INT64_MIN
  EXPECT_TRUE(has(g.text, "0.1f"));
  EXPECT_TRUE(has(g.text, "1e+300"));
  expect_compiles(g);
}

TEST(ModCodegen, EveryOpHasASpelling) {
  // The table spells every non-leaf op for at least one operand kind, and cuda_spelling substitutes.
  for (int i = static_cast<int>(ExprOp::Neg); i <= static_cast<int>(ExprOp::Where); ++i) {
    const OpInfo& r = op_info(static_cast<ExprOp>(i));
    EXPECT_EQ(static_cast<int>(r.op), i);
    if (r.op == ExprOp::Cast) continue;
    EXPECT_TRUE(r.cuda_f32 || r.cuda_i64 || r.cuda_bool) << r.name;
    EXPECT_EQ(r.cuda_f32 == nullptr, r.cuda_f64 == nullptr) << r.name;
  }
  // float arithmetic never contracts into FMAs (the CPU rounds each op)
  EXPECT_EQ(cuda_spelling(ExprOp::Add, ValueKind::Float, ValueKind::Float, false, {"x", "y"}), "__fadd_rn(x, y)");
  EXPECT_EQ(cuda_spelling(ExprOp::Mul, ValueKind::Float, ValueKind::Float, true, {"x", "y"}), "__dmul_rn(x, y)");
  EXPECT_EQ(cuda_spelling(ExprOp::Add, ValueKind::Int, ValueKind::Int, true, {"x", "y"}), "fg_add_i(x, y)");
  EXPECT_EQ(cuda_spelling(ExprOp::Exp, ValueKind::Float, ValueKind::Float, false, {"x"}), "expf(x)");
  EXPECT_EQ(cuda_spelling(ExprOp::Exp, ValueKind::Float, ValueKind::Float, true, {"x"}), "exp(x)");
  EXPECT_EQ(cuda_spelling(ExprOp::Cast, ValueKind::Int, ValueKind::Float, true, {"x"}), "fg_f2i(x)");
  EXPECT_EQ(cuda_spelling(ExprOp::Cast, ValueKind::Float, ValueKind::Int, false, {"x"}), "((float)x)");
  EXPECT_THROW(cuda_spelling(ExprOp::Exp, ValueKind::Int, ValueKind::Int, false, {"x"}), ValueError);
}

TEST(ModCodegen, RandomProgramsCompile) {
  // The fuzz generator's programs (every op and kind, edge constants, captures of several dtypes and
  // ranks) with their derivatives: the generated text compiles for float and double (the GPU fuzz test
  // in tests/cuda checks the values).
  for (uint64_t seed = 1; seed <= 24; ++seed) {
    fg::testing::RandomModOptions o;
    o.steps = 20 + static_cast<int>(seed % 16);
    o.errors = seed % 4 == 0;
    const fg::testing::RandomMod m = fg::testing::random_mod(seed, o);
    Generated g = generate(&m.score, &m.mask, true);
    expect_compiles(g);
    if (::testing::Test::HasFailure()) break;
  }
}
