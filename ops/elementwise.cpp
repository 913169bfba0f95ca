// Elementwise ops: validation, type promotion, output allocation, and each op's backward right below
// its forward. Kernels are reached only through the stubs (ops/elementwise.h).
#include "flexgrad/ops/elementwise.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "flexgrad/autograd/record.h"
#include "flexgrad/autograd/view.h"
#include "flexgrad/ops/reduce.h"

namespace fg {

FG_DEFINE_STUB(UnaryKernelFn, unary_stub);
FG_DEFINE_STUB(BinaryKernelFn, binary_stub);
FG_DEFINE_STUB(WhereKernelFn, where_stub);
FG_DEFINE_STUB(CopyKernelFn, copy_stub);
FG_DEFINE_STUB(FillKernelFn, fill_stub);

const char* unary_op_name(UnaryOp op) {
  static const char* names[] = {"neg", "exp", "exp2", "log", "log2", "sqrt", "rsqrt", "abs", "sin", "cos",
                                "tan", "tanh", "sigmoid", "relu", "gelu", "gelu_tanh", "silu", "floor", "ceil",
                                "round", "trunc", "sign", "reciprocal", "square", "expm1", "log1p", "erf",
                                "logical_not", "isnan", "isinf"};
  return names[static_cast<int>(op)];
}

const char* binary_op_name(BinaryOp op) {
  static const char* names[] = {"add", "sub", "mul", "div", "floor_divide", "remainder", "pow", "maximum",
                                "minimum", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
                                "logical_xor"};
  return names[static_cast<int>(op)];
}

// ---------------------------------------------------------------- type promotion

namespace {

// PyTorch's combine_categories: a lower-priority operand only matters if it is of a higher category.
std::optional<DType> combine(std::optional<DType> higher, std::optional<DType> lower) {
  if (!higher) return lower;
  if (!lower) return higher;
  if (is_floating(*higher)) return higher;
  if (*higher == kBool || is_floating(*lower)) return promote_types(*higher, *lower);
  return higher;
}

struct PromotionState {
  std::optional<DType> dim, zero, wrapped;
  void add(const Tensor& t) {
    auto& slot = t.impl()->is_wrapped_number() ? wrapped : t.dim() == 0 ? zero : dim;
    DType d = t.dtype();
    if (t.impl()->is_wrapped_number() && is_floating(d)) d = kDefaultFloat;  // Python floats are "default"
    slot = slot ? promote_types(*slot, d) : d;
  }
  void add(Scalar s) {
    DType d = s.is_floating() ? kDefaultFloat : s.dtype();
    wrapped = wrapped ? promote_types(*wrapped, d) : d;
  }
  DType result() const { return *combine(dim, combine(zero, wrapped)); }
};

void check_same_device(const Tensor& a, const Tensor& b, const char* op) {
  FG_CHECK(a.defined() && b.defined(), ValueError, "{}: got an undefined tensor", op);
  FG_CHECK(a.device() == b.device() || (b.dim() == 0 && b.is_cpu()) || (a.dim() == 0 && a.is_cpu()), DeviceError,
           "{}: expected all tensors to be on the same device, but found {} and {}", op, a.device(), b.device());
}

// Moves a CPU 0-d operand to `device` (PyTorch lets CPU scalars meet CUDA tensors).
Tensor on_device(const Tensor& t, Device device) { return t.device() == device ? t : to_device(t, device); }

// Casts without recording history (the op records its own backward).
Tensor cast_raw(const Tensor& t, DType dtype) {
  if (t.dtype() == dtype) return t;
  Tensor out = empty(t.sizes(), TensorOptions().dtype(dtype).device(t.device()));
  copy_stub(t.device(), make_elementwise_plan(out, {t}));
  return out;
}

// What backward needs to know of an input (captured instead of the tensor, so the graph does not
// keep inputs alive or form cycles through in-place outputs).
struct GradTarget {
  bool needed = false;
  Shape shape;
  DType dtype = kFloat32;
  GradTarget() = default;
  GradTarget(const Tensor& t)  // NOLINT
      : needed(t.defined() && t.requires_grad()), shape(t.defined() ? t.sizes() : Shape{}),
        dtype(t.defined() ? t.dtype() : kFloat32) {}
};

// The gradient for an input: broadcast dims summed away, cast back to the input's dtype.
Tensor grad_for(const Tensor& g, const GradTarget& input) {
  if (!input.needed) return Tensor();
  Tensor r = sum_to_shape(g, input.shape);
  return r.dtype() == input.dtype ? r : cast(r, input.dtype);
}

Tensor bool_mask_like(const Tensor& x, bool value) {
  return full(x.sizes(), value, TensorOptions().dtype(kBool).device(x.device()));
}

Tensor unary_raw(UnaryOp op, const Tensor& t, DType compute) {
  Tensor in = cast_raw(t, compute);
  bool bool_out = op == UnaryOp::LogicalNot || op == UnaryOp::IsNan || op == UnaryOp::IsInf;
  Tensor out = empty(t.sizes(), TensorOptions().dtype(bool_out ? kBool : compute).device(t.device()));
  unary_stub(t.device(), make_elementwise_plan(out, {in}), op);
  return out;
}

bool is_compare_or_logic(BinaryOp op) { return static_cast<int>(op) >= static_cast<int>(BinaryOp::Eq); }

Tensor binary_raw(BinaryOp op, const Tensor& a0, const Tensor& b0, double alpha = 1.0) {
  const char* name = binary_op_name(op);
  check_same_device(a0, b0, name);
  Device device = a0.dim() == 0 && a0.is_cpu() && !b0.is_cpu() ? b0.device() : a0.device();
  Tensor a = on_device(a0, device), b = on_device(b0, device);
  DType common = result_type(a0, b0);
  if (op == BinaryOp::Div && !is_floating(common)) common = kDefaultFloat;  // true division
  if (common == kBool && !is_compare_or_logic(op)) {
    FG_CHECK(op == BinaryOp::Add || op == BinaryOp::Mul || op == BinaryOp::Maximum || op == BinaryOp::Minimum,
             DTypeError, "{}: not supported for bool tensors (shapes {} and {}); cast to an integer dtype first",
             name, shape_str(a.sizes()), shape_str(b.sizes()));
  }
  Shape shape = broadcast_shapes(a.sizes(), b.sizes(), name);
  Tensor out = empty(shape, TensorOptions().dtype(is_compare_or_logic(op) ? kBool : common).device(device));
  binary_stub(device, make_elementwise_plan(out, {cast_raw(a, common), cast_raw(b, common)}), op, alpha);
  return out;
}

DType float_compute_dtype(const Tensor& t) { return is_floating(t.dtype()) ? t.dtype() : kDefaultFloat; }

}  // namespace

DType result_type(const Tensor& a, const Tensor& b) {
  PromotionState s;
  s.add(a);
  s.add(b);
  return s.result();
}

DType result_type(const Tensor& a, Scalar b) {
  PromotionState s;
  s.add(a);
  s.add(b);
  return s.result();
}

Tensor wrapped_scalar(Scalar value, DType dtype, Device device) {
  Tensor t = full({}, value, TensorOptions().dtype(dtype).device(device));
  t.impl()->set_wrapped_number(true);
  return t;
}

namespace {
Tensor wrap(Scalar s, const Tensor& like) {
  Tensor t = wrapped_scalar(s, s.is_floating() ? kFloat64 : s.is_bool() ? kBool : kInt64, like.device());
  return t;
}
}  // namespace

// ---------------------------------------------------------------- arithmetic

Tensor add(const Tensor& a, const Tensor& b, Scalar alpha) {
  Tensor out = binary_raw(BinaryOp::Add, a, b, alpha.to_double());
  if (needs_grad({a, b})) {
    double al = alpha.to_double();
    record("AddBackward", {a, b}, {out}, [a = GradTarget(a), b = GradTarget(b), al](const TensorList& g) {
      return TensorList{grad_for(g[0], a), grad_for(al == 1.0 ? g[0] : g[0] * al, b)};
    });
  }
  return out;
}

Tensor sub(const Tensor& a, const Tensor& b, Scalar alpha) {
  Tensor out = binary_raw(BinaryOp::Sub, a, b, alpha.to_double());
  if (needs_grad({a, b})) {
    double al = alpha.to_double();
    record("SubBackward", {a, b}, {out}, [a = GradTarget(a), b = GradTarget(b), al](const TensorList& g) {
      return TensorList{grad_for(g[0], a), grad_for(g[0] * (-al), b)};
    });
  }
  return out;
}

Tensor mul(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::Mul, a, b);
  if (needs_grad({a, b})) {
    SavedTensor sa = a, sb = b;
    record("MulBackward", {a, b}, {out}, [sa, sb, a = GradTarget(a), b = GradTarget(b)](const TensorList& g) {
      return TensorList{a.needed ? grad_for(g[0] * sb.unpack(), a) : Tensor(), b.needed ? grad_for(g[0] * sa.unpack(), b) : Tensor()};
    });
  }
  return out;
}

