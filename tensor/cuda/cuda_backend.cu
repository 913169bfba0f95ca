// The CUDA DeviceBackend: a caching allocator over cudaMalloc, one current stream per device, and
// host<->device copies through pinned staging buffers. Registered with the storage layer at load time.
#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "flexgrad/tensor/cuda/cublas_library.h"
#include "flexgrad/tensor/cuda/cuda_check.h"
#include "flexgrad/tensor/storage.h"

namespace fg::cuda {

void throw_cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  (void)cudaGetLastError();  // clear a sticky-free error so later calls start clean
  throw CudaError(fmt::format(fmt::runtime("CUDA error {} ({}): {} — in `{}` at {}:{}"), static_cast<int>(err),
                              cudaGetErrorName(err), cudaGetErrorString(err), expr, file, line));
}

void throw_cublas_error(int status, const char* expr, const char* file, int line) {
  throw CudaError(fmt::format(fmt::runtime("cuBLAS error {} ({}): {} — in `{}` at {}:{}"), status,
                              cublas().status_name(static_cast<cublasStatus_t>(status)),
                              cublas().status_string(static_cast<cublasStatus_t>(status)), expr, file, line));
}

namespace {

int query_device_count() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {  // no driver or no GPU: the backend is present but has no devices
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

int cached_device_count() {
  static const int n = query_device_count();
  return n;
}

void check_index(int device) {
  int n = cached_device_count();
  FG_CHECK(device >= 0 && device < n, DeviceError, "device cuda:{} is not available: {} CUDA device(s) present",
           device, n);
}

// ---------------------------------------------------------------- streams

struct StreamTable {
  std::mutex mu;
  std::vector<cudaStream_t> defaults, current;
  StreamTable() : defaults(cached_device_count(), nullptr), current(cached_device_count(), nullptr) {}
};
StreamTable& streams() {
  static StreamTable t;
  return t;
}

// ---------------------------------------------------------------- caching allocator

struct Block {
  size_t size;  // size class
  cudaStream_t stream;
};

class CachingAllocator {
 public:
  explicit CachingAllocator(int device) : device_(device) {}

  void* allocate(size_t nbytes) {
    const size_t size = allocation_size_class(nbytes);
    cudaStream_t s = stream(device_);
    std::lock_guard l(mu_);
    void* p = nullptr;
    auto it = free_.find({s, size});
    if (it != free_.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      stats_.cached_bytes -= size;
      ++stats_.num_cache_hits;
    } else {
      DeviceGuard g(device_);
      cudaError_t e = cudaMalloc(&p, size);
      if (e == cudaErrorMemoryAllocation) {  // give the cache back and try once more
        (void)cudaGetLastError();
        release_cached_locked();
        e = cudaMalloc(&p, size);
      }
      if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        FG_FAIL(CudaError,
                "CUDA out of memory on cuda:{} allocating {} bytes (size class {}): {} bytes free of {}, {} allocated "
                "by flexgrad, {} cached",
                device_, nbytes, size, free_b, total_b, stats_.allocated_bytes, stats_.cached_bytes);
      }
      FG_CUDA_CHECK(e);
      ++stats_.num_device_mallocs;
      stats_.reserved_bytes += size;
    }
    live_[p] = Block{size, s};
    stats_.allocated_bytes += size;
    stats_.peak_allocated_bytes = std::max(stats_.peak_allocated_bytes, stats_.allocated_bytes);
    ++stats_.num_allocations;
    return p;
  }

  void deallocate(void* p) {
    // A block freed while another stream is current may have been used there (StreamGuard): make its
    // own stream wait for that stream's queued work, so reuse on its stream cannot overtake that use.
    cudaStream_t cur = stream(device_);
    std::lock_guard l(mu_);
    auto it = live_.find(p);
    FG_ASSERT(it != live_.end());
    Block b = it->second;
    if (cur != b.stream) {
      DeviceGuard g(device_);
      cudaEvent_t ev;
      FG_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
      FG_CUDA_CHECK(cudaEventRecord(ev, cur));
      FG_CUDA_CHECK(cudaStreamWaitEvent(b.stream, ev, 0));
      FG_CUDA_CHECK(cudaEventDestroy(ev));  // released once it completes
    }
    live_.erase(it);
    stats_.allocated_bytes -= b.size;
    stats_.cached_bytes += b.size;
    ++stats_.num_frees;
    // Stream-ordered reuse: a later allocation on the same stream runs after the work queued so far.
    free_[{b.stream, b.size}].push_back(p);
  }

  void release_cached() {
    std::lock_guard l(mu_);
    release_cached_locked();
  }

  // `from` is being destroyed (its work is done): its blocks, live and cached, belong to `to` from now on,
  // so no later free or reuse refers to a dead stream handle (which a new stream could also reuse).
  void move_stream(cudaStream_t from, cudaStream_t to) {
    std::lock_guard l(mu_);
    for (auto& [ptr, b] : live_)
      if (b.stream == from) b.stream = to;
    for (auto it = free_.begin(); it != free_.end();) {
      if (it->first.first == from) {
        auto& dst = free_[{to, it->first.second}];
        dst.insert(dst.end(), it->second.begin(), it->second.end());
        it = free_.erase(it);
      } else {
        ++it;
      }
    }
  }

  AllocatorStats stats() {
    std::lock_guard l(mu_);
    return stats_;
  }
  void reset_peak() {
    std::lock_guard l(mu_);
    stats_.peak_allocated_bytes = stats_.allocated_bytes;
  }

 private:
  void release_cached_locked() {
    DeviceGuard g(device_);
    // Blocks may still be read by queued kernels of their stream: wait for the device first.
    FG_CUDA_CHECK(cudaDeviceSynchronize());
    for (auto& [key, ptrs] : free_) {
      for (void* p : ptrs) {
        FG_CUDA_CHECK(cudaFree(p));
        stats_.reserved_bytes -= key.second;
        stats_.cached_bytes -= key.second;
      }
    }
    free_.clear();
  }

  int device_;
  std::mutex mu_;
  std::unordered_map<void*, Block> live_;
  std::map<std::pair<cudaStream_t, size_t>, std::vector<void*>> free_;
  AllocatorStats stats_;
};

std::vector<std::unique_ptr<CachingAllocator>>& allocators() {
  static std::vector<std::unique_ptr<CachingAllocator>> a = [] {
    std::vector<std::unique_ptr<CachingAllocator>> v;
    for (int i = 0; i < cached_device_count(); ++i) v.push_back(std::make_unique<CachingAllocator>(i));
    return v;
  }();
  return a;
}
CachingAllocator& allocator(int device) {
  check_index(device);
  return *allocators()[device];
}

// ---------------------------------------------------------------- pinned staging

// Page-locked host blocks for staging, recycled once the event recorded after their last use completes.
class PinnedPool {
 public:
  static constexpr size_t kChunk = size_t{8} << 20;  // synchronous copies go in chunks of this size

