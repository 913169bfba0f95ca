// emit_cuda_mods (see mod_codegen.h): each SSA instruction becomes one `const TYPE vN = ...;` line,
// spelled by the op table (attention/op_semantics.h). Float code is emitted twice, as explicit
// specialisations for float and for double, so each precision gets its own precise math functions
// (expf / exp, ...) exactly as the CPU evaluators use them.
#include "flexgrad/attention/mod_codegen.h"

#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <optional>
#include <utility>

#include "flexgrad/attention/affine_score.h"
#include "flexgrad/attention/const_division.h"
#include "flexgrad/attention/float_ranges.h"
#include "flexgrad/attention/int_ranges.h"
#include "flexgrad/attention/op_semantics.h"

namespace fg {

namespace {

using VK = ValueKind;

std::string type_name(VK k, bool dbl) {
  switch (k) {
    case VK::Float: return dbl ? "double" : "float";
    case VK::Int: return "fg_i64";
    case VK::Bool: return "bool";
  }
  return "?";
}

// A float constant as a CUDA literal of T, exactly (float code gets the value rounded to float, as the
// CPU's float tile evaluator does).
std::string float_literal(double v, bool dbl) {
  if (!dbl) {
    const float f = static_cast<float>(v);
    if (std::isnan(f) || std::isinf(f))
      return fmt::format("__int_as_float({:#010x})", std::bit_cast<uint32_t>(f));
    std::string s = fmt::format("{}", f);  // shortest representation that reads back as f
    if (s.find_first_of(".e") == std::string::npos) s += ".0";
    return s + "f";
  }
  if (std::isnan(v) || std::isinf(v))
    return fmt::format("__longlong_as_double((long long){:#018x}ULL)", std::bit_cast<uint64_t>(v));
  std::string s = fmt::format("{}", v);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

// FG_DT_* of flex_abi.cuh.
const char* abi_dtype_name(DType t) {
  switch (t) {
    case kBool: return "FG_DT_BOOL";
    case kInt32: return "FG_DT_INT32";
    case kInt64: return "FG_DT_INT64";
    case kFloat16: return "FG_DT_FLOAT16";
    case kBFloat16: return "FG_DT_BFLOAT16";
    case kFloat32: return "FG_DT_FLOAT32";
    case kFloat64: return "FG_DT_FLOAT64";
    default: break;
  }
  FG_FAIL(DTypeError, "emit_cuda_mods: captured tensors of dtype {} cannot be read by generated code", dtype_name(t));
}

std::string int_literal(int64_t v) {
  if (v == INT64_MIN) return "((fg_i64)0x8000000000000000ULL)";
  return fmt::format("((fg_i64){}LL)", v);
}

// ---- Narrowing: the op table's integers are 64-bit and wrap, but an add, sub, mul or neg whose operands and
// exact result provably fit in 32 bits (int_ranges.h, with b, h, q, kv any non-negative int32) gives the same
// value computed in 32 bits, which the GPU does in one instruction (and converts to float in one more).
bool fits_int32(const IntRange& r) { return r.known && r.lo >= INT32_MIN && r.hi <= INT32_MAX; }

// The 32-bit spelling of instruction i when it is a narrowable add / sub / mul / neg (see IntRange), else "".
std::string narrowed(const ModProgram& p, size_t i, const std::vector<IntRange>& r, const std::vector<std::string>& a) {
  const Instr& in = p.instrs()[i];
  if (in.kind != VK::Int || !fits_int32(r[i])) return {};
  for (int32_t x : in.args)
    if (p.instrs()[x].kind != VK::Int || !fits_int32(r[x])) return {};
  switch (in.op) {
    case ExprOp::Add: return fmt::format("((fg_i64)((int){} + (int){}))", a[0], a[1]);
    case ExprOp::Sub: return fmt::format("((fg_i64)((int){} - (int){}))", a[0], a[1]);
    case ExprOp::Mul: return fmt::format("((fg_i64)((int){} * (int){}))", a[0], a[1]);
    case ExprOp::Neg: return fmt::format("((fg_i64)(-(int){}))", a[0]);
    default: return {};
  }
}

// Per instruction of `p`: whether its value reaches, through float ops continuous in it, an operand that must be
// exact (of an op with OpInfo::float_steps, of one whose result is not a float, a where's condition). Such values
// keep their exact spelling under approx_math: a quotient floored into a bucket, or compared in a mask_mod (whose
// every value reaches its bool), would otherwise move by a whole step where the approximation lands an ulp off.
std::vector<char> approx_exact_needed(const ModProgram& p) {
  const auto& ins = p.instrs();
  std::vector<char> exact(ins.size(), 0);
  for (size_t u = ins.size(); u-- > 0;) {  // users come after their operands
    const Instr& in = ins[u];
    if (in.args.empty()) continue;  // a leaf
    const bool steps = in.kind != VK::Float || exact[u] || op_info(in.op).float_steps;
    for (size_t a = 0; a < in.args.size(); ++a) {
      const bool condition = in.op == ExprOp::Where && a == 0;
      if (steps || condition) exact[static_cast<size_t>(in.args[a])] = 1;
    }
  }
  return exact;
}

// One program as the code generator spells it: the program, its kernel capture slots (`slots` maps the
// program's capture slots to the kernel's FgModArgs slots), FlexKernelOptions::approx_math, and the whole-program
// analyses every emitted function of it reads (computed once here, not per function).
struct ProgramEmitter {
  ProgramEmitter(const ModProgram& prog, std::vector<int> kernel_slots, bool approx_math, bool const_division = true)
      : p(prog),
        slots(std::move(kernel_slots)),
        approx(approx_math),
        const_div(const_division),
        ranges(int_ranges(prog)),
        exact(approx_math ? approx_exact_needed(prog) : std::vector<char>(prog.instrs().size(), 1)) {}
  const ModProgram& p;
  std::vector<int> slots;
  bool approx;
  bool const_div;                // CudaModsInput::const_division
  bool fast_div = false;         // the FG_SCORE_ELEM_FAST functions: divisions by a proven constant in corrected form
  std::vector<IntRange> ranges;  // int_ranges(p): where a narrower integer type is exact
  std::vector<char> exact;       // per value: keeps its exact spelling under approx_math (approx_exact_needed)
};

// c where instruction i is a float division x / c by a constant c (as float code rounds it); nullopt otherwise.
std::optional<float> constant_divisor(const ModProgram& p, size_t i) {
  const Instr& in = p.instrs()[i];
  if (in.op != ExprOp::Div || in.kind != VK::Float) return std::nullopt;
  const Instr& x = p.instrs()[in.args[0]];
  const Instr& c = p.instrs()[in.args[1]];
  if (x.kind != VK::Float || c.op != ExprOp::Const || c.kind != VK::Float) return std::nullopt;
  return static_cast<float>(c.value);
}

// Float x / c for a constant c in a form with the bits of the op table's __fdiv_rn and without its branch
// (const_division.h): x * (1 / c) for a power of two, float(double(x) * RN53(1 / c)) for the other constants that
// double_reciprocal accepts, and (fast_div: the FG_SCORE_ELEM_FAST functions) the corrected form where it is proven;
// empty where instruction i is no such division.
std::string divided_by_constant(const ModProgram& p, size_t i, const std::vector<std::string>& a, bool fast_div) {
  const std::optional<float> divisor = constant_divisor(p, i);
  if (!divisor) return {};
  const float cf = *divisor;
  if (fast_div)
    if (const std::optional<float> r = corrected_reciprocal(cf))  // x / -c as -(x / c): the form keeps zeros' sign for c > 0
      return fmt::format("{}fg_div_corrected({}, {}, {})", cf < 0 ? "-" : "", a[0], float_literal(std::fabs(cf), false),
                         float_literal(std::fabs(*r), false));
  if (const std::optional<float> r = exact_reciprocal(cf))
    return fmt::format("__fmul_rn({}, {})", a[0], float_literal(*r, false));
  if (const std::optional<double> r = double_reciprocal(cf))
    return fmt::format("__double2float_rn(__dmul_rn((double){}, {}))", a[0], float_literal(*r, true));
  return {};
}

// The statements computing the live instructions of the emitter's program; value i is named v<i>. Under
// approx_math the values approx_exact_needed leaves free take the approximate spelling.
std::string emit_body(const ProgramEmitter& em, const std::vector<char>& live, bool dbl) {
  std::string s;
  const ModProgram& p = em.p;
  const std::vector<int>& slots = em.slots;
  const auto& ins = p.instrs();
  auto v = [](int32_t i) { return fmt::format("v{}", i); };
  for (size_t i = 0; i < ins.size(); ++i) {
    if (!live[i]) continue;
    const Instr& in = ins[i];
    std::string expr;
    switch (in.op) {
      case ExprOp::Const:
        expr = in.kind == VK::Float ? float_literal(in.value, dbl)
               : in.kind == VK::Int ? int_literal(in.ivalue)
                                    : (in.ivalue ? "true" : "false");
        break;
      case ExprOp::Score: expr = "score"; break;
      case ExprOp::Batch: expr = "((fg_i64)b)"; break;
      case ExprOp::Head: expr = "((fg_i64)h)"; break;
      case ExprOp::QIdx: expr = "((fg_i64)q)"; break;
      case ExprOp::KVIdx: expr = "((fg_i64)kv)"; break;
      case ExprOp::Index: {
        // Python indexing per dim (fg_wrap_index records an out-of-range index and reads element 0),
        // then a strided read converted from the capture's stored dtype.
        const int slot = slots.at(static_cast<size_t>(in.capture));
        std::string off = "0";
        for (size_t d = 0; d < in.args.size(); ++d)
          off += fmt::format(" + fg_wrap_index(a, {0}, {1}, {2}) * a.caps[{0}].strides[{1}]", slot, d, v(in.args[d]));
        s += fmt::format("  const fg_i64 o{} = {};  // {}\n", i, off, p.captures()[in.capture].name);
        // The stored dtype is known now: the read is specialised on it (the module key is the text's hash).
        const char* dt = abi_dtype_name(p.captures()[in.capture].tensor.dtype());
        if (in.kind == VK::Float)
          expr = fmt::format("(({})fg_cap_load_f(a.caps[{}], {}, o{}))", type_name(VK::Float, dbl), slot, dt, i);
        else if (in.kind == VK::Int)
          expr = fmt::format("fg_cap_load_i(a.caps[{}], {}, o{})", slot, dt, i);
        else
          expr = fmt::format("(fg_cap_load_i(a.caps[{}], {}, o{}) != 0)", slot, dt, i);
        break;
      }
      default: {
        std::vector<std::string> args;
        for (int32_t x : in.args) args.push_back(v(x));
        const VK operand = ins[in.args[in.op == ExprOp::Where ? 1 : 0]].kind;
        const bool approx = em.approx && !em.exact[i];
        expr = narrowed(p, i, em.ranges, args);
        if (expr.empty() && !dbl && !approx && em.const_div) expr = divided_by_constant(p, i, args, em.fast_div);
        if (expr.empty()) expr = cuda_spelling(in.op, in.kind, operand, dbl, args, approx);
      }
    }
    s += fmt::format("  const {} v{} = {};\n", type_name(in.kind, dbl), i, expr);
  }
  return s;
}

std::vector<int> identity_slots(const std::vector<int>& given, size_t n) {
  if (!given.empty()) {
    FG_CHECK(given.size() == n, ValueError, "emit_cuda_mods: {} capture slots given for a program with {} captures",
             given.size(), n);
    return given;
  }
  std::vector<int> s(n);
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<int>(i);
  return s;
}

const char* kScoreSig = "(T score, int b, int h, int q, int kv, const FgModArgs& a)";
const char* kMaskSig = "(int b, int h, int q, int kv, const FgModArgs& a)";

// `template <> ... NAME<float>(...) {...}` and the double one, for a one-output function.
std::string specialisations(const char* ret_t, const char* name, const char* sig, const ProgramEmitter& em,
                            int32_t output) {
  std::string s;
  const std::vector<char> live = em.p.live({output});
  for (bool dbl : {false, true}) {
    const std::string T = type_name(VK::Float, dbl);
    std::string params = sig;
    for (size_t at; (at = params.find("T score")) != std::string::npos;) params.replace(at, 1, T);
    const std::string ret = std::string(ret_t) == "T" ? T : ret_t;
    s += fmt::format("template <> __device__ __forceinline__ {} {}<{}>{} {{\n", ret, name, T, params);
    s += emit_body(em, live, dbl);
    s += fmt::format("  return ({})v{};\n}}\n", ret, output);
  }
  return s;
}

// ---- Row / column / element split (see mod_codegen.h). Instructions that need neither kv nor the score
// are "row" values (computed once per q row), those that need kv but neither q nor the score are "column"
// values (once per kv column), the rest are computed per element. Leaves (constants, b, h, q, kv, score)
// cost nothing and are re-read wherever they are used rather than carried.
bool is_leaf(ExprOp op) {
  return op == ExprOp::Const || op == ExprOp::Score || op == ExprOp::Batch || op == ExprOp::Head ||
         op == ExprOp::QIdx || op == ExprOp::KVIdx;
}

enum class Part : uint8_t { None, Row, Col, Elem };

struct SplitProgram {
  std::vector<Part> part;                   // per instruction (None: dead or a leaf)
  std::vector<char> row_emit, col_emit;     // what the row / column functions compute (with the leaves they read)
  std::vector<int32_t> row_out, col_out;    // values carried from the row / column function to the element ones
};

// The split of `p` for element functions that together compute `outputs` (each element function may
// compute a subset of them, see elem_part): the row and column parts carry what any of them needs.
SplitProgram split_program(const ModProgram& p, const std::vector<int32_t>& outputs) {
  const auto& ins = p.instrs();
  const size_t n = ins.size();
  const std::vector<char> live = p.live(outputs);
  SplitProgram sp;
  sp.part.assign(n, Part::None);
  for (size_t i = 0; i < n; ++i) {
    if (!live[i] || is_leaf(ins[i].op)) continue;
    const uint8_t d = ins[i].deps;
    const bool q = d & kUsesQ, kv = d & kUsesKV, score = d & kUsesScore;
    sp.part[i] = (score || (q && kv)) ? Part::Elem : kv ? Part::Col : Part::Row;
  }
  // Carried values: row / column values the element part (or an output itself) reads.
  std::vector<char> carried(n, 0);
  auto carry = [&](int32_t v) {
    if (sp.part[v] == Part::Row || sp.part[v] == Part::Col) carried[v] = 1;
  };
  for (int32_t o : outputs) carry(o);
  for (size_t i = 0; i < n; ++i)
    if (sp.part[i] == Part::Elem)
      for (int32_t a : ins[i].args) carry(a);
  for (size_t i = 0; i < n; ++i)
    if (carried[i]) (sp.part[i] == Part::Row ? sp.row_out : sp.col_out).push_back(static_cast<int32_t>(i));
  // What the row and column functions evaluate: the closure of their carried values (a column value may
  // need a b/h-only "row" value, which the column function then recomputes).
  sp.row_emit = p.live(sp.row_out);
  sp.col_emit = p.live(sp.col_out);
  return sp;
}

// An element function computing `outputs` (a subset of the split's): the carried values it reads, and
// its own instructions plus the leaves they read.
struct ElemPart {
  std::vector<int32_t> row_in, col_in;
  std::vector<char> emit;
};

ElemPart elem_part(const ModProgram& p, const SplitProgram& sp, const std::vector<int32_t>& outputs) {
  const auto& ins = p.instrs();
  const size_t n = ins.size();
  const std::vector<char> live = p.live(outputs);
  ElemPart e;
  e.emit.assign(n, 0);
  std::vector<char> read(n, 0);
  for (int32_t o : outputs) read[o] = 1;
  for (size_t i = 0; i < n; ++i) {
    if (!live[i] || sp.part[i] != Part::Elem) continue;
    e.emit[i] = 1;
    for (int32_t a : ins[i].args) {
      read[a] = 1;
      if (is_leaf(ins[a].op)) e.emit[a] = 1;
    }
  }
  for (int32_t o : outputs)
    if (is_leaf(ins[o].op)) e.emit[o] = 1;
  for (int32_t v : sp.row_out)
    if (read[v]) e.row_in.push_back(v);
  for (int32_t v : sp.col_out)
    if (read[v]) e.col_in.push_back(v);
  return e;
}

// Whether the element function computing `outputs` has an effect besides its value (op_has_effects: a captured
// read, an Int op that can fail): without one, a kernel may evaluate it for every entry and select.
bool elem_has_effects(const ModProgram& p, const SplitProgram& sp, const std::vector<int32_t>& outputs) {
  const ElemPart e = elem_part(p, sp, outputs);
  const auto& ins = p.instrs();
  for (size_t i = 0; i < ins.size(); ++i) {
    if (!e.emit[i]) continue;
    const ValueKind operand = ins[i].args.empty() ? ins[i].kind : ins[ins[i].args[0]].kind;
    std::optional<int64_t> rhs;
    if (ins[i].args.size() == 2 && ins[ins[i].args[1]].op == ExprOp::Const && operand == ValueKind::Int) {
      rhs = ins[ins[i].args[1]].ivalue;
    }
    if (op_has_effects(ins[i].op, operand, rhs)) return true;
  }
  return false;
}

// `template <class T> struct NAME { T v3; fg_i64 v7; ... };` holding `vals` (Float values in T).
std::string carried_struct(const char* name, const ModProgram& p, const std::vector<int32_t>& vals) {
  std::string s = fmt::format("template <class T> struct {} {{", name);
  for (int32_t v : vals) {
    const VK k = p.instrs()[v].kind;
    s += fmt::format(" {} v{};", k == VK::Float ? "T" : type_name(k, false), v);
  }
  return s + " };\n";
}

// The body of an element function of precision `dbl` computing `outputs`: the carried values it reads
// from `r` and `c`, then its own statements.
std::string elem_body(const ProgramEmitter& em, const SplitProgram& sp, const std::vector<int32_t>& outputs, bool dbl) {
  const ModProgram& p = em.p;
  const ElemPart e = elem_part(p, sp, outputs);
  std::string s;
  for (int32_t v : e.row_in) s += fmt::format("  const {} v{} = r.v{};\n", type_name(p.instrs()[v].kind, dbl), v, v);
  for (int32_t v : e.col_in) s += fmt::format("  const {} v{} = c.v{};\n", type_name(p.instrs()[v].kind, dbl), v, v);
  return s + emit_body(em, e.emit, dbl);
}

// The row, column and element functions of one program (float and double specialisations) as split by
// `sp` (split_program; for the merged score / d score program, split for both outputs); the element
// function computes `output`. `prefix` is "fg_score" or "fg_mask"; `Row` / `Col` the carried structs;
// `elem_ret` "T" or "bool".
std::string split_functions(const char* prefix, const char* row_t, const char* col_t, const char* elem_ret,
                            const ProgramEmitter& em, const SplitProgram& sp, int32_t output) {
  const ModProgram& p = em.p;
  const bool score = p.type() != ModProgram::Type::Mask;
  std::string s = carried_struct(row_t, p, sp.row_out) + carried_struct(col_t, p, sp.col_out);
  s += fmt::format("template <class T> __device__ __forceinline__ {0}<T> {1}_row(int b, int h, int q, const FgModArgs& a);\n"
                   "template <class T> __device__ __forceinline__ {2}<T> {1}_col(int b, int h, int kv, const FgModArgs& a);\n",
                   row_t, prefix, col_t);
  s += fmt::format("template <class T> __device__ __forceinline__ {} {}_elem({}const {}<T>& r, const {}<T>& c, int b, int h, "
                   "int q, int kv, const FgModArgs& a);\n",
                   elem_ret, prefix, score ? "T score, " : "", row_t, col_t);
  for (bool dbl : {false, true}) {
    const std::string T = type_name(VK::Float, dbl);
    auto fill = [&](const char* var, const std::vector<int32_t>& vals) {
      std::string f;
      for (int32_t v : vals) f += fmt::format("  {}.v{} = v{};\n", var, v, v);
      return f;
    };
    s += fmt::format("template <> __device__ __forceinline__ {0}<{1}> {2}_row<{1}>(int b, int h, int q, const FgModArgs& a) {{\n",
                     row_t, T, prefix);
    s += emit_body(em, sp.row_emit, dbl);
    s += fmt::format("  {}<{}> r;\n{}  return r;\n}}\n", row_t, T, fill("r", sp.row_out));
    s += fmt::format("template <> __device__ __forceinline__ {0}<{1}> {2}_col<{1}>(int b, int h, int kv, const FgModArgs& a) {{\n",
                     col_t, T, prefix);
    s += emit_body(em, sp.col_emit, dbl);
    s += fmt::format("  {}<{}> c;\n{}  return c;\n}}\n", col_t, T, fill("c", sp.col_out));
    const std::string ret = std::string(elem_ret) == "T" ? T : elem_ret;
    s += fmt::format("template <> __device__ __forceinline__ {0} {1}_elem<{2}>({3}const {4}<{2}>& r, const {5}<{2}>& c, "
                     "int b, int h, int q, int kv, const FgModArgs& a) {{\n",
                     ret, prefix, T, score ? T + " score, " : std::string(), row_t, col_t);
    s += elem_body(em, sp, {output}, dbl);
    s += fmt::format("  return ({})v{};\n}}\n", ret, output);
  }
  return s;
}

// FG_SCORE_ELEM_FAST (mod_codegen.h): where the score_mod's element part is pure and divides by a constant that
// const_division.h's corrected form is proven for, fg_score_elem_fast (fg_score_elem<float> with those divisions in
// that form, no branch) and fg_score_elem_fast_ok (whether every such dividend is in the form's range); else 0.
// `dscore` (the merged program's outputs, backward modules): FG_SCORE_ELEM_DSCORE_FAST, fg_score_elem_dscore_fast
// and fg_score_elem_dscore_fast_ok, the same of fg_score_elem_dscore<float>.
std::string fast_elem_functions(const ProgramEmitter& em, const SplitProgram& sp, const std::vector<int32_t>& outputs,
                                bool pure, bool dscore) {
  const std::string name = dscore ? "fg_score_elem_dscore_fast" : "fg_score_elem_fast";
  const char* macro = dscore ? "FG_SCORE_ELEM_DSCORE_FAST" : "FG_SCORE_ELEM_FAST";
  std::vector<int32_t> dividends;
  if (pure && em.const_div && !em.approx) {
    const auto& ins = em.p.instrs();
    const ElemPart e = elem_part(em.p, sp, outputs);
    for (size_t i = 0; i < ins.size(); ++i) {
      const std::optional<float> divisor = e.emit[i] ? constant_divisor(em.p, i) : std::nullopt;
      if (!divisor || !corrected_reciprocal(*divisor)) continue;
      const int32_t x = ins[i].args[0];
      if (std::find(dividends.begin(), dividends.end(), x) == dividends.end()) dividends.push_back(x);
    }
  }
  if (dividends.empty()) return fmt::format("#define {} 0\n", macro);
  const std::string params = "(float score, const FgScoreRow<float>& r, const FgScoreCol<float>& c, int b, int h, "
                             "int q, int kv, const FgModArgs& a";
  std::string s = fmt::format("#define {} 1\n", macro);
  s += fmt::format("__device__ __forceinline__ bool {}_ok{}) {{\n", name, params);
  s += elem_body(em, sp, dividends, false);
  std::string all;
  for (int32_t d : dividends) all += fmt::format("{}fg_div_corrected_ok(v{})", all.empty() ? "" : " && ", d);
  s += fmt::format("  return {};\n}}\n", all);
  ProgramEmitter fast = em;
  fast.fast_div = true;
  s += fmt::format("__device__ __forceinline__ float {}{}{}) {{\n", name, params, dscore ? ", float* dscore" : "");
  s += elem_body(fast, sp, outputs, false);
  if (dscore) s += fmt::format("  *dscore = v{};\n", outputs[1]);
  s += fmt::format("  return v{};\n}}\n", outputs[0]);
  return s;
}

// fg_score_elem_dscore's parameters in precision T ("T" for the primary template).
std::string score_dscore_params(const std::string& T) {
  return fmt::format("({0} score, const FgScoreRow<{0}>& r, const FgScoreCol<{0}>& c, int b, int h, int q, int kv, "
                     "const FgModArgs& a, {0}* dscore)", T);
}

// fg_score_elem_dscore from the merged program `m` (ScoreModBackward::value_and_dscore, split as the
// fg_score parts were): one pass computes both outputs, sharing their common subexpressions.
std::string score_dscore_functions(const ProgramEmitter& em, const SplitProgram& sp) {
  const ModProgram& m = em.p;
  std::string s;
  const int32_t score_out = m.outputs()[0], dscore_out = m.outputs()[1];
  for (bool dbl : {false, true}) {
    const std::string T = type_name(VK::Float, dbl);
    s += fmt::format("template <> __device__ __forceinline__ {0} fg_score_elem_dscore<{0}>{1} {{\n", T,
                     score_dscore_params(T));
    s += elem_body(em, sp, {score_out, dscore_out}, dbl);
    s += fmt::format("  *dscore = ({})v{};\n  return ({})v{};\n}}\n", T, dscore_out, T, score_out);
  }
  return s;
}

// ---- The affine form (affine_score.h) under approx_math, for the tensor-core kernels to fold its factors into their
// own constants:
//   #define FG_SCORE_AFFINE 0|1
//   #define FG_SCORE_IN_FACTOR, FG_SCORE_OUT_FACTOR   (double literals)
//   #define FG_SCORE_CORE_LO, FG_SCORE_CORE_HI        bounds of core(x) for every x (float_ranges.h), where they are
//                                                    finite and out_factor (hi - lo) log2 e <= 64
//   __device__ float fg_score_core(float x, int b, int h, int q, int kv, const FgModArgs& a);   core(x)
//   backward modules: __device__ float fg_score_core_dscore(float x, ..., float* dscore);
//     core(x), and *dscore = out_factor in_factor core'(x): d score_mod / d score, as fg_score_elem_dscore's
// Taken where the score_mod has the form, its scaled score may be approximated (approx_exact_needed: not floored,
// compared or cast), the core's element function reads no row or column part and nothing that can fail (so it needs
// no FgScoreRow / FgScoreCol of its own and may be evaluated for every entry), and, in a backward module, the
// derivative is not constant (the merged element step, which the folding serves) and no capture takes a gradient
// (whose terms read the pre-mod score). `no_cap_grad`: this module computes no capture-gradient term.
std::string affine_functions(const CudaModsInput& in, bool no_cap_grad, CudaModsFacts& facts) {
  const ScoreModBackward* g = in.score_grad;
  std::optional<AffineScoreForm> form;
  if (in.approx_math && in.score_mod && (g == nullptr || (!g->dscore_is_constant && no_cap_grad))) {
    form = affine_score_form(*in.score_mod);
    if (form && form->scaled_score >= 0 && approx_exact_needed(*in.score_mod)[static_cast<size_t>(form->scaled_score)])
      form.reset();
  }
  std::optional<ScoreModBackward> core_grad;
  const ModProgram* core = nullptr;  // the core, with its derivative as output 1 in a backward module
  if (form) {
    if (g != nullptr) core_grad = derive_score_mod(form->core);
    core = core_grad ? &core_grad->value_and_dscore : &form->core;
    std::vector<int32_t> outs = core->outputs();
    const SplitProgram sp = split_program(*core, outs);
    if (!sp.row_out.empty() || !sp.col_out.empty() || elem_has_effects(*core, sp, outs)) form.reset();
  }
  if (!form) return "#define FG_SCORE_AFFINE 0\n";
  facts.affine_form = true;
  std::string s = fmt::format("// affine form: score_mod(s) = {} * core({} * s), core(score) = {}\n", form->out_factor,
                              form->in_factor, form->core.to_string());
  s += fmt::format("#define FG_SCORE_AFFINE 1\n#define FG_SCORE_IN_FACTOR {}\n#define FG_SCORE_OUT_FACTOR {}\n",
                   float_literal(form->in_factor, true), float_literal(form->out_factor, true));
  // The core's bounds over every input that is not NaN (float_ranges.h: softcap's tanh [-1, 1], 0.5 tanh(x) + 0.5
  // [0, 1]), where they are finite and the modified scores' span out_factor (hi - lo) is at most 64 / log2 e
  // (softcap's cap up to 22): the tensor-core forward's bounded max (flex_forward_common.cuh) then keeps every kept
  // entry's P at or above 2^-64.
  const FloatRange range = float_ranges(form->core)[static_cast<size_t>(form->core.output())];
  if (range.finite() && form->out_factor * (range.hi - range.lo) * 1.4426950408889634 <= 64.0) {
    facts.core_bounded = true;
    s += fmt::format("#define FG_SCORE_CORE_LO {}\n#define FG_SCORE_CORE_HI {}\n", float_literal(range.lo, true),
                     float_literal(range.hi, true));
  }
  const ProgramEmitter em(*core, {}, /*approx_math=*/true);
  const char* sig = "float score, int b, int h, int q, int kv, const FgModArgs& a";
  const int32_t value = core->outputs()[0];
  if (core_grad) {
    // FG_SCORE_CORE_DSCORE_FINITE: as FG_DSCORE_FINITE below, of the core's derivative.
    facts.core_dscore_finite = dscore_needs_no_zero_test(core_grad->value_and_dscore);
    s += fmt::format("#define FG_SCORE_CORE_DSCORE_FINITE {}\n", facts.core_dscore_finite ? 1 : 0);
    s += fmt::format("__device__ __forceinline__ float fg_score_core_dscore({}, float* dscore) {{\n", sig);
    s += emit_body(em, core->live(core->outputs()), false);
    const int32_t d = core->outputs()[1];
    const double f = form->out_factor * form->in_factor;
    s += f == 1.0 ? fmt::format("  *dscore = v{};\n", d)
                  : fmt::format("  *dscore = v{} * {};\n", d, float_literal(f, false));
    s += fmt::format("  return v{};\n}}\n", value);
  } else {
    s += fmt::format("__device__ __forceinline__ float fg_score_core({}) {{\n", sig);
    s += emit_body(em, core->live({value}), false);
    s += fmt::format("  return v{};\n}}\n", value);
  }
  return s;
}

}  // namespace

std::string emit_cuda_mods(const CudaModsInput& in) { return emit_cuda_mods_and_facts(in).text; }

CudaMods emit_cuda_mods_and_facts(const CudaModsInput& in) {
  CudaMods out;
  CudaModsFacts& facts = out.facts;
  std::string& s = out.text;
  s = "// ---- generated by fg::emit_cuda_mods (attention/mod_codegen.cpp)\n";
  if (in.score_mod) {
    FG_CHECK(in.score_mod->type() == ModProgram::Type::Score, ValueError,
             "emit_cuda_mods: score_mod is not a score_mod program");
    s += "// score_mod: " + in.score_mod->to_string() + "\n";
  }
  if (in.mask_mod) {
    FG_CHECK(in.mask_mod->type() == ModProgram::Type::Mask, ValueError,
             "emit_cuda_mods: mask_mod is not a mask_mod program");
    s += "// mask_mod: " + in.mask_mod->to_string() + "\n";
  }

  // ---- score_mod: split into row / column / element functions; fg_score_mod composes them. With a
  // derivative that depends on the element, the parts come from the merged program (value_and_dscore,
  // whose output 0 is the forward's instructions in the forward's order, so fg_score_elem is unchanged):
  // its row / column parts then also carry what d score_mod / d score needs, for fg_score_elem_dscore.
  const ScoreModBackward* g = in.score_grad;
  const bool merged = in.score_mod && g && !g->dscore_is_constant;
  const ModProgram* score_prog = merged ? &g->value_and_dscore : in.score_mod;
  std::vector<int> score_prog_slots;
  SplitProgram score_split;
  std::optional<ProgramEmitter> score_em;  // the score program's, shared by its split and its fg_score_elem_dscore
  s += fmt::format("#define FG_HAS_SCORE_MOD {}\n", in.score_mod ? 1 : 0);
  if (in.score_mod) {
    const std::vector<int> fwd_slots = identity_slots(in.score_slots, in.score_mod->captures().size());
    if (merged) {
      FG_CHECK(score_prog->outputs().size() == 2, ValueError,
               "emit_cuda_mods: score_grad has no merged score / d score program (make it with derive_score_mod)");
      for (const CaptureRef& c : score_prog->captures()) {  // the forward's captures, by tensor identity
        int at = -1;
        for (size_t i = 0; i < in.score_mod->captures().size(); ++i)
          if (in.score_mod->captures()[i].tensor.impl() == c.tensor.impl()) at = fwd_slots[i];
        FG_CHECK(at >= 0, ValueError, "emit_cuda_mods: score_grad reads '{}', which the score_mod does not "
                 "(score_grad is not derived from this score_mod)", c.name);
        score_prog_slots.push_back(at);
      }
    } else {
      score_prog_slots = fwd_slots;
    }
    std::vector<int32_t> split_outs = {score_prog->output()};
    if (merged) split_outs.push_back(score_prog->outputs()[1]);
    score_split = split_program(*score_prog, split_outs);
    score_em.emplace(*score_prog, score_prog_slots, in.approx_math, in.const_division);
    s += split_functions("fg_score", "FgScoreRow", "FgScoreCol", "T", *score_em, score_split, score_prog->output());
    // FG_SCORE_ELEM_PURE: fg_score_elem and fg_score_elem_dscore (the element part of every output split for)
    // read nothing and cannot fail, so the backward's element step may evaluate them for every entry and select.
    const bool elem_pure = !elem_has_effects(*score_prog, score_split, split_outs);
    s += fmt::format("#define FG_SCORE_ELEM_PURE {}\n", elem_pure ? 1 : 0);
    s += fast_elem_functions(*score_em, score_split, {score_prog->output()}, elem_pure, false);
    s += merged ? fast_elem_functions(*score_em, score_split, split_outs, elem_pure, true)
                : std::string("#define FG_SCORE_ELEM_DSCORE_FAST 0\n");
  } else {
    s += "#define FG_SCORE_ELEM_PURE 1\n#define FG_SCORE_ELEM_FAST 0\n#define FG_SCORE_ELEM_DSCORE_FAST 0\n";
    s += "template <class T> struct FgScoreRow {};\ntemplate <class T> struct FgScoreCol {};\n"
         "template <class T> __device__ __forceinline__ FgScoreRow<T> fg_score_row(int, int, int, const FgModArgs&) { return {}; }\n"
         "template <class T> __device__ __forceinline__ FgScoreCol<T> fg_score_col(int, int, int, const FgModArgs&) { return {}; }\n"
         "template <class T> __device__ __forceinline__ T fg_score_elem(T score, const FgScoreRow<T>&, const FgScoreCol<T>&, int, "
         "int, int, int, const FgModArgs&) { return score; }\n";
  }
  s += fmt::format("template <class T> __device__ __forceinline__ T fg_score_mod{} {{\n"
                   "  return fg_score_elem<T>(score, fg_score_row<T>(b, h, q, a), fg_score_col<T>(b, h, kv, a), b, h, q, kv, a);\n}}\n",
                   kScoreSig);

  // ---- mask_mod: fg_mask_mod_t<T> computes any float parts in T; fg_mask_mod is the float one (as the
  // CPU's BlockMask construction); a float64 kernel may call fg_mask_mod_t<double> to match the CPU's
  // float64 path.
  s += fmt::format("#define FG_HAS_MASK_MOD {}\n", in.mask_mod ? 1 : 0);
  if (in.mask_mod) {
    const SplitProgram msp = split_program(*in.mask_mod, {in.mask_mod->output()});
    const ProgramEmitter mask_em(*in.mask_mod, identity_slots(in.mask_slots, in.mask_mod->captures().size()),
                                 in.approx_math, in.const_division);
    s += split_functions("fg_mask", "FgMaskRow", "FgMaskCol", "bool", mask_em, msp, in.mask_mod->output());
    // FG_MASK_ELEM_PURE: fg_mask_elem reads nothing and cannot fail, so the backward's element steps evaluate it for
    // every entry and select (predicated code; a guarded call made ptxas branch around each entry).
    facts.mask_elem_pure = !elem_has_effects(*in.mask_mod, msp, {in.mask_mod->output()});
    s += fmt::format("#define FG_MASK_ELEM_PURE {}\n", facts.mask_elem_pure ? 1 : 0);
    // FG_MASK_READS_CAPTURES: the mask reads captured tensors (document ids, lengths, tables); the forward's
    // bounds-free mask step is chosen by it (flex_forward_common.cuh).
    s += fmt::format("#define FG_MASK_READS_CAPTURES {}\n", in.mask_mod->captures().empty() ? 0 : 1);
  } else {
    s += "#define FG_MASK_ELEM_PURE 1\n#define FG_MASK_READS_CAPTURES 0\n";
    s += "template <class T> struct FgMaskRow {};\ntemplate <class T> struct FgMaskCol {};\n"
         "template <class T> __device__ __forceinline__ FgMaskRow<T> fg_mask_row(int, int, int, const FgModArgs&) { return {}; }\n"
         "template <class T> __device__ __forceinline__ FgMaskCol<T> fg_mask_col(int, int, int, const FgModArgs&) { return {}; }\n"
         "template <class T> __device__ __forceinline__ bool fg_mask_elem(const FgMaskRow<T>&, const FgMaskCol<T>&, int, int, "
         "int, int, const FgModArgs&) { return true; }\n";
  }
  s += fmt::format("template <class T> __device__ __forceinline__ bool fg_mask_mod_t{} {{\n"
                   "  return fg_mask_elem<T>(fg_mask_row<T>(b, h, q, a), fg_mask_col<T>(b, h, kv, a), b, h, q, kv, a);\n}}\n",
                   kMaskSig);
  s += fmt::format("__device__ __forceinline__ bool fg_mask_mod{} {{ return fg_mask_mod_t<float>(b, h, q, kv, a); }}\n",
                   kMaskSig);

  // ---- d score_mod / d score
  const bool dconst = g == nullptr || g->dscore_is_constant;
  const double dvalue = g == nullptr ? 1.0 : g->dscore_constant;
  s += fmt::format("#define FG_DSCORE_IS_CONSTANT {}\n", dconst ? 1 : 0);
  if (dconst) s += fmt::format("#define FG_DSCORE_CONSTANT {}\n", float_literal(dvalue, true));
  // FG_DSCORE_FINITE: a varying derivative that is finite for every score but NaN, where the score_mod is NaN when
  // the score is (float_ranges.h): the backward's element step multiplies dS by it without testing dS for zero.
  facts.dscore_finite = merged && dscore_needs_no_zero_test(g->value_and_dscore);
  s += fmt::format("#define FG_DSCORE_FINITE {}\n", facts.dscore_finite ? 1 : 0);
  s += fmt::format("template <class T> __device__ __forceinline__ T fg_dscore{}", kScoreSig);
  // Kernel slots by tensor identity: a gradient term's capture (an index into ScoreModBackward::captures,
  // the forward's list) may be absent from the derivative program (`score + bias[h]` has derivative 1).
  std::vector<int> prog_slots;
  std::vector<std::pair<const TensorImpl*, int>> slot_by_tensor;
  auto note = [&](const std::vector<CaptureRef>& caps, const std::vector<int>& slots) {
    for (size_t i = 0; i < caps.size(); ++i) slot_by_tensor.emplace_back(caps[i].tensor.impl(), slots[i]);
  };
  if (in.score_mod) note(in.score_mod->captures(), identity_slots(in.score_slots, in.score_mod->captures().size()));
  if (in.mask_mod) note(in.mask_mod->captures(), identity_slots(in.mask_slots, in.mask_mod->captures().size()));
  if (g) {
    if (in.grad_slots.empty()) {  // default: the position in the forward's capture list
      for (const CaptureRef& c : g->program.captures()) {
        int at = -1;
        for (size_t i = 0; i < g->captures.size(); ++i)
          if (g->captures[i].tensor.impl() == c.tensor.impl()) at = static_cast<int>(i);
        FG_CHECK(at >= 0, ValueError, "emit_cuda_mods: the derivative reads '{}', which the forward does not", c.name);
        prog_slots.push_back(at);
      }
    } else {
      prog_slots = identity_slots(in.grad_slots, g->program.captures().size());
    }
    note(g->program.captures(), prog_slots);
    if (!in.score_mod) note(g->captures, identity_slots({}, g->captures.size()));
  }
  auto kernel_slot = [&](const CaptureRef& c) {
    for (const auto& [impl, slot] : slot_by_tensor)
      if (impl == c.tensor.impl()) return slot;
    FG_FAIL(ValueError, "emit_cuda_mods: captured tensor '{}' needs a gradient but has no kernel slot (pass the "
            "score_mod or its slots)", c.name);
  };
  if (dconst) {
    s += " { return (T)FG_DSCORE_CONSTANT; }\n";
  } else {
    s += ";\n";
    s += specialisations("T", "fg_dscore", kScoreSig,
                         ProgramEmitter(g->program, prog_slots, in.approx_math, in.const_division),
                         g->program.outputs()[0]);
  }
  // ---- the modified score and d score_mod / d score of one element together (the backward's per-element
  // call); without a merged program it is fg_score_elem and the constant, or the identity and fg_dscore.
  s += fmt::format("template <class T> __device__ __forceinline__ T fg_score_elem_dscore{}", score_dscore_params("T"));
  if (merged) {
    s += ";\n" + score_dscore_functions(*score_em, score_split);
  } else if (in.score_mod) {
    s += " {\n  *dscore = (T)FG_DSCORE_CONSTANT;\n  return fg_score_elem<T>(score, r, c, b, h, q, kv, a);\n}\n";
  } else {
    s += " {\n  *dscore = fg_dscore<T>(score, b, h, q, kv, a);\n  return score;\n}\n";
  }

  std::vector<const CaptureGradTerm*> terms;  // the capture-gradient terms this module computes
  if (g)
    for (const CaptureGradTerm& t : g->terms)
      if (static_cast<size_t>(t.capture) < in.grad_needed.size() && in.grad_needed[t.capture]) terms.push_back(&t);

  s += affine_functions(in, terms.empty(), facts);

  // ---- capture gradients
  s += fmt::format("#define FG_HAS_CAP_GRAD {}\n", terms.empty() ? 0 : 1);
  const char* cap_sig = "(T score, T grad, int b, int h, int q, int kv, const FgModArgs& a, const Sink& sink)";
  s += "// sink.add(kernel capture slot, row-major linear index into that capture, grad * d score_mod / d capture)\n";
  if (terms.empty()) {
    s += fmt::format("template <class T, class Sink> __device__ __forceinline__ void fg_cap_grad{} {{}}\n", cap_sig);
    return out;
  }
  std::vector<int32_t> outs;
  for (const CaptureGradTerm* t : terms) {
    for (int32_t d = 0; d < t->ndim; ++d) outs.push_back(g->program.outputs()[t->index_output + d]);
    outs.push_back(g->program.outputs()[t->deriv_output]);
  }
  const std::vector<char> live = g->program.live(outs);
  const ProgramEmitter grad_em(g->program, prog_slots, in.approx_math, in.const_division);
  for (bool dbl : {false, true}) {  // one overload per precision; the template below picks by T
    s += fmt::format(
        "template <class Sink> __device__ __forceinline__ void fg_cap_grad_impl({0} score, {0} grad, int b, int h, "
        "int q, int kv, const FgModArgs& a, const Sink& sink) {{\n",
        type_name(VK::Float, dbl));
    s += emit_body(grad_em, live, dbl);
    for (const CaptureGradTerm* t : terms) {
      const int slot = kernel_slot(g->captures[t->capture]);
      s += "  {\n    fg_i64 lin = 0;\n";
      for (int32_t d = 0; d < t->ndim; ++d)
        s += fmt::format("    lin = lin * a.caps[{0}].sizes[{1}] + fg_wrap_index(a, {0}, {1}, v{2});\n", slot, d,
                         g->program.outputs()[t->index_output + d]);
      s += fmt::format("    sink.add({}, lin, (double)grad * (double)v{});  // d / d {}\n  }}\n", slot,
                       g->program.outputs()[t->deriv_output], g->captures[t->capture].name);
    }
    s += "}\n";
  }
  s += fmt::format(
      "template <class T, class Sink> __device__ __forceinline__ void fg_cap_grad{} {{\n"
      "  fg_cap_grad_impl<Sink>(score, grad, b, h, q, kv, a, sink);\n}}\n",
      cap_sig);
  return out;
}

}  // namespace fg
