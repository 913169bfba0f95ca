// fg::Expr: the symbolic value a user's score_mod / mask_mod computes with.
//
// flexgrad calls a mod once with symbolic inputs (score, b, h, q_idx, kv_idx); every operator on Expr
// records a node, so the call returns a small expression DAG that trace_score_mod / trace_mask_mod
// (attention/mod_program.h) lower to a folded, CSE'd SSA program. This is what torch.compile's tracing
// of a Python mod gives PyTorch, done with C++ operator overloading instead.
//
// Value kinds and promotion follow PyTorch: int op int stays int, anything with a float is float,
// true division `/` is always float, comparisons give bool, `&` `|` `!` work on bools.
// C++ numbers mix freely: `s * 2`, `2.0 - q`, `kv < S - 1` (S a C++ int becomes a constant).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "flexgrad/tensor/tensor.h"

namespace fg {

enum class ValueKind : uint8_t { Bool, Int, Float };
const char* value_kind_name(ValueKind k);  // "bool", "int", "float"

// Every operation of the IR. Leaves first, then by arity.
enum class ExprOp : uint8_t {
  // leaves
  Const, Score, Batch, Head, QIdx, KVIdx,
  Index,  // read a captured tensor at integer index expressions (one arg per dim)
  // unary
  Neg, Not, Abs, Exp, Exp2, Log, Log2, Sqrt, Rsqrt, Sin, Cos, Tan, Tanh, Sigmoid, Floor, Ceil,
  Cast,  // to the node's kind
  // binary
  Add, Sub, Mul, Div, FloorDiv, Mod, Pow, Min, Max, Eq, Ne, Lt, Le, Gt, Ge, And, Or,
  // ternary
  Where,
};
const char* expr_op_name(ExprOp op);
int expr_op_arity(ExprOp op);  // -1 for Index (one per dim)

// The input slots of a mod, as bits (ModProgram::uses()).
enum InputBit : uint8_t { kUsesScore = 1, kUsesBatch = 2, kUsesHead = 4, kUsesQ = 8, kUsesKV = 16 };

// A captured tensor as the IR sees it: shared so that several nodes and programs refer to one tensor.
struct CaptureRef {
  Tensor tensor;
  std::string name;  // for printing; "cap0", "cap1"... when not given
};

// One node of the traced DAG (internal to tracing; programs are what the rest of flexgrad uses).
struct ExprNode {
  ExprOp op;
  ValueKind kind;
  double value = 0;                       // Const (bools and ints stored exactly as doubles up to 2^53)
  int64_t ivalue = 0;                     // Const of kind Int (exact)
  std::shared_ptr<CaptureRef> capture;    // Index
  std::vector<std::shared_ptr<const ExprNode>> args;
};

class Expr {
 public:
  // Constants. Implicit, so C++ numbers mix with Exprs as in Python.
  Expr(double v);   // NOLINT float constant (also ±inf)
  Expr(float v) : Expr(static_cast<double>(v)) {}  // NOLINT
  Expr(long long v);  // NOLINT int constant
  Expr(int v) : Expr(static_cast<long long>(v)) {}            // NOLINT
  Expr(long v) : Expr(static_cast<long long>(v)) {}           // NOLINT
  Expr(unsigned v) : Expr(static_cast<long long>(v)) {}       // NOLINT
  Expr(unsigned long v) : Expr(static_cast<long long>(v)) {}  // NOLINT
  Expr(bool v);     // NOLINT bool constant
  explicit Expr(std::shared_ptr<const ExprNode> n) : node_(std::move(n)) {}

  ValueKind kind() const { return node_->kind; }
  bool is_float() const { return kind() == ValueKind::Float; }
  bool is_int() const { return kind() == ValueKind::Int; }
  bool is_bool() const { return kind() == ValueKind::Bool; }
  const std::shared_ptr<const ExprNode>& node() const { return node_; }

  // The symbolic inputs (used by tracing; users receive them as arguments).
  static Expr score();
  static Expr batch();
  static Expr head();
  static Expr q_idx();
  static Expr kv_idx();

  Expr abs() const;  // `(q - kv).abs()` as in PyTorch