  struct Buf {
    void* ptr;
    size_t size;
    cudaEvent_t done;
    bool in_use;
  };

  // A block of at least nbytes whose previous copy has completed.
  Buf* acquire(size_t nbytes) {
    std::lock_guard l(mu_);
    for (auto& b : bufs_) {
      if (!b->in_use && b->size >= nbytes && cudaEventQuery(b->done) == cudaSuccess) {
        b->in_use = true;
        return b.get();
      }
    }
    (void)cudaGetLastError();
    auto b = std::make_unique<Buf>();
    b->size = std::max(nbytes, kChunk);
    FG_CUDA_CHECK(cudaHostAlloc(&b->ptr, b->size, cudaHostAllocPortable));
    FG_CUDA_CHECK(cudaEventCreateWithFlags(&b->done, cudaEventDisableTiming));
    b->in_use = true;
    bufs_.push_back(std::move(b));
    return bufs_.back().get();
  }
  // The block may be reused once `s` has passed this point.
  void release_after(Buf* b, cudaStream_t s) {
    std::lock_guard l(mu_);
    FG_CUDA_CHECK(cudaEventRecord(b->done, s));
    b->in_use = false;
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<Buf>> bufs_;
};
PinnedPool& pinned_pool() {
  static PinnedPool p;
  return p;
}

bool host_is_pinned(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeHost;
}

struct HostCopyBack {
  void* dst;
  const void* src;
  size_t n;
};
void CUDART_CB host_copy_back(void* arg) {
  auto* c = static_cast<HostCopyBack*>(arg);
  std::memcpy(c->dst, c->src, c->n);
  delete c;
}

// Issues the copy on `s`. sync: wait for it before returning (staging chunks pipelined with the DMA).
void copy_on_stream(void* dst, Device dd, const void* src, Device sd, size_t n, cudaStream_t s, bool sync) {
  if (n == 0) return;
  if (dd.is_cuda() && sd.is_cuda()) {
    if (dd.index == sd.index) FG_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, s));
    else FG_CUDA_CHECK(cudaMemcpyPeerAsync(dst, dd.index, src, sd.index, n, s));
  } else if (dd.is_cuda()) {  // host -> device
    if (host_is_pinned(src)) {
      FG_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, s));
    } else if (sync) {
      // Double-buffered: the CPU fills one chunk while the previous one is on the wire.
      PinnedPool::Buf* bufs[2] = {pinned_pool().acquire(PinnedPool::kChunk), pinned_pool().acquire(PinnedPool::kChunk)};
      for (size_t off = 0, i = 0; off < n; off += PinnedPool::kChunk, ++i) {
        PinnedPool::Buf* b = bufs[i & 1];
        FG_CUDA_CHECK(cudaEventSynchronize(b->done));
        size_t len = std::min(PinnedPool::kChunk, n - off);
        std::memcpy(b->ptr, static_cast<const char*>(src) + off, len);
        FG_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst) + off, b->ptr, len, cudaMemcpyHostToDevice, s));
        FG_CUDA_CHECK(cudaEventRecord(b->done, s));
      }
      for (auto* b : bufs) pinned_pool().release_after(b, s);
    } else {
      PinnedPool::Buf* b = pinned_pool().acquire(n);
      std::memcpy(b->ptr, src, n);  // src may be reused as soon as we return
      FG_CUDA_CHECK(cudaMemcpyAsync(dst, b->ptr, n, cudaMemcpyHostToDevice, s));
      pinned_pool().release_after(b, s);
    }
  } else {  // device -> host
    if (host_is_pinned(dst)) {
      FG_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, s));
    } else if (sync) {
      PinnedPool::Buf* bufs[2] = {pinned_pool().acquire(PinnedPool::kChunk), pinned_pool().acquire(PinnedPool::kChunk)};
      size_t prev_off = 0, prev_len = 0;
      PinnedPool::Buf* prev = nullptr;
      for (size_t off = 0, i = 0; off < n; off += PinnedPool::kChunk, ++i) {
        PinnedPool::Buf* b = bufs[i & 1];
        size_t len = std::min(PinnedPool::kChunk, n - off);
        FG_CUDA_CHECK(cudaMemcpyAsync(b->ptr, static_cast<const char*>(src) + off, len, cudaMemcpyDeviceToHost, s));
        FG_CUDA_CHECK(cudaEventRecord(b->done, s));
        if (prev) {  // drain the previous chunk while this one is in flight
          FG_CUDA_CHECK(cudaEventSynchronize(prev->done));
          std::memcpy(static_cast<char*>(dst) + prev_off, prev->ptr, prev_len);
        }
        prev = b, prev_off = off, prev_len = len;
      }
      FG_CUDA_CHECK(cudaEventSynchronize(prev->done));
      std::memcpy(static_cast<char*>(dst) + prev_off, prev->ptr, prev_len);
      for (auto* b : bufs) pinned_pool().release_after(b, s);
    } else {
      PinnedPool::Buf* b = pinned_pool().acquire(n);
      FG_CUDA_CHECK(cudaMemcpyAsync(b->ptr, src, n, cudaMemcpyDeviceToHost, s));
      FG_CUDA_CHECK(cudaLaunchHostFunc(s, host_copy_back, new HostCopyBack{dst, b->ptr, n}));
      pinned_pool().release_after(b, s);
    }
  }
  if (sync) FG_CUDA_CHECK(cudaStreamSynchronize(s));
}

