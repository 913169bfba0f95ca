// CUDA kernels behind ops/reduce_kernels.h: reductions (block per output with a deterministic split of long
// rows into partials, or thread per output when the reduced elements are strided and outputs many),
// arg-reductions, scans (cub::BlockScan with a running prefix) and sorts (cub segmented radix sort on
// order-preserving 64-bit keys, which is stable: equal values keep their input order as on the CPU).
#include <cub/block/block_scan.cuh>
#include <cuda/std/limits>
#include <cub/device/device_segmented_radix_sort.cuh>

#include "flexgrad/ops/cuda/layout_device.cuh"
#include "flexgrad/ops/reduce_kernels.h"

namespace fg::cuda {
namespace {

// ---------------------------------------------------------------- accumulators (mirror ops/cpu/reduce_cpu.cpp)

template <class D, ReduceOp OP> struct RAcc;

template <class D> constexpr bool is_fp_v = std::is_floating_point_v<dc_t<D>>;

template <class D> struct RAcc<D, ReduceOp::Sum> {
  using acc_t = std::conditional_t<is_fp_v<D>, double, long long>;
  using out_t = std::conditional_t<is_fp_v<D>, D, int64_t>;
  static __device__ acc_t init() { return 0; }
  static __device__ acc_t from(D v) { return static_cast<acc_t>(load_c(v)); }
  static __device__ acc_t combine(acc_t a, acc_t b) { return a + b; }
};
template <class D> struct RAcc<D, ReduceOp::Prod> {
  using acc_t = std::conditional_t<is_fp_v<D>, double, long long>;
  using out_t = std::conditional_t<is_fp_v<D>, D, int64_t>;
  static __device__ acc_t init() { return 1; }
  static __device__ acc_t from(D v) { return static_cast<acc_t>(load_c(v)); }
  static __device__ acc_t combine(acc_t a, acc_t b) { return a * b; }
};
template <class D, bool IsMax> struct ExtremeAcc {
  using acc_t = std::conditional_t<std::is_same_v<dc_t<D>, int64_t>, long long, dc_t<D>>;
  using out_t = D;
  static __device__ acc_t init() {
    if constexpr (std::is_same_v<acc_t, bool>) return !IsMax;
    else if constexpr (std::is_floating_point_v<acc_t>) return IsMax ? -INFINITY : INFINITY;
    else return IsMax ? ::cuda::std::numeric_limits<acc_t>::lowest() : ::cuda::std::numeric_limits<acc_t>::max();
  }
  static __device__ bool better(acc_t v, acc_t acc) {
    if constexpr (std::is_floating_point_v<acc_t>) {
      if (acc != acc) return false;
      if (v != v) return true;
    }
    return IsMax ? v > acc : v < acc;
  }
  static __device__ acc_t from(D v) { return static_cast<acc_t>(load_c(v)); }
  static __device__ acc_t combine(acc_t a, acc_t b) { return better(b, a) ? b : a; }
};
template <class D> struct RAcc<D, ReduceOp::Max> : ExtremeAcc<D, true> {};
template <class D> struct RAcc<D, ReduceOp::Min> : ExtremeAcc<D, false> {};
template <class D, bool IsAny> struct LogicAcc {
  using acc_t = bool;
  using out_t = bool;
  static __device__ bool init() { return !IsAny; }
  static __device__ bool from(D v) {
    auto x = load_c(v);
    return x != decltype(x)(0);
  }
  static __device__ bool combine(bool a, bool b) { return IsAny ? (a || b) : (a && b); }
};
template <class D> struct RAcc<D, ReduceOp::Any> : LogicAcc<D, true> {};
template <class D> struct RAcc<D, ReduceOp::All> : LogicAcc<D, false> {};

template <class Out, class A> __device__ Out finish(A a) {
  if constexpr (std::is_same_v<Out, bool>) return a;
  else return store_c<Out>(static_cast<dc_t<Out>>(a));
}

// ---------------------------------------------------------------- reduce

// Block (o, s) reduces the reduced elements [s * chunk, min((s+1) * chunk, n_red)) of output o. With one
// split it writes the output, else a partial (combined in split order by reduce_finish: deterministic).
template <class D, ReduceOp OP>
__global__ void __launch_bounds__(kThreads) reduce_block_kernel(ReduceLayout l, const D* __restrict__ in, void* out,
                                                                typename RAcc<D, OP>::acc_t* partial, int64_t chunk) {
  using Acc = RAcc<D, OP>;
  using acc_t = typename Acc::acc_t;
  __shared__ acc_t shared[32];
  const int64_t o = blockIdx.x;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t end = begin + chunk < l.n_red ? begin + chunk : l.n_red;
  const D* base = in + kept_in_off(l, o);
  acc_t acc = Acc::init();
  const bool unit = l.red_ndim == 1 && l.red_in_strides[0] == 1;
  if (unit) {
    constexpr int V = 16 / sizeof(D) > 8 ? 8 : 16 / sizeof(D);
    const D* p = base + begin;
    const int64_t n = end - begin;
    int64_t head = 0;
    // Peel elements until p is 16-byte aligned, then 16-byte vector loads.
    while (head < n && (reinterpret_cast<uintptr_t>(p + head) % 16) != 0) ++head;
    if (head > n) head = n;
    for (int64_t i = threadIdx.x; i < head; i += blockDim.x) acc = Acc::combine(acc, Acc::from(p[i]));
    const int64_t nvec = (n - head) / V;
    const auto* pv = reinterpret_cast<const Vec<D, V>*>(p + head);
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      Vec<D, V> v = pv[i];
#pragma unroll
      for (int j = 0; j < V; ++j) acc = Acc::combine(acc, Acc::from(v.v[j]));
    }
    for (int64_t i = head + nvec * V + threadIdx.x; i < n; i += blockDim.x) acc = Acc::combine(acc, Acc::from(p[i]));
  } else {
    for (int64_t r = begin + threadIdx.x; r < end; r += blockDim.x) acc = Acc::combine(acc, Acc::from(base[red_in_off(l, r)]));
  }
  acc = block_reduce(acc, [](acc_t a, acc_t b) { return Acc::combine(a, b); }, shared);
  if (threadIdx.x == 0) {
    if (gridDim.y == 1) static_cast<typename Acc::out_t*>(out)[o] = finish<typename Acc::out_t>(acc);
    else partial[o * gridDim.y + blockIdx.y] = acc;
  }
}

// One block per output combines its partials with a fixed thread assignment and tree: deterministic.
template <class D, ReduceOp OP>
__global__ void __launch_bounds__(kThreads) reduce_finish_kernel(int64_t n_out, int splits,
                                                                 const typename RAcc<D, OP>::acc_t* partial, void* out) {
  using Acc = RAcc<D, OP>;
  using acc_t = typename Acc::acc_t;
  __shared__ acc_t shared[32];
  const int64_t o = blockIdx.x;
  acc_t acc = Acc::init();
  for (int s = threadIdx.x; s < splits; s += blockDim.x) acc = Acc::combine(acc, partial[o * splits + s]);
  acc = block_reduce(acc, [](acc_t a, acc_t b) { return Acc::combine(a, b); }, shared);
  if (threadIdx.x == 0) static_cast<typename Acc::out_t*>(out)[o] = finish<typename Acc::out_t>(acc);
}

// One thread per output: coalesced when neighbouring outputs are neighbours in memory (reducing an outer dim).
template <class D, ReduceOp OP>
__global__ void reduce_thread_kernel(ReduceLayout l, const D* __restrict__ in, void* out) {
  using Acc = RAcc<D, OP>;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= l.n_out) return;
  const D* base = in + kept_in_off(l, o);
  auto acc = Acc::init();
  for (int64_t r = 0; r < l.n_red; ++r) acc = Acc::combine(acc, Acc::from(base[red_in_off(l, r)]));
  static_cast<typename Acc::out_t*>(out)[o] = finish<typename Acc::out_t>(acc);
}

