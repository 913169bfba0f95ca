// CUDA kernel of embedding's weight gradient (ops/embedding_kernels.h). The generic index_add path walks
// all tokens serially for each column (B*T dependent read-modify-writes per thread, a few hundred threads
// busy); here the (id, token) pairs are sorted by id with CUB's radix sort, which is stable, so each id's
// tokens stay in token order. One block per sorted position: the block that starts a run of equal ids sums
// that run's gradient rows in order (columns across threads, the accumulator in registers), the other
// blocks return at once. Rows of ids that never occur are zeroed by a memset first. No atomics: the same
// inputs give the same bits, and float32/float64 sums are taken in the order the index_add path takes them.
#include <cub/device/device_radix_sort.cuh>

#include "ops/cuda/cuda_common.cuh"
#include "ops/embedding_kernels.h"

namespace fg::cuda {
namespace {

constexpr int kSegThreads = 128;

__global__ void iota_kernel(int* __restrict__ v, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) v[i] = i;
}

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
  if (threadIdx.x == 0) s_end = n;
  __syncthreads();
  for (int base = start + 1; base < n; base += kSegThreads) {
    const int j = base + static_cast<int>(threadIdx.x);
    const bool differs = j < n && ids[j] != id;
    if (differs) atomicMin(&s_end, j);
    if (__syncthreads_or(differs)) break;
  }
  const int end = s_end;
  D* dst = out + static_cast<int64_t>(id) * dim;
  for (int64_t c = threadIdx.x; c < dim; c += kSegThreads) {
    C acc = 0;
    int j = start;
    // Four rows in flight, added in token order.
    for (; j + 4 <= end; j += 4) {
      const C v0 = load_c(grad[static_cast<int64_t>(tokens[j]) * dim + c]);
      const C v1 = load_c(grad[static_cast<int64_t>(tokens[j + 1]) * dim + c]);
      const C v2 = load_c(grad[static_cast<int64_t>(tokens[j + 2]) * dim + c]);
      const C v3 = load_c(grad[static_cast<int64_t>(tokens[j + 3]) * dim + c]);
      acc += v0;
      acc += v1;
      acc += v2;
      acc += v3;
    }
    for (; j < end; ++j) acc += load_c(grad[static_cast<int64_t>(tokens[j]) * dim + c]);
    dst[c] = store_c<D>(acc);
  }
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
    segment_sum_kernel<D><<<static_cast<unsigned>(n), kSegThreads, 0, s>>>(
        keys_out.as<unsigned long long>(), vals_out.as<int>(), n, static_cast<const D*>(a.grad), static_cast<D*>(a.out),
        a.dim);
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(embedding_bwd_stub, CUDA, embedding_bwd_cuda);

}  // namespace fg::cuda
