// Elementwise ops: broadcasting over strided inputs, PyTorch's type promotion, autograd for the
// differentiable ones. Each op's forward and backward live side by side in ops/elementwise.cpp; the
// kernels per device live in ops/cpu/elementwise_cpu.cpp and ops/cuda/elementwise_cuda.cu.
#pragma once
#include <optional>

#include "flexgrad/ops/elementwise_plan.h"
#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/tensor.h"

namespace fg {

enum class UnaryOp : uint8_t {
  Neg, Exp, Exp2, Log, Log2, Sqrt, Rsqrt, Abs, Sin, Cos, Tan, Tanh, Sigmoid, Relu, Gelu, GeluTanh, Silu,
  Floor, Ceil, Round, Trunc, Sign, Reciprocal, Square, Expm1, Log1p, Erf, LogicalNot, IsNan, IsInf,
};
enum class BinaryOp : uint8_t {
  Add, Sub, Mul, Div, FloorDiv, Remainder, Pow, Maximum, Minimum,
  Eq, Ne, Lt, Le, Gt, Ge, LogicalAnd, LogicalOr, LogicalXor,
};
const char* unary_op_name(UnaryOp op);
const char* binary_op_name(BinaryOp op);

// ---- kernel families (one stub each; operand 0 of the plan is the output) ----
// Unary: input and output share the dtype, except LogicalNot/IsNan/IsInf whose output is bool.
using UnaryKernelFn = void (*)(const ElementwisePlan&, UnaryOp);
// Binary: both inputs share the dtype; output is that dtype, or bool for comparisons and logical ops.
// alpha scales the second operand of Add/Sub (a + alpha * b).
using BinaryKernelFn = void (*)(const ElementwisePlan&, BinaryOp, double alpha);
using WhereKernelFn = void (*)(const ElementwisePlan&);        // out = cond ? a : b (a, b, out same dtype)
using CopyKernelFn = void (*)(const ElementwisePlan&);         // out = cast(in), any dtype pair
using FillKernelFn = void (*)(const ElementwisePlan&, Scalar);  // out = value
FG_DECLARE_STUB(UnaryKernelFn, unary_stub);
FG_DECLARE_STUB(BinaryKernelFn, binary_stub);
FG_DECLARE_STUB(WhereKernelFn, where_stub);
FG_DECLARE_STUB(CopyKernelFn, copy_stub);
FG_DECLARE_STUB(FillKernelFn, fill_stub);

// ---- type promotion (PyTorch's result_type: dimensioned tensors > 0-d tensors > wrapped numbers) ----
DType result_type(const Tensor& a, const Tensor& b);
DType result_type(const Tensor& a, Scalar b);
// A 0-d tensor holding a number, marked so that it does not raise the other operand's dtype.
Tensor wrapped_scalar(Scalar value, DType dtype, Device device);

// ---- arithmetic ----
Tensor add(const Tensor& a, const Tensor& b, Scalar alpha = 1);
Tensor sub(const Tensor& a, const Tensor& b, Scalar alpha = 1);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);           // true division: integer inputs give float
Tensor floor_divide(const Tensor& a, const Tensor& b);  // Python's //, rounds toward -inf
Tensor remainder(const Tensor& a, const Tensor& b);     // Python's %, sign of the divisor
Tensor pow(const Tensor& a, const Tensor& b);
Tensor pow(const Tensor& a, Scalar exponent);
Tensor pow(Scalar base, const Tensor& exponent);
Tensor maximum(const Tensor& a, const Tensor& b);
Tensor minimum(const Tensor& a, const Tensor& b);
Tensor clamp(const Tensor& t, std::optional<Scalar> min, std::optional<Scalar> max);
Tensor clamp(const Tensor& t, const Tensor& min, const Tensor& max);  // either may be undefined
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b);
Tensor where(const Tensor& cond, const Tensor& a, Scalar b);
Tensor where(const Tensor& cond, Scalar a, const Tensor& b);
Tensor masked_fill(const Tensor& t, const Tensor& mask, Scalar value);

// ---- comparisons and logic (bool results, no gradient) ----
Tensor eq(const Tensor& a, const Tensor& b);
Tensor ne(const Tensor& a, const Tensor& b);
Tensor lt(const Tensor& a, const Tensor& b);
Tensor le(const Tensor& a, const Tensor& b);
Tensor gt(const Tensor& a, const Tensor& b);
Tensor ge(const Tensor& a, const Tensor& b);
Tensor logical_and(const Tensor& a, const Tensor& b);
Tensor logical_or(const Tensor& a, const Tensor& b);
Tensor logical_xor(const Tensor& a, const Tensor& b);
Tensor logical_not(const Tensor& t);
Tensor isnan(const Tensor& t);
Tensor isinf(const Tensor& t);
// True when every element is equal (same shape); allclose as numpy (|a-b| <= atol + rtol*|b|).
bool equal(const Tensor& a, const Tensor& b);
bool allclose(const Tensor& a, const Tensor& b, double rtol = 1e-5, double atol = 1e-8);

