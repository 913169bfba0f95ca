// CPU kernels of the elementwise families (ops/elementwise.h). Half types load to float, compute and
// round back once per element.
#include <atomic>
#include <cstring>

#include "flexgrad/ops/cpu/parallel_loops.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/elementwise_math.h"

namespace fg::cpu {
namespace {

template <class T> using C = compute_t<T>;

// One case per op so each op gets its own loop with the op known at compile time (vectorisable).
#define FG_UNARY_CASE(OP) \
  case UnaryOp::OP: unary_loop<T, T>(p, [](T v) { return static_cast<T>(math::unary<C<T>>(UnaryOp::OP, static_cast<C<T>>(v))); }); break;
#define FG_BINARY_CASE(OP)                                                                                    \
  case BinaryOp::OP:                                                                                          \
    binary_loop<T, T>(p, [al](T a, T b) {                                                                     \
      return static_cast<T>(math::binary<C<T>>(BinaryOp::OP, static_cast<C<T>>(a), static_cast<C<T>>(b), al)); \
    });                                                                                                       \
    break;

void unary_kernel(const ElementwisePlan& p, UnaryOp op) {
  if (op == UnaryOp::LogicalNot || op == UnaryOp::IsNan || op == UnaryOp::IsInf) {
    FG_DISPATCH_ALL_TYPES(p.dtypes[1], unary_op_name(op), [&]<class T>() {
      unary_loop<bool, T>(p, [op](T v) -> bool {
        C<T> x = static_cast<C<T>>(v);
        if (op == UnaryOp::LogicalNot) return !(x != C<T>(0));
        if constexpr (std::is_floating_point_v<C<T>>) {
          return op == UnaryOp::IsNan ? std::isnan(x) : std::isinf(x);
        } else {
          return false;
        }
      });
    });
    return;
  }
  FG_DISPATCH_ALL_TYPES(p.dtypes[0], unary_op_name(op), [&]<class T>() {
    // Switch outside the loop so each op gets its own vectorisable loop.
    switch (op) {
      FG_UNARY_CASE(Neg) FG_UNARY_CASE(Exp) FG_UNARY_CASE(Exp2) FG_UNARY_CASE(Log) FG_UNARY_CASE(Log2)
      FG_UNARY_CASE(Sqrt) FG_UNARY_CASE(Rsqrt) FG_UNARY_CASE(Abs) FG_UNARY_CASE(Sin) FG_UNARY_CASE(Cos)
      FG_UNARY_CASE(Tan) FG_UNARY_CASE(Tanh) FG_UNARY_CASE(Sigmoid) FG_UNARY_CASE(Relu) FG_UNARY_CASE(Gelu)
      FG_UNARY_CASE(GeluTanh) FG_UNARY_CASE(Silu) FG_UNARY_CASE(Floor) FG_UNARY_CASE(Ceil) FG_UNARY_CASE(Round)
      FG_UNARY_CASE(Trunc) FG_UNARY_CASE(Sign) FG_UNARY_CASE(Reciprocal) FG_UNARY_CASE(Square)
      FG_UNARY_CASE(Expm1) FG_UNARY_CASE(Log1p) FG_UNARY_CASE(Erf)
      default: FG_FAIL(NotImplementedError, "unary kernel: {} not handled", unary_op_name(op));
    }
  });
}

void binary_kernel(const ElementwisePlan& p, BinaryOp op, double alpha) {
  if (math::is_comparison(op)) {
    FG_DISPATCH_ALL_TYPES(p.dtypes[1], binary_op_name(op), [&]<class T>() {
      binary_loop<bool, T>(p, [op](T a, T b) { return math::compare<C<T>>(op, static_cast<C<T>>(a), static_cast<C<T>>(b)); });
    });
    return;
  }
  std::atomic<bool> divided_by_zero{false};
  FG_DISPATCH_ALL_TYPES(p.dtypes[0], binary_op_name(op), [&]<class T>() {
    const auto al = static_cast<C<T>>(alpha);
    if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
      if (op == BinaryOp::FloorDiv || op == BinaryOp::Remainder || op == BinaryOp::Div) {
        binary_loop<T, T>(p, [&, op](T a, T b) {
          if (b == 0) divided_by_zero.store(true, std::memory_order_relaxed);
          return math::binary<T>(op, a, b, al);
        });
        return;
      }
    }
    switch (op) {
      FG_BINARY_CASE(Add) FG_BINARY_CASE(Sub) FG_BINARY_CASE(Mul) FG_BINARY_CASE(Div) FG_BINARY_CASE(FloorDiv)
      FG_BINARY_CASE(Remainder) FG_BINARY_CASE(Pow) FG_BINARY_CASE(Maximum) FG_BINARY_CASE(Minimum)
      default: FG_FAIL(NotImplementedError, "binary kernel: {} not handled", binary_op_name(op));
    }
  });
  FG_CHECK(!divided_by_zero.load(), ValueError, "{}: ZeroDivisionError (integer division by zero)", binary_op_name(op));
}

void where_kernel(const ElementwisePlan& p) {
  FG_DISPATCH_ALL_TYPES(p.dtypes[0], "where", [&]<class T>() {
    for_each_row(p, [&](char* const* ptrs, const int64_t* st, int64_t n) {
      for (int64_t i = 0; i < n; ++i) {
        bool c = *reinterpret_cast<const bool*>(ptrs[1] + i * st[1]);
        *reinterpret_cast<T*>(ptrs[0] + i * st[0]) =
            c ? *reinterpret_cast<const T*>(ptrs[2] + i * st[2]) : *reinterpret_cast<const T*>(ptrs[3] + i * st[3]);
      }
    });
  });
}

void copy_kernel(const ElementwisePlan& p) {
  if (p.dtypes[0] == p.dtypes[1] && p.is_contiguous(0) && p.is_contiguous(1)) {
    const size_t es = element_size(p.dtypes[0]);
    for_each_row(p, [&](char* const* ptrs, const int64_t*, int64_t n) { std::memcpy(ptrs[0], ptrs[1], n * es); });
    return;
  }
  FG_DISPATCH_ALL_TYPES(p.dtypes[0], "copy", [&]<class Out>() {
    FG_DISPATCH_ALL_TYPES(p.dtypes[1], "copy", [&]<class In>() {
      unary_loop<Out, In>(p, [](In v) {
        if constexpr (std::is_same_v<Out, bool>) return static_cast<C<In>>(v) != C<In>(0);
        else if constexpr (std::is_same_v<In, bool>) return static_cast<Out>(static_cast<C<Out>>(v ? 1 : 0));
        else return static_cast<Out>(static_cast<C<Out>>(static_cast<C<In>>(v)));
      });
    });
  });
}

void fill_kernel(const ElementwisePlan& p, Scalar value) {
  FG_DISPATCH_ALL_TYPES(p.dtypes[0], "fill", [&]<class T>() {
    const T v = value.to<T>();
    for_each_row(p, [&](char* const* ptrs, const int64_t* st, int64_t n) {
      if (st[0] == sizeof(T)) {
        T* out = reinterpret_cast<T*>(ptrs[0]);
        for (int64_t i = 0; i < n; ++i) out[i] = v;
      } else {
        for (int64_t i = 0; i < n; ++i) *reinterpret_cast<T*>(ptrs[0] + i * st[0]) = v;
      }
    });
  });
}

}  // namespace

FG_REGISTER_KERNEL(unary_stub, CPU, &unary_kernel);
FG_REGISTER_KERNEL(binary_stub, CPU, &binary_kernel);
FG_REGISTER_KERNEL(where_stub, CPU, &where_kernel);
FG_REGISTER_KERNEL(copy_stub, CPU, &copy_kernel);
FG_REGISTER_KERNEL(fill_stub, CPU, &fill_kernel);

}  // namespace fg::cpu
