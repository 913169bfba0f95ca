// CUDA kernels of layer_norm / rms_norm (ops/norm_kernels.h). One block per row, its width picked from n
// (a single warp for short rows, so the reductions are shuffles only); statistics accumulate in the dtype
// (float32 for float32, float64 for float64), mean first and then the centred squares, as the CPU does.
// The weight/bias gradients never use atomics: pass 1 sums fixed chunks of rows per column tile into
// partials, pass 2 adds the partials of each column in chunk order. Chunking depends only on the shape,
// so two runs (or two GPUs) give bitwise equal gradients.
#include "flexgrad/ops/cuda/layout_device.cuh"
#include "flexgrad/ops/norm_kernels.h"

namespace fg::cuda {
namespace {

// Rows of the weight/bias partial sums: each chunk of kChunkRows rows yields one partial per column.
constexpr int kChunkRows = 256;
constexpr int kColTile = 32, kRowLanes = 8;

template <class T> __device__ __forceinline__ T rsqrt_exact(T v) { return T(1) / ::sqrt(v); }
// g * w rounded once, never fused into a later add: the backward subtracts mean(g w) from g w, and a product
// contracted into that subtraction (fma) leaves the product's rounding error, which rstd (1/sqrt(eps) for a
// constant row) magnifies — at n = 1 the exact answer 0 came out as 1e-5.
__device__ __forceinline__ float mul_rounded(float p, float q) { return __fmul_rn(p, q); }
__device__ __forceinline__ double mul_rounded(double p, double q) { return __dmul_rn(p, q); }

template <class T>
__global__ void norm_fwd_kernel(NormArgs a, T* __restrict__ y, T* __restrict__ mean_out, T* __restrict__ rstd_out) {
  __shared__ T shared[32];
  const int64_t r = blockIdx.x, n = a.n;
  const T* x = static_cast<const T*>(a.x) + r * n;
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  T* out = y + r * n;
  auto add = [](T p, T q) { return p + q; };
  T m = 0;
  if (!a.rms) {
    T s = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    m = block_allreduce(s, add, shared) / static_cast<T>(n);
  }
  T v = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const T d = x[i] - m;
    v += d * d;
  }
  v = block_allreduce(v, add, shared) / static_cast<T>(n);
  const T rs = rsqrt_exact(v + static_cast<T>(a.eps));
  if (threadIdx.x == 0) {
    mean_out[r] = m;
    rstd_out[r] = rs;
  }
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    T h = (x[i] - m) * rs;
    if (w) h *= w[i];
    if (b) h += b[i];
    out[i] = h;
  }
}

// gx of one row: with xhat = (x - m) rs and gh = g w,  dx = rs (gh - mean(gh) - xhat mean(gh xhat)).
template <class T>
__global__ void norm_bwd_dx_kernel(NormArgs a, const T* __restrict__ gy, const T* __restrict__ mean,
                                   const T* __restrict__ rstd, T* __restrict__ gx) {
  __shared__ T shared[32];
  const int64_t r = blockIdx.x, n = a.n;
  const T* x = static_cast<const T*>(a.x) + r * n;
  const T* w = static_cast<const T*>(a.weight);
  const T* g = gy + r * n;
  T* dx = gx + r * n;
  const T m = a.rms ? T(0) : mean[r], rs = rstd[r];
  T sg = 0, sgx = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const T xh = (x[i] - m) * rs;
    const T gh = w ? mul_rounded(g[i], w[i]) : g[i];
    sg += gh;
    sgx += gh * xh;
  }
  auto add = [](T p, T q) { return p + q; };
  const T mg = a.rms ? T(0) : block_allreduce(sg, add, shared) / static_cast<T>(n);
  const T mgx = block_allreduce(sgx, add, shared) / static_cast<T>(n);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const T xh = (x[i] - m) * rs;
    const T gh = w ? mul_rounded(g[i], w[i]) : g[i];
    dx[i] = rs * (gh - mg - xh * mgx);
  }
}

// Pass 1 of gw/gb: block (kColTile, kRowLanes) over one column tile and one chunk of rows. Lane y sums
// rows chunk_start + y, + kRowLanes, ... in order; the lanes are then added in lane order.
template <class T>
__global__ void norm_bwd_partial_kernel(NormArgs a, const T* __restrict__ gy, const T* __restrict__ mean,
                                        const T* __restrict__ rstd, T* __restrict__ part_w, T* __restrict__ part_b) {
  __shared__ T sw[kRowLanes][kColTile], sb[kRowLanes][kColTile];
  const int64_t n = a.n;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t r0 = chunk * kChunkRows;
  const int64_t r1 = r0 + kChunkRows < a.rows ? r0 + kChunkRows : a.rows;
  const T* X = static_cast<const T*>(a.x);
  T accw = 0, accb = 0;
  if (col < n) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kRowLanes) {
      const T g = gy[r * n + col];
      if (part_w) {
        const T m = a.rms ? T(0) : mean[r];
        accw += g * ((X[r * n + col] - m) * rstd[r]);
      }
      accb += g;
    }
  }
  sw[threadIdx.y][threadIdx.x] = accw;
  sb[threadIdx.y][threadIdx.x] = accb;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    T tw = 0, tb = 0;
