// Storage: a reference-counted block of device memory shared by a tensor and all of its views.
// It also carries the version counter that autograd uses to detect in-place changes to saved tensors.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>

#include "flexgrad/tensor/device.h"

namespace fg {

// A device's memory services. The CPU one is built in; the CUDA one registers itself when compiled.
class DeviceBackend {
 public:
  virtual ~DeviceBackend() = default;
  virtual void* allocate(size_t nbytes, int device_index) = 0;
  virtual void deallocate(void* ptr, size_t nbytes, int device_index) = 0;
  // Copies nbytes between any two devices where one of them is this backend's (or the CPU).
  virtual void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t nbytes) = 0;
  // The same without the host waiting where the destination is this backend's device: the copy is ordered on
  // the device's stream and the source may be reused as soon as the call returns (host memory is staged).
  // Copies to the host still wait (the caller reads the result next). Default: copy_bytes.
  virtual void copy_bytes_nonblocking(void* dst, Device dst_device, const void* src, Device src_device,
                                      size_t nbytes) {
    copy_bytes(dst, dst_device, src, src_device, nbytes);
  }
  virtual void fill_zero(void* ptr, size_t nbytes, int device_index) = 0;
  virtual int device_count() const = 0;
  virtual void synchronize(int device_index) {}
};

void register_device_backend(DeviceType type, DeviceBackend* backend);
// Throws DeviceError naming the device when no backend is registered or the index is out of range.
DeviceBackend& device_backend(Device device);
bool is_device_available(DeviceType type);

// The CPU allocator caches freed blocks of 64 KiB and more by size class (reuse avoids page faults).
struct CpuAllocatorStats {
  size_t allocated_bytes = 0;     // in live storages (size-class rounded)
  size_t cached_bytes = 0;        // freed, kept for reuse
  size_t cache_hits = 0;          // allocations served from the cache
  size_t system_allocations = 0;  // allocations that went to the system
};
CpuAllocatorStats cpu_allocator_stats();
void cpu_empty_cache();                    // returns every cached block to the system
void set_cpu_cache_limit(size_t bytes);    // most bytes kept cached (default 2 GiB); empties the cache
int device_count(DeviceType type);

class StorageImpl {
 public:
  // Allocates nbytes on device (uninitialised).
  StorageImpl(size_t nbytes, Device device);
  // Wraps memory owned elsewhere; deleter (may be empty) runs when the storage dies.
  StorageImpl(void* data, size_t nbytes, Device device, std::function<void(void*)> deleter);
  ~StorageImpl();
  StorageImpl(const StorageImpl&) = delete;
  StorageImpl& operator=(const StorageImpl&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

  uint32_t version() const { return version_.load(std::memory_order_relaxed); }
  void bump_version() { version_.fetch_add(1, std::memory_order_relaxed); }

 private:
  void* data_ = nullptr;
  size_t nbytes_ = 0;
  Device device_;
  std::function<void(void*)> external_deleter_;
  bool owned_ = true;
  std::atomic<uint32_t> version_{0};
};

using Storage = std::shared_ptr<StorageImpl>;

}  // namespace fg
