// VisitedBlocks held by the host (visited_blocks.h); the GPU's pending form is in
// attention/cuda/visited_blocks_cuda.cpp.
#include "flexgrad/attention/visited_blocks.h"

namespace fg {
namespace {

class HostVisitedBlocks final : public VisitedBlocks {
 public:
  explicit HostVisitedBlocks(int64_t n) : n_(n) {}
  std::optional<int64_t> known() const override { return n_; }

 private:
  int64_t n_;
};

}  // namespace

std::shared_ptr<const VisitedBlocks> VisitedBlocks::of(int64_t count) {
  return std::make_shared<const HostVisitedBlocks>(count);
}

}  // namespace fg
