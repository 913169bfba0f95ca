// CUDA matrix products behind ops/linalg_kernels.h. Float types go to cuBLAS (cublasGemmEx and its
// strided-batched / pointer-batched forms): f32 computes in exact f32 unless TF32 was allowed
// (fg::cuda::set_allow_tf32), f16/bf16 accumulate in f32, f64 in f64. Row-major C = A @ B is issued as the
// column-major C^T = B^T A^T; a matrix with neither unit row nor unit column stride is first copied to a
// contiguous buffer. Integer dtypes use a plain kernel with int64 accumulation (cuBLAS has no int64 GEMM).
#include <atomic>
#include <mutex>
#include <optional>
#include <vector>

#include "flexgrad/ops/cuda/cuda_common.cuh"
#include "flexgrad/ops/linalg_kernels.h"
#include "flexgrad/tensor/cuda/cublas_library.h"

namespace fg::cuda {

namespace {
std::atomic<bool> g_allow_tf32{false};

cublasHandle_t handle(int dev) {
  static std::mutex mu;
  static std::vector<cublasHandle_t> handles;
  std::lock_guard l(mu);
  if (static_cast<int>(handles.size()) <= dev) handles.resize(dev + 1, nullptr);
  if (!handles[dev]) FG_CUBLAS_CHECK(cublas().create(&handles[dev]));
  return handles[dev];
}

struct Operand {
  const void* ptr;
  cublasOperation_t op;
  int64_t ld;
};

// Column-major view of a row-major [rows, cols] matrix with strides (rs, cs) as op(X^T): returns
// the operation and leading dimension, or false when neither stride is 1 (or ld is invalid).
bool col_major_view(int64_t rows, int64_t cols, int64_t rs, int64_t cs, cublasOperation_t& op, int64_t& ld) {
  if (cs == 1 && (rs >= std::max<int64_t>(cols, 1) || rows == 1)) {
    op = CUBLAS_OP_N;  // memory is X^T (cols x rows) column-major
    ld = rows == 1 ? std::max<int64_t>(cols, 1) : rs;
    return true;
  }
  if (rs == 1 && (cs >= std::max<int64_t>(rows, 1) || cols == 1)) {
    op = CUBLAS_OP_T;  // memory is X (rows x cols) column-major
    ld = cols == 1 ? std::max<int64_t>(rows, 1) : cs;
    return true;
  }
  return false;
}

template <class D>
__global__ void pack_kernel(GemmArgs g, bool is_a, int64_t batch, D* dst) {
  const int64_t rows = is_a ? g.m : g.k, cols = is_a ? g.k : g.n;
  const int64_t rs = is_a ? g.a_rs : g.b_rs, cs = is_a ? g.a_cs : g.b_cs;
  const int64_t per = rows * cols, total = per * batch;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b = t / per, e = t - b * per, r = e / cols, c = e - r * cols;
    int64_t off = 0, bi = b;
    for (int d = g.batch_ndim - 1; d >= 0; --d) {
      off += (bi % g.batch_sizes[d]) * (is_a ? g.a_batch_strides[d] : g.b_batch_strides[d]);
      bi /= g.batch_sizes[d];
    }
    dst[t] = static_cast<const D*>(is_a ? g.a : g.b)[off + r * rs + c * cs];
  }
}

template <class D>
__global__ void int_gemm_kernel(GemmArgs g) {
  const int64_t total = g.batch * g.m * g.n;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b = t / (g.m * g.n), e = t - b * g.m * g.n, i = e / g.n, j = e - i * g.n;
    int64_t oa = 0, ob = 0, oc = 0, bi = b;
    for (int d = g.batch_ndim - 1; d >= 0; --d) {
      int64_t x = bi % g.batch_sizes[d];
      bi /= g.batch_sizes[d];
      oa += x * g.a_batch_strides[d], ob += x * g.b_batch_strides[d], oc += x * g.c_batch_strides[d];
    }
    const D* a = static_cast<const D*>(g.a) + oa + i * g.a_rs;
    const D* bb = static_cast<const D*>(g.b) + ob + j * g.b_cs;
    long long acc = 0;
    for (int64_t kk = 0; kk < g.k; ++kk) acc += static_cast<long long>(a[kk * g.a_cs]) * static_cast<long long>(bb[kk * g.b_rs]);
    static_cast<D*>(g.c)[oc + i * g.n + j] = store_c<D>(acc);
  }
}

