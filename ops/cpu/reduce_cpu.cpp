// CPU kernels for reductions, arg-reductions, prefix sums and sorting (ops/reduce_kernels.h).
//
// Parallelism: with many output positions, OpenMP splits the outputs; with few outputs and long
// reductions (a full sum of a big tensor), each output's reduced range is cut into fixed chunks whose
// partial results are combined in chunk order, so the result does not depend on thread scheduling.
#include <omp.h>

#include <memory>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "flexgrad/ops/reduce_kernels.h"

namespace fg {
namespace {

constexpr int64_t kParallelGrain = 32768;  // fewer elements than this: not worth waking threads
constexpr int64_t kChunk = 16384;          // reduced elements per partial result in the chunked path

template <class T> constexpr bool is_float_v = std::is_floating_point_v<compute_t<T>>;

template <class Out, class V> Out to_out(V v) {
  if constexpr (std::is_same_v<Out, Half> || std::is_same_v<Out, BFloat16>) return Out(static_cast<float>(v));
  else return static_cast<Out>(v);
}

// Calls f(pointer offset, length, stride) for the reduced elements [begin, end) of the position whose
// input offset is `base`, one contiguous run of the innermost reduced dim at a time.
template <class F>
inline void for_each_run(const ReduceLayout& l, int64_t base, int64_t begin, int64_t end, F&& f) {
  const int64_t n = l.inner_size(), s = l.inner_in_stride();
  int64_t r = begin;
  while (r < end) {
    int64_t col = r % n;
    int64_t len = std::min(n - col, end - r);
    f(base + l.red_in_offset(r - col) + col * s, len, s);
    r += len;
  }
}

// ---- accumulators: init / add a run / combine two partials / finish to the output type ----
template <class T> struct SumAcc {
  using acc_t = std::conditional_t<is_float_v<T>, double, int64_t>;
  using out_t = std::conditional_t<is_float_v<T>, T, int64_t>;
  static acc_t init() { return 0; }
  static void run(acc_t& acc, const T* p, int64_t n, int64_t s) {
    // Four independent partial sums: breaks the add dependency chain and halves rounding growth.
    acc_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      a0 += static_cast<acc_t>(static_cast<compute_t<T>>(p[i * s]));
      a1 += static_cast<acc_t>(static_cast<compute_t<T>>(p[(i + 1) * s]));
      a2 += static_cast<acc_t>(static_cast<compute_t<T>>(p[(i + 2) * s]));
      a3 += static_cast<acc_t>(static_cast<compute_t<T>>(p[(i + 3) * s]));
    }
    for (; i < n; ++i) a0 += static_cast<acc_t>(static_cast<compute_t<T>>(p[i * s]));
    acc += (a0 + a1) + (a2 + a3);
  }
  static acc_t combine(acc_t a, acc_t b) { return a + b; }
};

template <class T> struct ProdAcc {
  using acc_t = std::conditional_t<is_float_v<T>, double, int64_t>;
  using out_t = std::conditional_t<is_float_v<T>, T, int64_t>;
  static acc_t init() { return 1; }
  static void run(acc_t& acc, const T* p, int64_t n, int64_t s) {
    for (int64_t i = 0; i < n; ++i) acc *= static_cast<acc_t>(static_cast<compute_t<T>>(p[i * s]));
  }
  static acc_t combine(acc_t a, acc_t b) { return a * b; }
};

// Max/Min keep NaN once seen: `v != v` is only true for NaN, and a NaN accumulator never compares greater.
template <class T, bool IsMax> struct ExtremeAcc {
  using acc_t = compute_t<T>;
  using out_t = T;
  static acc_t init() {
    if constexpr (std::is_same_v<acc_t, bool>) return !IsMax;
    else if constexpr (std::is_floating_point_v<acc_t>)
      return IsMax ? -std::numeric_limits<acc_t>::infinity() : std::numeric_limits<acc_t>::infinity();
    else return IsMax ? std::numeric_limits<acc_t>::lowest() : std::numeric_limits<acc_t>::max();
  }
  static bool better(acc_t v, acc_t acc) {
    if constexpr (std::is_floating_point_v<acc_t>) {
      if (acc != acc) return false;
      if (v != v) return true;
    }
    return IsMax ? v > acc : v < acc;
  }
  static void run(acc_t& acc, const T* p, int64_t n, int64_t s) {
    for (int64_t i = 0; i < n; ++i) {
      acc_t v = static_cast<acc_t>(p[i * s]);
      if (better(v, acc)) acc = v;
    }
  }
  static acc_t combine(acc_t a, acc_t b) { return better(b, a) ? b : a; }
};

template <class T, bool IsAny> struct LogicAcc {
  using acc_t = bool;
  using out_t = bool;
  static acc_t init() { return !IsAny; }
  static void run(acc_t& acc, const T* p, int64_t n, int64_t s) {
    for (int64_t i = 0; i < n && acc == !IsAny; ++i) {
      bool nz = static_cast<compute_t<T>>(p[i * s]) != compute_t<T>(0);
      if (nz == IsAny) acc = IsAny;
    }
  }
  static acc_t combine(acc_t a, acc_t b) { return IsAny ? (a || b) : (a && b); }
};

template <class Acc, class T>
void reduce_loop(const ReduceLayout& l, const T* in, typename Acc::out_t* out) {
  using acc_t = typename Acc::acc_t;
  const int64_t total = l.n_out * l.n_red;
  const int threads = omp_get_max_threads();
  if (l.n_out >= threads || l.n_red < 2 * kChunk || threads == 1) {
#pragma omp parallel for schedule(static) if (total > kParallelGrain && l.n_out > 1)
    for (int64_t o = 0; o < l.n_out; ++o) {
      acc_t acc = Acc::init();
      for_each_run(l, l.in_offset(o), 0, l.n_red, [&](int64_t off, int64_t n, int64_t s) { Acc::run(acc, in + off, n, s); });
      out[o] = to_out<typename Acc::out_t>(acc);
    }
    return;
  }
  // Few outputs, long reductions: fixed chunks, partials combined in order (deterministic).
  const int64_t nchunks = (l.n_red + kChunk - 1) / kChunk;
  // Not std::vector<acc_t>: for any/all acc_t is bool, and vector<bool> packs partials into shared words,
  // so threads writing neighbouring chunks lost each other's bits (all() of a big tensor came out false).
  std::unique_ptr<acc_t[]> partial(new acc_t[nchunks]);
  for (int64_t o = 0; o < l.n_out; ++o) {
    const int64_t base = l.in_offset(o);
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      acc_t acc = Acc::init();
      for_each_run(l, base, c * kChunk, std::min(l.n_red, (c + 1) * kChunk),
                   [&](int64_t off, int64_t n, int64_t s) { Acc::run(acc, in + off, n, s); });
      partial[c] = acc;
    }
    acc_t acc = Acc::init();
    for (int64_t c = 0; c < nchunks; ++c) acc = Acc::combine(acc, partial[c]);
    out[o] = to_out<typename Acc::out_t>(acc);
  }
}

