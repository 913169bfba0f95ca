// The meaning of every ExprOp, defined once.
//
// Each op has one row in a table (op_info()): its name and arity, how its result kind follows from its
// operands' kinds, its exact scalar evaluation, its derivative, what it does with NaN, zero divisors and
// out-of-range values, its CUDA C++ spelling for float, double, int64 and bool operands, and its interval
// rules (its result's range from its operands' ranges). Everything that evaluates a ModProgram derives from here:
//   - infer_op_kinds (expr.h)             the kind rule
//   - constant folding and the scalar evaluator (mod_program.cpp)   eval_op() / the row's `eval`
//   - the TileEvaluator (tile_eval.cpp)   the element functions below (the same inline code, run in
//                                         vectorisable loops; float tiles use fg::vec's exp/exp2/tanh/
//                                         sigmoid, accurate to ~2 ulp, double tiles use libm like here)
//   - the reference path (flex_reference.cpp)   tensor ops plus the guards this file lists
//   - the derivative (mod_grad.cpp)       the row's `grad`
//   - the CUDA generator (mod_codegen.cpp)     the row's spellings (helpers in kernels/flex_abi.cuh)
//   - the cuDNN lowering (cudnn_lowering.cpp, cuda/cudnn_sdpa.cpp)   the row's cuDNN pointwise mode
//   - the interval analyses (int_ranges.h, float_ranges.h)   the row's `int_range` / `float_range`
//
// Semantics in one paragraph (PyTorch's and Python's unless said otherwise):
//   ints are 64-bit two's complement and wrap on overflow (+ - * neg abs, INT64_MIN // -1 == INT64_MIN);
//   `//` and `%` are Python's (floor; the remainder has the divisor's sign), for floats as torch's
//   floor_divide / remainder; an integer `//` or `%` by zero, or an integer to a negative power, is a
//   ValueError (the GPU records it in the FgError flag and yields 0; the host raises the same error);
//   float ops are IEEE (x/0 is ±inf, 0/0 NaN, log of a negative NaN); min/max propagate NaN;
//   float -> int truncates toward zero, saturates at the int64 range and maps NaN to 0 (what the GPU's
//   cvt.rzi does; C++'s cast is undefined there); float/int -> bool is `!= 0` (NaN is true);
//   comparisons involving NaN are false except `!=`; where() evaluates both branches (an error in
//   either raises); captured reads follow Python indexing: [-n, n) valid, negative wraps, anything else
//   is an IndexError (throw_capture_index_error) naming the tensor, dim, index and size.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "flexgrad/attention/expr.h"
#include "flexgrad/attention/value_ranges.h"

namespace fg {

class ProgramBuilder;

// ---------------------------------------------------------------- element functions
// Plain inline code so that the tile evaluator's loops can inline (and vectorise) them.
namespace sem {

inline int64_t wrap_add(int64_t a, int64_t b) { return static_cast<int64_t>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b)); }
inline int64_t wrap_sub(int64_t a, int64_t b) { return static_cast<int64_t>(static_cast<uint64_t>(a) - static_cast<uint64_t>(b)); }
inline int64_t wrap_mul(int64_t a, int64_t b) { return static_cast<int64_t>(static_cast<uint64_t>(a) * static_cast<uint64_t>(b)); }
inline int64_t wrap_neg(int64_t a) { return static_cast<int64_t>(0 - static_cast<uint64_t>(a)); }
inline int64_t wrap_abs(int64_t a) { return a < 0 ? wrap_neg(a) : a; }

// Python floor division / remainder on int64 for b != 0 (callers check the zero divisor).
inline int64_t floordiv_nz(int64_t a, int64_t b) {
  if (b == -1) return wrap_neg(a);  // INT64_MIN / -1 overflows (and traps on x86)
  int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}
inline int64_t mod_nz(int64_t a, int64_t b) {
  if (b == -1) return 0;
  int64_t r = a % b;
  if (r != 0 && ((r < 0) != (b < 0))) r += b;
  return r;
}
// Integer power for b >= 0 (callers check negative exponents), wrapping.
inline int64_t pow_nn(int64_t a, int64_t b) {
  uint64_t r = 1, x = static_cast<uint64_t>(a);
  while (b) {
    if (b & 1) r *= x;
    x *= x;
    b >>= 1;
  }
  return static_cast<int64_t>(r);
}

