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
  kBTile, kDsPairs, kSlots
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

// A thread's bf16 pair layouts of one head for the bf16 products (tile_kernels.h, gemm_bf16), repacked
// when the head changes as HeadTranspose: K^T as pairs along E ([E/2 x L], the transpose of K's rows read
// as E/2 pairs each) and V as pairs along L ([ceil(L/2) x Ev], rows 2p and 2p + 1 interleaved; an odd L
// pads the last pair with 0).
class HeadPairs {
 public:
  explicit HeadPairs(ScratchSlot slot) : slot_(slot) {}
  const uint32_t* k_transposed(const BFloat16* rows, int64_t L, int64_t E) {
    if (rows == src_) return buf_;
    buf_ = thread_scratch<uint32_t>(slot_, L * (E / 2));
    tile_kernels().transpose32(rows, L, E / 2, buf_);
    src_ = rows;
    return buf_;
  }
  const uint32_t* v_interleaved(const BFloat16* rows, int64_t L, int64_t Ev) {
    if (rows == src_) return buf_;
    buf_ = thread_scratch<uint32_t>(slot_, (L + 1) / 2 * Ev);
    tile_kernels().pair_rows_bf16(reinterpret_cast<const uint16_t*>(rows), Ev, L, Ev, buf_, Ev);
    src_ = rows;
    return buf_;
  }

 private:
  ScratchSlot slot_;
  uint32_t* buf_ = nullptr;
  const BFloat16* src_ = nullptr;
};

// A thread's transposed copy [E x L] of one head's K (or V) rows [L x E], the B operand of the A B^T tile
// products of float problems (double hands K itself to BLAS: null). Repacked only when the head changes:
// a thread's consecutive tasks mostly share a head, so the copy stays in its cache across the head's
// blocks, and the buffer is per thread (no call-sized allocation, whose page faults cost more than the copy).
template <class T>
class HeadTranspose {
 public:
  explicit HeadTranspose(ScratchSlot slot) : slot_(slot) {}
  const T* get(const T* rows, int64_t L, int64_t E) {
    if constexpr (!std::is_same_v<T, float>) {
      return nullptr;
    } else {
      if (rows == src_) return buf_;
      buf_ = thread_scratch<T>(slot_, L * E);
      tile_kernels().transpose32(rows, L, E, buf_);
      src_ = rows;
      return buf_;
    }
  }

 private:
  ScratchSlot slot_;
  T* buf_ = nullptr;
  const T* src_ = nullptr;
};

}  // namespace fg::cpu
