// Lowering, folding, CSE, printing, hashing and scalar evaluation of ModPrograms.
#include "flexgrad/attention/mod_program.h"

#include "flexgrad/attention/op_semantics.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <unordered_map>

namespace fg {

// ---------------------------------------------------------------- scalar semantics

// Thin wrappers over the op table (attention/op_semantics.h), kept for callers that work on plain numbers.
int64_t py_floordiv(int64_t a, int64_t b) {
  if (b == 0) throw_int_division_by_zero(ExprOp::FloorDiv, a);
  return sem::floordiv_nz(a, b);
}

int64_t py_mod(int64_t a, int64_t b) {
  if (b == 0) throw_int_division_by_zero(ExprOp::Mod, a);
  return sem::mod_nz(a, b);
}

double py_fmod(double a, double b) { return sem::mod_f(a, b); }

int64_t int_pow(int64_t a, int64_t b) {
  if (b < 0) throw_negative_int_power(a, b);
  return sem::pow_nn(a, b);
}

double apply_scalar(ExprOp op, ValueKind kind, ValueKind ok, const double* x) {
  const OpInfo& r = op_info(op);
  FG_CHECK(r.eval != nullptr, ValueError, "apply_scalar: {} is not an operation", r.name);
  ScalarValue v[3];
  const int n = r.arity;
  for (int i = 0; i < n; ++i) {
    const ValueKind k = (op == ExprOp::Where && i == 0) ? ValueKind::Bool : ok;
    v[i] = k == ValueKind::Float ? ScalarValue::of_float(x[i]) : ScalarValue::of_int(sem::to_int(x[i]));
  }
  return r.eval(kind, ok, v).as_double(kind);
}

// ---------------------------------------------------------------- builder

namespace {
uint8_t leaf_bit(ExprOp op) {
  switch (op) {
    case ExprOp::Score: return kUsesScore;
    case ExprOp::Batch: return kUsesBatch;
    case ExprOp::Head: return kUsesHead;
    case ExprOp::QIdx: return kUsesQ;
    case ExprOp::KVIdx: return kUsesKV;
    default: return 0;
  }
}
bool is_leaf_input(ExprOp op) { return leaf_bit(op) != 0; }
Instr make_instr(ExprOp op, ValueKind kind) {
  Instr in;
  in.op = op;
  in.kind = kind;
  return in;
}

std::string cse_key(const Instr& in) {
  std::string k;
  auto put = [&](const void* p, size_t n) { k.append(static_cast<const char*>(p), n); };
  put(&in.op, 1);
  put(&in.kind, 1);
  put(&in.capture, 4);
  put(&in.ivalue, 8);
  put(&in.value, 8);
  std::vector<int32_t> a = in.args;
  const bool commutative = in.op == ExprOp::Add || in.op == ExprOp::Mul || in.op == ExprOp::Min ||
                           in.op == ExprOp::Max || in.op == ExprOp::Eq || in.op == ExprOp::Ne ||
                           in.op == ExprOp::And || in.op == ExprOp::Or;
  if (commutative && a[0] > a[1]) std::swap(a[0], a[1]);
  put(a.data(), a.size() * 4);
  return k;
}
}  // namespace

ProgramBuilder::ProgramBuilder(std::vector<CaptureRef> captures) : captures_(std::move(captures)) {
  for (auto& c : captures_) capture_ids_.push_back(c.tensor.impl());
}

double ProgramBuilder::const_value(int32_t id) const {
  const Instr& in = instrs_[id];
  return in.kind == ValueKind::Float ? in.value : static_cast<double>(in.ivalue);
}

int32_t ProgramBuilder::push(Instr in) {
  if (is_leaf_input(in.op)) in.deps = leaf_bit(in.op);
  for (int32_t a : in.args) in.deps |= instrs_[a].deps;
  // CSE by hash-consing: an identical instruction already emitted is reused.
  std::string key = cse_key(in);
  auto it = cse_.find(key);
  if (it != cse_.end()) {
    if (!in.implicit && instrs_[it->second].op == ExprOp::Cast) instrs_[it->second].implicit = false;
    return it->second;
  }
  instrs_.push_back(std::move(in));
  int32_t id = static_cast<int32_t>(instrs_.size() - 1);
  cse_.emplace(std::move(key), id);
  return id;
}

int32_t ProgramBuilder::constant_float(double v) {
  Instr in = make_instr(ExprOp::Const, ValueKind::Float);
  in.value = v == 0 ? 0.0 * (std::signbit(v) ? -1 : 1) : v;
  return push(in);
}
int32_t ProgramBuilder::constant_int(int64_t v) {
  Instr in = make_instr(ExprOp::Const, ValueKind::Int);
  in.ivalue = v;
  return push(in);
}
int32_t ProgramBuilder::constant_bool(bool v) {
  Instr in = make_instr(ExprOp::Const, ValueKind::Bool);
  in.ivalue = v;
  return push(in);
}
int32_t ProgramBuilder::input(ExprOp leaf) {
  FG_ASSERT(is_leaf_input(leaf));
  Instr in = make_instr(leaf, leaf == ExprOp::Score ? ValueKind::Float : ValueKind::Int);
  return push(in);
}

int32_t ProgramBuilder::capture_slot(const std::shared_ptr<CaptureRef>& ref) {
  for (size_t i = 0; i < capture_ids_.size(); ++i)
    if (capture_ids_[i] == ref->tensor.impl()) return static_cast<int32_t>(i);
  captures_.push_back(*ref);
  capture_ids_.push_back(ref->tensor.impl());
  if (captures_.back().name.empty()) captures_.back().name = fmt::format("cap{}", captures_.size() - 1);
  return static_cast<int32_t>(captures_.size() - 1);
}

int32_t ProgramBuilder::index(int32_t slot, std::vector<int32_t> indices) {
  const Tensor& t = captures_.at(slot).tensor;
  FG_ASSERT(static_cast<int64_t>(indices.size()) == t.dim());
  Instr in = make_instr(ExprOp::Index,
           is_floating(t.dtype()) ? ValueKind::Float : t.dtype() == kBool ? ValueKind::Bool : ValueKind::Int);
  in.capture = slot;
  for (int32_t& i : indices) {
    i = cast(i, ValueKind::Int);
    // A constant index is checked at trace time, not per tile (Python rules: [-n, n) is valid).
    if (is_const(i)) {
      const int64_t d = static_cast<int64_t>(&i - indices.data());
      const int64_t v = instrs_[i].ivalue;
      FG_CHECK(v >= -t.size(d) && v < t.size(d), IndexError,
               "flex_attention mod: constant index {} is out of range for dim {} of captured tensor '{}' of shape {}",
               v, d, captures_[slot].name, shape_str(t.sizes()));
    }
  }
  in.args = std::move(indices);
  return push(in);
}

int32_t ProgramBuilder::cast(int32_t x, ValueKind to, bool implicit) {
  if (instrs_[x].kind == to) return x;
  return emit(ExprOp::Cast, to, {x}, implicit);
}

int32_t ProgramBuilder::emit(ExprOp op, ValueKind kind, std::vector<int32_t> args, bool implicit) {
  using VK = ValueKind;
  const int arity = expr_op_arity(op);
  FG_ASSERT(arity > 0 && static_cast<int>(args.size()) == arity);
  const VK operand_kind = instrs_[args[op == ExprOp::Where ? 1 : 0]].kind;
  auto make_const = [&](VK k, double v) {
    return k == VK::Float ? constant_float(v) : k == VK::Int ? constant_int(static_cast<int64_t>(v))
                                                             : constant_bool(v != 0);
  };
  // ---- constant folding
  bool all_const = true;
  for (int32_t a : args) all_const = all_const && is_const(a);
  if (all_const) {  // exact: ints fold as int64, not through double
    ScalarValue v[3];
    for (size_t i = 0; i < args.size(); ++i) {
      const Instr& c = instrs_[args[i]];
      v[i] = c.kind == VK::Float ? ScalarValue::of_float(c.value) : ScalarValue::of_int(c.ivalue);
    }
    const ScalarValue r = eval_op(op, kind, operand_kind, v);
    return kind == VK::Float ? constant_float(r.f) : kind == VK::Int ? constant_int(r.i) : constant_bool(r.i != 0);
  }
  // ---- algebraic identities (exact in IEEE arithmetic, except the two constant reassociations below,
  //      which may differ by one rounding)
  auto is_c = [&](int32_t id, double v) { return is_const(id) && const_value(id) == v; };
  const int32_t a = args[0], b = args.size() > 1 ? args[1] : -1;
  switch (op) {
    case ExprOp::Add:
      if (is_c(b, 0) && kind == VK::Int) return a;
      if (is_c(a, 0) && kind == VK::Int) return b;
      // x + (-0.0) == x exactly; x + 0.0 differs only for x == -0.0 (irrelevant to attention).
      if (is_c(b, 0)) return a;
      if (is_c(a, 0)) return b;
      if (a == b) return emit(ExprOp::Mul, kind, {make_const(kind, 2), a});
      break;
    case ExprOp::Sub:
      if (is_c(b, 0)) return a;
      if (is_c(a, 0)) return emit(ExprOp::Neg, kind, {b});
      if (a == b && kind == VK::Int) return constant_int(0);
      break;
    case ExprOp::Mul:
      if (is_c(b, 1)) return a;
      if (is_c(a, 1)) return b;
      if (is_c(b, -1)) return emit(ExprOp::Neg, kind, {a});
      if (is_c(a, -1)) return emit(ExprOp::Neg, kind, {b});
      if (kind == VK::Int && (is_c(a, 0) || is_c(b, 0))) return constant_int(0);
      if (kind == VK::Float) {
        // c1 * (c2 * x) -> (c1*c2) * x and c * -x -> (-c) * x: keeps derivative chains short
        // (reassociating two constants changes the result by at most one rounding).
        const int32_t c = is_const(a) ? a : is_const(b) ? b : -1;
        const int32_t o = c == a ? b : a;
        if (c >= 0 && instrs_[o].op == ExprOp::Mul) {
          const int32_t ia = instrs_[o].args[0], ib = instrs_[o].args[1];
          if (is_const(ia)) return emit(ExprOp::Mul, kind, {constant_float(const_value(c) * const_value(ia)), ib});
          if (is_const(ib)) return emit(ExprOp::Mul, kind, {ia, constant_float(const_value(c) * const_value(ib))});
        }
        if (c >= 0 && instrs_[o].op == ExprOp::Neg)
          return emit(ExprOp::Mul, kind, {constant_float(-const_value(c)), instrs_[o].args[0]});
      }
      break;
    case ExprOp::Div:
      if (is_c(b, 1)) return a;
      // (c1 * x) / c2 -> (c1/c2) * x
      if (kind == VK::Float && is_const(b) && instrs_[a].op == ExprOp::Mul) {
        const int32_t ia = instrs_[a].args[0], ib = instrs_[a].args[1];
        if (is_const(ia)) return emit(ExprOp::Mul, kind, {constant_float(const_value(ia) / const_value(b)), ib});
        if (is_const(ib)) return emit(ExprOp::Mul, kind, {ia, constant_float(const_value(ib) / const_value(b))});
      }
      break;
    case ExprOp::Neg:
      if (instrs_[a].op == ExprOp::Neg) return instrs_[a].args[0];
      break;
    case ExprOp::Not:
      if (instrs_[a].op == ExprOp::Not) return instrs_[a].args[0];
      break;
    case ExprOp::And:
      if (is_const(a)) return const_value(a) != 0 ? b : a;
      if (is_const(b)) return const_value(b) != 0 ? a : b;
      if (a == b) return a;
      break;
    case ExprOp::Or:
      if (is_const(a)) return const_value(a) != 0 ? a : b;
      if (is_const(b)) return const_value(b) != 0 ? b : a;
      if (a == b) return a;
      break;
    case ExprOp::Min:
    case ExprOp::Max:
      if (a == b) return a;
      break;
    case ExprOp::Where:
      if (is_const(a)) return const_value(a) != 0 ? args[1] : args[2];
      if (args[1] == args[2]) return args[1];
      break;
    case ExprOp::Cast:
      // float -> int -> float etc. are not identities; only a cast to the same kind is.
      if (instrs_[a].kind == kind) return a;
      break;
    default:
      break;
  }
  Instr in = make_instr(op, kind);
  in.implicit = implicit;
  in.args = std::move(args);
  return push(in);
}

int32_t ProgramBuilder::reemit(const Instr& in, const std::vector<int32_t>& operand_map) {
  std::vector<int32_t> args;
  for (int32_t a : in.args) args.push_back(operand_map[a]);
  switch (in.op) {
    case ExprOp::Const:
      return in.kind == ValueKind::Float ? constant_float(in.value)
             : in.kind == ValueKind::Int ? constant_int(in.ivalue)
                                         : constant_bool(in.ivalue != 0);
    case ExprOp::Score: case ExprOp::Batch: case ExprOp::Head: case ExprOp::QIdx: case ExprOp::KVIdx:
      return input(in.op);
    case ExprOp::Index: return index(in.capture, std::move(args));
    case ExprOp::Cast: return cast(args[0], in.kind, in.implicit);
    default: return emit(in.op, in.kind, std::move(args), in.implicit);
  }
}

ModProgram ProgramBuilder::finish(std::vector<int32_t> outputs, std::vector<std::string> names,
                                  ModProgram::Type type) const {
  std::vector<char> live(instrs_.size(), 0);
  for (int32_t o : outputs) live[o] = 1;
  for (int32_t i = static_cast<int32_t>(instrs_.size()) - 1; i >= 0; --i)
    if (live[i]) for (int32_t a : instrs_[i].args) live[a] = 1;
  ModProgram p;
  std::vector<int32_t> remap(instrs_.size(), -1), cap_remap(captures_.size(), -1);
  for (size_t i = 0; i < instrs_.size(); ++i) {
    if (!live[i]) continue;
    Instr in = instrs_[i];
    for (int32_t& a : in.args) a = remap[a];
    if (in.op == ExprOp::Index) {
      if (cap_remap[in.capture] < 0) {
        cap_remap[in.capture] = static_cast<int32_t>(p.captures_.size());
        p.captures_.push_back(captures_[in.capture]);
      }
      in.capture = cap_remap[in.capture];
    }
    p.uses_ |= leaf_bit(in.op);
    remap[i] = static_cast<int32_t>(p.instrs_.size());
    p.instrs_.push_back(std::move(in));
  }
  for (int32_t o : outputs) p.outputs_.push_back(remap[o]);
  p.output_names_ = std::move(names);
  p.output_names_.resize(p.outputs_.size());
  p.type_ = type;
  return p;
}

// ---------------------------------------------------------------- lowering and tracing

namespace {
struct Lowerer {
  ProgramBuilder& pb;
  std::unordered_map<const ExprNode*, int32_t> memo;