int cuda_index(Device a, Device b) { return a.is_cuda() ? a.index : b.index; }

// ---------------------------------------------------------------- the backend

class CudaBackend final : public DeviceBackend {
 public:
  void* allocate(size_t nbytes, int device) override {
    if (nbytes == 0) return nullptr;
    return allocator(device).allocate(nbytes);
  }
  void deallocate(void* ptr, size_t, int device) override {
    if (ptr) allocator(device).deallocate(ptr);
  }
  void copy_bytes(void* dst, Device dd, const void* src, Device sd, size_t nbytes) override {
    FG_CHECK(dd.is_cuda() || sd.is_cuda(), DeviceError, "CUDA backend asked to copy {} -> {}", sd, dd);
    int dev = cuda_index(dd, sd);
    check_index(dev);
    if (dd.is_cuda()) check_index(dd.index);
    if (sd.is_cuda()) check_index(sd.index);
    DeviceGuard g(dev);
    copy_on_stream(dst, dd, src, sd, nbytes, stream(dev), /*sync=*/true);
  }
  void copy_bytes_nonblocking(void* dst, Device dd, const void* src, Device sd, size_t nbytes) override {
    if (!dd.is_cuda()) return copy_bytes(dst, dd, src, sd, nbytes);
    const int dev = cuda_index(dd, sd);
    check_index(dd.index);
    if (sd.is_cuda()) check_index(sd.index);
    DeviceGuard g(dev);
    copy_on_stream(dst, dd, src, sd, nbytes, stream(dev), /*sync=*/false);
  }
  void fill_zero(void* ptr, size_t nbytes, int device) override {
    if (nbytes == 0) return;
    DeviceGuard g(device);
    FG_CUDA_CHECK(cudaMemsetAsync(ptr, 0, nbytes, stream(device)));
  }
  int device_count() const override { return cached_device_count(); }
  void synchronize(int device) override { cuda::synchronize(device); }
};