Tensor div(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::Div, a, b);
  if (needs_grad({a, b})) {
    SavedTensor sa = a, sb = b;
    record("DivBackward", {a, b}, {out}, [sa, sb, a = GradTarget(a), b = GradTarget(b)](const TensorList& g) {
      Tensor bv = sb.unpack();
      Tensor ga = a.needed ? grad_for(g[0] / bv, a) : Tensor();
      Tensor gb = b.needed ? grad_for(-g[0] * sa.unpack() / (bv * bv), b) : Tensor();
      return TensorList{ga, gb};
    });
  }
  return out;
}

Tensor floor_divide(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::FloorDiv, a, b);
  if (needs_grad({a, b})) {  // piecewise constant: zero gradient
    record("FloorDivideBackward", {a, b}, {out}, [a = GradTarget(a), b = GradTarget(b)](const TensorList& g) {
      auto z = [&](const GradTarget& t) { return t.needed ? zeros(t.shape, TensorOptions().dtype(t.dtype).device(g[0].device())) : Tensor(); };
      return TensorList{z(a), z(b)};
    });
  }
  return out;
}

Tensor remainder(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::Remainder, a, b);
  if (needs_grad({a, b})) {  // a - floor(a/b) * b
    SavedTensor sa = a, sb = b;
    record("RemainderBackward", {a, b}, {out}, [sa, sb, a = GradTarget(a), b = GradTarget(b)](const TensorList& g) {
      Tensor gb = b.needed ? grad_for(-g[0] * floor_divide(sa.unpack(), sb.unpack()), b) : Tensor();
      return TensorList{grad_for(g[0], a), gb};
    });
  }
  return out;
}

