// NVRTC compilation and the two-level module cache of attention/cuda/jit.h.
//
// get_module(src, device):
//   key  = 128-bit FNV-1a of (code, options, target arch, NVRTC version)
//   1. in-process map (device, key)                         -> memory hit
//   2. <cache dir>/<name>-<key>.cubin                       -> disk hit
//   3. NVRTC -> CUBIN, written atomically (tmp + rename)    -> compile
// then cudaLibraryLoadData + cudaLibraryGetKernel. The runtime's library API is used instead of the
// driver's cuModule* so libflexgrad needs no libcuda at link time (machines without a driver still load it).
#include "flexgrad/attention/cuda/jit.h"

#include <cuda_runtime.h>
#include <nvrtc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <bit>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>

#include "flexgrad/tensor/cuda/cuda_check.h"

namespace fg::cuda::jit {
namespace {

std::string hex(uint64_t v) {
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

// Two independent 64-bit hashes (different multipliers and mixing) over the text eight bytes at a time: a 128-bit
// key, accidental collisions out of reach. Word-wise because it runs on every kernel call, over the generated
// mods and configuration (several KiB): byte-wise FNV-1a took ~12 us of a call's host time for 7 KiB.
struct KeyHasher {
  uint64_t a = 0xcbf29ce484222325ull, b = 0x84222325cbf29ce4ull;
  void word(uint64_t w) {
    a = std::rotl(a ^ w, 31) * 0x9e3779b97f4a7c15ull;
    b = (b ^ w) * 0xff51afd7ed558ccdull;
    b ^= b >> 29;
  }
  void add(std::string_view s) {
    size_t i = 0;
    for (; i + 8 <= s.size(); i += 8) {
      uint64_t w;
      std::memcpy(&w, s.data() + i, 8);
      word(w);
    }
    uint64_t tail = 0;
    std::memcpy(&tail, s.data() + i, s.size() - i);
    word(tail);
    word(s.size());  // the length ends the string, so ("ab","c") != ("a","bc") and trailing zero bytes count
  }
  std::string str() const { return hex(a) + hex(b); }
};

const std::string& nvrtc_version() {  // (in every call's key: built once)
  static const std::string v = [] {
    int major = 0, minor = 0;
    nvrtcVersion(&major, &minor);
    return std::to_string(major) + "." + std::to_string(minor);
  }();
  return v;
}

// Whether the loaded NVRTC is version major.minor or newer (options older versions refuse are asked only then).
bool nvrtc_at_least(int major, int minor) {
  int have_major = 0, have_minor = 0;
  nvrtcVersion(&have_major, &have_minor);
  return have_major > major || (have_major == major && have_minor >= minor);
}

// NVRTC's --split-compile (in 12.8's and 13.0's; not asked of older versions, which might refuse the option).
bool split_compile_supported() { return nvrtc_at_least(12, 8); }

// NVRTC 12.9+ keeps a cache of its own across processes, so a "cold" compile timed on a machine that compiled the
// same text before measures a cache hit (session 25: 3 backward and forward modules in 0.16 s on the H200, against
// ~1.2 s each). FLEXGRAD_NVRTC_NO_CACHE=1 passes --no-cache (bench/run_flex_bench.sh's cold row); the code is the
// same either way.
bool nvrtc_no_cache() {
  static const bool on = [] {
    const char* env = std::getenv("FLEXGRAD_NVRTC_NO_CACHE");
    if (env == nullptr || *env == '\0' || std::string(env) == "0") return false;
    return nvrtc_at_least(12, 9);  // (older versions have no cache and refuse the option)
  }();
  return on;
}

#define FG_NVRTC_CHECK(expr)                                                                           \
  do {                                                                                                 \
    nvrtcResult fg_nvrtc_res_ = (expr);                                                                \
    if (fg_nvrtc_res_ != NVRTC_SUCCESS)                                                                \
      FG_FAIL(Error, "NVRTC call {} failed: {}", #expr, nvrtcGetErrorString(fg_nvrtc_res_));           \
  } while (0)

class LoadedModule final : public JitModule {
 public:
  LoadedModule(const std::string& key, const std::string& name, const std::string& cubin,
               const std::vector<std::string>& kernels, int device)
      : key_(key) {
    DeviceGuard guard(device);
    FG_CUDA_CHECK(cudaLibraryLoadData(&lib_, cubin.data(), nullptr, nullptr, 0, nullptr, nullptr, 0));
    for (const std::string& k : kernels) {
      cudaKernel_t fn = nullptr;
      cudaError_t err = cudaLibraryGetKernel(&fn, lib_, k.c_str());
      if (err != cudaSuccess) {
        cudaGetLastError();
        FG_FAIL(Error, "jit module '{}': kernel '{}' not found in the compiled code ({})", name, k,
                cudaGetErrorString(err));
      }
      functions_.emplace(k, reinterpret_cast<void*>(fn));
    }
  }
  // Modules live until the process ends (they are cached); unloading at exit would race the driver's own
  // teardown, so the library is deliberately not unloaded.
  void* function(const std::string& name) const override {
    auto it = functions_.find(name);
    FG_CHECK(it != functions_.end(), Error, "jit module {}: no kernel named '{}'", key_, name);
    return it->second;
  }
  const std::string& key() const override { return key_; }

 private:
  std::string key_;
  cudaLibrary_t lib_ = nullptr;
  std::map<std::string, void*> functions_;
};

struct Cache {
  std::mutex mu;
  std::map<std::pair<int, std::string>, std::shared_ptr<const JitModule>> modules;
  JitStats stats;
  std::string dir;
  bool dir_resolved = false;
};
Cache& cache() {
  static Cache* c = new Cache();  // leaked on purpose: modules must outlive static destructors of users
  return *c;
}

bool make_dirs(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  return std::filesystem::is_directory(path, ec);
}

std::string resolve_cache_dir() {
  std::string dir;
  if (const char* d = std::getenv("FLEXGRAD_CACHE_DIR"); d && *d) dir = d;
  else if (const char* x = std::getenv("XDG_CACHE_HOME"); x && *x) dir = std::string(x) + "/flexgrad";
  else if (const char* h = std::getenv("HOME"); h && *h) dir = std::string(h) + "/.cache/flexgrad";
  if (dir.empty()) return "";
  if (!make_dirs(dir)) {
    std::fprintf(stderr, "flexgrad: cannot create the kernel cache directory %s; compiled kernels are not kept on disk\n",
                 dir.c_str());
    return "";
  }
  return dir;
}

bool read_file(const std::string& path, std::string& out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  std::ostringstream ss;
  ss << f.rdbuf();
  out = ss.str();
  return !out.empty();
}

// Writes atomically: a unique temporary file in the same directory, then rename().
void write_file_atomic(const std::string& path, const std::string& data) {
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return;
    f.write(data.data(), static_cast<std::streamsize>(data.size()));
    if (!f) {
      std::remove(tmp.c_str());
      return;
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) std::remove(tmp.c_str());
}

std::string compile_cubin(const JitSource& src, const std::string& arch, const std::string& key, const std::string& dir) {
  nvrtcProgram prog = nullptr;
  const std::string file_name = src.name + ".cu";
  // Every embedded kernel file is a header the source may include by name.
  std::vector<std::string> header_text, header_names;
  for (std::string_view n : embedded_source_names()) {
    header_names.emplace_back(n);
    header_text.emplace_back(embedded_source(n));
  }
  std::vector<const char*> htext, hnames;
  for (size_t i = 0; i < header_names.size(); ++i) {
    htext.push_back(header_text[i].c_str());
    hnames.push_back(header_names[i].c_str());
  }
  // The optimiser and ptxas take a module's kernels on threads of their own (the backward's two or three): 25-28%
  // less time on two cores (1.09 -> 0.80 s for a causal warp-specialised backward, nvcc 13.0), the kernels' code
  // byte for byte the same (only the line tables differ). An NVRTC that refuses the option compiles without it
  // (the same code, only slower), and from then on if that compile succeeds.
  static std::atomic<bool> split_compile{split_compile_supported()};
  nvrtcResult res = NVRTC_SUCCESS;
  bool retried = false;
  for (bool split = split_compile.load();; split = false, retried = true) {
    FG_NVRTC_CHECK(nvrtcCreateProgram(&prog, src.code.c_str(), file_name.c_str(), static_cast<int>(htext.size()),
                                      htext.data(), hnames.data()));
    std::vector<std::string> opts = {"--gpu-architecture=" + arch, "-std=c++17", "-default-device", "-lineinfo"};
    if (split) opts.emplace_back("--split-compile=0");
    if (nvrtc_no_cache()) opts.emplace_back("--no-cache");
    opts.insert(opts.end(), src.options.begin(), src.options.end());
    std::vector<const char*> copts;
    for (const std::string& o : opts) copts.push_back(o.c_str());
    res = nvrtcCompileProgram(prog, static_cast<int>(copts.size()), copts.data());
    if (!(split && res == NVRTC_ERROR_INVALID_OPTION)) break;
    nvrtcDestroyProgram(&prog);
  }
  if (retried && res == NVRTC_SUCCESS) split_compile = false;
  size_t log_size = 0;
  nvrtcGetProgramLogSize(prog, &log_size);
  std::string log(log_size, '\0');
  if (log_size > 1) nvrtcGetProgramLog(prog, log.data());
  if (res != NVRTC_SUCCESS) {
    nvrtcDestroyProgram(&prog);
    // Keep the generated source for inspection next to the cache (or in /tmp without one).
    const std::string where = (dir.empty() ? std::string("/tmp") : dir) + "/" + src.name + "-" + key + ".failed.cu";
    std::ofstream(where) << src.code;
    FG_FAIL(Error, "jit: NVRTC could not compile '{}' for {} ({}); generated source kept at {}\n{}", src.name, arch,
            nvrtcGetErrorString(res), where, log);
  }
  size_t size = 0;
  FG_NVRTC_CHECK(nvrtcGetCUBINSize(prog, &size));
  std::string cubin(size, '\0');
  FG_NVRTC_CHECK(nvrtcGetCUBIN(prog, cubin.data()));
  nvrtcDestroyProgram(&prog);
  return cubin;
}

}  // namespace

std::string target_arch(int device) {
  static std::mutex mu;
  static std::map<int, std::string> archs;
  std::lock_guard lock(mu);
  auto it = archs.find(device);
  if (it != archs.end()) return it->second;
  int major = 0, minor = 0;
  FG_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  FG_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  FG_CHECK(major >= 8, NotImplementedError,
           "flexgrad's run-time compiled kernels need compute capability 8.0 or newer; device {} is sm_{}{}", device,
           major, minor);
  // sm_90a unlocks Hopper-only instructions (wgmma, setmaxnreg); code built for it runs on sm_90 only.
  std::string arch = "sm_" + std::to_string(major) + std::to_string(minor) + (major == 9 && minor == 0 ? "a" : "");
  archs.emplace(device, arch);
  return arch;
}

std::shared_ptr<const JitModule> get_module(const JitSource& src, int device) {
  const std::string arch = target_arch(device);
  KeyHasher h;
  h.add(src.code);
  static const std::string headers_key = [] {  // the headers a source may include: fixed per build
    KeyHasher hh;
    for (std::string_view n : embedded_source_names()) hh.add(embedded_source(n));
    return hh.str();
  }();
  h.add(headers_key);
  for (const std::string& o : src.options) h.add(o);
  h.add(arch);
  h.add(nvrtc_version());
  const std::string key = h.str();

  Cache& c = cache();
  std::unique_lock lock(c.mu);
  if (auto it = c.modules.find({device, key}); it != c.modules.end()) {
    ++c.stats.memory_hits;
    return it->second;
  }
  if (!c.dir_resolved) {
    c.dir = resolve_cache_dir();
    c.dir_resolved = true;
  }
  const std::string dir = c.dir;
  // Compiling can take seconds: other threads wanting other modules should not wait on the lock. Two threads
  // compiling the same key both succeed; the second insert is dropped.
  lock.unlock();
  const std::string path = dir.empty() ? "" : dir + "/" + src.name + "-" + key + ".cubin";
  std::string cubin;
  bool from_disk = !path.empty() && read_file(path, cubin);
  double seconds = 0;
  if (!from_disk) {
    auto t0 = std::chrono::steady_clock::now();
    cubin = compile_cubin(src, arch, key, dir);
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!path.empty()) write_file_atomic(path, cubin);
  }
  std::shared_ptr<const JitModule> mod;
  try {
    mod = std::make_shared<LoadedModule>(key, src.name, cubin, src.kernels, device);
  } catch (const CudaError&) {
    if (!from_disk) throw;
    // A damaged cache file: compile afresh and replace it.
    auto t0 = std::chrono::steady_clock::now();
    cubin = compile_cubin(src, arch, key, dir);
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    write_file_atomic(path, cubin);
    from_disk = false;
    mod = std::make_shared<LoadedModule>(key, src.name, cubin, src.kernels, device);
  }
  lock.lock();
  if (from_disk) ++c.stats.disk_hits;
  else {
    ++c.stats.compiles;
    c.stats.compile_seconds += seconds;
  }
  auto [it, inserted] = c.modules.emplace(std::make_pair(device, key), mod);
  return it->second;
}

namespace {

// Raises a kernel's dynamic shared memory limit on `device` to at least `bytes`, once: the attribute stays set on
// the kernel (modules are never unloaded, so a kernel handle is never reused for another kernel), and the call
// cost ~1-2 us of host time on every launch, time the GPU waits for a call's first kernel.
void ensure_smem_limit(const void* fn, int device, size_t bytes) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> raised;
  std::lock_guard lock(mu);
  size_t& have = raised[{fn, device}];
  if (have >= bytes) return;
  FG_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  have = bytes;
}

}  // namespace

void launch_on(void* stream, void* function, Dim3 grid, Dim3 block, size_t dynamic_smem, void** args, int device) {
  FG_CHECK(function != nullptr, ValueError, "jit::launch: null kernel");
  DeviceGuard guard(device);
  const void* fn = function;
  if (dynamic_smem > 48 * 1024) ensure_smem_limit(fn, device, dynamic_smem);
  FG_CUDA_CHECK(cudaLaunchKernel(fn, dim3(grid.x, grid.y, grid.z), dim3(block.x, block.y, block.z), args, dynamic_smem,
                                 static_cast<cudaStream_t>(stream)));
}

void launch(void* function, Dim3 grid, Dim3 block, size_t dynamic_smem, void** args, int device) {
  launch_on(stream(device), function, grid, block, dynamic_smem, args, device);
}

JitStats stats() {
  std::lock_guard lock(cache().mu);
  return cache().stats;
}

void reset_stats() {
  std::lock_guard lock(cache().mu);
  cache().stats = JitStats{};
}

std::string cache_dir() {
  Cache& c = cache();
  std::lock_guard lock(c.mu);
  if (!c.dir_resolved) {
    c.dir = resolve_cache_dir();
    c.dir_resolved = true;
  }
  return c.dir;
}

void clear_memory_cache() {
  Cache& c = cache();
  std::lock_guard lock(c.mu);
  c.modules.clear();
  c.dir_resolved = false;  // re-read the environment (tests point FLEXGRAD_CACHE_DIR elsewhere)
}

}  // namespace fg::cuda::jit