CudaBackend backend_instance;
const bool registered = [] {
  register_device_backend(DeviceType::CUDA, &backend_instance);
  return true;
}();

}  // namespace

// ---------------------------------------------------------------- public API

size_t allocation_size_class(size_t nbytes) {
  constexpr size_t kSmall = 512, kLarge = size_t{2} << 20, kSmallLimit = size_t{1} << 20;
  if (nbytes <= kSmallLimit) return std::max<size_t>(kSmall, (nbytes + kSmall - 1) / kSmall * kSmall);
  return (nbytes + kLarge - 1) / kLarge * kLarge;
}

AllocatorStats allocator_stats(int device) { return allocator(device).stats(); }
void reset_peak_stats(int device) { allocator(device).reset_peak(); }
void empty_cache() {
  for (auto& a : allocators()) a->release_cached();
}

StreamHandle current_stream(int device) {
  check_index(device);
  auto& t = streams();
  std::lock_guard l(t.mu);
  if (t.current[device]) return t.current[device];
  if (!t.defaults[device]) {
    DeviceGuard g(device);
    FG_CUDA_CHECK(cudaStreamCreateWithFlags(&t.defaults[device], cudaStreamNonBlocking));
  }
  return t.defaults[device];
}
void set_current_stream(StreamHandle s, int device) {
  check_index(device);
  auto& t = streams();
  std::lock_guard l(t.mu);
  t.current[device] = static_cast<cudaStream_t>(s);
}
StreamHandle create_stream(int device) {
  check_index(device);
  DeviceGuard g(device);
  cudaStream_t s;
  FG_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return s;
}
void destroy_stream(StreamHandle s, int device) {
  check_index(device);
  DeviceGuard g(device);
  auto cs = static_cast<cudaStream_t>(s);
  FG_CUDA_CHECK(cudaStreamSynchronize(cs));
  {
    auto& t = streams();
    std::lock_guard l(t.mu);
    FG_CHECK(t.current[device] != cs, DeviceError, "destroy_stream: the stream is current on cuda:{}", device);
  }
  allocator(device).move_stream(cs, static_cast<cudaStream_t>(current_stream(device)));
  FG_CUDA_CHECK(cudaStreamDestroy(cs));
}
void synchronize(int device) {
  DeviceGuard g(device);
  FG_CUDA_CHECK(cudaStreamSynchronize(stream(device)));
}

