// ModProgram: a traced score_mod / mask_mod as a topologically ordered SSA instruction list.
//
// trace_score_mod / trace_mask_mod call the user's callable once with symbolic inputs and lower the
// resulting DAG here. Lowering goes through ProgramBuilder, which folds constants, applies a few
// algebraic identities and hash-conses (CSE), so every backend sees the same small program. Operand
// kinds are made explicit: an op's operands always have the kind the op computes in (implicit casts
// are inserted and marked `implicit`), so evaluators never promote.
//
// One program serves every (B, H, Q_LEN, KV_LEN): the sizes are never part of it. Captured tensors are
// referenced by slot; their values are read at evaluation time.
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "flexgrad/attention/expr.h"
#include "flexgrad/attention/op_semantics.h"

namespace fg {

struct Instr {
  ExprOp op = ExprOp::Const;
  ValueKind kind = ValueKind::Float;              // kind of the result
  bool implicit = false;       // Cast inserted by promotion (printed transparently)
  uint8_t deps = 0;            // InputBit mask of the inputs this value depends on (transitively)
  int32_t capture = -1;        // Index: slot in ModProgram::captures()
  int64_t ivalue = 0;          // Const Int / Bool
  double value = 0;            // Const Float
  std::vector<int32_t> args;   // operand instruction ids (< this id)
};

// A visitor for ModProgram::evaluate: supplies the value type and one function per instruction shape.
// The reference (tensor) path implements it with differentiable tensor ops; tests use doubles.
//   struct V { using Value = ...;
//     Value constant(const Instr&); Value input(ExprOp leaf); Value index(const Instr&, const CaptureRef&,
//     std::vector<Value> idx); Value apply(const Instr&, std::vector<Value> args); };
class ModProgram {
 public:
  enum class Type : uint8_t { Score, Mask, Derived };

  Type type() const { return type_; }
  const std::vector<Instr>& instrs() const { return instrs_; }
  const std::vector<int32_t>& outputs() const { return outputs_; }
  const std::vector<std::string>& output_names() const { return output_names_; }
  int32_t output() const { return outputs_.at(0); }
  const std::vector<CaptureRef>& captures() const { return captures_; }
  uint8_t uses() const { return uses_; }  // InputBit mask over all outputs
  bool uses(InputBit b) const { return (uses_ & b) != 0; }
  size_t size() const { return instrs_.size(); }

  // Readable formula of output i, e.g. "score + (kv_idx - q_idx) * exp2(-((h + 1) * 8.0) / 4)".
  std::string to_string(size_t output = 0) const;
  std::string to_string_all() const;  // "name = formula" per output, one per line
  // Structural hash: equal for structurally equal programs; includes captured dtype and rank, not values.
  uint64_t hash() const;
  // Which instructions `outputs` need, transitively (1 per needed instruction): what an emitter evaluates.
  std::vector<char> live(const std::vector<int32_t>& outputs) const;
  bool structurally_equal(const ModProgram& o) const;
  // Every field a code generator reads, as bytes: instructions (implicit casts included), outputs and their
  // names, each capture's dtype, rank and name (not its values). Equal keys give equal generated text (a memo's
  // key, without collisions).
  std::string structure_key() const;

  // Scalar reference evaluation in double (bools as 0/1, ints exact); all outputs, or output 0.
  std::vector<double> evaluate_all(int64_t b, int64_t h, int64_t q, int64_t kv, double score = 0) const;
  double evaluate(int64_t b, int64_t h, int64_t q, int64_t kv, double score = 0) const {
    return evaluate_all(b, h, q, kv, score)[0];
  }
  // The same, with ints kept exact (int64 beyond 2^53): floats in .f, ints and bools in .i.
  std::vector<ScalarValue> evaluate_exact(int64_t b, int64_t h, int64_t q, int64_t kv, double score = 0) const;

  // Generic evaluation over any value type; returns the outputs.
  template <class V> std::vector<typename V::Value> evaluate_with(V& v) const {
    std::vector<typename V::Value> vals;
    vals.reserve(instrs_.size());
    for (const Instr& in : instrs_) {
      if (in.op == ExprOp::Const) {
        vals.push_back(v.constant(in));
      } else if (in.op == ExprOp::Score || in.op == ExprOp::Batch || in.op == ExprOp::Head ||
                 in.op == ExprOp::QIdx || in.op == ExprOp::KVIdx) {
        vals.push_back(v.input(in.op));
      } else {
        std::vector<typename V::Value> a;
        a.reserve(in.args.size());
        for (int32_t x : in.args) a.push_back(vals[x]);
        if (in.op == ExprOp::Index) vals.push_back(v.index(in, captures_[in.capture], std::move(a)));
        else vals.push_back(v.apply(in, std::move(a)));
      }
    }
    std::vector<typename V::Value> out;
    for (int32_t o : outputs_) out.push_back(vals[o]);
    return out;
  }

