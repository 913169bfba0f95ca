#include "tensor/storage.h"

#include <array>
#include <cstdlib>
#include <cstring>

#include "tensor/error.h"

namespace fg {
namespace {

// CPU memory: 64-byte aligned so that vector loads and BLAS see aligned rows.
class CpuBackend final : public DeviceBackend {
 public:
  void* allocate(size_t nbytes, int) override {
    if (nbytes == 0) return nullptr;
    size_t rounded = (nbytes + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, rounded);
    FG_CHECK(p != nullptr, Error, "out of CPU memory allocating {} bytes", nbytes);
    return p;
  }
  void deallocate(void* ptr, size_t, int) override { std::free(ptr); }
  void copy_bytes(void* dst, Device, const void* src, Device, size_t nbytes) override {
    if (nbytes) std::memcpy(dst, src, nbytes);
  }
  void fill_zero(void* ptr, size_t nbytes, int) override {
    if (nbytes) std::memset(ptr, 0, nbytes);
  }
  int device_count() const override { return 1; }
};

std::array<DeviceBackend*, kNumDeviceTypes>& backends() {
  static CpuBackend cpu;
  static std::array<DeviceBackend*, kNumDeviceTypes> table{&cpu, nullptr};
  return table;
}

}  // namespace

void register_device_backend(DeviceType type, DeviceBackend* backend) {
  backends()[static_cast<int>(type)] = backend;
}

DeviceBackend& device_backend(Device device) {
  DeviceBackend* b = backends()[static_cast<int>(device.type)];
  FG_CHECK(b != nullptr, DeviceError,
           "device {} is not available: flexgrad was built without its backend", device);
  FG_CHECK(device.index >= 0 && device.index < b->device_count(), DeviceError,
           "device {} is not available: {} device(s) of that type present", device, b->device_count());
  return *b;
}

bool is_device_available(DeviceType type) { return device_count(type) > 0; }

int device_count(DeviceType type) {
  DeviceBackend* b = backends()[static_cast<int>(type)];
  return b ? b->device_count() : 0;
}

StorageImpl::StorageImpl(size_t nbytes, Device device) : nbytes_(nbytes), device_(device) {
  data_ = device_backend(device).allocate(nbytes, device.index);
}

StorageImpl::StorageImpl(void* data, size_t nbytes, Device device, std::function<void(void*)> deleter)
    : data_(data), nbytes_(nbytes), device_(device), external_deleter_(std::move(deleter)), owned_(false) {}

StorageImpl::~StorageImpl() {
  if (!owned_) {
    if (external_deleter_) external_deleter_(data_);
    return;
  }
  if (data_) device_backend(device_).deallocate(data_, nbytes_, device_.index);
}

}  // namespace fg

namespace fg {

Device Device::parse(const std::string& s) {
  if (s == "cpu") return kCPU;
  if (s == "cuda") return kCUDA;
  if (s.rfind("cuda:", 0) == 0) {
    try {
      size_t used = 0;
      int idx = std::stoi(s.substr(5), &used);
      if (used == s.size() - 5 && idx >= 0) return Device(DeviceType::CUDA, idx);
    } catch (const std::exception&) {
    }
  }
  FG_FAIL(ValueError, "invalid device string '{}' (expected cpu, cuda or cuda:N)", s);
}

}  // namespace fg