Tensor pow(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::Pow, a, b);
  if (needs_grad({a, b})) {
    SavedTensor sa = a, sb = b, so = out;
    record("PowBackward", {a, b}, {out}, [sa, sb, so, a = GradTarget(a), b = GradTarget(b)](const TensorList& g) {
      Tensor av = sa.unpack(), bv = sb.unpack();
      Tensor ga, gb;
      if (a.needed) ga = grad_for(where(bv == 0.0, zeros_like(g[0]), g[0] * bv * pow(av, bv - 1.0)), a);
      if (b.needed) {
        // d/db a^b = a^b log a; defined as 0 where a == 0 and b >= 0 (PyTorch's convention).
        Tensor term = g[0] * so.unpack() * log(av);
        gb = grad_for(where(logical_and(av == 0.0, bv >= 0.0), zeros_like(term), term), b);
      }
      return TensorList{ga, gb};
    });
  }
  return out;
}

Tensor pow(const Tensor& a, Scalar exponent) {
  DType dt = result_type(a, exponent);
  Tensor out = binary_raw(BinaryOp::Pow, a, wrapped_scalar(exponent, dt, a.device()));
  if (needs_grad({a})) {
    SavedTensor sa = a;
    double e = exponent.to_double();
    record("PowBackward", {a}, {out}, [sa, e](const TensorList& g) {
      if (e == 0.0) return TensorList{zeros_like(g[0])};
      return TensorList{g[0] * e * pow(sa.unpack(), e - 1.0)};
    });
  }
  return out;
}

Tensor pow(Scalar base, const Tensor& exponent) {
  DType dt = result_type(exponent, base);
  return pow(wrapped_scalar(base, dt, exponent.device()), exponent);
}

namespace {
// Shared backward of maximum/minimum: the winner takes the gradient, ties split it evenly.
TensorList minmax_backward(const Tensor& g, const GradTarget& a, const GradTarget& b, const Tensor& av, const Tensor& bv,
                           bool is_max) {
  Tensor a_wins = is_max ? gt(av, bv) : lt(av, bv);
  Tensor tie = eq(av, bv);
  Tensor half = g * 0.5;
  Tensor zero = zeros_like(g);
  Tensor ga = a.needed ? grad_for(where(tie, half, where(a_wins, g, zero)), a) : Tensor();
  Tensor gb = b.needed ? grad_for(where(tie, half, where(a_wins, zero, g)), b) : Tensor();
  return {ga, gb};
}
}  // namespace

Tensor maximum(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::Maximum, a, b);
  if (needs_grad({a, b})) {
    SavedTensor sa = a, sb = b;
    record("MaximumBackward", {a, b}, {out}, [sa, sb, a = GradTarget(a), b = GradTarget(b)](const TensorList& g) {
      return minmax_backward(g[0], a, b, sa.unpack(), sb.unpack(), true);
    });
  }
  return out;
}

Tensor minimum(const Tensor& a, const Tensor& b) {
  Tensor out = binary_raw(BinaryOp::Minimum, a, b);
  if (needs_grad({a, b})) {
    SavedTensor sa = a, sb = b;
    record("MinimumBackward", {a, b}, {out}, [sa, sb, a = GradTarget(a), b = GradTarget(b)](const TensorList& g) {
      return minmax_backward(g[0], a, b, sa.unpack(), sb.unpack(), false);
    });
  }
  return out;
}

Tensor clamp(const Tensor& t, std::optional<Scalar> lo, std::optional<Scalar> hi) {
  FG_CHECK(lo || hi, ValueError, "clamp: at least one of 'min' or 'max' must not be None");
  DType dt = t.dtype();
  if (lo) dt = result_type(t, *lo);
  if (hi) dt = promote_types(dt, result_type(t, *hi));
  Tensor out = cast_raw(t, dt);
  if (lo) out = binary_raw(BinaryOp::Maximum, out, wrapped_scalar(*lo, dt, t.device()));
  if (hi) out = binary_raw(BinaryOp::Minimum, out, wrapped_scalar(*hi, dt, t.device()));
  if (needs_grad({t})) {
    SavedTensor st = t;
    record("ClampBackward", {t}, {out}, [st, lo, hi, t = GradTarget(t)](const TensorList& g) {
      Tensor x = st.unpack();
      Tensor keep = bool_mask_like(x, true);
      if (lo) keep = logical_and(keep, x >= *lo);
      if (hi) keep = logical_and(keep, x <= *hi);
      return TensorList{grad_for(where(keep, g[0], zeros_like(g[0])), t)};
    });
  }
  return out;
}