// ---- unary math (integer inputs are promoted to float where the result is float) ----
Tensor unary(UnaryOp op, const Tensor& t);
Tensor neg(const Tensor& t);
Tensor exp(const Tensor& t);
Tensor exp2(const Tensor& t);
Tensor expm1(const Tensor& t);
Tensor log(const Tensor& t);
Tensor log2(const Tensor& t);
Tensor log1p(const Tensor& t);
Tensor sqrt(const Tensor& t);
Tensor rsqrt(const Tensor& t);
Tensor abs(const Tensor& t);
Tensor sin(const Tensor& t);
Tensor cos(const Tensor& t);
Tensor tan(const Tensor& t);
Tensor tanh(const Tensor& t);
Tensor sigmoid(const Tensor& t);
Tensor relu(const Tensor& t);
Tensor gelu(const Tensor& t, bool tanh_approximation = false);
Tensor silu(const Tensor& t);
Tensor erf(const Tensor& t);
Tensor floor(const Tensor& t);
Tensor ceil(const Tensor& t);
Tensor round(const Tensor& t);
Tensor trunc(const Tensor& t);
Tensor sign(const Tensor& t);
Tensor reciprocal(const Tensor& t);
Tensor square(const Tensor& t);

// ---- casts and copies ----
Tensor cast(const Tensor& t, DType dtype);  // differentiable between floating dtypes
// Differentiable. non_blocking (as PyTorch's .to(device, non_blocking=True)): a copy to a GPU does not make the
// host wait (ordered on the device's stream; a host source may be reused at once); copies to the host wait.
Tensor to_device(const Tensor& t, Device device, bool non_blocking = false);
Tensor contiguous(const Tensor& t);
Tensor clone(const Tensor& t);

// ---- in-place (bump the version counter; error on a leaf that requires grad while grad mode is on) ----
Tensor& add_(Tensor& self, const Tensor& other, Scalar alpha = 1);
Tensor& sub_(Tensor& self, const Tensor& other, Scalar alpha = 1);
Tensor& mul_(Tensor& self, const Tensor& other);
Tensor& div_(Tensor& self, const Tensor& other);
Tensor& add_(Tensor& self, Scalar other);
Tensor& mul_(Tensor& self, Scalar other);
Tensor& zero_(Tensor& self);
Tensor& fill_(Tensor& self, Scalar value);
Tensor& copy_(Tensor& self, const Tensor& src);  // broadcasts src, casts, any devices
Tensor& clamp_(Tensor& self, std::optional<Scalar> min, std::optional<Scalar> max);

// ---- operators ----
Tensor operator+(const Tensor& a, const Tensor& b);
Tensor operator-(const Tensor& a, const Tensor& b);
Tensor operator*(const Tensor& a, const Tensor& b);
Tensor operator/(const Tensor& a, const Tensor& b);
Tensor operator-(const Tensor& t);
Tensor operator+(const Tensor& a, Scalar b);
Tensor operator-(const Tensor& a, Scalar b);
Tensor operator*(const Tensor& a, Scalar b);
Tensor operator/(const Tensor& a, Scalar b);
Tensor operator+(Scalar a, const Tensor& b);
Tensor operator-(Scalar a, const Tensor& b);
Tensor operator*(Scalar a, const Tensor& b);
Tensor operator/(Scalar a, const Tensor& b);
Tensor operator%(const Tensor& a, const Tensor& b);
Tensor operator%(const Tensor& a, Scalar b);
Tensor operator<(const Tensor& a, const Tensor& b);
Tensor operator<=(const Tensor& a, const Tensor& b);
Tensor operator>(const Tensor& a, const Tensor& b);
Tensor operator>=(const Tensor& a, const Tensor& b);
Tensor operator==(const Tensor& a, const Tensor& b);
Tensor operator!=(const Tensor& a, const Tensor& b);
Tensor operator<(const Tensor& a, Scalar b);
Tensor operator<=(const Tensor& a, Scalar b);
Tensor operator>(const Tensor& a, Scalar b);
Tensor operator>=(const Tensor& a, Scalar b);
Tensor operator==(const Tensor& a, Scalar b);
Tensor operator!=(const Tensor& a, Scalar b);
Tensor operator&(const Tensor& a, const Tensor& b);  // logical and (bool tensors)
Tensor operator|(const Tensor& a, const Tensor& b);
Tensor operator!(const Tensor& t);
Tensor& operator+=(Tensor& a, const Tensor& b);
Tensor& operator-=(Tensor& a, const Tensor& b);
Tensor& operator*=(Tensor& a, const Tensor& b);
Tensor& operator*=(Tensor& a, Scalar b);

}  // namespace fg