  int32_t lower(const std::shared_ptr<const ExprNode>& n) {
    auto it = memo.find(n.get());
    if (it != memo.end()) return it->second;
    int32_t id = lower_node(*n);
    memo.emplace(n.get(), id);
    return id;
  }
  int32_t lower_node(const ExprNode& n) {
    switch (n.op) {
      case ExprOp::Const:
        return n.kind == ValueKind::Float ? pb.constant_float(n.value)
               : n.kind == ValueKind::Int ? pb.constant_int(n.ivalue)
                                          : pb.constant_bool(n.ivalue != 0);
      case ExprOp::Score: case ExprOp::Batch: case ExprOp::Head: case ExprOp::QIdx: case ExprOp::KVIdx:
        return pb.input(n.op);
      case ExprOp::Index: {
        std::vector<int32_t> idx;
        for (auto& a : n.args) idx.push_back(lower(a));
        return pb.index(pb.capture_slot(n.capture), std::move(idx));
      }
      case ExprOp::Cast:
        return pb.cast(lower(n.args[0]), n.kind, /*implicit=*/false);
      default: break;
    }
    std::vector<int32_t> args;
    std::vector<ValueKind> kinds;
    for (auto& a : n.args) {
      args.push_back(lower(a));
      kinds.push_back(a->kind);
    }
    if ((n.op == ExprOp::Floor || n.op == ExprOp::Ceil) && kinds[0] == ValueKind::Int) return args[0];
    OpKinds ok = infer_op_kinds(n.op, kinds);
    for (size_t i = 0; i < args.size(); ++i) {
      if (n.op == ExprOp::Where && i == 0) continue;  // the condition stays bool
      args[i] = pb.cast(args[i], ok.compute, /*implicit=*/true);
    }
    return pb.emit(n.op, ok.result, std::move(args));
  }
};
}  // namespace

ModProgram lower_expr(const Expr& e, ModProgram::Type type) {
  ProgramBuilder pb;
  Lowerer l{pb, {}};
  int32_t out = l.lower(e.node());
  if (type == ModProgram::Type::Score) out = pb.cast(out, ValueKind::Float, true);
  ModProgram p = pb.finish({out}, {type == ModProgram::Type::Score ? "score" : "mask"});
  p.type_ = type;
  return p;
}

ModProgram trace_score_mod(const ScoreMod& mod, const std::string& name) {
  FG_CHECK(static_cast<bool>(mod), ValueError, "{}: the callable is empty", name);
  Expr result = 0.0;
  try {
    result = mod(Expr::score(), Expr::batch(), Expr::head(), Expr::q_idx(), Expr::kv_idx());
  } catch (const std::exception& e) {
    FG_FAIL(ValueError, "{}: tracing failed, the callable threw: {}", name, e.what());
  }
  ModProgram p = lower_expr(result, ModProgram::Type::Score);
  FG_CHECK(result.kind() != ValueKind::Bool, ValueError,
           "{}: a score_mod must return a number (the modified score), but returned a bool expression `{}`"
           " (did you mean to pass it as a mask_mod?)", name, lower_expr(result, ModProgram::Type::Mask).to_string());
  return p;
}

ModProgram trace_mask_mod(const MaskMod& mod, const std::string& name) {
  FG_CHECK(static_cast<bool>(mod), ValueError, "{}: the callable is empty", name);
  Expr result = false;
  try {
    result = mod(Expr::batch(), Expr::head(), Expr::q_idx(), Expr::kv_idx());
  } catch (const std::exception& e) {
    FG_FAIL(ValueError, "{}: tracing failed, the callable threw: {}", name, e.what());
  }
  ModProgram p = lower_expr(result, ModProgram::Type::Mask);
  FG_CHECK(result.kind() == ValueKind::Bool, ValueError,
           "{}: a mask_mod must return a bool (true = attend), but returned a {} expression `{}`", name,
           value_kind_name(result.kind()), p.to_string());
  return p;
}

// ---------------------------------------------------------------- printing

namespace {
std::string format_float(double v) {
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  if (std::isnan(v)) return "nan";
  std::string s = fmt::format("{}", v);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}
int precedence(const Instr& in) {
  switch (in.op) {
    case ExprOp::Neg: case ExprOp::Not: return 90;
    case ExprOp::Mul: case ExprOp::Div: case ExprOp::FloorDiv: case ExprOp::Mod: return 80;
    case ExprOp::Add: case ExprOp::Sub: return 70;
    case ExprOp::Eq: case ExprOp::Ne: case ExprOp::Lt: case ExprOp::Le: case ExprOp::Gt: case ExprOp::Ge:
      return 60;
    case ExprOp::And: return 50;
    case ExprOp::Or: return 40;
    case ExprOp::Const:
      return (in.kind == ValueKind::Float ? in.value < 0 : in.kind == ValueKind::Int && in.ivalue < 0) ? 90 : 100;
    default: return 100;
  }
}
const char* infix(ExprOp op) {
  switch (op) {
    case ExprOp::Mul: return " * ";
    case ExprOp::Div: return " / ";
    case ExprOp::FloorDiv: return " // ";
    case ExprOp::Mod: return " % ";
    case ExprOp::Add: return " + ";
    case ExprOp::Sub: return " - ";
    case ExprOp::Eq: return " == ";
    case ExprOp::Ne: return " != ";
    case ExprOp::Lt: return " < ";
    case ExprOp::Le: return " <= ";
    case ExprOp::Gt: return " > ";
    case ExprOp::Ge: return " >= ";
    case ExprOp::And: return " & ";
    case ExprOp::Or: return " | ";
    default: return nullptr;
  }
}
}  // namespace

std::string ModProgram::to_string(size_t output) const {
  FG_CHECK(output < outputs_.size(), IndexError, "ModProgram::to_string: output {} of {}", output, outputs_.size());
  std::vector<std::string> s(instrs_.size());
  std::vector<int> prec(instrs_.size());
  for (size_t i = 0; i < instrs_.size(); ++i) {
    const Instr& in = instrs_[i];
    prec[i] = precedence(in);
    auto arg = [&](int k, int min_prec) {
      int32_t a = in.args[k];
      return prec[a] < min_prec ? "(" + s[a] + ")" : s[a];
    };
    switch (in.op) {
      case ExprOp::Const:
        s[i] = in.kind == ValueKind::Float ? format_float(in.value)
               : in.kind == ValueKind::Int ? fmt::format("{}", in.ivalue)
                                           : (in.ivalue ? "true" : "false");
        break;
      case ExprOp::Score: s[i] = "score"; break;
      case ExprOp::Batch: s[i] = "b"; break;
      case ExprOp::Head: s[i] = "h"; break;
      case ExprOp::QIdx: s[i] = "q_idx"; break;
      case ExprOp::KVIdx: s[i] = "kv_idx"; break;
      case ExprOp::Index:
        s[i] = captures_[in.capture].name;
        for (int32_t a : in.args) s[i] += "[" + s[a] + "]";
        break;
      case ExprOp::Neg: s[i] = std::string("-").append(arg(0, 91)); break;  // (append: GCC 12 -Wrestrict false positive)
      case ExprOp::Not: s[i] = std::string("!").append(arg(0, 91)); break;
      case ExprOp::Cast:
        if (in.implicit) {
          s[i] = s[in.args[0]];
          prec[i] = prec[in.args[0]];
        } else {
          s[i] = fmt::format("to_{}({})", value_kind_name(in.kind), s[in.args[0]]);
        }
        break;
      case ExprOp::Where:
        s[i] = fmt::format("where({}, {}, {})", s[in.args[0]], s[in.args[1]], s[in.args[2]]);
        break;
      default:
        if (const char* op = infix(in.op)) {
          s[i] = arg(0, prec[i]) + op + arg(1, prec[i] + 1);
        } else if (in.args.size() == 1) {
          s[i] = fmt::format("{}({})", expr_op_name(in.op), s[in.args[0]]);
        } else {
          s[i] = fmt::format("{}({}, {})", expr_op_name(in.op), s[in.args[0]], s[in.args[1]]);
        }
    }
  }
  return s[outputs_[output]];
}

std::string ModProgram::to_string_all() const {
  std::string r;
  for (size_t o = 0; o < outputs_.size(); ++o)
    r += fmt::format("{} = {}\n", output_names_[o].empty() ? fmt::format("out{}", o) : output_names_[o], to_string(o));
  return r;
}

// ---------------------------------------------------------------- hashing

namespace {
inline uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
  h *= 0xff51afd7ed558ccdULL;
  return h ^ (h >> 33);
}
}  // namespace