// torch.floor_divide on floats (not floor(a / b): 1.0 // 0.1 is 9, as in Python).
template <class T> inline T floordiv_f(T a, T b) {
  if (b == 0) return a / b;
  const T mod = std::fmod(a, b);
  T div = (a - mod) / b;
  if (mod != 0 && ((b < 0) != (mod < 0))) div -= 1;
  T fl = std::floor(div);
  if (div - fl > T(0.5)) fl += 1;
  return div == 0 ? std::copysign(T(0), a / b) : fl;
}
// torch.remainder on floats: fmod with the divisor's sign.
template <class T> inline T mod_f(T a, T b) {
  T r = std::fmod(a, b);
  if (r != 0 && ((r < 0) != (b < 0))) r += b;
  return r;
}
// NaN-propagating minimum / maximum (torch.minimum / maximum).
template <class T> inline T min_f(T a, T b) { return (a < b || a != a) ? a : b; }
template <class T> inline T max_f(T a, T b) { return (a > b || a != a) ? a : b; }

// float -> int64: truncate, saturate, NaN -> 0.
template <class T> inline int64_t to_int(T x) {
  if (x != x) return 0;
  if (x >= T(9223372036854775808.0)) return std::numeric_limits<int64_t>::max();
  if (x <= T(-9223372036854775808.0)) return std::numeric_limits<int64_t>::min();
  return static_cast<int64_t>(x);
}

template <class T> inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }

}  // namespace sem

// The errors the ops raise (shared by every CPU evaluator; the GPU reports the same values).
[[noreturn]] void throw_int_division_by_zero(ExprOp op, int64_t dividend);  // ValueError
[[noreturn]] void throw_negative_int_power(int64_t base, int64_t exponent);  // ValueError

// ---------------------------------------------------------------- scalar values

// A value of any kind, exact: floats in f, ints and bools (0/1) in i.
struct ScalarValue {
  double f = 0;
  int64_t i = 0;
  static ScalarValue of_float(double v) { return {v, 0}; }
  static ScalarValue of_int(int64_t v) { return {0, v}; }
  static ScalarValue of_bool(bool v) { return {0, v ? 1 : 0}; }
  double as_double(ValueKind k) const { return k == ValueKind::Float ? f : static_cast<double>(i); }
};

// ---------------------------------------------------------------- the table

// How an op's computing kind (its operands are cast to it) and result kind follow from its operands.
enum class KindRule : uint8_t {
  Leaf,        // no operands (Const, inputs) or a captured read: the node's own kind
  SameNumber,  // neg, abs, floor, ceil: int or float, kept (bool rejected)
  Logical,     // not, and, or: bools only
  FloatMath,   // exp, log, ...: computed in float
  Arithmetic,  // + - * // % pow min max: float if any operand is, else int (bools count as ints)
  TrueDiv,     // /: always float
  Compare,     // == != < <= > >=: compared in the promoted kind, bool result
  Select,      // where(bool, a, b): the promoted kind of a and b
  Cast,        // to the node's kind
};

// Operand adjoints from the result's adjoint; mapped ids in the derivative program (see mod_grad.cpp).
struct GradContext {
  ProgramBuilder& pb;
  int32_t g;           // adjoint of the result (float)
  int32_t y;           // the result
  int32_t x[3];        // the operands (-1 past the arity)
  ValueKind kind[3];   // the operands' kinds (only float operands receive a gradient)
  int32_t dx[3] = {-1, -1, -1};  // out: contribution to each operand's adjoint (-1: none)
};

