// Public, toolkit-free API of the CUDA backend (tensor/cuda/cuda_backend.cu): caching allocator
// statistics, the current stream of each device, asynchronous copies through pinned staging and the
// TF32 switch of matmul. Plain C++ so that code built without nvcc (tests, tools) can include it; it is
// only implemented when flexgrad is built with CUDA (FLEXGRAD_WITH_CUDA).
#pragma once
#include <cstddef>
#include <cstdint>

#include "flexgrad/tensor/tensor.h"

namespace fg::cuda {

// An opaque cudaStream_t. nullptr means "the device's default stream of flexgrad" when passed in.
using StreamHandle = void*;

struct AllocatorStats {
  size_t allocated_bytes = 0;       // bytes in blocks handed out now (rounded to their size class)
  size_t peak_allocated_bytes = 0;  // highest allocated_bytes since the last reset_peak_stats
  size_t reserved_bytes = 0;        // bytes obtained from cudaMalloc and not yet released (in use + cached)
  size_t cached_bytes = 0;          // reserved - allocated: free blocks kept for reuse
  uint64_t num_allocations = 0;     // allocate() calls that returned memory
  uint64_t num_cache_hits = 0;      // ... of which were served from the cache
  uint64_t num_device_mallocs = 0;  // cudaMalloc calls
  uint64_t num_frees = 0;           // deallocate() calls
};

// Device-memory allocator: requests are rounded to a size class (512 B multiples up to 1 MiB, 2 MiB
// multiples above) and freed blocks are cached per (size class, stream) for reuse. Memory always comes
// from cudaMalloc (never managed memory). On cudaMalloc failure the cache is released and the call retried.
AllocatorStats allocator_stats(int device = 0);
void reset_peak_stats(int device = 0);
// Returns every cached (free) block of every device to the driver.
void empty_cache();
// Size class a request of nbytes is served from.
size_t allocation_size_class(size_t nbytes);

// The stream flexgrad's kernels and copies on `device` are issued to. Initially a per-device stream
// created by flexgrad (non-blocking with respect to the legacy default stream).
StreamHandle current_stream(int device = 0);
void set_current_stream(StreamHandle stream, int device = 0);
StreamHandle create_stream(int device = 0);
void destroy_stream(StreamHandle stream, int device = 0);
// Waits for the current stream of `device`.
void synchronize(int device = 0);
// RAII: makes `stream` current on `device` for a scope.
class StreamGuard {
 public:
  StreamGuard(StreamHandle stream, int device = 0);
  ~StreamGuard();
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  StreamHandle prev_;
  int device_;
};

// Copies nbytes on the current stream of the CUDA device involved and returns without waiting.
// Pageable host memory goes through a pinned staging block that is recycled once the copy is done
// (device->host into pageable memory finishes with a host callback); the caller synchronizes before
// reading dst or overwriting src... src may be reused at once for host->device (it was staged).
void copy_async(void* dst, Device dst_device, const void* src, Device src_device, size_t nbytes);
// Same data on `device`, issued asynchronously (any strided tensor; no autograd).
Tensor to_device_async(const Tensor& t, Device device);
// A CPU tensor with the same values whose memory is page-locked (cudaHostAlloc), so copies skip staging.
Tensor pin_memory(const Tensor& t);
bool is_pinned(const void* host_ptr);

// matmul on float32: exact float32 arithmetic by default; TF32 tensor cores only when allowed.
void set_allow_tf32(bool allow);
bool allow_tf32();

}  // namespace fg::cuda