std::vector<char> ModProgram::live(const std::vector<int32_t>& outputs) const {
  std::vector<char> needed(instrs_.size(), 0);
  for (int32_t o : outputs) needed[static_cast<size_t>(o)] = 1;
  for (size_t i = instrs_.size(); i-- > 0;)
    if (needed[i])
      for (int32_t a : instrs_[i].args) needed[static_cast<size_t>(a)] = 1;
  return needed;
}

// The one walk over a program's structure that hash(), structurally_equal() and structure_key() derive from: every
// field, in one order, as 64-bit words to `word`, and with `spelling` the fields only the generated text reads
// (implicit casts, output and capture names; strings as their length and then `bytes`). The counts go first, so two
// different programs never give the same sequence.
template <class Word, class Bytes>
void ModProgram::walk_structure(bool spelling, Word&& word, Bytes&& bytes) const {
  word(static_cast<uint64_t>(type_));
  word(instrs_.size());
  for (const Instr& in : instrs_) {
    word((static_cast<uint64_t>(in.op) << 8) | static_cast<uint64_t>(in.kind));
    if (spelling) word(in.implicit ? 1 : 0);
    word(static_cast<uint64_t>(in.ivalue));
    word(std::bit_cast<uint64_t>(in.value));
    word(static_cast<uint64_t>(static_cast<int64_t>(in.capture)));
    word(in.args.size());
    for (int32_t a : in.args) word(static_cast<uint64_t>(a));
  }
  word(outputs_.size());
  for (int32_t o : outputs_) word(static_cast<uint64_t>(o));
  if (spelling) {
    for (const std::string& n : output_names_) {
      word(n.size());
      bytes(n);
    }
  }
  word(captures_.size());
  for (const CaptureRef& c : captures_) {
    word(static_cast<uint64_t>(c.tensor.dtype()));
    word(static_cast<uint64_t>(c.tensor.dim()));
    if (spelling) {
      word(c.name.size());
      bytes(c.name);
    }
  }
}

