// Run-time compiled CUDA kernels: NVRTC compiles a generated translation unit for the device's
// architecture, the driver loads it, and the result is cached by a key in memory (per device) and on
// disk (so a second process compiles nothing).
//
// Toolkit-free header: code built without nvcc can include it; it is implemented only when flexgrad
// is built with CUDA (FLEXGRAD_WITH_CUDA).
//
// Disk cache: $FLEXGRAD_CACHE_DIR if set, else $XDG_CACHE_HOME/flexgrad, else $HOME/.cache/flexgrad
// (a directory that cannot be created disables the disk cache with a one-line warning on stderr).
// Entries are CUBIN files named by the key's hash; writes go to a temporary file renamed into place,
// so concurrent processes never see half a file. NVRTC 12.9+ has a cache of its own besides;
// FLEXGRAD_NVRTC_NO_CACHE=1 turns it off (to time a cold compile).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace fg::cuda::jit {

// What to compile. The cache key is a hash of (code, options, target architecture, NVRTC version):
// two sources with the same text share one module.
struct JitSource {
  std::string name;                  // for messages and file names, e.g. "flex_forward"
  std::string code;                  // the complete translation unit
  std::vector<std::string> kernels;  // extern "C" kernel names the module must define
  std::vector<std::string> options;  // extra NVRTC options; -arch and -std are added by the cache
};

// A module loaded on one device. Functions are cudaKernel_t handles as void* (toolkit-free): pass them to
// launch() below, or to cudaLaunchKernel / cudaFuncSetAttribute cast to const void*.
class JitModule {
 public:
  virtual ~JitModule() = default;
  // The kernel `name` (one of JitSource::kernels); Error when absent.
  virtual void* function(const std::string& name) const = 0;
  virtual const std::string& key() const = 0;
};

// The module for `src` on `device`: from memory, else from disk, else compiled. A failed compile raises
// fg::Error whose message holds NVRTC's log and the path of the generated source, written to the cache
// directory (or /tmp) for inspection.
std::shared_ptr<const JitModule> get_module(const JitSource& src, int device);

// Launches `function` on the current flexgrad stream of `device` (cudaLaunchKernel). `args` as for
// cudaLaunchKernel: an array of pointers to each parameter. Dynamic shared memory above 48 KiB is allowed
// by raising the function's attribute first. Launch errors raise fg::CudaError.
struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
void launch(void* function, Dim3 grid, Dim3 block, size_t dynamic_smem, void** args, int device);
// The same on `stream` (a cudaStream_t of `device`) instead of the current one.
void launch_on(void* stream, void* function, Dim3 grid, Dim3 block, size_t dynamic_smem, void** args, int device);

// The architecture NVRTC targets on `device`: "sm_90a" on Hopper, else "sm_XY" (sm_80 minimum;
// NotImplementedError below it).
std::string target_arch(int device);

struct JitStats {
  uint64_t compiles = 0;      // NVRTC runs
  uint64_t memory_hits = 0;   // served from the in-process cache
  uint64_t disk_hits = 0;     // loaded from a CUBIN on disk
  double compile_seconds = 0; // total time in NVRTC
};
JitStats stats();
void reset_stats();
// The disk cache directory in use ("" when disabled).
std::string cache_dir();
// Forget the in-process modules (tests use it to exercise the disk cache within one process).
void clear_memory_cache();

// The text of a kernel template of attention/cuda/kernels/ (embedded at build time), e.g.
// embedded_source("flex_abi.cuh"). std::out_of_range for an unknown name. Every embedded file is also
// visible to NVRTC as a header: a source may `#include "flex_mma.cuh"` (and the cache key covers them all).
std::string_view embedded_source(std::string_view name);
std::vector<std::string_view> embedded_source_names();

}  // namespace fg::cuda::jit
