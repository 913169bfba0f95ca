// Expr construction: promotion rules and the operator overloads that record nodes.
#include "flexgrad/attention/expr.h"

#include <cmath>

#include "flexgrad/attention/op_semantics.h"

namespace fg {

const char* value_kind_name(ValueKind k) {
  switch (k) {
    case ValueKind::Bool: return "bool";
    case ValueKind::Int: return "int";
    case ValueKind::Float: return "float";
  }
  return "?";
}

// Names, arities and promotion rules come from the op table (attention/op_semantics.h).
const char* expr_op_name(ExprOp op) { return op_info(op).name; }
int expr_op_arity(ExprOp op) { return op_info(op).arity; }

namespace {
std::string kinds_str(const std::vector<ValueKind>& ks) {
  std::string s;
  for (size_t i = 0; i < ks.size(); ++i) s += (i ? ", " : "") + std::string(value_kind_name(ks[i]));
  return s;
}
bool any_float(const std::vector<ValueKind>& ks) {
  for (auto k : ks) if (k == ValueKind::Float) return true;
  return false;
}
}  // namespace

OpKinds infer_op_kinds(ExprOp op, const std::vector<ValueKind>& k) {
  using VK = ValueKind;
  auto bad = [&](const char* why) {
    FG_FAIL(ValueError, "flex_attention mod: {} is not defined for operands ({}): {}", expr_op_name(op),
            kinds_str(k), why);
  };
  const int arity = expr_op_arity(op);
  FG_CHECK(arity < 0 || static_cast<int>(k.size()) == arity, ValueError, "{}: expected {} operands, got {}",
           expr_op_name(op), arity, k.size());
  switch (op_info(op).kinds) {
    case KindRule::SameNumber:
      if (k[0] == VK::Bool) bad("a number is needed (use logical_not for bools, or compare first)");
      return {k[0], k[0]};
    case KindRule::Logical:
      for (VK x : k)
        if (x != VK::Bool) bad("logical ops combine bools (masks); compare first, e.g. x != 0");
      return {VK::Bool, VK::Bool};
    case KindRule::FloatMath:
    case KindRule::TrueDiv:
      return {VK::Float, VK::Float};
    case KindRule::Arithmetic: {
      // bools take part in arithmetic as 0/1 ints (as Python's True + True == 2).
      VK c = any_float(k) ? VK::Float : VK::Int;
      return {c, c};
    }
    case KindRule::Compare: {
      VK c = any_float(k) ? VK::Float
             : (k[0] == VK::Bool && k[1] == VK::Bool && (op == ExprOp::Eq || op == ExprOp::Ne)) ? VK::Bool
                                                                                                 : VK::Int;
      return {c, VK::Bool};
    }
    case KindRule::Select: {
      if (k[0] != VK::Bool) bad("the condition of where must be a bool");
      VK c = (k[1] == VK::Float || k[2] == VK::Float) ? VK::Float
             : (k[1] == VK::Bool && k[2] == VK::Bool) ? VK::Bool
                                                     : VK::Int;
      return {c, c};
    }
    default:
      FG_FAIL(ValueError, "infer_op_kinds: {} has no promotion rule", expr_op_name(op));
  }
}

namespace {
std::shared_ptr<ExprNode> leaf(ExprOp op, ValueKind kind) {
  auto n = std::make_shared<ExprNode>();
  n->op = op;
  n->kind = kind;
  return n;
}
}  // namespace

Expr::Expr(double v) {
  auto n = leaf(ExprOp::Const, ValueKind::Float);
  n->value = v;
  node_ = n;
}
Expr::Expr(long long v) {
  auto n = leaf(ExprOp::Const, ValueKind::Int);
  n->ivalue = v;
  n->value = static_cast<double>(v);
  node_ = n;
}
Expr::Expr(bool v) {
  auto n = leaf(ExprOp::Const, ValueKind::Bool);
  n->ivalue = v;
  n->value = v;
  node_ = n;
}
Expr Expr::score() { return Expr(std::shared_ptr<const ExprNode>(leaf(ExprOp::Score, ValueKind::Float))); }
Expr Expr::batch() { return Expr(std::shared_ptr<const ExprNode>(leaf(ExprOp::Batch, ValueKind::Int))); }
Expr Expr::head() { return Expr(std::shared_ptr<const ExprNode>(leaf(ExprOp::Head, ValueKind::Int))); }
Expr Expr::q_idx() { return Expr(std::shared_ptr<const ExprNode>(leaf(ExprOp::QIdx, ValueKind::Int))); }
Expr Expr::kv_idx() { return Expr(std::shared_ptr<const ExprNode>(leaf(ExprOp::KVIdx, ValueKind::Int))); }
Expr Expr::abs() const { return fg::abs(*this); }

Expr make_expr(ExprOp op, std::vector<Expr> args) {
  std::vector<ValueKind> kinds;
  for (const Expr& a : args) kinds.push_back(a.kind());
  OpKinds ok = infer_op_kinds(op, kinds);
  auto n = std::make_shared<ExprNode>();
  n->op = op;
  n->kind = ok.result;
  for (Expr& a : args) n->args.push_back(a.node());
  return Expr(std::shared_ptr<const ExprNode>(std::move(n)));
}

Expr operator+(const Expr& a, const Expr& b) { return make_expr(ExprOp::Add, {a, b}); }
Expr operator-(const Expr& a, const Expr& b) { return make_expr(ExprOp::Sub, {a, b}); }
Expr operator*(const Expr& a, const Expr& b) { return make_expr(ExprOp::Mul, {a, b}); }
Expr operator/(const Expr& a, const Expr& b) { return make_expr(ExprOp::Div, {a, b}); }
Expr operator%(const Expr& a, const Expr& b) { return make_expr(ExprOp::Mod, {a, b}); }
Expr operator-(const Expr& a) { return make_expr(ExprOp::Neg, {a}); }
Expr floor_div(const Expr& a, const Expr& b) { return make_expr(ExprOp::FloorDiv, {a, b}); }
Expr pow(const Expr& a, const Expr& b) { return make_expr(ExprOp::Pow, {a, b}); }
Expr min(const Expr& a, const Expr& b) { return make_expr(ExprOp::Min, {a, b}); }
Expr max(const Expr& a, const Expr& b) { return make_expr(ExprOp::Max, {a, b}); }
Expr clamp(const Expr& x, const Expr& lo, const Expr& hi) { return min(max(x, lo), hi); }
Expr operator==(const Expr& a, const Expr& b) { return make_expr(ExprOp::Eq, {a, b}); }
Expr operator!=(const Expr& a, const Expr& b) { return make_expr(ExprOp::Ne, {a, b}); }
Expr operator<(const Expr& a, const Expr& b) { return make_expr(ExprOp::Lt, {a, b}); }
Expr operator<=(const Expr& a, const Expr& b) { return make_expr(ExprOp::Le, {a, b}); }
Expr operator>(const Expr& a, const Expr& b) { return make_expr(ExprOp::Gt, {a, b}); }
Expr operator>=(const Expr& a, const Expr& b) { return make_expr(ExprOp::Ge, {a, b}); }
Expr operator&(const Expr& a, const Expr& b) { return make_expr(ExprOp::And, {a, b}); }
Expr operator|(const Expr& a, const Expr& b) { return make_expr(ExprOp::Or, {a, b}); }
Expr operator!(const Expr& a) { return make_expr(ExprOp::Not, {a}); }
Expr logical_not(const Expr& a) { return make_expr(ExprOp::Not, {a}); }
Expr where(const Expr& c, const Expr& a, const Expr& b) { return make_expr(ExprOp::Where, {c, a, b}); }
Expr abs(const Expr& a) { return make_expr(ExprOp::Abs, {a}); }
Expr exp(const Expr& a) { return make_expr(ExprOp::Exp, {a}); }
Expr exp2(const Expr& a) { return make_expr(ExprOp::Exp2, {a}); }
Expr log(const Expr& a) { return make_expr(ExprOp::Log, {a}); }
Expr log2(const Expr& a) { return make_expr(ExprOp::Log2, {a}); }
Expr sqrt(const Expr& a) { return make_expr(ExprOp::Sqrt, {a}); }
Expr rsqrt(const Expr& a) { return make_expr(ExprOp::Rsqrt, {a}); }
Expr sin(const Expr& a) { return make_expr(ExprOp::Sin, {a}); }
Expr cos(const Expr& a) { return make_expr(ExprOp::Cos, {a}); }
Expr tan(const Expr& a) { return make_expr(ExprOp::Tan, {a}); }
Expr tanh(const Expr& a) { return make_expr(ExprOp::Tanh, {a}); }
Expr sigmoid(const Expr& a) { return make_expr(ExprOp::Sigmoid, {a}); }
Expr floor(const Expr& a) { return make_expr(ExprOp::Floor, {a}); }
Expr ceil(const Expr& a) { return make_expr(ExprOp::Ceil, {a}); }

Expr cast(const Expr& a, ValueKind to) {
  if (a.kind() == to) return a;
  auto n = std::make_shared<ExprNode>();
  n->op = ExprOp::Cast;
  n->kind = to;
  n->args.push_back(a.node());
  return Expr(std::shared_ptr<const ExprNode>(std::move(n)));
}
Expr to_float(const Expr& a) { return cast(a, ValueKind::Float); }
Expr to_int(const Expr& a) { return cast(a, ValueKind::Int); }
Expr to_bool(const Expr& a) { return cast(a, ValueKind::Bool); }

// ---- Captured ----

Captured::Captured(Tensor t, std::string name) {
  FG_CHECK(t.defined(), ValueError, "Captured: the tensor is undefined");
  // Any device: each evaluator checks that it reads captures where it runs (the CPU tile evaluator, the
  // CUDA kernels' glue), naming the tensor.
  const DType d = t.dtype();
  FG_CHECK(d == kFloat32 || d == kFloat64 || d == kInt32 || d == kInt64 || d == kBool, DTypeError,
           "Captured: unsupported dtype {} (expected float32, float64, int32, int64 or bool)", d);
  ref_ = std::make_shared<CaptureRef>(CaptureRef{std::move(t), std::move(name)});
}

Captured Captured::operator[](const Expr& index) const {
  FG_CHECK(indexed_dims() < ref_->tensor.dim(), IndexError,
           "Captured{}: too many indices for a tensor of shape {} ({} given)",
           ref_->name.empty() ? "" : " '" + ref_->name + "'", shape_str(ref_->tensor.sizes()), indexed_dims() + 1);
  FG_CHECK(index.kind() != ValueKind::Float, IndexError,
           "Captured{}: index {} is a float expression; indices must be int (use to_int or floor_div)",
           ref_->name.empty() ? "" : " '" + ref_->name + "'", indexed_dims());
  Captured c = *this;
  c.indices_.push_back(index.kind() == ValueKind::Bool ? to_int(index) : index);
  return c;
}

Expr Captured::operator()(std::vector<Expr> indices) const {
  Captured c = *this;
  for (const Expr& e : indices) c = c[e];
  return c;
}

Captured::operator Expr() const {
  const Tensor& t = ref_->tensor;
  FG_CHECK(indexed_dims() == t.dim(), IndexError,
           "Captured{}: a tensor of shape {} needs {} indices to give a value, got {}",
           ref_->name.empty() ? "" : " '" + ref_->name + "'", shape_str(t.sizes()), t.dim(), indexed_dims());
  auto n = std::make_shared<ExprNode>();
  n->op = ExprOp::Index;
  n->kind = is_floating(t.dtype()) ? ValueKind::Float : t.dtype() == kBool ? ValueKind::Bool : ValueKind::Int;
  n->capture = ref_;
  for (const Expr& e : indices_) n->args.push_back(e.node());
  return Expr(std::shared_ptr<const ExprNode>(std::move(n)));
}

}  // namespace fg