 private:
  std::shared_ptr<const ExprNode> node_;
};

// The kind an op computes in (its operands are cast to it) and the kind of its result, by PyTorch's
// promotion rules. ValueError naming the op and operand kinds when the op makes no sense for them.
struct OpKinds { ValueKind compute, result; };
OpKinds infer_op_kinds(ExprOp op, const std::vector<ValueKind>& operand_kinds);

// Builds a node, applying the promotion rules; ValueError (naming `op`, the operand kinds) when the
// operation makes no sense for those kinds (e.g. `!` on a float, `&` on ints).
Expr make_expr(ExprOp op, std::vector<Expr> args);

// ---- arithmetic ----
Expr operator+(const Expr& a, const Expr& b);
Expr operator-(const Expr& a, const Expr& b);
Expr operator*(const Expr& a, const Expr& b);
Expr operator/(const Expr& a, const Expr& b);  // true division: always float
Expr operator%(const Expr& a, const Expr& b);  // Python remainder: sign of the divisor
Expr operator-(const Expr& a);
Expr floor_div(const Expr& a, const Expr& b);  // Python `//`: floor
Expr pow(const Expr& a, const Expr& b);
Expr min(const Expr& a, const Expr& b);
Expr max(const Expr& a, const Expr& b);
Expr clamp(const Expr& x, const Expr& lo, const Expr& hi);
// ---- comparisons (bool) ----
Expr operator==(const Expr& a, const Expr& b);
Expr operator!=(const Expr& a, const Expr& b);
Expr operator<(const Expr& a, const Expr& b);
Expr operator<=(const Expr& a, const Expr& b);
Expr operator>(const Expr& a, const Expr& b);
Expr operator>=(const Expr& a, const Expr& b);
// ---- logic (bool operands) ----
Expr operator&(const Expr& a, const Expr& b);
Expr operator|(const Expr& a, const Expr& b);
Expr operator!(const Expr& a);
Expr logical_not(const Expr& a);
Expr where(const Expr& cond, const Expr& a, const Expr& b);
// ---- math (float results; ints are converted) ----
Expr abs(const Expr& a);
Expr exp(const Expr& a);
Expr exp2(const Expr& a);
Expr log(const Expr& a);
Expr log2(const Expr& a);
Expr sqrt(const Expr& a);
Expr rsqrt(const Expr& a);
Expr sin(const Expr& a);
Expr cos(const Expr& a);
Expr tan(const Expr& a);
Expr tanh(const Expr& a);
Expr sigmoid(const Expr& a);
Expr floor(const Expr& a);  // ints stay ints (as torch.floor)
Expr ceil(const Expr& a);
// ---- casts ----
Expr cast(const Expr& a, ValueKind to);
Expr to_float(const Expr& a);
Expr to_int(const Expr& a);  // truncates toward zero, as .to(torch.int64)
Expr to_bool(const Expr& a);  // != 0

// A tensor a mod captures, indexed with expressions: `Captured bias(t); ... bias[h]`,
// `table[h][q - kv + S - 1]`, `doc[q] == doc[kv]`. Each [] indexes the next dim; once every dim is
// indexed the result converts to an Expr (float for float32/float64, int for int32/int64, bool for bool).
// Tensors of those dtypes on any device (the evaluator that reads one checks it is on its own device).
// The tensor is held by reference (its values may change between calls without re-tracing); float
// captures that require grad get gradients through ScoreModBackward.
class Captured {
 public:
  explicit Captured(Tensor t, std::string name = "");
  Captured operator[](const Expr& index) const;
  Expr operator()(std::vector<Expr> indices) const;  // all dims at once: cap({h, q})
  operator Expr() const;  // NOLINT: implicit so `bias[h] + s` reads naturally; ValueError if not all dims indexed
  const Tensor& tensor() const { return ref_->tensor; }
  int64_t indexed_dims() const { return static_cast<int64_t>(indices_.size()); }

 private:
  std::shared_ptr<CaptureRef> ref_;
  std::vector<Expr> indices_;
};

// What users write. b, h, q_idx, kv_idx are int; score is float; mask mods return bool.
using ScoreMod = std::function<Expr(Expr score, Expr b, Expr h, Expr q_idx, Expr kv_idx)>;
using MaskMod = std::function<Expr(Expr b, Expr h, Expr q_idx, Expr kv_idx)>;

}  // namespace fg
