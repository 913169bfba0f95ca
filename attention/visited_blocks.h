// VisitedBlocks: how many blocks a BlockMask visits (partial + full, summed over the mask's batch, heads and
// q-block rows: the count BlockMask::sparsity() is made of), as the host can learn it without waiting for the
// device. A mask built on the CPU has it at once. A mask built on a GPU counts its blocks there, behind the
// kernels that wrote its lists, and copies the count into pinned host memory with an event after it, so the
// host knows it once that copy has landed and asking never blocks.
//
// Readers use it for choices that change speed, never results: the CUDA backward launches its persistent
// kernels where the mask's rows are short (flex_backward_cuda.cpp), and sparsity() skips its synchronising
// read when the count is known.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>

namespace fg {

class VisitedBlocks {
 public:
  virtual ~VisitedBlocks() = default;
  // The count, or nullopt while the device's copy is still in flight (or where no count was queued: a GPU
  // mask built when the pinned slots were all taken). Never blocks; safe from any thread.
  virtual std::optional<int64_t> known() const = 0;

  // A count the host already holds.
  static std::shared_ptr<const VisitedBlocks> of(int64_t count);
};

}  // namespace fg