Tensor clamp(const Tensor& t, const Tensor& lo, const Tensor& hi) {
  FG_CHECK(lo.defined() || hi.defined(), ValueError, "clamp: at least one of 'min' or 'max' must be defined");
  Tensor out = t;
  if (lo.defined()) out = maximum(out, lo);
  if (hi.defined()) out = minimum(out, hi);
  return out;
}

Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b) {
  FG_CHECK(cond.defined() && cond.dtype() == kBool, DTypeError,
           "where: expected condition to be a bool tensor, but got {}", cond.defined() ? dtype_name(cond.dtype()) : "undefined");
  check_same_device(a, b, "where");
  check_same_device(cond, a, "where");
  DType dt = result_type(a, b);
  Shape shape = broadcast_shapes(broadcast_shapes(cond.sizes(), a.sizes(), "where"), b.sizes(), "where");
  Device device = a.dim() == 0 && a.is_cpu() ? b.device() : a.device();
  Tensor out = empty(shape, TensorOptions().dtype(dt).device(device));
  where_stub(device, make_elementwise_plan(out, {on_device(cond, device), cast_raw(on_device(a, device), dt),
                                                 cast_raw(on_device(b, device), dt)}));
  if (needs_grad({a, b})) {
    SavedTensor sc = cond;
    record("WhereBackward", {a, b}, {out}, [sc, a = GradTarget(a), b = GradTarget(b)](const TensorList& g) {
      Tensor c = sc.unpack();
      Tensor z = zeros_like(g[0]);
      return TensorList{a.needed ? grad_for(where(c, g[0], z), a) : Tensor(),
                        b.needed ? grad_for(where(c, z, g[0]), b) : Tensor()};
    });
  }
  return out;
}

Tensor where(const Tensor& cond, const Tensor& a, Scalar b) {
  return where(cond, a, wrapped_scalar(b, result_type(a, b), a.device()));
}
Tensor where(const Tensor& cond, Scalar a, const Tensor& b) {
  return where(cond, wrapped_scalar(a, result_type(b, a), b.device()), b);
}
Tensor masked_fill(const Tensor& t, const Tensor& mask, Scalar value) {
  return where(mask, wrapped_scalar(value, t.dtype(), t.device()), t);
}

// ---------------------------------------------------------------- comparisons and logic

Tensor eq(const Tensor& a, const Tensor& b) { return binary_raw(BinaryOp::Eq, a, b); }
Tensor ne(const Tensor& a, const Tensor& b) { return binary_raw(BinaryOp::Ne, a, b); }
Tensor lt(const Tensor& a, const Tensor& b) { return binary_raw(BinaryOp::Lt, a, b); }
Tensor le(const Tensor& a, const Tensor& b) { return binary_raw(BinaryOp::Le, a, b); }
Tensor gt(const Tensor& a, const Tensor& b) { return binary_raw(BinaryOp::Gt, a, b); }
Tensor ge(const Tensor& a, const Tensor& b) { return binary_raw(BinaryOp::Ge, a, b); }
Tensor logical_and(const Tensor& a, const Tensor& b) { return binary_raw(BinaryOp::LogicalAnd, a, b); }
Tensor logical_or(const Tensor& a, const Tensor& b) { return binary_raw(BinaryOp::LogicalOr, a, b); }
Tensor logical_xor(const Tensor& a, const Tensor& b) { return binary_raw(BinaryOp::LogicalXor, a, b); }
Tensor logical_not(const Tensor& t) { return unary_raw(UnaryOp::LogicalNot, t, t.dtype()); }
Tensor isnan(const Tensor& t) { return unary_raw(UnaryOp::IsNan, t, t.dtype()); }
Tensor isinf(const Tensor& t) { return unary_raw(UnaryOp::IsInf, t, t.dtype()); }

bool equal(const Tensor& a, const Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  if (a.numel() == 0) return true;
  return all(eq(a, b)).item<bool>();
}

bool allclose(const Tensor& a, const Tensor& b, double rtol, double atol) {
  Tensor af = cast_raw(a, kFloat64), bf = cast_raw(b, kFloat64);
  Tensor diff = abs(af - bf);
  Tensor tol = abs(bf) * rtol + atol;
  Tensor ok = logical_or(le(diff, tol), logical_and(eq(af, bf), logical_not(isnan(af))));
  return a.numel() == 0 || all(ok).item<bool>();
}

