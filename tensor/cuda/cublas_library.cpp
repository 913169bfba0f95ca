// See cublas_library.h.
#include "flexgrad/tensor/cuda/cublas_library.h"

#include <dlfcn.h>

#include <cstdlib>
#include <string>
#include <type_traits>
#include <vector>

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
  std::string tried;
  void* handle = nullptr;
  std::string file;
  for (const std::string& f : files) {
    handle = dlopen(f.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle) {
      file = f;
      break;
    }
    const char* why = dlerror();
    tried += fmt::format("\n  {}: {}", f, why ? why : "unknown error");
  }
  if (!handle)
    throw CudaError(fmt::format("cuBLAS cannot be loaded; tried:{}\nput the CUDA toolkit's library directory on "
                                "LD_LIBRARY_PATH or set FLEXGRAD_CUBLAS_LIBRARY to libcublas.so.{}'s path",
                                tried, CUBLAS_VER_MAJOR));
  CublasLibrary lib;
  auto symbol = [&](auto& fn, const char* name) {
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(handle, name));
    if (fn) return;
    dlclose(handle);
    throw CudaError(fmt::format("{} has no symbol {} (not cuBLAS, or one older than the headers' {}.x?)", file, name,
                                CUBLAS_VER_MAJOR));
  };
  symbol(lib.create, "cublasCreate_v2");
  symbol(lib.set_stream, "cublasSetStream_v2");
  symbol(lib.gemm_ex, "cublasGemmEx");
  symbol(lib.gemm_strided_batched_ex, "cublasGemmStridedBatchedEx");
  symbol(lib.gemm_batched_ex, "cublasGemmBatchedEx");
  symbol(lib.status_name, "cublasGetStatusName");
  symbol(lib.status_string, "cublasGetStatusString");
  return lib;  // the handle stays open for the life of the process
}

const CublasLibrary& cublas() {
  // A static whose initialiser throws is not initialised: the next call tries again.
  static const CublasLibrary lib = open_cublas(candidate_files());
  return lib;
}

}  // namespace fg::cuda
