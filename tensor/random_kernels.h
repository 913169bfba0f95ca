// Kernels of the counter-based random factories (tensor/random.h), one per device behind a DispatchStub.
// A fill writes element i (row-major, contiguous `out` of `n` elements of `dtype`) from the Philox words
// of counter base + i under `seed`, with exactly the mapping documented in tensor/random.h, so every
// backend gives the same values for the same generator state.
#pragma once
#include <cstdint>

#include "flexgrad/tensor/dispatch.h"
#include "flexgrad/tensor/dtype.h"

namespace fg {

enum class RandomKind : int { Uniform, Normal, Int, Bernoulli };

struct RandomFill {
  RandomKind kind = RandomKind::Uniform;
  DType dtype = DType::Float32;
  uint64_t seed = 0, base = 0;
  int64_t n = 0;
  int64_t low = 0;     // Int: low
  uint64_t range = 1;  // Int: high - low
  double p = 0.5;      // Bernoulli
};

using RandomFillFn = void (*)(void* out, const RandomFill& f);
FG_DECLARE_STUB(RandomFillFn, random_fill_stub);

}  // namespace fg