// ---------------------------------------------------------------- unary math

namespace {

// The derivative of each differentiable unary op, given input x, output y and upstream gradient g.
Tensor unary_backward(UnaryOp op, const Tensor& g, const Tensor& x, const Tensor& y) {
  constexpr double kLn2 = std::numbers::ln2;
  switch (op) {
    case UnaryOp::Neg: return -g;
    case UnaryOp::Exp: return g * y;
    case UnaryOp::Exp2: return g * y * kLn2;
    case UnaryOp::Expm1: return g * (y + 1.0);
    case UnaryOp::Log: return g / x;
    case UnaryOp::Log2: return g / (x * kLn2);
    case UnaryOp::Log1p: return g / (x + 1.0);
    case UnaryOp::Sqrt: return g / (y * 2.0);
    case UnaryOp::Rsqrt: return g * y * y * y * -0.5;
    case UnaryOp::Abs: return g * sign(x);
    case UnaryOp::Sin: return g * cos(x);
    case UnaryOp::Cos: return -g * sin(x);
    case UnaryOp::Tan: return g * (y * y + 1.0);
    case UnaryOp::Tanh: return g * (1.0 - y * y);
    case UnaryOp::Sigmoid: return g * y * (1.0 - y);
    case UnaryOp::Relu: return where(y > 0.0, g, zeros_like(g));
    case UnaryOp::Gelu: {
      Tensor cdf = (erf(x * std::numbers::sqrt2 / 2) + 1.0) * 0.5;
      Tensor pdf = exp(x * x * -0.5) * (1.0 / std::sqrt(2.0 * std::numbers::pi));
      return g * (cdf + x * pdf);
    }
    case UnaryOp::GeluTanh: {
      const double beta = std::sqrt(2.0 / std::numbers::pi), kappa = 0.044715;
      Tensor inner = (x + x * x * x * kappa) * beta;
      Tensor t = tanh(inner);
      Tensor dinner = (x * x * (3.0 * kappa) + 1.0) * beta;
      return g * ((t + 1.0) * 0.5 + x * 0.5 * (1.0 - t * t) * dinner);
    }
    case UnaryOp::Silu: {
      Tensor s = sigmoid(x);
      return g * (s * (1.0 + x * (1.0 - s)));
    }
    case UnaryOp::Erf: return g * exp(-(x * x)) * (2.0 / std::sqrt(std::numbers::pi));
    case UnaryOp::Reciprocal: return -g * y * y;
    case UnaryOp::Square: return g * x * 2.0;
    case UnaryOp::Floor: case UnaryOp::Ceil: case UnaryOp::Round: case UnaryOp::Trunc: case UnaryOp::Sign:
      return zeros_like(g);
    default: FG_FAIL(NotImplementedError, "{} has no gradient", unary_op_name(op));
  }
}

bool keeps_integer_dtype(UnaryOp op) {
  switch (op) {
    case UnaryOp::Neg: case UnaryOp::Abs: case UnaryOp::Sign: case UnaryOp::Square: case UnaryOp::Relu:
    case UnaryOp::Floor: case UnaryOp::Ceil: case UnaryOp::Round: case UnaryOp::Trunc: return true;
    default: return false;
  }
}

}  // namespace

Tensor unary(UnaryOp op, const Tensor& t) {
  FG_CHECK(t.defined(), ValueError, "{}: got an undefined tensor", unary_op_name(op));
  if (op == UnaryOp::LogicalNot) return logical_not(t);
  if (op == UnaryOp::IsNan) return isnan(t);
  if (op == UnaryOp::IsInf) return isinf(t);
  FG_CHECK(!(op == UnaryOp::Neg && t.dtype() == kBool), DTypeError,
           "neg: negation, the `-` operator, on a bool tensor is not supported; use logical_not instead");
  DType compute = keeps_integer_dtype(op) ? t.dtype() : float_compute_dtype(t);
  Tensor out = unary_raw(op, t, compute);
  if (needs_grad({t})) {
    SavedTensor sx = t, sy = out;
    record(std::string(unary_op_name(op)) + "Backward", {t}, {out}, [op, sx, sy, t = GradTarget(t)](const TensorList& g) {
      return TensorList{grad_for(unary_backward(op, g[0], sx.unpack(), sy.unpack()), t)};
    });
  }
  return out;
}

