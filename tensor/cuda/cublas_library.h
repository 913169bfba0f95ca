// cuBLAS's entry points, from libcublas opened with dlopen at first use rather than linked.
//
// Why: a process that links libcublas runs libcublasLt's static initialisers before main, about 0.4 s on a
// 2-core machine whether or not it ever multiplies on a GPU. Every program that loads libflexgrad paid that
// (CPU-only runs; each of the ~1,100 test processes ctest starts, half of CI's test time). Opened here, only
// the first GEMM on a GPU pays it.
//
// Which file: FLEXGRAD_CUBLAS_LIBRARY when set, else libcublas.so.<major of the headers built against>
// (searched as dlopen does, libflexgrad's run path included), else that file in the toolkit CMake found.
#pragma once
#include <cublas_v2.h>

#include <string>
#include <vector>

namespace fg::cuda {

struct CublasLibrary {
  // The GEMMs' signatures are spelled out: under nvcc the header adds C++ overloads taking a cudaDataType
  // compute type, so decltype(&cublasGemmEx) would be ambiguous.
  using GemmEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int m, int n, int k,
                                    const void* alpha, const void* A, cudaDataType, int lda, const void* B,
                                    cudaDataType, int ldb, const void* beta, void* C, cudaDataType, int ldc,
                                    cublasComputeType_t, cublasGemmAlgo_t);
  using GemmStridedBatchedEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int m, int n,
                                                  int k, const void* alpha, const void* A, cudaDataType, int lda,
                                                  long long stride_a, const void* B, cudaDataType, int ldb,
                                                  long long stride_b, const void* beta, void* C, cudaDataType, int ldc,
                                                  long long stride_c, int batch, cublasComputeType_t, cublasGemmAlgo_t);
  using GemmBatchedEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int m, int n, int k,
                                           const void* alpha, const void* const A[], cudaDataType, int lda,
                                           const void* const B[], cudaDataType, int ldb, const void* beta,
                                           void* const C[], cudaDataType, int ldc, int batch, cublasComputeType_t,
                                           cublasGemmAlgo_t);

  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  GemmEx gemm_ex = nullptr;
  GemmStridedBatchedEx gemm_strided_batched_ex = nullptr;
  GemmBatchedEx gemm_batched_ex = nullptr;
  decltype(&cublasGetStatusName) status_name = nullptr;
  decltype(&cublasGetStatusString) status_string = nullptr;
};

// Opens the library on the first call (thread-safe, once per process). Throws CudaError naming each file
// tried and why it failed (or the missing symbol); a later call retries.
const CublasLibrary& cublas();

// What cublas() runs once: opens the first of `files` that dlopen can (the default list is the header's), and
// finds every entry point in it.
CublasLibrary open_cublas(const std::vector<std::string>& files);

}  // namespace fg::cuda
