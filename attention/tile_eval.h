// TileEvaluator: evaluates a ModProgram for one (b, h) over a rectangular tile
// q in [q0, q0+nq), kv in [kv0, kv0+nkv) — the hot path of the fused CPU kernels.
//
// The instruction list is interpreted once per tile, each instruction running a tight loop over the
// tile (so per-node loops vectorise). Values are stored at the shape they vary with: constants and
// b/h-only values are scalars, q-only values are columns of nq, kv-only values rows of nkv, and only
// values that depend on both (or on the score) are full nq x nkv tiles. Scratch buffers are owned by
// the evaluator and grow monotonically: keep one evaluator per thread and no tile allocates.
//
// Float values are computed in T (float or double), ints in int64, bools in uint8.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "flexgrad/attention/mod_program.h"

namespace fg {

// A value of the last evaluated tile: element (i, j) is data[i * row_stride + j * col_stride]
// (strides are 0 along dims the value does not vary with).
struct TileValue {
  const void* data = nullptr;
  int64_t row_stride = 0, col_stride = 0;
  ValueKind kind = ValueKind::Float;
  template <class U> const U* as() const { return static_cast<const U*>(data); }
};

template <class T>
class TileEvaluator {
 public:
  explicit TileEvaluator(ModProgram program);
  TileEvaluator(const TileEvaluator&) = delete;
  TileEvaluator& operator=(const TileEvaluator&) = delete;
  TileEvaluator(TileEvaluator&&) = default;

  // Evaluate another program with the same buffers (kept when they fit it): an evaluator kept per thread
  // across calls does not allocate and fault in fresh tiles for every call. release() drops the program
  // and with it the captured tensors it holds, keeping the buffers.
  void reset(ModProgram program);
  void release();

  // Evaluate every output. `score` (row-major nq x nkv with leading dimension ld_score, default nkv)
  // is required iff the program uses the score; it must stay alive while outputs are read.
  // IndexError when a captured tensor is read out of range.
  void run(int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t kv0, int64_t nkv, const T* score = nullptr,
           int64_t ld_score = -1);
  TileValue output(size_t i) const;

  // Score mods: out (nq x nkv, leading dim ld_out, default nkv) = score_mod(score). out may equal score.
  void score_tile(int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t kv0, int64_t nkv, const T* score,
                  T* out, int64_t ld_score = -1, int64_t ld_out = -1);
  // Mask mods: out[i * ld_out + j] = 1 where attention is allowed, 0 elsewhere.
  void mask_tile(int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t kv0, int64_t nkv, uint8_t* out,
                 int64_t ld_out = -1);
  // Number of true entries of a bool output over the tile (BlockMask construction).
  int64_t count_true(size_t output = 0) const;

  // Copies output i into a dense nq x nkv array, converting its kind (ints/bools -> U).
  template <class U> void copy_output(size_t i, U* dst, int64_t ld = -1) const;

  const ModProgram& program() const { return program_; }

 private:
  struct Slot {
    const void* ptr = nullptr;
    int64_t rs = 0, cs = 0;
  };
  ModProgram program_;
  std::vector<Slot> slots_;
  std::vector<void*> bufs_;
  struct Free { void operator()(void* p) const; };
  std::vector<std::unique_ptr<void, Free>> owned_;
  int64_t capacity_ = 0;  // elements per full-tile buffer
  int64_t nq_ = 0, nkv_ = 0;
  void reserve(int64_t elems);
};

template <class T>
template <class U>
void TileEvaluator<T>::copy_output(size_t i, U* dst, int64_t ld) const {
  if (ld < 0) ld = nkv_;
  const TileValue v = output(i);
  auto copy = [&](auto* src) {
    for (int64_t r = 0; r < nq_; ++r) {
      const auto* row = src + r * v.row_stride;
      U* out = dst + r * ld;
      if (v.col_stride) {  // contiguous row: a vectorisable converting copy
        for (int64_t c = 0; c < nkv_; ++c) out[c] = static_cast<U>(row[c]);
      } else {             // value constant along the row
        const U x = static_cast<U>(row[0]);
        for (int64_t c = 0; c < nkv_; ++c) out[c] = x;
      }
    }
  };
  switch (v.kind) {
    case ValueKind::Float: copy(v.as<T>()); break;
    case ValueKind::Int: copy(v.as<int64_t>()); break;
    case ValueKind::Bool: copy(v.as<uint8_t>()); break;
  }
}

extern template class TileEvaluator<float>;
extern template class TileEvaluator<double>;

}  // namespace fg
