// See cublas_library.h.
#include "flexgrad/tensor/cuda/cublas_library.h"

#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

#include "flexgrad/tensor/cuda/shared_library.h"
#include "flexgrad/tensor/error.h"

namespace fg::cuda {
namespace {

// The spelled-out GEMM types are those of cuBLAS's C functions: static_cast picks the overload of exactly that
// type and fails to compile when there is none (unevaluated: nothing refers to libcublas).
template <class Fn> constexpr bool kIsFunctionPointer = std::is_pointer_v<Fn>;
static_assert(kIsFunctionPointer<decltype(static_cast<CublasLibrary::GemmEx>(&cublasGemmEx))>);
static_assert(kIsFunctionPointer<decltype(static_cast<CublasLibrary::GemmStridedBatchedEx>(&cublasGemmStridedBatchedEx))>);
static_assert(kIsFunctionPointer<decltype(static_cast<CublasLibrary::GemmBatchedEx>(&cublasGemmBatchedEx))>);

// The candidates, in order: the user's choice alone when given, else the soname and the build's copy.
std::vector<std::string> candidate_files() {
  if (const char* env = std::getenv("FLEXGRAD_CUBLAS_LIBRARY"); env && *env) return {env};
  std::vector<std::string> files{fmt::format("libcublas.so.{}", CUBLAS_VER_MAJOR)};
#ifdef FLEXGRAD_CUBLAS_BUILD_PATH
  files.push_back(FLEXGRAD_CUBLAS_BUILD_PATH);
#endif
  return files;
}

}  // namespace

CublasLibrary open_cublas(const std::vector<std::string>& files) {
  const SharedLibrary so(files);
  if (!so.is_open())
    throw CudaError(fmt::format("cuBLAS cannot be loaded ({}); put the CUDA toolkit's library directory on "
                                "LD_LIBRARY_PATH or set FLEXGRAD_CUBLAS_LIBRARY to libcublas.so.{}'s path",
                                so.why(), CUBLAS_VER_MAJOR));
  CublasLibrary lib;
  auto need = [&](auto& fn, const char* name) {
    if (!so.find(fn, name))
      throw CudaError(fmt::format("{} has no symbol {} (not cuBLAS, or one older than the headers' {}.x?)", so.file(),
                                  name, CUBLAS_VER_MAJOR));
  };
  need(lib.create, "cublasCreate_v2");
  need(lib.set_stream, "cublasSetStream_v2");
  need(lib.gemm_ex, "cublasGemmEx");
  need(lib.gemm_strided_batched_ex, "cublasGemmStridedBatchedEx");
  need(lib.gemm_batched_ex, "cublasGemmBatchedEx");
  need(lib.status_name, "cublasGetStatusName");
  need(lib.status_string, "cublasGetStatusString");
  return lib;
}

const CublasLibrary& cublas() {
  // A static whose initialiser throws is not initialised: the next call tries again.
  static const CublasLibrary lib = open_cublas(candidate_files());
  return lib;
}

}  // namespace fg::cuda
