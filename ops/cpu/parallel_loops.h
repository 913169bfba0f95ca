// Running an ElementwisePlan on the CPU: the innermost dim is handed to a tight loop (with stride
// specialisations the compiler can vectorise), the rest is split across OpenMP threads.
#pragma once
#include <algorithm>

#include "flexgrad/ops/elementwise_plan.h"

namespace fg::cpu {

inline constexpr int64_t kParallelGrain = 32768;  // elements below which threads cost more than they save

// inner(char* const* ptrs, const int64_t* strides, int64_t n): process n elements of dim 0 starting at ptrs.
template <class Inner>
void for_each_row(const ElementwisePlan& p, Inner&& inner) {
  if (p.numel == 0) return;
  const int nops = p.noperands;
  int64_t strides0[kMaxPlanOperands];
  for (int i = 0; i < nops; ++i) strides0[i] = p.strides[i][0];
  const int64_t inner_n = p.sizes[0];
  const int64_t outer_n = p.numel / inner_n;
  if (outer_n == 1) {
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(inner_n / kParallelGrain, 256));
    const int64_t per = (inner_n + chunks - 1) / chunks;
#pragma omp parallel for if (chunks > 1) schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t start = c * per, len = std::min(per, inner_n - start);
      if (len <= 0) continue;
      char* ptrs[kMaxPlanOperands] = {};
      for (int i = 0; i < nops; ++i) ptrs[i] = p.data[i] + start * strides0[i];
      inner(ptrs, strides0, len);
    }
    return;
  }
#pragma omp parallel for if (p.numel > kParallelGrain) schedule(static)
  for (int64_t o = 0; o < outer_n; ++o) {
    char* ptrs[kMaxPlanOperands] = {};
    for (int i = 0; i < nops; ++i) ptrs[i] = p.data[i];
    int64_t rem = o;
    for (int d = 1; d < p.ndim; ++d) {
      int64_t idx = rem % p.sizes[d];
      rem /= p.sizes[d];
      for (int i = 0; i < nops; ++i) ptrs[i] += idx * p.strides[i][d];
    }
    inner(ptrs, strides0, inner_n);
  }
}

// out[i] = f(in[i]) with stored types Out/In; f works on values.
template <class Out, class In, class F>
void unary_loop(const ElementwisePlan& p, F f) {
  for_each_row(p, [&](char* const* ptrs, const int64_t* st, int64_t n) {
    auto* out = reinterpret_cast<Out*>(ptrs[0]);
    auto* in = reinterpret_cast<const In*>(ptrs[1]);
    if (st[0] == sizeof(Out) && st[1] == sizeof(In)) {
      for (int64_t i = 0; i < n; ++i) out[i] = f(in[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) {
        *reinterpret_cast<Out*>(ptrs[0] + i * st[0]) = f(*reinterpret_cast<const In*>(ptrs[1] + i * st[1]));
      }
    }
  });
}

// out[i] = f(a[i], b[i]); contiguous, scalar-broadcast and general strides each get their own loop.
template <class Out, class In, class F>
void binary_loop(const ElementwisePlan& p, F f) {
  for_each_row(p, [&](char* const* ptrs, const int64_t* st, int64_t n) {
    auto* out = reinterpret_cast<Out*>(ptrs[0]);
    auto* a = reinterpret_cast<const In*>(ptrs[1]);
    auto* b = reinterpret_cast<const In*>(ptrs[2]);
    if (st[0] == sizeof(Out) && st[1] == sizeof(In) && st[2] == sizeof(In)) {
      for (int64_t i = 0; i < n; ++i) out[i] = f(a[i], b[i]);
    } else if (st[0] == sizeof(Out) && st[1] == sizeof(In) && st[2] == 0) {
      const In bv = *b;
      for (int64_t i = 0; i < n; ++i) out[i] = f(a[i], bv);
    } else if (st[0] == sizeof(Out) && st[1] == 0 && st[2] == sizeof(In)) {
      const In av = *a;
      for (int64_t i = 0; i < n; ++i) out[i] = f(av, b[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) {
        *reinterpret_cast<Out*>(ptrs[0] + i * st[0]) = f(*reinterpret_cast<const In*>(ptrs[1] + i * st[1]),
                                                         *reinterpret_cast<const In*>(ptrs[2] + i * st[2]));
      }
    }
  });
}

}  // namespace fg::cpu