struct OpInfo {
  ExprOp op;
  const char* name;   // as expr_op_name
  int arity;          // -1 for Index (one per dim)
  KindRule kinds;
  // Edge-case behaviour in words (NaN, zero divisors, overflow, out of range), for docs and messages.
  const char* edges;
  // Exact scalar evaluation: result of kind `result` from operands of the computing kind `operand`.
  // Raises the op's ValueError (integer division by zero, negative integer power). Null for leaves.
  ScalarValue (*eval)(ValueKind result, ValueKind operand, const ScalarValue* x);
  // Reverse-mode rule (float result). Null when the derivative is zero almost everywhere or the op has
  // no float operands.
  void (*grad)(GradContext& c);
  // CUDA C++ expressions with {0} {1} {2} for the operands, per computing kind (null: not defined for
  // it). Helpers named fg_* live in attention/cuda/kernels/flex_abi.cuh. Float + - * / and sqrt use
  // the round-to-nearest intrinsics (__fadd_rn, __dmul_rn, ...), which the compiler never contracts
  // into FMAs: the CPU evaluators are built without contraction, so both round every op alike.
  // Transcendentals use the precise library functions (expf / exp, ...): never -use_fast_math.
  const char* cuda_f32;
  const char* cuda_f64;
  const char* cuda_i64;
  const char* cuda_bool;
  // The f32 spelling under FlexKernelOptions::approx_math (a hardware approximation, or + - * as plain operators
  // that the compiler may contract into FMAs; null: cuda_f32 either way).
  const char* cuda_f32_approx = nullptr;
  // cuDNN's pointwise mode (CUDNN_POINTWISE_<name>) for the cuDNN backend's score-modifier graphs
  // (attention/cudnn_lowering.h), which compute it in float32 (int32 for bounded ints, bool for logic)
  // with cuDNN's own transcendental approximations; null: the op does not lower to cuDNN. Cast lowers
  // as IDENTITY int -> float only; Pow for floats only.
  const char* cudnn = nullptr;
  // Whether an Int computation of the op can fail (eval raises; the generated code reports it through the
  // kernels' error flag): integer floor division and remainder by zero, a negative integer power.
  bool int_may_raise = false;
  // Whether the float result jumps where a float operand crosses a point (floor, ceil, //, %): an ulp of an
  // operand can move it by a whole step. Such ops, and every consumer whose result is not a float (comparisons,
  // casts to int or bool), take exact operands only: cuda_f32_approx spellings never feed them (mod_codegen.cpp).
  bool float_steps = false;
  // Interval rules, for the analyses of int_ranges.h and float_ranges.h: the range of an Int result (int_range)
  // and of a Float result (float_range) from the operands' ranges; null: unknown. Sound: every value the row's
  // `eval` can produce from operands in their ranges lies in the range, and a float one is NaN only where
  // may_nan says (for a score that is not NaN); unknown is always allowed. (Tanh's [-1, 1] and sigmoid's [0, 1]
  // bound a score_mod's core, which lets the tensor-core forward drop its running max: flex_forward_common.cuh.)
  IntRange (*int_range)(const OperandRanges& x) = nullptr;
  FloatRange (*float_range)(const OperandRanges& x) = nullptr;
};

// The row of `op`.
const OpInfo& op_info(ExprOp op);

// Whether generated code of `op` computing in `operand` kind has an effect besides its value: a captured
// read (Index: memory, and an index error) or an Int computation that can fail (OpInfo::int_may_raise) — not
// when its second operand is a constant `rhs` for which it cannot (a nonzero divisor, a non-negative power).
// Code without such ops may be evaluated where its result is not used (the kernels' predicated element steps).
inline bool op_has_effects(ExprOp op, ValueKind operand, std::optional<int64_t> rhs = std::nullopt) {
  if (op == ExprOp::Index) return true;
  if (operand != ValueKind::Int || !op_info(op).int_may_raise) return false;
  if (!rhs) return true;
  return op == ExprOp::Pow ? *rhs < 0 : *rhs == 0;
}

// Evaluate `op` exactly (the folding / scalar-evaluator semantics).
inline ScalarValue eval_op(ExprOp op, ValueKind result, ValueKind operand, const ScalarValue* x) {
  return op_info(op).eval(result, operand, x);
}

// The CUDA expression of `op` (result kind `result`, computing in `operand` kind; floats are double when
// `double_precision`, else float) with the operand expressions substituted. Casts are spelled here too.
// ValueError when the table has no spelling for that kind (a leaf or an ill-typed instruction). `approx`
// (FlexKernelOptions::approx_math) picks a row's cuda_f32_approx for float operands in single precision.
std::string cuda_spelling(ExprOp op, ValueKind result, ValueKind operand, bool double_precision,
                          const std::vector<std::string>& args, bool approx = false);

}  // namespace fg