Tensor neg(const Tensor& t) { return unary(UnaryOp::Neg, t); }
Tensor exp(const Tensor& t) { return unary(UnaryOp::Exp, t); }
Tensor exp2(const Tensor& t) { return unary(UnaryOp::Exp2, t); }
Tensor expm1(const Tensor& t) { return unary(UnaryOp::Expm1, t); }
Tensor log(const Tensor& t) { return unary(UnaryOp::Log, t); }
Tensor log2(const Tensor& t) { return unary(UnaryOp::Log2, t); }
Tensor log1p(const Tensor& t) { return unary(UnaryOp::Log1p, t); }
Tensor sqrt(const Tensor& t) { return unary(UnaryOp::Sqrt, t); }
Tensor rsqrt(const Tensor& t) { return unary(UnaryOp::Rsqrt, t); }
Tensor abs(const Tensor& t) { return unary(UnaryOp::Abs, t); }
Tensor sin(const Tensor& t) { return unary(UnaryOp::Sin, t); }
Tensor cos(const Tensor& t) { return unary(UnaryOp::Cos, t); }
Tensor tan(const Tensor& t) { return unary(UnaryOp::Tan, t); }
Tensor tanh(const Tensor& t) { return unary(UnaryOp::Tanh, t); }
Tensor sigmoid(const Tensor& t) { return unary(UnaryOp::Sigmoid, t); }
Tensor relu(const Tensor& t) { return unary(UnaryOp::Relu, t); }
Tensor gelu(const Tensor& t, bool tanh_approx) { return unary(tanh_approx ? UnaryOp::GeluTanh : UnaryOp::Gelu, t); }
Tensor silu(const Tensor& t) { return unary(UnaryOp::Silu, t); }
Tensor erf(const Tensor& t) { return unary(UnaryOp::Erf, t); }
Tensor floor(const Tensor& t) { return unary(UnaryOp::Floor, t); }
Tensor ceil(const Tensor& t) { return unary(UnaryOp::Ceil, t); }
Tensor round(const Tensor& t) { return unary(UnaryOp::Round, t); }
Tensor trunc(const Tensor& t) { return unary(UnaryOp::Trunc, t); }
Tensor sign(const Tensor& t) { return unary(UnaryOp::Sign, t); }
Tensor reciprocal(const Tensor& t) { return unary(UnaryOp::Reciprocal, t); }
Tensor square(const Tensor& t) { return unary(UnaryOp::Square, t); }

// ---------------------------------------------------------------- casts and copies

Tensor cast(const Tensor& t, DType dtype) {
  if (t.dtype() == dtype) return t;
  Tensor out = cast_raw(t, dtype);
  if (is_floating(dtype) && needs_grad({t})) {
    DType from = t.dtype();
    record("ToCopyBackward", {t}, {out}, [from](const TensorList& g) { return TensorList{cast(g[0], from)}; });
  }
  return out;
}

Tensor to_device(const Tensor& t, Device device, bool non_blocking) {
  if (t.device() == device) return t;
  // Copy through a contiguous buffer on the source device so the transfer is one block.
  Tensor src = t.is_contiguous() ? t : contiguous(t.detach());
  Tensor out = empty(t.sizes(), TensorOptions().dtype(t.dtype()).device(device));
  DeviceBackend& backend = device_backend(device.is_cpu() ? t.device() : device);
  const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
  if (non_blocking) backend.copy_bytes_nonblocking(out.data_ptr(), device, src.data_ptr(), t.device(), nbytes);
  else backend.copy_bytes(out.data_ptr(), device, src.data_ptr(), t.device(), nbytes);
  if (needs_grad({t})) {
    Device from = t.device();
    record("ToCopyBackward", {t}, {out}, [from](const TensorList& g) { return TensorList{to_device(g[0], from)}; });
  }
  return out;
}

Tensor clone(const Tensor& t) {
  Tensor out = empty(t.sizes(), t.options());
  copy_stub(t.device(), make_elementwise_plan(out, {t}));
  if (needs_grad({t})) record("CloneBackward", {t}, {out}, [](const TensorList& g) { return TensorList{g[0]}; });
  return out;
}

Tensor contiguous(const Tensor& t) { return t.is_contiguous() ? t : clone(t); }

// ---------------------------------------------------------------- in-place