StreamGuard::StreamGuard(StreamHandle s, int device) : device_(device) {
  check_index(device);
  auto& t = streams();
  {
    std::lock_guard l(t.mu);
    prev_ = t.current[device];
  }
  set_current_stream(s, device);
}
StreamGuard::~StreamGuard() { set_current_stream(prev_, device_); }

DeviceGuard::DeviceGuard(int device) {
  int cur = 0;
  FG_CUDA_CHECK(cudaGetDevice(&cur));
  if (cur != device) {
    FG_CUDA_CHECK(cudaSetDevice(device));
    prev_ = cur;
  }
}
DeviceGuard::~DeviceGuard() {
  if (prev_ >= 0) cudaSetDevice(prev_);
}

int device_of(const void* ptr) {
  if (cached_device_count() <= 1) return 0;
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, ptr) != cudaSuccess || a.type != cudaMemoryTypeDevice) {
    (void)cudaGetLastError();
    int cur = 0;
    FG_CUDA_CHECK(cudaGetDevice(&cur));
    return cur;
  }
  return a.device;
}

int num_sms(int device) {
  static std::vector<int> cache = [] {
    std::vector<int> v(cached_device_count(), 0);
    for (int i = 0; i < static_cast<int>(v.size()); ++i)
      FG_CUDA_CHECK(cudaDeviceGetAttribute(&v[i], cudaDevAttrMultiProcessorCount, i));
    return v;
  }();
  return cache[device];
}

Workspace::Workspace(size_t nbytes, int device) : nbytes_(nbytes), device_(device) {
  if (nbytes) ptr_ = allocator(device).allocate(nbytes);
}
Workspace::~Workspace() {
  if (ptr_) allocator(device_).deallocate(ptr_);
}

void copy_async(void* dst, Device dd, const void* src, Device sd, size_t nbytes) {
  FG_CHECK(dd.is_cuda() || sd.is_cuda(), DeviceError, "copy_async: neither {} nor {} is a CUDA device", sd, dd);
  int dev = cuda_index(dd, sd);
  check_index(dev);
  DeviceGuard g(dev);
  copy_on_stream(dst, dd, src, sd, nbytes, stream(dev), /*sync=*/false);
}

Tensor to_device_async(const Tensor& t, Device device) {
  FG_CHECK(t.defined(), ValueError, "to_device_async: the tensor is undefined");
  if (t.device() == device) return t;
  Tensor src = t.is_contiguous() ? t : t.contiguous();
  Tensor out = empty(t.sizes(), TensorOptions().dtype(t.dtype()).device(device));
  copy_async(out.data_ptr(), device, src.data_ptr(), t.device(), static_cast<size_t>(t.numel()) * t.element_size());
  // A contiguous temporary made here may die at once: its device block is only reused by later work on
  // the same stream (ordered after this copy), and host sources are staged before copy_async returns.
  return out;
}

Tensor pin_memory(const Tensor& t) {
  FG_CHECK(t.defined() && t.is_cpu(), DeviceError, "pin_memory: expected a CPU tensor");
  FG_CHECK(cached_device_count() > 0, DeviceError, "pin_memory: no CUDA device is available");
  size_t n = static_cast<size_t>(t.numel()) * t.element_size();
  void* p = nullptr;
  FG_CUDA_CHECK(cudaHostAlloc(&p, std::max<size_t>(n, 1), cudaHostAllocPortable));
  auto storage = std::make_shared<StorageImpl>(p, n, kCPU, [](void* q) { cudaFreeHost(q); });
  Tensor out(std::make_shared<TensorImpl>(std::move(storage), t.sizes(), contiguous_strides(t.sizes()), 0, t.dtype()));
  out.copy_(t);
  return out;
}
bool is_pinned(const void* p) { return cached_device_count() > 0 && host_is_pinned(p); }

}  // namespace fg::cuda
