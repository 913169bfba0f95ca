// The GPU's VisitedBlocks (attention/visited_blocks.h): the count is summed on the device behind the kernels that
// wrote the lists, copied into a pinned host slot, and an event recorded after the copy; known() reads the slot
// once the event has completed (cudaEventQuery: never blocks).
//
// The slots come from one page-locked page per device, allocated once and kept for the process: a mask is built
// per training step (document masks change with the batch), and cudaHostAlloc / cudaFreeHost per mask would cost
// far more than the count (cudaFreeHost synchronises the device). A slot is reused only once the event of its
// last copy has completed, so a copy still in flight for a mask already destroyed cannot land in a new mask's
// slot. With every slot taken (512 masks alive at once on one device), or built while the stream is being captured
// into a CUDA graph, a new mask gets no count: known() stays nullopt and the readers take their default (speed only).
#include <cuda_runtime.h>

#include <array>
#include <atomic>
#include <mutex>
#include <vector>

#include "flexgrad/attention/block_mask_kernels.h"
#include "flexgrad/autograd/grad_mode.h"
#include "flexgrad/ops/ops.h"
#include "flexgrad/tensor/cuda/cuda_check.h"

namespace fg::cuda {
namespace {

class PinnedSlots {
 public:
  static constexpr int kSlots = 512;  // one 4 KiB page of int64

  struct Slot {
    int64_t* host = nullptr;
    cudaEvent_t done = nullptr;  // created on first use, on the pool's device
    bool in_use = false;
  };

  explicit PinnedSlots(int device) : device_(device) {}

  // A free slot whose last copy has landed, or nullptr when every slot is taken. Call with the device current.
  Slot* acquire() {
    std::lock_guard lock(mu_);
    if (page_ == nullptr) {
      FG_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&page_), sizeof(int64_t) * kSlots, cudaHostAllocPortable));
      for (int i = 0; i < kSlots; ++i) slots_[i].host = page_ + i;
    }
    for (Slot& s : slots_) {
      if (s.in_use) continue;
      if (s.done == nullptr) {
        FG_CUDA_CHECK(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming));
      } else if (cudaEventQuery(s.done) != cudaSuccess) {
        (void)cudaGetLastError();  // cudaErrorNotReady: its copy is still in flight
        continue;
      }
      s.in_use = true;
      return &s;
    }
    return nullptr;
  }
  void release(Slot* s) {
    std::lock_guard lock(mu_);
    s->in_use = false;
  }
  int device() const { return device_; }

 private:
  int device_;
  std::mutex mu_;
  int64_t* page_ = nullptr;
  std::array<Slot, kSlots> slots_{};
};

// Never destroyed (as the CUDA backend's own statics): events and pinned memory must not be freed after the
// runtime has gone at exit.
PinnedSlots& slots_of(int device) {
  static std::mutex mu;
  static auto* pools = new std::vector<PinnedSlots*>();
  std::lock_guard lock(mu);
  if (pools->size() <= static_cast<size_t>(device)) pools->resize(device + 1, nullptr);
  PinnedSlots*& p = (*pools)[device];
  if (p == nullptr) p = new PinnedSlots(device);
  return *p;
}

// Whether the device's current stream is being captured into a CUDA graph: there an event query may invalidate the
// capture, and work queued there runs only when the graph is launched, so no count is queued or read.
bool capturing(int device) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream(device), &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;  // unknown: take the safe side (no count)
  }
  return status != cudaStreamCaptureStatusNone;
}

class PendingVisitedBlocks final : public VisitedBlocks {
 public:
  PendingVisitedBlocks(PinnedSlots& pool, PinnedSlots::Slot* slot) : pool_(pool), slot_(slot) {}
  ~PendingVisitedBlocks() override {
    if (slot_ != nullptr) pool_.release(slot_);
  }
  std::optional<int64_t> known() const override {
    if (const int64_t v = value_.load(std::memory_order_acquire); v >= 0) return v;
    if (slot_ == nullptr) return std::nullopt;
    DeviceGuard guard(pool_.device());
    if (capturing(pool_.device())) return std::nullopt;
    const cudaError_t e = cudaEventQuery(slot_->done);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();  // not ready (or a device error, which the next synchronising call reports)
      return std::nullopt;
    }
    const int64_t v = *slot_->host;
    value_.store(v, std::memory_order_release);
    return v;
  }

 private:
  PinnedSlots& pool_;
  PinnedSlots::Slot* slot_;
  mutable std::atomic<int64_t> value_{-1};
};

std::shared_ptr<const VisitedBlocks> visited_cuda(const Tensor& num, const Tensor& full_num) {
  const int device = num.device().index;
  DeviceGuard guard(device);
  PinnedSlots& pool = slots_of(device);
  PinnedSlots::Slot* slot = capturing(device) ? nullptr : pool.acquire();
  auto pending = std::make_shared<const PendingVisitedBlocks>(pool, slot);
  if (slot == nullptr || num.numel() == 0) {
    if (slot != nullptr) *slot->host = 0;  // nothing to count: the event (never recorded) reads as complete
    return pending;
  }
  NoGradGuard no_grad;
  Tensor total = sum(num);  // int64 on the device
  if (full_num.defined()) total = add(total, sum(full_num));
  const cudaStream_t s = stream(device);
  FG_CUDA_CHECK(cudaMemcpyAsync(slot->host, total.data_ptr(), sizeof(int64_t), cudaMemcpyDeviceToHost, s));
  FG_CUDA_CHECK(cudaEventRecord(slot->done, s));
  // `total` may be freed now: the caching allocator reuses its block only for work queued after the copy.
  return pending;
}

}  // namespace

FG_REGISTER_KERNEL(visited_blocks_stub, CUDA, &visited_cuda);

}  // namespace fg::cuda