template <class D, ReduceOp OP> void reduce_typed(const ReduceLayout& l, const void* in, void* out) {
  using Acc = RAcc<D, OP>;
  const int dev = device_of(in ? in : out);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  const D* p = static_cast<const D*>(in);
  const bool inner_unit = l.red_ndim >= 1 && l.red_in_strides[l.red_ndim - 1] == 1;
  if (l.n_red == 0 || (!inner_unit && l.n_out >= 4 * num_sms(dev))) {
    reduce_thread_kernel<D, OP><<<static_cast<unsigned>((l.n_out + kThreads - 1) / kThreads), kThreads, 0, s>>>(l, p, out);
    FG_CUDA_CHECK_LAUNCH();
    return;
  }
  // Enough blocks to fill the GPU a few times over, each at least 8K elements.
  int64_t splits = 1;
  const int64_t want_blocks = 4LL * num_sms(dev) * (2048 / kThreads);
  if (l.n_out < want_blocks && l.n_red > 16384) {
    splits = std::min<int64_t>((l.n_red + 8191) / 8192, (want_blocks + l.n_out - 1) / l.n_out);
    splits = std::min<int64_t>(splits, 65535);
  }
  int64_t chunk = (l.n_red + splits - 1) / splits;
  chunk = (chunk + 63) / 64 * 64;  // keep chunk starts aligned for vector loads
  splits = (l.n_red + chunk - 1) / chunk;
  FG_CHECK(l.n_out <= 0x7fffffff, NotImplementedError, "reduce: {} outputs exceed the CUDA grid", l.n_out);
  Workspace partial(splits > 1 ? sizeof(typename Acc::acc_t) * l.n_out * splits : 0, dev);
  dim3 grid(static_cast<unsigned>(l.n_out), static_cast<unsigned>(splits));
  reduce_block_kernel<D, OP><<<grid, kThreads, 0, s>>>(l, p, out, partial.as<typename Acc::acc_t>(), chunk);
  FG_CUDA_CHECK_LAUNCH();
  if (splits > 1) {
    reduce_finish_kernel<D, OP><<<static_cast<unsigned>(l.n_out), kThreads, 0, s>>>(
        l.n_out, static_cast<int>(splits), partial.as<typename Acc::acc_t>(), out);
    FG_CUDA_CHECK_LAUNCH();
  }
}