namespace {

enum class Overlap { Refuse, Allow };

// An input sharing some, but not all, of self's memory would be read where it was already overwritten:
// refused, as PyTorch does. The same layout (x.mul_(x)) is fine; layouts too irregular to decide pass.
void check_no_partial_overlap(const Tensor& self, const Tensor& input, const char* op) {
  if (!input.defined() || self.is_same(input) || !self.shares_storage(input)) return;
  if (self.numel() == 0 || input.numel() == 0 || !is_dense_non_overlapping(self.sizes(), self.strides()) ||
      !is_dense_non_overlapping(input.sizes(), input.strides())) return;
  const int64_t a0 = self.storage_offset(), a1 = a0 + self.numel();
  const int64_t b0 = input.storage_offset(), b1 = b0 + input.numel();
  bool same_layout = a0 == b0 && self.sizes() == input.sizes();
  for (int64_t d = 0; same_layout && d < self.dim(); ++d) {
    same_layout = self.sizes()[d] <= 1 || self.strides()[d] == input.strides()[d];
  }
  FG_CHECK(same_layout || a1 <= b0 || b1 <= a0, ValueError,
           "{}: unsupported operation: some elements of the input tensor (shape {}, strides {}) and the written-to "
           "tensor (shape {}, strides {}) refer to a single memory location; clone() the input first", op,
           shape_str(input.sizes()), shape_str(input.strides()), shape_str(self.sizes()), shape_str(self.strides()));
}

// The checks before writing into self (inputs[0] is self). Several elements of self sharing one memory
// location (an expanded view) would each write it: refused, as PyTorch does, except by fills, which write
// one value everywhere; so is an input partly overlapping self. When the write will be recorded (some
// input requires grad), PyTorch's autograd checks follow.
void check_inplace(const Tensor& self, const char* op, const TensorList& inputs, Overlap overlap = Overlap::Refuse) {
  FG_CHECK(self.defined(), ValueError, "{}: self is undefined", op);
  for (int64_t d = 0; d < self.dim() && overlap == Overlap::Refuse; ++d) {
    FG_CHECK(self.strides()[d] != 0 || self.sizes()[d] <= 1, ValueError,
             "{}: unsupported operation: more than one element of the written-to tensor (shape {}, strides {}) "
             "refers to a single memory location; clone() the tensor before writing to it in place", op,
             shape_str(self.sizes()), shape_str(self.strides()));
  }
  for (size_t i = 1; i < inputs.size(); ++i) check_no_partial_overlap(self, inputs[i], op);
  check_inplace_autograd(self, op, needs_grad(inputs));
}

// Writes `value` (broadcastable to self) into self, bumps its version, and when autograd is recording
// makes self the output of a new node over `inputs` (inputs[0] is self's previous history).
void assign_inplace(Tensor& self, const Tensor& value, const char* op, const TensorList& inputs, BackwardFn backward) {
  Shape b = broadcast_shapes(self.sizes(), value.sizes(), op);
  FG_CHECK(b == self.sizes(), ShapeError, "{}: output with shape {} doesn't match the broadcast shape {}", op,
           shape_str(self.sizes()), shape_str(b));
  bool recording = needs_grad(inputs);
  std::shared_ptr<Node> node;
  if (recording) node = record(std::string(op) + "Backward", inputs, {}, std::move(backward));  // edges to the old history
  copy_stub(self.device(), make_elementwise_plan(self, {on_device(value, self.device())}));
  self.bump_version();
  if (recording) {
    node->num_outputs = 1;
    rebase_history(self, node);  // on a view, the base gets the new history (CopySlices)
  }
}

}  // namespace

Tensor& add_(Tensor& self, const Tensor& other, Scalar alpha) {
  check_inplace(self, "add_", {self, other});
  double al = alpha.to_double();
  Tensor value = binary_raw(BinaryOp::Add, self, other, al);
  assign_inplace(self, value, "add_", {self, other}, [other = GradTarget(other), al](const TensorList& g) {
    return TensorList{g[0], other.needed ? grad_for(g[0] * al, other) : Tensor()};
  });
  return self;
}

Tensor& sub_(Tensor& self, const Tensor& other, Scalar alpha) { return add_(self, other, -alpha.to_double()); }

Tensor& mul_(Tensor& self, const Tensor& other) {
  check_inplace(self, "mul_", {self, other});
  bool recording = needs_grad({self, other});
  // self's old value is overwritten, so the factor other's gradient needs is copied first.
  SavedTensor saved_self = recording && other.requires_grad() ? clone(self.detach()) : Tensor();
  // other may alias self (x.mul_(x)): then it is overwritten too and must be copied as well.
  SavedTensor saved_other = recording ? (other.shares_storage(self) ? clone(other.detach()) : other.detach()) : Tensor();
  Tensor value = binary_raw(BinaryOp::Mul, self, other);
  assign_inplace(self, value, "mul_", {self, other},
                 [saved_self, saved_other, other = GradTarget(other)](const TensorList& g) {
                   return TensorList{g[0] * saved_other.unpack(),
                                     other.needed ? grad_for(g[0] * saved_self.unpack(), other) : Tensor()};
                 });
  return self;
}

Tensor& div_(Tensor& self, const Tensor& other) {
  FG_CHECK(is_floating(self.dtype()), DTypeError, "div_: result type {} can't be cast to the desired output type {}",
           kDefaultFloat, self.dtype());
  return mul_(self, reciprocal(other));
}

Tensor& add_(Tensor& self, Scalar other) { return add_(self, wrapped_scalar(other, self.dtype(), self.device())); }
Tensor& mul_(Tensor& self, Scalar other) { return mul_(self, wrapped_scalar(other, self.dtype(), self.device())); }

Tensor& fill_(Tensor& self, Scalar value) {
  check_inplace(self, "fill_", {self}, Overlap::Allow);
  bool recording = needs_grad({self});
  std::shared_ptr<Node> node;
  if (recording) node = record("FillBackward", {self}, {}, [](const TensorList&) { return TensorList{Tensor()}; });
  fill_stub(self.device(), make_elementwise_plan(self, {}), value);
  self.bump_version();
  if (recording) {
    node->num_outputs = 1;
    rebase_history(self, node);
  }
  return self;
}

