// emit_cuda_mods (see mod_codegen.h): each SSA instruction becomes one `const TYPE vN = ...;` line,
// spelled by the op table (attention/op_semantics.h). Float code is emitted twice, as explicit
// specialisations for float and for double, so each precision gets its own precise math functions
// (expf / exp, ...) exactly as the CPU evaluators use them.
#include "attention/mod_codegen.h"

#include <bit>
#include <cmath>

#include "attention/op_semantics.h"

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

std::string int_literal(int64_t v) {
  if (v == INT64_MIN) return "((fg_i64)0x8000000000000000ULL)";
  return fmt::format("((fg_i64){}LL)", v);
}

// Instructions that `outputs` need (transitively).
std::vector<char> live_set(const ModProgram& p, const std::vector<int32_t>& outputs) {
  std::vector<char> live(p.size(), 0);
  for (int32_t o : outputs) live[o] = 1;
  for (int32_t i = static_cast<int32_t>(p.size()) - 1; i >= 0; --i)
    if (live[i])
      for (int32_t a : p.instrs()[i].args) live[a] = 1;
  return live;
}

// The statements computing the live instructions of `p`; value i is named v<i>. `slots` maps the
// program's capture slots to the kernel's FgModArgs slots.
std::string emit_body(const ModProgram& p, const std::vector<char>& live, const std::vector<int>& slots, bool dbl) {
  std::string s;
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
        if (in.kind == VK::Float)
          expr = fmt::format("(({})fg_cap_load_f(a.caps[{}], o{}))", type_name(VK::Float, dbl), slot, i);
        else if (in.kind == VK::Int)
          expr = fmt::format("fg_cap_load_i(a.caps[{}], o{})", slot, i);
        else
          expr = fmt::format("(fg_cap_load_i(a.caps[{}], o{}) != 0)", slot, i);
        break;
      }
      default: {
        std::vector<std::string> args;
        for (int32_t x : in.args) args.push_back(v(x));
        const VK operand = ins[in.args[in.op == ExprOp::Where ? 1 : 0]].kind;
        expr = cuda_spelling(in.op, in.kind, operand, dbl, args);
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
std::string specialisations(const char* ret_t, const char* name, const char* sig, const ModProgram& p, int32_t output,
                            const std::vector<int>& slots) {
  std::string s;
  const std::vector<char> live = live_set(p, {output});
  for (bool dbl : {false, true}) {
    const std::string T = type_name(VK::Float, dbl);
    std::string params = sig;
    for (size_t at; (at = params.find("T score")) != std::string::npos;) params.replace(at, 1, T);
    const std::string ret = std::string(ret_t) == "T" ? T : ret_t;
    s += fmt::format("template <> __device__ __forceinline__ {} {}<{}>{} {{\n", ret, name, T, params);
    s += emit_body(p, live, slots, dbl);
    s += fmt::format("  return ({})v{};\n}}\n", ret, output);
  }
  return s;
}

}  // namespace

std::string emit_cuda_mods(const CudaModsInput& in) {
  std::string s = "// ---- generated by fg::emit_cuda_mods (attention/mod_codegen.cpp)\n";
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

  // ---- score_mod
  s += fmt::format("#define FG_HAS_SCORE_MOD {}\n", in.score_mod ? 1 : 0);
  s += fmt::format("template <class T> __device__ __forceinline__ T fg_score_mod{}", kScoreSig);
  if (in.score_mod) {
    s += ";\n";
    s += specialisations("T", "fg_score_mod", kScoreSig, *in.score_mod, in.score_mod->output(),
                         identity_slots(in.score_slots, in.score_mod->captures().size()));
  } else {
    s += " { return score; }\n";
  }

  // ---- mask_mod: fg_mask_mod_t<T> computes any float parts in T; fg_mask_mod is the float one (as the
  // CPU's BlockMask construction); a float64 kernel may call fg_mask_mod_t<double> to match the CPU's
  // float64 path.
  s += fmt::format("#define FG_HAS_MASK_MOD {}\n", in.mask_mod ? 1 : 0);
  s += fmt::format("template <class T> __device__ __forceinline__ bool fg_mask_mod_t{}", kMaskSig);
  if (in.mask_mod) {
    s += ";\n";
    s += specialisations("bool", "fg_mask_mod_t", kMaskSig, *in.mask_mod, in.mask_mod->output(),
                         identity_slots(in.mask_slots, in.mask_mod->captures().size()));
  } else {
    s += " { return true; }\n";
  }
  s += fmt::format("__device__ __forceinline__ bool fg_mask_mod{} {{ return fg_mask_mod_t<float>(b, h, q, kv, a); }}\n",
                   kMaskSig);

  // ---- d score_mod / d score
  const ScoreModBackward* g = in.score_grad;
  const bool dconst = g == nullptr || g->dscore_is_constant;
  const double dvalue = g == nullptr ? 1.0 : g->dscore_constant;
  s += fmt::format("#define FG_DSCORE_IS_CONSTANT {}\n", dconst ? 1 : 0);
  if (dconst) s += fmt::format("#define FG_DSCORE_CONSTANT {}\n", float_literal(dvalue, true));
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
    s += specialisations("T", "fg_dscore", kScoreSig, g->program, g->program.outputs()[0], prog_slots);
  }

  // ---- capture gradients
  std::vector<const CaptureGradTerm*> terms;
  if (g)
    for (const CaptureGradTerm& t : g->terms)
      if (static_cast<size_t>(t.capture) < in.grad_needed.size() && in.grad_needed[t.capture]) terms.push_back(&t);
  s += fmt::format("#define FG_HAS_CAP_GRAD {}\n", terms.empty() ? 0 : 1);
  const char* cap_sig = "(T score, T grad, int b, int h, int q, int kv, const FgModArgs& a, const Sink& sink)";
  s += "// sink.add(kernel capture slot, row-major linear index into that capture, grad * d score_mod / d capture)\n";
  if (terms.empty()) {
    s += fmt::format("template <class T, class Sink> __device__ __forceinline__ void fg_cap_grad{} {{}}\n", cap_sig);
    return s;
  }
  std::vector<int32_t> outs;
  for (const CaptureGradTerm* t : terms) {
    for (int32_t d = 0; d < t->ndim; ++d) outs.push_back(g->program.outputs()[t->index_output + d]);
    outs.push_back(g->program.outputs()[t->deriv_output]);
  }
  const std::vector<char> live = live_set(g->program, outs);
  for (bool dbl : {false, true}) {  // one overload per precision; the template below picks by T
    s += fmt::format(
        "template <class Sink> __device__ __forceinline__ void fg_cap_grad_impl({0} score, {0} grad, int b, int h, "
        "int q, int kv, const FgModArgs& a, const Sink& sink) {{\n",
        type_name(VK::Float, dbl));
    s += emit_body(g->program, live, prog_slots, dbl);
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
  return s;
}

}  // namespace fg