void reduce_cuda(ReduceOp op, const ReduceLayout& l, const void* in, DType in_dtype, void* out) {
  if (l.n_out == 0) return;
  dispatch_all(in_dtype, "reduce", [&]<class D>() {
    switch (op) {
      case ReduceOp::Sum: reduce_typed<D, ReduceOp::Sum>(l, in, out); break;
      case ReduceOp::Prod: reduce_typed<D, ReduceOp::Prod>(l, in, out); break;
      case ReduceOp::Max: reduce_typed<D, ReduceOp::Max>(l, in, out); break;
      case ReduceOp::Min: reduce_typed<D, ReduceOp::Min>(l, in, out); break;
      case ReduceOp::Any: reduce_typed<D, ReduceOp::Any>(l, in, out); break;
      case ReduceOp::All: reduce_typed<D, ReduceOp::All>(l, in, out); break;
    }
  });
}

// ---------------------------------------------------------------- arg-reduce

template <class A> struct ArgPair {
  A v;
  long long i;
};

template <class D, bool IsMax>
__global__ void __launch_bounds__(kThreads) arg_reduce_kernel(ReduceLayout l, const D* __restrict__ in, D* values,
                                                              int64_t* indices) {
  using E = ExtremeAcc<D, IsMax>;
  using A = typename E::acc_t;
  using P = ArgPair<A>;
  __shared__ A sv[32];
  __shared__ long long si[32];
  const int64_t o = blockIdx.x;
  const D* base = in + kept_in_off(l, o);
  const int64_t n = l.n_red;
  P best{E::init(), n};  // index n: "nothing seen" (loses every tie)
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) {
    A v = E::from(base[red_in_off(l, r)]);
    if (best.i == n || E::better(v, best.v)) best = P{v, r};
  }
  // Combine: the better value wins; equal values (or two NaNs) give the lower index.
  auto combine = [](P a, P b) -> P {
    if (E::better(b.v, a.v)) return b;
    if (E::better(a.v, b.v)) return a;
    return b.i < a.i ? b : a;
  };
  // block_reduce on a pair: reduce warps by shuffles of both fields.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int d = 16; d > 0; d >>= 1) {
    P other{shfl_down(best.v, d), shfl_down(best.i, d)};
    if (lane + d < 32) best = combine(best, other);
  }
  if (lane == 0) { sv[warp] = best.v; si[warp] = best.i; }
  __syncthreads();
  if (warp == 0) {
    best = lane < nwarps ? P{sv[lane], si[lane]} : P{sv[0], si[0]};
    for (int d = 16; d > 0; d >>= 1) {
      P other{shfl_down(best.v, d), shfl_down(best.i, d)};
      if (lane + d < nwarps) best = combine(best, other);
    }
    if (lane == 0) {
      values[o] = base[red_in_off(l, best.i)];
      indices[o] = best.i;
    }
  }
}