void reduce_cpu(ReduceOp op, const ReduceLayout& l, const void* in, DType dtype, void* out) {
  FG_DISPATCH_ALL_TYPES(dtype, "reduce", [&]<class T>() {
    const T* p = static_cast<const T*>(in);
    auto go = [&]<class Acc>() { reduce_loop<Acc>(l, p, static_cast<typename Acc::out_t*>(out)); };
    switch (op) {
      case ReduceOp::Sum: go.template operator()<SumAcc<T>>(); break;
      case ReduceOp::Prod: go.template operator()<ProdAcc<T>>(); break;
      case ReduceOp::Max: go.template operator()<ExtremeAcc<T, true>>(); break;
      case ReduceOp::Min: go.template operator()<ExtremeAcc<T, false>>(); break;
      case ReduceOp::Any: go.template operator()<LogicAcc<T, true>>(); break;
      case ReduceOp::All: go.template operator()<LogicAcc<T, false>>(); break;
    }
  });
}

template <class T, bool IsMax>
void arg_reduce_typed(const ReduceLayout& l, const T* p, T* vout, int64_t* indices) {
  using Acc = ExtremeAcc<T, IsMax>;
  using acc_t = typename Acc::acc_t;
#pragma omp parallel for schedule(static) if (l.n_out * l.n_red > kParallelGrain && l.n_out > 1)
  for (int64_t o = 0; o < l.n_out; ++o) {
    const int64_t base = l.in_offset(o);
    acc_t best = static_cast<acc_t>(p[base]);
    int64_t best_i = 0, r0 = 0;
    for_each_run(l, base, 0, l.n_red, [&](int64_t off, int64_t n, int64_t s) {
      for (int64_t i = 0; i < n; ++i) {
        acc_t v = static_cast<acc_t>(p[off + i * s]);
        if (Acc::better(v, best)) { best = v; best_i = r0 + i; }  // strict: the first index wins ties
      }
      r0 += n;
    });
    vout[o] = to_out<T>(best);
    indices[o] = best_i;
  }
}

