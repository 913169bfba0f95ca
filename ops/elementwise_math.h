// The scalar math of every elementwise op, shared by the CPU kernels and (as __device__ code) the CUDA
// kernels so both backends compute the same function. C is the compute type (float, double, int32,
// int64, bool); half types are computed in float by the caller.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "flexgrad/ops/elementwise.h"
#include "flexgrad/tensor/philox.h"  // FG_HOST_DEVICE

namespace fg::math {

// Integer arithmetic wraps (two's complement), as PyTorch's integer kernels do. It is done in the unsigned
// type: signed overflow is undefined behaviour in C++ (UBSan reports it), unsigned arithmetic is modular.
template <class C> FG_HOST_DEVICE inline C wrap_add(C a, C b) {
  using U = std::make_unsigned_t<C>;
  return static_cast<C>(static_cast<U>(a) + static_cast<U>(b));
}
template <class C> FG_HOST_DEVICE inline C wrap_sub(C a, C b) {
  using U = std::make_unsigned_t<C>;
  return static_cast<C>(static_cast<U>(a) - static_cast<U>(b));
}
template <class C> FG_HOST_DEVICE inline C wrap_mul(C a, C b) {
  using U = std::make_unsigned_t<C>;
  return static_cast<C>(static_cast<U>(a) * static_cast<U>(b));
}

template <class C> FG_HOST_DEVICE inline C py_floor_div(C a, C b) {
  if constexpr (std::is_integral_v<C>) {
    if (b == 0) return 0;  // the caller reports the division by zero
    if (b == -1) return wrap_sub(C(0), a);  // a / -1 traps for the most negative a (x86 SIGFPE): wraps instead
    C q = a / b;
    if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
    return q;
  } else {
    if (b == 0) return a / b;
    C mod = std::fmod(a, b);
    C div = (a - mod) / b;
    if (mod != 0 && ((b < 0) != (mod < 0))) div -= 1;
    C fl = std::floor(div);
    if (div - fl > C(0.5)) fl += 1;
    return div == 0 ? std::copysign(C(0), a / b) : fl;
  }
}

template <class C> FG_HOST_DEVICE inline C py_remainder(C a, C b) {
  if constexpr (std::is_integral_v<C>) {
    if (b == 0 || b == -1) return 0;  // a % -1 traps for the most negative a (x86 SIGFPE)
    C r = a % b;
    if (r != 0 && ((r < 0) != (b < 0))) r += b;
    return r;
  } else {
    C r = std::fmod(a, b);
    if (r != 0 && ((r < 0) != (b < 0))) r += b;
    return r;
  }
}

template <class C> FG_HOST_DEVICE inline C int_pow(C base, C exp) {
  if (exp < 0) return base == 1 ? 1 : base == -1 ? ((exp & 1) ? -1 : 1) : 0;
  C result = 1;
  while (exp) {
    if (exp & 1) result = wrap_mul(result, base);
    exp >>= 1;
    base = wrap_mul(base, base);
  }
  return result;
}

template <class C> FG_HOST_DEVICE inline C unary(UnaryOp op, C x) {
  if constexpr (std::is_same_v<C, bool>) {
    switch (op) {
      case UnaryOp::Abs: case UnaryOp::Square: case UnaryOp::Sign: case UnaryOp::Floor: case UnaryOp::Ceil:
      case UnaryOp::Round: case UnaryOp::Trunc: case UnaryOp::Relu: return x;
      default: return x;
    }
  } else if constexpr (std::is_integral_v<C>) {
    switch (op) {
      case UnaryOp::Neg: return wrap_sub(C(0), x);
      case UnaryOp::Abs: return x < 0 ? wrap_sub(C(0), x) : x;
      case UnaryOp::Sign: return (x > 0) - (x < 0);
      case UnaryOp::Square: return wrap_mul(x, x);
      case UnaryOp::Relu: return x > 0 ? x : 0;
      default: return x;  // floor/ceil/round/trunc are the identity on integers
    }
  } else {
    constexpr C kSqrt1_2 = C(0.70710678118654752440);
    constexpr C kLn2 = C(0.69314718055994530942);
    switch (op) {
      case UnaryOp::Neg: return -x;
      case UnaryOp::Exp: return std::exp(x);
      case UnaryOp::Exp2: return std::exp2(x);
      case UnaryOp::Expm1: return std::expm1(x);
      case UnaryOp::Log: return std::log(x);
      case UnaryOp::Log2: return std::log2(x);
      case UnaryOp::Log1p: return std::log1p(x);
      case UnaryOp::Sqrt: return std::sqrt(x);
      case UnaryOp::Rsqrt: return C(1) / std::sqrt(x);
      case UnaryOp::Abs: return std::fabs(x);
      case UnaryOp::Sin: return std::sin(x);
      case UnaryOp::Cos: return std::cos(x);
      case UnaryOp::Tan: return std::tan(x);
      case UnaryOp::Tanh: return std::tanh(x);
      case UnaryOp::Sigmoid: return C(1) / (C(1) + std::exp(-x));
      case UnaryOp::Relu: return x > C(0) ? x : (x != x ? x : C(0));
      case UnaryOp::Gelu: return C(0.5) * x * (C(1) + std::erf(x * kSqrt1_2));
      case UnaryOp::GeluTanh: {
        constexpr C kBeta = C(0.79788456080286535588);  // sqrt(2/pi)
        return C(0.5) * x * (C(1) + std::tanh(kBeta * (x + C(0.044715) * x * x * x)));
      }
      case UnaryOp::Silu: return x / (C(1) + std::exp(-x));
      case UnaryOp::Erf: return std::erf(x);
      case UnaryOp::Floor: return std::floor(x);
      case UnaryOp::Ceil: return std::ceil(x);
      case UnaryOp::Round: return std::nearbyint(x);  // half to even, as PyTorch
      case UnaryOp::Trunc: return std::trunc(x);
      case UnaryOp::Sign: return x > C(0) ? C(1) : x < C(0) ? C(-1) : x;  // keeps 0 and NaN
      case UnaryOp::Reciprocal: return C(1) / x;
      case UnaryOp::Square: return x * x;
      default: (void)kLn2; return x;
    }
  }
}

// Arithmetic binary ops; comparisons and logic are handled by `compare`.
template <class C> FG_HOST_DEVICE inline C binary(BinaryOp op, C a, C b, C alpha) {
  if constexpr (std::is_same_v<C, bool>) {
    switch (op) {
      case BinaryOp::Add: return a || (alpha && b);
      case BinaryOp::Mul: return a && b;
      case BinaryOp::Maximum: return a || b;
      case BinaryOp::Minimum: return a && b;
      default: return a;  // rejected before reaching the kernel
    }
  } else {
    if constexpr (std::is_integral_v<C>) {
      switch (op) {
        case BinaryOp::Add: return wrap_add(a, wrap_mul(alpha, b));
        case BinaryOp::Sub: return wrap_sub(a, wrap_mul(alpha, b));
        case BinaryOp::Mul: return wrap_mul(a, b);
        case BinaryOp::Div: return b == 0 ? 0 : b == -1 ? wrap_sub(C(0), a) : a / b;  // a / -1 may trap
        default: break;
      }
    }
    switch (op) {
      case BinaryOp::Add: return a + alpha * b;
      case BinaryOp::Sub: return a - alpha * b;
      case BinaryOp::Mul: return a * b;
      case BinaryOp::Div: return a / b;
      case BinaryOp::FloorDiv: return py_floor_div(a, b);
      case BinaryOp::Remainder: return py_remainder(a, b);
      case BinaryOp::Pow:
        if constexpr (std::is_integral_v<C>) return int_pow(a, b);
        else return std::pow(a, b);
      case BinaryOp::Maximum:
        if constexpr (std::is_floating_point_v<C>) { if (a != a || b != b) return a + b; }
        return a > b ? a : b;
      case BinaryOp::Minimum:
        if constexpr (std::is_floating_point_v<C>) { if (a != a || b != b) return a + b; }
        return a < b ? a : b;
      default: return a;
    }
  }
}

template <class C> FG_HOST_DEVICE inline bool compare(BinaryOp op, C a, C b) {
  switch (op) {
    case BinaryOp::Eq: return a == b;
    case BinaryOp::Ne: return a != b;
    case BinaryOp::Lt: return a < b;
    case BinaryOp::Le: return a <= b;
    case BinaryOp::Gt: return a > b;
    case BinaryOp::Ge: return a >= b;
    case BinaryOp::LogicalAnd: return (a != C(0)) && (b != C(0));
    case BinaryOp::LogicalOr: return (a != C(0)) || (b != C(0));
    case BinaryOp::LogicalXor: return (a != C(0)) != (b != C(0));
    default: return false;
  }
}

FG_HOST_DEVICE inline bool is_comparison(BinaryOp op) {
  return op == BinaryOp::Eq || op == BinaryOp::Ne || op == BinaryOp::Lt || op == BinaryOp::Le ||
         op == BinaryOp::Gt || op == BinaryOp::Ge || op == BinaryOp::LogicalAnd || op == BinaryOp::LogicalOr ||
         op == BinaryOp::LogicalXor;
}

}  // namespace fg::math