uint64_t ModProgram::hash() const {
  uint64_t h = 0x666c65786772ULL;
  walk_structure(false, [&h](uint64_t w) { h = mix(h, w); }, [](const std::string&) {});
  return h;
}

std::string ModProgram::structure_key() const {
  std::string k;
  walk_structure(
      true, [&k](uint64_t w) { k.append(reinterpret_cast<const char*>(&w), sizeof w); },
      [&k](const std::string& b) { k += b; });
  return k;
}

bool ModProgram::structurally_equal(const ModProgram& o) const {
  std::vector<uint64_t> a, b;
  walk_structure(false, [&a](uint64_t w) { a.push_back(w); }, [](const std::string&) {});
  o.walk_structure(false, [&b](uint64_t w) { b.push_back(w); }, [](const std::string&) {});
  return a == b;
}

// ---------------------------------------------------------------- scalar evaluation

[[noreturn]] void throw_capture_index_error(const CaptureRef& c, int64_t dim, int64_t index) {
  FG_FAIL(IndexError,
          "flex_attention mod: index {} is out of range for dim {} (size {}) of captured tensor '{}' of shape {}",
          index, dim, c.tensor.size(dim), c.name, shape_str(c.tensor.sizes()));
}

int64_t wrap_capture_index(const CaptureRef& c, int64_t dim, int64_t index) {
  const int64_t n = c.tensor.size(dim);
  const int64_t i = index < 0 ? index + n : index;
  if (i < 0 || i >= n) throw_capture_index_error(c, dim, index);
  return i;
}