void arg_reduce_cuda(bool is_max, const ReduceLayout& l, const void* in, DType dtype, void* values, int64_t* indices) {
  if (l.n_out == 0) return;
  FG_CHECK(l.n_red > 0, IndexError, "argmax/argmin: cannot reduce an empty dimension");
  const int dev = device_of(in);
  DeviceGuard g(dev);
  dispatch_all(dtype, is_max ? "argmax" : "argmin", [&]<class D>() {
    auto* p = static_cast<const D*>(in);
    auto* v = static_cast<D*>(values);
    if (is_max) arg_reduce_kernel<D, true><<<static_cast<unsigned>(l.n_out), kThreads, 0, stream(dev)>>>(l, p, v, indices);
    else arg_reduce_kernel<D, false><<<static_cast<unsigned>(l.n_out), kThreads, 0, stream(dev)>>>(l, p, v, indices);
    FG_CUDA_CHECK_LAUNCH();
  });
}

// ---------------------------------------------------------------- scan (cumsum)

template <class D>
__global__ void __launch_bounds__(kThreads) scan_kernel(ReduceLayout l, const D* __restrict__ in, void* out_v, bool reverse) {
  using Acc = RAcc<D, ReduceOp::Sum>;
  using acc_t = typename Acc::acc_t;
  using out_t = typename Acc::out_t;
  using Scan = cub::BlockScan<acc_t, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  __shared__ acc_t carry;
  const int64_t o = blockIdx.x;
  const D* src = in + kept_in_off(l, o);
  out_t* dst = static_cast<out_t*>(out_v) + kept_out_off(l, o);
  const int64_t n = inner_n(l), s = inner_s(l), os = inner_os(l);
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < n; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    const int64_t i = reverse ? n - 1 - j : j;
    acc_t v = j < n ? Acc::from(src[i * s]) : acc_t(0);
    acc_t incl, total;
    Scan(temp).InclusiveSum(v, incl, total);
    const acc_t c = carry;
    if (j < n) dst[i * os] = finish<out_t>(c + incl);
    __syncthreads();
    if (threadIdx.x == 0) carry = c + total;
    __syncthreads();
  }
}

void scan_cuda(const ReduceLayout& l, const void* in, DType in_dtype, void* out, bool reverse) {
  if (l.n_out == 0) return;
  FG_ASSERT(l.red_ndim <= 1);
  const int dev = device_of(in);
  DeviceGuard g(dev);
  dispatch_all(in_dtype, "cumsum", [&]<class D>() {
    scan_kernel<D><<<static_cast<unsigned>(l.n_out), kThreads, 0, stream(dev)>>>(l, static_cast<const D*>(in), out, reverse);
    FG_CUDA_CHECK_LAUNCH();
  });
}

// ---------------------------------------------------------------- sort / topk

// Order-preserving unsigned key: NaN largest, -0 == +0, integers by value.
template <class D> __device__ unsigned long long sort_key(D v) {
  auto x = load_c(v);
  using C = decltype(x);
  if constexpr (std::is_floating_point_v<C>) {
    double d = static_cast<double>(x);
    if (d != d) return ~0ULL;
    if (d == 0.0) d = 0.0;
    unsigned long long u = __double_as_longlong(d);
    return (u >> 63) ? ~u : (u | (1ULL << 63));
  } else if constexpr (std::is_same_v<C, bool>) {
    return x ? 1ULL : 0ULL;
  } else {
    return static_cast<unsigned long long>(static_cast<long long>(x)) ^ (1ULL << 63);
  }
}

