// CPU row reductions: one row per iteration, rows split over OpenMP threads.
#include <cmath>
#include <limits>

#include "ops/reduce_kernels.h"

namespace fg::cpu {
namespace {

template <class T> using Acc = std::conditional_t<std::is_floating_point_v<compute_t<T>>, double, int64_t>;

void reduce_rows_kernel(const Tensor& in, const Tensor& out, ReduceOp op) {
  const int64_t rows = in.sizes()[0], cols = in.sizes()[1];
  if (op == ReduceOp::Any || op == ReduceOp::All) {
    FG_DISPATCH_ALL_TYPES(in.dtype(), "any/all", [&]<class T>() {
      const T* src = in.data<T>();
      bool* dst = out.data<bool>();
      _Pragma("omp parallel for if (rows * cols > 32768)")
      for (int64_t r = 0; r < rows; ++r) {
        bool acc = op == ReduceOp::All;
        for (int64_t c = 0; c < cols; ++c) {
          bool v = static_cast<compute_t<T>>(src[r * cols + c]) != compute_t<T>(0);
          acc = op == ReduceOp::All ? (acc && v) : (acc || v);
        }
        dst[r] = acc;
      }
    });
    return;
  }
  FG_DISPATCH_ALL_TYPES(in.dtype(), "reduce", [&]<class T>() {
    FG_DISPATCH_ALL_TYPES(out.dtype(), "reduce", [&]<class O>() {
      const T* src = in.data<T>();
      O* dst = out.data<O>();
      _Pragma("omp parallel for if (rows * cols > 32768)")
      for (int64_t r = 0; r < rows; ++r) {
        const T* row = src + r * cols;
        using A = Acc<T>;
        A acc;
        switch (op) {
          case ReduceOp::Sum: {
            acc = 0;
            for (int64_t c = 0; c < cols; ++c) acc += static_cast<A>(static_cast<compute_t<T>>(row[c]));
            break;
          }
          case ReduceOp::Prod: {
            acc = 1;
            for (int64_t c = 0; c < cols; ++c) acc *= static_cast<A>(static_cast<compute_t<T>>(row[c]));
            break;
          }
          default: {  // Max / Min, NaN propagates
            acc = static_cast<A>(static_cast<compute_t<T>>(row[0]));
            for (int64_t c = 1; c < cols; ++c) {
              A v = static_cast<A>(static_cast<compute_t<T>>(row[c]));
              if constexpr (std::is_floating_point_v<A>) {
                if (std::isnan(v) || std::isnan(acc)) { acc = std::numeric_limits<A>::quiet_NaN(); continue; }
              }
              acc = op == ReduceOp::Max ? (v > acc ? v : acc) : (v < acc ? v : acc);
            }
          }
        }
        if constexpr (std::is_same_v<O, bool>) dst[r] = acc != 0;
        else dst[r] = static_cast<O>(static_cast<compute_t<O>>(acc));
      }
    });
  });
}

}  // namespace

FG_REGISTER_KERNEL(reduce_rows_stub, CPU, &reduce_rows_kernel);

}  // namespace fg::cpu