 private:
  friend class ProgramBuilder;
  friend ModProgram lower_expr(const Expr&, ModProgram::Type);
  // hash(), structurally_equal() and structure_key()'s one walk over the fields (mod_program.cpp).
  template <class Word, class Bytes>
  void walk_structure(bool spelling, Word&& word, Bytes&& bytes) const;
  Type type_ = Type::Derived;
  std::vector<Instr> instrs_;
  std::vector<int32_t> outputs_;
  std::vector<std::string> output_names_;
  std::vector<CaptureRef> captures_;
  uint8_t uses_ = 0;
};

// Builds programs with folding + CSE. Also used by the symbolic derivative (attention/mod_grad.h).
class ProgramBuilder {
 public:
  explicit ProgramBuilder(std::vector<CaptureRef> captures = {});
  int32_t constant_float(double v);
  int32_t constant_int(int64_t v);
  int32_t constant_bool(bool v);
  int32_t input(ExprOp leaf);  // Score, Batch, Head, QIdx, KVIdx
  int32_t index(int32_t capture_slot, std::vector<int32_t> indices);
  // Any other op; operands must already have the op's computing kind (use cast()).
  int32_t emit(ExprOp op, ValueKind kind, std::vector<int32_t> args, bool implicit = false);
  int32_t cast(int32_t x, ValueKind to, bool implicit = true);
  // Convenience for the derivative: float arithmetic with folding.
  int32_t add(int32_t a, int32_t b) { return emit(ExprOp::Add, ValueKind::Float, {a, b}); }
  int32_t sub(int32_t a, int32_t b) { return emit(ExprOp::Sub, ValueKind::Float, {a, b}); }
  int32_t mul(int32_t a, int32_t b) { return emit(ExprOp::Mul, ValueKind::Float, {a, b}); }
  int32_t div(int32_t a, int32_t b) { return emit(ExprOp::Div, ValueKind::Float, {a, b}); }
  int32_t neg(int32_t a) { return emit(ExprOp::Neg, ValueKind::Float, {a}); }

  const Instr& instr(int32_t id) const { return instrs_[id]; }
  bool is_const(int32_t id) const { return instrs_[id].op == ExprOp::Const; }
  double const_value(int32_t id) const;  // any kind, as double
  int32_t capture_slot(const std::shared_ptr<CaptureRef>& ref);  // dedupes by tensor identity
  const std::vector<CaptureRef>& captures() const { return captures_; }

  // Instruction `in` of another program, its operands mapped to this builder's ids by `operand_map` (indexed by
  // that program's ids), emitted again here with the same folding and CSE.
  int32_t reemit(const Instr& in, const std::vector<int32_t>& operand_map);

  // Keeps what `outputs` need (dead-code elimination) and renumbers; the result has type `type`.
  ModProgram finish(std::vector<int32_t> outputs, std::vector<std::string> output_names,
                    ModProgram::Type type = ModProgram::Type::Derived) const;

 private:
  int32_t push(Instr in);
  std::vector<Instr> instrs_;
  std::vector<CaptureRef> captures_;
  std::vector<const TensorImpl*> capture_ids_;
  std::unordered_map<std::string, int32_t> cse_;  // instruction key -> id (hash-consing)
};

// Trace a mod once. ValueError naming the mod (`name`, default "score_mod"/"mask_mod") when the callable
// throws or returns the wrong kind (a score_mod must return a number, a mask_mod a bool).
ModProgram trace_score_mod(const ScoreMod& mod, const std::string& name = "score_mod");
ModProgram trace_mask_mod(const MaskMod& mod, const std::string& name = "mask_mod");
// Lower an already built expression (e.g. from combinators); `type` Score or Mask.
ModProgram lower_expr(const Expr& e, ModProgram::Type type);

// Scalar semantics on plain numbers (wrappers over the op table, attention/op_semantics.h).
int64_t py_floordiv(int64_t a, int64_t b);  // ValueError on division by zero
int64_t py_mod(int64_t a, int64_t b);       // ValueError on division by zero
double py_fmod(double a, double b);         // fmod with the divisor's sign, as torch.remainder
int64_t int_pow(int64_t a, int64_t b);      // ValueError for negative exponents (as PyTorch)
// IndexError naming the captured tensor, dim, index and shape (evaluators call it on out-of-range reads).
[[noreturn]] void throw_capture_index_error(const CaptureRef& c, int64_t dim, int64_t index);
// Python indexing of dim `dim` of a capture: [-n, n) valid, negative wraps; else throw_capture_index_error.
int64_t wrap_capture_index(const CaptureRef& c, int64_t dim, int64_t index);
// Apply `op` of kind `kind` on double-encoded operands (ints exact up to 2^53); eval_op is the exact form.
double apply_scalar(ExprOp op, ValueKind kind, ValueKind operand_kind, const double* args);

}  // namespace fg
