// Internal to the CUDA sources: checked CUDA runtime / cuBLAS calls, device guards and launch helpers.
// A failed call throws fg::CudaError naming the call, the file and line, and the runtime's message.
#pragma once
#include <cuda_runtime.h>

#include "flexgrad/tensor/cuda/cuda_api.h"
#include "flexgrad/tensor/error.h"

namespace fg::cuda {

[[noreturn]] void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line);
[[noreturn]] void throw_cublas_error(int status, const char* expr, const char* file, int line);

inline cudaStream_t stream(int device) { return static_cast<cudaStream_t>(current_stream(device)); }
// Device that owns `ptr` (device memory), or the current device when it cannot be told.
int device_of(const void* ptr);
// Makes `device` current for a scope (no-op when it already is).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = -1;
};
int num_sms(int device);
// Scratch device memory from the caching allocator, freed on scope exit (stream-ordered: safe to reuse
// on the same stream once queued work is done).
class Workspace {
 public:
  Workspace(size_t nbytes, int device);
  ~Workspace();
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  void* get() const { return ptr_; }
  template <class T> T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t nbytes_ = 0;
  int device_ = 0;
};

}  // namespace fg::cuda

// fmt 9 checks literal format strings with consteval, which the CUDA front end cannot evaluate: in CUDA
// sources the error macros format at run time instead (same messages).
#undef FG_CHECK
#define FG_CHECK(cond, ErrorType, fmtstr, ...)                                                 \
  do {                                                                                     \
    if (!(cond)) [[unlikely]] {                                                            \
      throw ::fg::ErrorType(::fmt::format(::fmt::runtime(fmtstr) __VA_OPT__(, ) __VA_ARGS__)); \
    }                                                                                      \
  } while (0)
#undef FG_FAIL
#define FG_FAIL(ErrorType, fmtstr, ...) \
  throw ::fg::ErrorType(::fmt::format(::fmt::runtime(fmtstr) __VA_OPT__(, ) __VA_ARGS__))
#undef FG_ASSERT
#define FG_ASSERT(cond)                                                                               \
  do {                                                                                                \
    if (!(cond)) [[unlikely]] {                                                                       \
      throw ::fg::Error(::fmt::format(::fmt::runtime("internal error: {} failed at {}:{}"), #cond, __FILE__, __LINE__)); \
    }                                                                                                 \
  } while (0)

#define FG_CUDA_CHECK(expr)                                                                \
  do {                                                                                     \
    cudaError_t fg_cuda_err_ = (expr);                                                     \
    if (fg_cuda_err_ != cudaSuccess) [[unlikely]]                                          \
      ::fg::cuda::throw_cuda_error(fg_cuda_err_, #expr, __FILE__, __LINE__);               \
  } while (0)

// After a kernel launch: reports launch-configuration errors at the launch site.
#define FG_CUDA_CHECK_LAUNCH() FG_CUDA_CHECK(cudaGetLastError())

#define FG_CUBLAS_CHECK(expr)                                                              \
  do {                                                                                     \
    int fg_cublas_st_ = static_cast<int>(expr);                                            \
    if (fg_cublas_st_ != 0) [[unlikely]]                                                   \
      ::fg::cuda::throw_cublas_error(fg_cublas_st_, #expr, __FILE__, __LINE__);            \
  } while (0)