Tensor& zero_(Tensor& self) { return fill_(self, 0); }

Tensor& copy_(Tensor& self, const Tensor& src) {
  FG_CHECK(src.defined(), ValueError, "copy_: src is undefined");
  check_inplace(self, "copy_", {self, src});
  // Writing over self cuts its old history (no gradient flows there); src receives the gradient.
  assign_inplace(self, src, "copy_", {self, src}, [src = GradTarget(src)](const TensorList& g) {
    return TensorList{Tensor(), grad_for(g[0], src)};
  });
  return self;
}

Tensor& clamp_(Tensor& self, std::optional<Scalar> lo, std::optional<Scalar> hi) {
  check_inplace(self, "clamp_", {self});
  Tensor value = clamp(self.detach(), lo, hi);
  SavedTensor before = needs_grad({self}) ? clone(self.detach()) : Tensor();
  assign_inplace(self, value, "clamp_", {self}, [before, lo, hi](const TensorList& g) {
    Tensor x = before.unpack();
    Tensor keep = bool_mask_like(x, true);
    if (lo) keep = logical_and(keep, x >= *lo);
    if (hi) keep = logical_and(keep, x <= *hi);
    return TensorList{where(keep, g[0], zeros_like(g[0]))};
  });
  return self;
}

// ---------------------------------------------------------------- operators

Tensor operator+(const Tensor& a, const Tensor& b) { return add(a, b); }
Tensor operator-(const Tensor& a, const Tensor& b) { return sub(a, b); }
Tensor operator*(const Tensor& a, const Tensor& b) { return mul(a, b); }
Tensor operator/(const Tensor& a, const Tensor& b) { return div(a, b); }
Tensor operator-(const Tensor& t) { return neg(t); }
Tensor operator+(const Tensor& a, Scalar b) { return add(a, wrapped_scalar(b, result_type(a, b), a.device())); }
Tensor operator-(const Tensor& a, Scalar b) { return sub(a, wrapped_scalar(b, result_type(a, b), a.device())); }
Tensor operator*(const Tensor& a, Scalar b) { return mul(a, wrapped_scalar(b, result_type(a, b), a.device())); }
Tensor operator/(const Tensor& a, Scalar b) { return div(a, wrapped_scalar(b, result_type(a, b), a.device())); }
Tensor operator+(Scalar a, const Tensor& b) { return add(wrapped_scalar(a, result_type(b, a), b.device()), b); }
Tensor operator-(Scalar a, const Tensor& b) { return sub(wrapped_scalar(a, result_type(b, a), b.device()), b); }
Tensor operator*(Scalar a, const Tensor& b) { return mul(wrapped_scalar(a, result_type(b, a), b.device()), b); }
Tensor operator/(Scalar a, const Tensor& b) { return div(wrapped_scalar(a, result_type(b, a), b.device()), b); }
Tensor operator%(const Tensor& a, const Tensor& b) { return remainder(a, b); }
Tensor operator%(const Tensor& a, Scalar b) { return remainder(a, wrapped_scalar(b, result_type(a, b), a.device())); }
Tensor operator<(const Tensor& a, const Tensor& b) { return lt(a, b); }
Tensor operator<=(const Tensor& a, const Tensor& b) { return le(a, b); }
Tensor operator>(const Tensor& a, const Tensor& b) { return gt(a, b); }
Tensor operator>=(const Tensor& a, const Tensor& b) { return ge(a, b); }
Tensor operator==(const Tensor& a, const Tensor& b) { return eq(a, b); }
Tensor operator!=(const Tensor& a, const Tensor& b) { return ne(a, b); }
Tensor operator<(const Tensor& a, Scalar b) { return lt(a, wrap(b, a)); }
Tensor operator<=(const Tensor& a, Scalar b) { return le(a, wrap(b, a)); }
Tensor operator>(const Tensor& a, Scalar b) { return gt(a, wrap(b, a)); }
Tensor operator>=(const Tensor& a, Scalar b) { return ge(a, wrap(b, a)); }
Tensor operator==(const Tensor& a, Scalar b) { return eq(a, wrap(b, a)); }
Tensor operator!=(const Tensor& a, Scalar b) { return ne(a, wrap(b, a)); }
Tensor operator&(const Tensor& a, const Tensor& b) { return logical_and(a, b); }
Tensor operator|(const Tensor& a, const Tensor& b) { return logical_or(a, b); }
Tensor operator!(const Tensor& t) { return logical_not(t); }
Tensor& operator+=(Tensor& a, const Tensor& b) { return add_(a, b); }
Tensor& operator-=(Tensor& a, const Tensor& b) { return sub_(a, b); }
Tensor& operator*=(Tensor& a, const Tensor& b) { return mul_(a, b); }
Tensor& operator*=(Tensor& a, Scalar b) { return mul_(a, b); }

}  // namespace fg
