// CUDA kernel of embedding's weight gradient (ops/embedding_kernels.h). The generic index_add path walks
// all tokens serially for each column (B*T dependent read-modify-writes per thread, a few hundred threads
// busy); here the (id, token) pairs are sorted by id with CUB's radix sort, which is stable, so each id's
// tokens stay in token order. One block per (sorted position, group of 128 columns): the blocks that start
// a run of equal ids sum that run's gradient rows in order (a column per thread, the accumulator in a
// register, 8 rows' loads in flight), the other blocks return at once. Rows of ids that never occur are
// zeroed by a memset first. No atomics: the same inputs give the same bits, and float32/float64 sums are
// taken in the order the index_add path takes them. The cost of a run of R equal ids is about R / 8
// dependent memory round trips (a very frequent id, e.g. padding, bounds the kernel's time).
#include <cub/device/device_radix_sort.cuh>

#include "flexgrad/ops/cuda/cuda_common.cuh"
#include "flexgrad/ops/embedding_kernels.h"

namespace fg::cuda {
namespace {

constexpr int kSegThreads = 128, kInFlight = 8;

__global__ void iota_kernel(int* __restrict__ v, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v[i] = i;
}

// Block (start, column group): blocks whose sorted position does not start a run return at once. The
// run's token positions are staged in shared memory kSegThreads at a time; each thread owns one column
// and keeps kInFlight rows' loads in flight, adding them in token order.
template <class D>
__global__ void __launch_bounds__(kSegThreads) segment_sum_kernel(const unsigned long long* __restrict__ ids,
                                                                  const int* __restrict__ tokens, int n,
                                                                  const D* __restrict__ grad, D* __restrict__ out,
                                                                  int64_t dim) {
  using C = dc_t<D>;
  const int start = blockIdx.x;
  const unsigned long long id = ids[start];
  if (start > 0 && ids[start - 1] == id) return;
  // The run's end: the block scans kSegThreads ids at a time; the smallest differing position wins.
  __shared__ int s_end;
  __shared__ int s_tok[kSegThreads];
  if (threadIdx.x == 0) s_end = n;
  __syncthreads();
  for (int base = start + 1; base < n; base += kSegThreads) {
    const int j = base + static_cast<int>(threadIdx.x);
    const bool differs = j < n && ids[j] != id;
    if (differs) atomicMin(&s_end, j);
    if (__syncthreads_or(differs)) break;
  }
  const int end = s_end;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kSegThreads + threadIdx.x;
  const bool active = c < dim;
  const D* g = grad + (active ? c : 0);
  C acc = 0;
  for (int base = start; base < end; base += kSegThreads) {
    const int cnt = end - base < kSegThreads ? end - base : kSegThreads;
    __syncthreads();  // the previous chunk's positions are no longer read
    if (static_cast<int>(threadIdx.x) < cnt) s_tok[threadIdx.x] = tokens[base + threadIdx.x];
    __syncthreads();
    if (!active) continue;
    int k = 0;
    for (; k + kInFlight <= cnt; k += kInFlight) {
      C v[kInFlight];
#pragma unroll
      for (int q = 0; q < kInFlight; ++q) v[q] = load_c(g[static_cast<int64_t>(s_tok[k + q]) * dim]);
#pragma unroll
      for (int q = 0; q < kInFlight; ++q) acc += v[q];
    }
    for (; k < cnt; ++k) acc += load_c(g[static_cast<int64_t>(s_tok[k]) * dim]);
  }
  if (active) out[static_cast<int64_t>(id) * dim + c] = store_c<D>(acc);
}

int bits_for(int64_t num_embeddings) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) < num_embeddings) ++bits;
  return bits;
}

void embedding_bwd_cuda(const EmbeddingBwdArgs& a) {
  const int dev = device_of(a.out);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  const size_t elem = element_size(a.dtype);
  FG_CUDA_CHECK(cudaMemsetAsync(a.out, 0, elem * static_cast<size_t>(a.num_embeddings * a.dim), s));
  if (a.tokens == 0 || a.dim == 0) return;
  FG_CHECK(a.tokens < (int64_t{1} << 31), NotImplementedError,
           "embedding backward: {} tokens exceed the CUDA kernel's int range", a.tokens);
  const int n = static_cast<int>(a.tokens);
  Workspace keys_out(sizeof(unsigned long long) * n, dev), vals(sizeof(int) * n, dev), vals_out(sizeof(int) * n, dev);
  iota_kernel<<<grid_for(n, kThreads, dev), kThreads, 0, s>>>(vals.as<int>(), n);
  FG_CUDA_CHECK_LAUNCH();
  // Indices are validated non-negative, so their int64 bits sort as unsigned; only the bits an id can use.
  const auto* keys = reinterpret_cast<const unsigned long long*>(a.index);
  const int end_bit = bits_for(a.num_embeddings);
  size_t temp_bytes = 0;
  FG_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys, keys_out.as<unsigned long long>(),
                                                vals.as<int>(), vals_out.as<int>(), n, 0, end_bit, s));
  Workspace temp(temp_bytes, dev);
  FG_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.get(), temp_bytes, keys, keys_out.as<unsigned long long>(),
                                                vals.as<int>(), vals_out.as<int>(), n, 0, end_bit, s));
  dispatch_floating(a.dtype, "embedding backward", [&]<class D>() {
    const int64_t groups = (a.dim + kSegThreads - 1) / kSegThreads;
    FG_CHECK(groups <= 65535, NotImplementedError, "embedding backward: embedding_dim {} exceeds the CUDA grid", a.dim);
    segment_sum_kernel<D><<<dim3(static_cast<unsigned>(n), static_cast<unsigned>(groups)), kSegThreads, 0, s>>>(
        keys_out.as<unsigned long long>(), vals_out.as<int>(), n, static_cast<const D*>(a.grad), static_cast<D*>(a.out),
        a.dim);
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(embedding_bwd_stub, CUDA, embedding_bwd_cuda);

}  // namespace fg::cuda