namespace {
// Exact evaluation (ints as int64) through the op table; outputs are converted to double at the end.
struct ScalarVisitor {
  using Value = ScalarValue;
  const ModProgram& p;
  int64_t b, h, q, kv;
  double score;
  ScalarValue constant(const Instr& in) const {
    return in.kind == ValueKind::Float ? ScalarValue::of_float(in.value) : ScalarValue::of_int(in.ivalue);
  }
  ScalarValue input(ExprOp leaf) const {
    switch (leaf) {
      case ExprOp::Score: return ScalarValue::of_float(score);
      case ExprOp::Batch: return ScalarValue::of_int(b);
      case ExprOp::Head: return ScalarValue::of_int(h);
      case ExprOp::QIdx: return ScalarValue::of_int(q);
      default: return ScalarValue::of_int(kv);
    }
  }
  ScalarValue index(const Instr& in, const CaptureRef& c, std::vector<ScalarValue> idx) const {
    Shape at(idx.size());
    for (size_t d = 0; d < idx.size(); ++d) at[d] = wrap_capture_index(c, static_cast<int64_t>(d), idx[d].i);
    if (in.kind == ValueKind::Float) return ScalarValue::of_float(c.tensor.at(at));
    // A capture on another device is read through at() (a copy; ints exact up to 2^53).
    if (!c.tensor.is_cpu()) return ScalarValue::of_int(static_cast<int64_t>(c.tensor.at(at)));
    // ints exactly (int64 values beyond 2^53 must not go through double)
    int64_t off = 0;
    for (size_t d = 0; d < at.size(); ++d) off += at[d] * c.tensor.strides()[d];
    switch (c.tensor.dtype()) {
      case DType::Int64: return ScalarValue::of_int(static_cast<const int64_t*>(c.tensor.data_ptr())[off]);
      case DType::Int32: return ScalarValue::of_int(static_cast<const int32_t*>(c.tensor.data_ptr())[off]);
      case DType::Bool: return ScalarValue::of_bool(static_cast<const bool*>(c.tensor.data_ptr())[off]);
      default: FG_FAIL(DTypeError, "captured tensor '{}': unsupported dtype {}", c.name, c.tensor.dtype());
    }
  }
  ScalarValue apply(const Instr& in, std::vector<ScalarValue> args) const {
    const ValueKind ok = p.instrs()[in.args[in.op == ExprOp::Where ? 1 : 0]].kind;
    return eval_op(in.op, in.kind, ok, args.data());
  }
};
}  // namespace

std::vector<double> ModProgram::evaluate_all(int64_t b, int64_t h, int64_t q, int64_t kv, double score) const {
  ScalarVisitor v{*this, b, h, q, kv, score};
  std::vector<ScalarValue> r = evaluate_with(v);
  std::vector<double> out(r.size());
  for (size_t i = 0; i < r.size(); ++i) out[i] = r[i].as_double(instrs_[outputs_[i]].kind);
  return out;
}

std::vector<ScalarValue> ModProgram::evaluate_exact(int64_t b, int64_t h, int64_t q, int64_t kv, double score) const {
  ScalarVisitor v{*this, b, h, q, kv, score};
  return evaluate_with(v);
}

}  // namespace fg