void arg_reduce_cpu(bool is_max, const ReduceLayout& l, const void* in, DType dtype, void* values, int64_t* indices) {
  FG_DISPATCH_ALL_TYPES(dtype, "argmax/argmin", [&]<class T>() {
    if (is_max) arg_reduce_typed<T, true>(l, static_cast<const T*>(in), static_cast<T*>(values), indices);
    else arg_reduce_typed<T, false>(l, static_cast<const T*>(in), static_cast<T*>(values), indices);
  });
}

template <class T>
void scan_typed(const ReduceLayout& l, const T* p, typename SumAcc<T>::out_t* q, bool reverse) {
  using Acc = SumAcc<T>;
  using out_t = typename Acc::out_t;
  const int64_t n = l.inner_size(), s = l.inner_in_stride(), os = l.inner_out_stride();
  FG_ASSERT(l.red_ndim <= 1);
#pragma omp parallel for schedule(static) if (l.n_out * n > kParallelGrain && l.n_out > 1)
  for (int64_t o = 0; o < l.n_out; ++o) {
    const T* src = p + l.in_offset(o);
    out_t* dst = q + l.out_offset(o);
    typename Acc::acc_t acc = 0;
    for (int64_t j = 0; j < n; ++j) {
      int64_t i = reverse ? n - 1 - j : j;
      acc += static_cast<typename Acc::acc_t>(static_cast<compute_t<T>>(src[i * s]));
      dst[i * os] = to_out<out_t>(acc);
    }
  }
}

void scan_cpu(const ReduceLayout& l, const void* in, DType dtype, void* out, bool reverse) {
  FG_DISPATCH_ALL_TYPES(dtype, "cumsum", [&]<class T>() {
    scan_typed<T>(l, static_cast<const T*>(in), static_cast<typename SumAcc<T>::out_t*>(out), reverse);
  });
}

template <class T>
void sort_typed(const ReduceLayout& l, const T* p, T* vout, int64_t* indices, int64_t k, bool descending) {
  using C = compute_t<T>;
  const int64_t n = l.inner_size(), s = l.inner_in_stride(), os = l.inner_out_stride();
  FG_ASSERT(l.red_ndim <= 1 && k <= n);
  // A strict total order on (value, index): NaN is the largest value; equal values keep input order,
  // which makes a partial sort give exactly the prefix of the stable sort.
  auto before = [descending](const std::pair<C, int64_t>& a, const std::pair<C, int64_t>& b) {
    bool an = false, bn = false;
    if constexpr (std::is_floating_point_v<C>) { an = a.first != a.first; bn = b.first != b.first; }
    if (an != bn) return descending ? an : bn;
    if (!an && a.first != b.first) return descending ? a.first > b.first : a.first < b.first;
    return a.second < b.second;
  };
#pragma omp parallel for schedule(static) if (l.n_out * n > kParallelGrain && l.n_out > 1)
  for (int64_t o = 0; o < l.n_out; ++o) {
    const T* src = p + l.in_offset(o);
    std::vector<std::pair<C, int64_t>> row(n);
    for (int64_t i = 0; i < n; ++i) row[i] = {static_cast<C>(src[i * s]), i};
    if (k < n) std::partial_sort(row.begin(), row.begin() + k, row.end(), before);
    else std::sort(row.begin(), row.end(), before);  // the index tie-break makes it stable
    const int64_t ooff = l.out_offset(o);
    for (int64_t i = 0; i < k; ++i) {
      vout[ooff + i * os] = to_out<T>(row[i].first);
      indices[ooff + i * os] = row[i].second;
    }
  }
}

void sort_cpu(const ReduceLayout& l, const void* in, DType dtype, void* values, int64_t* indices, int64_t k,
              bool descending) {
  FG_DISPATCH_ALL_TYPES(dtype, "sort", [&]<class T>() {
    sort_typed<T>(l, static_cast<const T*>(in), static_cast<T*>(values), indices, k, descending);
  });
}

}  // namespace

FG_REGISTER_KERNEL(reduce_stub, CPU, reduce_cpu);
FG_REGISTER_KERNEL(arg_reduce_stub, CPU, arg_reduce_cpu);
FG_REGISTER_KERNEL(scan_stub, CPU, scan_cpu);
FG_REGISTER_KERNEL(sort_stub, CPU, sort_cpu);

}  // namespace fg