#pragma unroll
    for (int l = 0; l < kRowLanes; ++l) {
      tw += sw[l][threadIdx.x];
      tb += sb[l][threadIdx.x];
    }
    if (part_w) part_w[chunk * n + col] = tw;
    if (part_b) part_b[chunk * n + col] = tb;
  }
}

// Pass 2: each column adds its chunk partials in chunk order.
template <class T>
__global__ void norm_bwd_final_kernel(int64_t n, int64_t chunks, const T* __restrict__ part_w, const T* __restrict__ part_b,
                                      T* __restrict__ gw, T* __restrict__ gb) {
  for (int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; col < n;
       col += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T tw = 0, tb = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      if (gw) tw += part_w[c * n + col];
      if (gb) tb += part_b[c * n + col];
    }
    if (gw) gw[col] = tw;
    if (gb) gb[col] = tb;
  }
}

// One warp for short rows (shuffle-only reductions), wider blocks as rows grow.
int row_threads(int64_t n) {
  if (n <= 128) return 32;
  if (n <= 1024) return 128;
  if (n <= 4096) return 256;
  return 512;
}

void check_grid(const NormArgs& a) {
  FG_CHECK(a.rows <= 0x7fffffff, NotImplementedError, "layer_norm/rms_norm: {} rows exceed the CUDA grid", a.rows);
  FG_CHECK(a.dtype == kFloat32 || a.dtype == kFloat64, DTypeError,
           "layer_norm/rms_norm: CUDA kernel takes float32/float64, got {}", a.dtype);
}

template <class F> void dispatch_norm(DType t, F&& f) {
  if (t == kFloat32) f.template operator()<float>();
  else f.template operator()<double>();
}

void norm_fwd_cuda(const NormArgs& a, void* y, void* mean, void* rstd) {
  check_grid(a);
  if (a.rows == 0) return;
  const int dev = device_of(a.x);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  dispatch_norm(a.dtype, [&]<class T>() {
    norm_fwd_kernel<T><<<static_cast<unsigned>(a.rows), row_threads(a.n), 0, s>>>(
        a, static_cast<T*>(y), static_cast<T*>(mean), static_cast<T*>(rstd));
    FG_CUDA_CHECK_LAUNCH();
  });
}

void norm_bwd_cuda(const NormArgs& a, const void* gy, const void* mean, const void* rstd, void* gx, void* gw, void* gb) {
  check_grid(a);
  if (a.rows == 0) return;
  const int dev = device_of(a.x);
  DeviceGuard g(dev);
  cudaStream_t s = stream(dev);
  dispatch_norm(a.dtype, [&]<class T>() {
    const T* G = static_cast<const T*>(gy);
    const T* M = static_cast<const T*>(mean);
    const T* R = static_cast<const T*>(rstd);
    norm_bwd_dx_kernel<T><<<static_cast<unsigned>(a.rows), row_threads(a.n), 0, s>>>(a, G, M, R, static_cast<T*>(gx));
    FG_CUDA_CHECK_LAUNCH();
    if (!gw && !gb) return;
    const int64_t chunks = (a.rows + kChunkRows - 1) / kChunkRows;
    const int64_t tiles = (a.n + kColTile - 1) / kColTile;
    FG_CHECK(chunks <= 65535 && tiles <= 0x7fffffff, NotImplementedError,
             "layer_norm/rms_norm: [{}, {}] exceeds the CUDA grid of the weight gradient", a.rows, a.n);
    Workspace pw(gw ? sizeof(T) * chunks * a.n : 0, dev), pb(gb ? sizeof(T) * chunks * a.n : 0, dev);
    T* part_w = gw ? pw.as<T>() : nullptr;
    T* part_b = gb ? pb.as<T>() : nullptr;
    norm_bwd_partial_kernel<T><<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks)), dim3(kColTile, kRowLanes), 0, s>>>(
        a, G, M, R, part_w, part_b);
    FG_CUDA_CHECK_LAUNCH();
    norm_bwd_final_kernel<T><<<grid_for(a.n, kThreads, dev), kThreads, 0, s>>>(a.n, chunks, part_w, part_b,
                                                                               static_cast<T*>(gw), static_cast<T*>(gb));
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(norm_fwd_stub, CUDA, norm_fwd_cuda);
FG_REGISTER_KERNEL(norm_bwd_stub, CUDA, norm_bwd_cuda);

}  // namespace fg::cuda
