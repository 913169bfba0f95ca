// Per-thread scratch of the fused CPU FlexAttention (flex_cpu.cpp) that outlives a call: tile buffers,
// TileEvaluators, and a thread's transposed / bf16-paired copy of the K or V head it works on.
//
// OpenMP keeps its threads, so a call reuses the buffers of the last one instead of allocating fresh ones,
// faulting their pages in and unmapping them again (at one 128-token head that was 95% of a
// forward+backward). They grow to the largest tile or head seen and are never shrunk. Internal to
// attention/cpu (not installed).
#pragma once
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "flexgrad/attention/cpu/tile_kernels.h"
#include "flexgrad/attention/tile_eval.h"
#include "flexgrad/tensor/half.h"

namespace fg::cpu {

// Scratch buffers, one set per thread and element type: a few tiles and transposed heads per thread. Each
// slot has one user at a time (forward and backward of one thread never overlap).
enum ScratchSlot : int {
  kScoreTile, kPreTile, kGradTile, kDsTile, kAccTile, kRowMax, kRowSum, kMaskTile, kKt, kVt, kKRows, kPTile,
  kBTile, kDsPairs, kTileMax, kSlots
};
template <class U>
inline U* thread_scratch(ScratchSlot slot, int64_t n) {
  thread_local std::vector<U> bufs[kSlots];
  std::vector<U>& b = bufs[slot];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}
template <class U>
class ScratchTile {
 public:
  ScratchTile(ScratchSlot slot, int64_t n) : p_(thread_scratch<U>(slot, n)) {}
  U* data() const { return p_; }
  U* begin() const { return p_; }
  U& operator[](int64_t i) const { return p_[i]; }

 private:
  U* p_;
};

// A TileEvaluator of `program` (none for null) from this thread's evaluator of the same role, for the same
// reason as the scratch tiles: its buffers (a tile per instruction) survive from call to call. The program,
// and the captured tensors it holds, are dropped when the holder goes away.
enum EvalSlot : int { kScoreEval, kMaskEval, kGradEval, kCapEval, kEvalSlots };
template <class T>
class ThreadEvaluator {
 public:
  ThreadEvaluator(EvalSlot slot, const ModProgram* program) {
    if (!program) return;
    thread_local std::unique_ptr<TileEvaluator<T>> evs[kEvalSlots];
    std::unique_ptr<TileEvaluator<T>>& e = evs[slot];
    if (e) e->reset(*program);
    else e = std::make_unique<TileEvaluator<T>>(*program);
    ev_ = e.get();
  }
  ~ThreadEvaluator() {
    if (ev_) ev_->release();
  }
  ThreadEvaluator(const ThreadEvaluator&) = delete;
  ThreadEvaluator& operator=(const ThreadEvaluator&) = delete;
  explicit operator bool() const { return ev_ != nullptr; }
  TileEvaluator<T>* operator->() const { return ev_; }
  TileEvaluator<T>& operator*() const { return *ev_; }

 private:
  TileEvaluator<T>* ev_ = nullptr;
};

// A thread's copy of one K or V head in the layout a tile product reads, packed block by block as tiles
// ask for them and started afresh when the head changes (a thread's consecutive tasks mostly share a head,
// so the copy stays in its cache across the head's q blocks; a task packs only the kv blocks it visits,
// which matters when many threads share a head under a sparse mask). The head is L rows of `cols` elements;
// get() returns the block of rows [kv0, kv0 + n):
//   Transpose32: 32-bit elements (floats, or bf16 pairs along E) -> the block's cols x n transpose, leading
//                dimension n, contiguous at + kv0 * cols. (Not the head's cols x L transpose with leading
//                dimension L: a tile product reads B's rows one after another, and rows L floats apart fall
//                on a handful of cache sets for power-of-two L, so B was refetched from L2 for every
//                register block: 1.5x the time of QK^T on AVX2.)
//   PairRows16: bf16 -> pairs of rows, ceil(n/2) x cols pairs, leading dimension cols, at + kv0 / 2 * cols
//               (kv0 even; an odd L pads the last pair with 0).
class HeadPack {
 public:
  enum Layout { Transpose32, PairRows16 };
  HeadPack(ScratchSlot slot, Layout layout) : slot_(slot), layout_(layout) {}
  // The packed block of rows [kv0, kv0 + n) (blocks are asked for with the same kv0 and n every time).
  const uint32_t* get(const void* head, int64_t L, int64_t cols, int64_t kv0, int64_t n) {
    const TileKernels& tk = tile_kernels();
    if (head != src_) {
      buf_ = thread_scratch<uint32_t>(slot_, layout_ == Transpose32 ? L * cols : (L + 1) / 2 * cols);
      ready_.assign(L, 0);
      src_ = head;
    }
    uint32_t* block = layout_ == Transpose32 ? buf_ + kv0 * cols : buf_ + kv0 / 2 * cols;
    if (!ready_[kv0]) {
      if (layout_ == Transpose32) {
        tk.transpose32(static_cast<const uint32_t*>(head) + kv0 * cols, n, cols, block, n);
      } else {
        tk.pair_rows_bf16(static_cast<const uint16_t*>(head) + kv0 * cols, cols, n, cols, block, cols);
      }
      ready_[kv0] = 1;
    }
    return block;
  }

 private:
  ScratchSlot slot_;
  Layout layout_;
  uint32_t* buf_ = nullptr;
  const void* src_ = nullptr;
  std::vector<uint8_t> ready_;  // per row: the block starting there is packed
};

// The transposed float block (E x n, leading dimension n) of rows [kv0, kv0 + n), packed as needed; null
// for double (BLAS reads K itself).
template <class T>
const T* transposed_block(HeadPack& pack, const T* head, int64_t L, int64_t E, int64_t kv0, int64_t n) {
  if constexpr (std::is_same_v<T, float>) return reinterpret_cast<const float*>(pack.get(head, L, E, kv0, n));
  else return nullptr;
}

}  // namespace fg::cpu