template <class D>
__global__ void zero_kernel(D* p, int64_t n) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < n; t += static_cast<int64_t>(gridDim.x) * blockDim.x) p[t] = D(0.0f);
}

void gemm_cuda(const GemmArgs& g_in) {
  GemmArgs g = g_in;
  const int dev = device_of(g.c);
  DeviceGuard guard(dev);
  cudaStream_t s = stream(dev);
  if (g.m == 0 || g.n == 0 || g.batch == 0) return;
  if (g.dtype == kInt32 || g.dtype == kInt64 || g.dtype == kBool) {
    dispatch_all(g.dtype, "matmul", [&]<class D>() {
      if constexpr (std::is_integral_v<D> && !std::is_same_v<D, bool>) {
        int_gemm_kernel<D><<<grid_for(g.batch * g.m * g.n, kThreads, dev), kThreads, 0, s>>>(g);
        FG_CUDA_CHECK_LAUNCH();
      } else {
        FG_FAIL(DTypeError, "matmul: unsupported dtype bool");
      }
    });
    return;
  }
  const size_t es = element_size(g.dtype);
  const int64_t total_c = g.batch * g.m * g.n;
  if (g.k == 0) {  // empty inner dim: C = 0
    FG_CUDA_CHECK(cudaMemsetAsync(g.c, 0, static_cast<size_t>(total_c) * es, s));
    return;
  }
  // Per-batch element offsets (host), to find a uniform batch stride or build pointer arrays.
  std::vector<int64_t> oa(g.batch), ob(g.batch), oc(g.batch);
  for (int64_t b = 0; b < g.batch; ++b) g.batch_offsets(b, oa[b], ob[b], oc[b]);
  cublasOperation_t op_a, op_b;
  int64_t lda, ldb;
  std::optional<Workspace> packed_a, packed_b;
  auto pack = [&](bool is_a, std::optional<Workspace>& ws) {
    const int64_t rows = is_a ? g.m : g.k, cols = is_a ? g.k : g.n;
    Workspace& w = ws.emplace(static_cast<size_t>(rows * cols * g.batch) * es, dev);
    dispatch_floating(g.dtype, "matmul", [&]<class D>() {
      pack_kernel<D><<<grid_for(rows * cols * g.batch, kThreads, dev), kThreads, 0, s>>>(g, is_a, g.batch, w.as<D>());
      FG_CUDA_CHECK_LAUNCH();
    });
    for (int64_t b = 0; b < g.batch; ++b) (is_a ? oa : ob)[b] = b * rows * cols;
    if (is_a) { g.a = w.get(); g.a_rs = cols; g.a_cs = 1; }
    else { g.b = w.get(); g.b_rs = cols; g.b_cs = 1; }
  };
  if (!col_major_view(g.m, g.k, g.a_rs, g.a_cs, op_a, lda)) {
    pack(true, packed_a);
    col_major_view(g.m, g.k, g.a_rs, g.a_cs, op_a, lda);
  }
  if (!col_major_view(g.k, g.n, g.b_rs, g.b_cs, op_b, ldb)) {
    pack(false, packed_b);
    col_major_view(g.k, g.n, g.b_rs, g.b_cs, op_b, ldb);
  }
  cudaDataType_t type;
  cublasComputeType_t compute;
  float alpha_f = 1.f, beta_f = 0.f;
  double alpha_d = 1.0, beta_d = 0.0;
  const void *alpha = &alpha_f, *beta = &beta_f;
  switch (g.dtype) {
    case kFloat32:
      type = CUDA_R_32F;
      compute = g_allow_tf32.load() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F_PEDANTIC;
      break;
    case kFloat64: type = CUDA_R_64F; compute = CUBLAS_COMPUTE_64F; alpha = &alpha_d; beta = &beta_d; break;
    case kFloat16: type = CUDA_R_16F; compute = CUBLAS_COMPUTE_32F; break;
    case kBFloat16: type = CUDA_R_16BF; compute = CUBLAS_COMPUTE_32F; break;
    default: FG_FAIL(DTypeError, "matmul: unsupported dtype {}", dtype_name(g.dtype));
  }
  cublasHandle_t h = handle(dev);
  FG_CUBLAS_CHECK(cublas().set_stream(h, s));
  FG_CHECK(g.m < INT32_MAX && g.n < INT32_MAX && g.k < INT32_MAX && lda < INT32_MAX && ldb < INT32_MAX, NotImplementedError,
           "matmul: sizes beyond cuBLAS's int range (m={}, n={}, k={})", g.m, g.n, g.k);
  // Column-major: C^T (n x m, ldc = n) = op(B^T) (n x k) * op(A^T) (k x m).
  const char* A = static_cast<const char*>(g.b);  // cuBLAS's first operand is our B
  const char* B = static_cast<const char*>(g.a);
  char* C = static_cast<char*>(g.c);
  auto uniform = [&](const std::vector<int64_t>& v, int64_t& stride) {
    stride = g.batch > 1 ? v[1] - v[0] : 0;
    for (int64_t b = 1; b < g.batch; ++b) if (v[b] - v[b - 1] != stride) return false;
    return true;
  };
  int64_t sa, sb, sc;
  const bool strided = uniform(ob, sa) && uniform(oa, sb) && uniform(oc, sc);
  if (g.batch == 1) {
    FG_CUBLAS_CHECK(cublas().gemm_ex(h, op_b, op_a, (int)g.n, (int)g.m, (int)g.k, alpha, A + ob[0] * es, type, (int)ldb,
                                 B + oa[0] * es, type, (int)lda, beta, C + oc[0] * es, type, (int)g.n, compute,
                                 CUBLAS_GEMM_DEFAULT));
  } else if (strided && sc != 0) {
    FG_CUBLAS_CHECK(cublas().gemm_strided_batched_ex(h, op_b, op_a, (int)g.n, (int)g.m, (int)g.k, alpha, A + ob[0] * es, type,
                                               (int)ldb, sa, B + oa[0] * es, type, (int)lda, sb, beta, C + oc[0] * es,
                                               type, (int)g.n, sc, (int)g.batch, compute, CUBLAS_GEMM_DEFAULT));
  } else {
    std::vector<const void*> pa(g.batch), pb(g.batch);
    std::vector<void*> pc(g.batch);
    for (int64_t b = 0; b < g.batch; ++b) {
      pa[b] = A + ob[b] * es, pb[b] = B + oa[b] * es, pc[b] = C + oc[b] * es;
    }
    Workspace dptr(sizeof(void*) * 3 * g.batch, dev);
    auto** d = dptr.as<void*>();
    FG_CUDA_CHECK(cudaMemcpyAsync(d, pa.data(), sizeof(void*) * g.batch, cudaMemcpyHostToDevice, s));
    FG_CUDA_CHECK(cudaMemcpyAsync(d + g.batch, pb.data(), sizeof(void*) * g.batch, cudaMemcpyHostToDevice, s));
    FG_CUDA_CHECK(cudaMemcpyAsync(d + 2 * g.batch, pc.data(), sizeof(void*) * g.batch, cudaMemcpyHostToDevice, s));
    FG_CUBLAS_CHECK(cublas().gemm_batched_ex(h, op_b, op_a, (int)g.n, (int)g.m, (int)g.k, alpha, (const void* const*)d, type,
                                        (int)ldb, (const void* const*)(d + g.batch), type, (int)lda, beta,
                                        (void* const*)(d + 2 * g.batch), type, (int)g.n, (int)g.batch, compute,
                                        CUBLAS_GEMM_DEFAULT));
    // Host arrays die here: the copies above read pageable memory synchronously before returning.
  }
}

}  // namespace

void set_allow_tf32(bool allow) { g_allow_tf32.store(allow); }
bool allow_tf32() { return g_allow_tf32.load(); }

FG_REGISTER_KERNEL(gemm_stub, CUDA, gemm_cuda);

}  // namespace fg::cuda