template <class D>
__global__ void sort_keys_kernel(ReduceLayout l, const D* __restrict__ in, unsigned long long* keys, int64_t* idx,
                                 int* offsets, bool descending) {
  const int64_t n = inner_n(l), s = inner_s(l);
  const int64_t total = l.n_out * n;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = t / n, i = t - o * n;
    unsigned long long k = sort_key(in[kept_in_off(l, o) + i * s]);
    keys[t] = descending ? ~k : k;
    idx[t] = i;
    if (i == 0) offsets[o] = static_cast<int>(t);
    if (t == total - 1) offsets[l.n_out] = static_cast<int>(total);
  }
}

template <class D>
__global__ void sort_write_kernel(ReduceLayout l, const D* __restrict__ in, const int64_t* sorted_idx, D* values,
                                  int64_t* indices, int64_t k) {
  const int64_t n = inner_n(l), s = inner_s(l), os = inner_os(l);
  const int64_t total = l.n_out * k;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = t / k, i = t - o * k;
    const int64_t src_i = sorted_idx[o * n + i];
    const int64_t off = kept_out_off(l, o) + i * os;
    values[off] = in[kept_in_off(l, o) + src_i * s];
    indices[off] = src_i;
  }
}

void sort_cuda(const ReduceLayout& l, const void* in, DType dtype, void* values, int64_t* indices, int64_t k,
               bool descending) {
  FG_ASSERT(l.red_ndim <= 1);
  const int64_t n = inner_n(l);
  const int64_t total = l.n_out * n;
  if (total == 0 || k == 0) return;
  FG_CHECK(total < (int64_t{1} << 31), NotImplementedError, "sort: {} elements exceed the CUDA sort's int range", total);
  const int dev = device_of(in);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  Workspace keys(sizeof(unsigned long long) * total, dev), keys_out(sizeof(unsigned long long) * total, dev);
  Workspace idx(sizeof(int64_t) * total, dev), idx_out(sizeof(int64_t) * total, dev);
  Workspace offsets(sizeof(int) * (l.n_out + 1), dev);
  dispatch_all(dtype, "sort", [&]<class D>() {
    sort_keys_kernel<D><<<grid_for(total, kThreads, dev), kThreads, 0, s>>>(l, static_cast<const D*>(in),
                                                                            keys.as<unsigned long long>(),
                                                                            idx.as<int64_t>(), offsets.as<int>(), descending);
    FG_CUDA_CHECK_LAUNCH();
    size_t temp_bytes = 0;
    const int* off = offsets.as<int>();
    FG_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(nullptr, temp_bytes, keys.as<unsigned long long>(),
                                                           keys_out.as<unsigned long long>(), idx.as<int64_t>(),
                                                           idx_out.as<int64_t>(), static_cast<int>(total),
                                                           static_cast<int>(l.n_out), off, off + 1, 0, 64, s));
    Workspace temp(temp_bytes, dev);
    FG_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairs(temp.get(), temp_bytes, keys.as<unsigned long long>(),
                                                           keys_out.as<unsigned long long>(), idx.as<int64_t>(),
                                                           idx_out.as<int64_t>(), static_cast<int>(total),
                                                           static_cast<int>(l.n_out), off, off + 1, 0, 64, s));
    sort_write_kernel<D><<<grid_for(l.n_out * k, kThreads, dev), kThreads, 0, s>>>(
        l, static_cast<const D*>(in), idx_out.as<int64_t>(), static_cast<D*>(values), indices, k);
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(reduce_stub, CUDA, reduce_cuda);
FG_REGISTER_KERNEL(arg_reduce_stub, CUDA, arg_reduce_cuda);
FG_REGISTER_KERNEL(scan_stub, CUDA, scan_cuda);
FG_REGISTER_KERNEL(sort_stub, CUDA, sort_cuda);

}  // namespace fg::cuda
