// Seeded random factories. A Generator is (seed, offset): each draw of n elements uses counters
// [offset, offset + n) and then advances offset, so results depend only on the seed and the order of
// draws, never on threads or devices (the same values on CPU and CUDA).
//
// The exact element -> counter mapping (any other backend, e.g. a CUDA kernel, must reproduce it):
//   A draw reserves counters with base = gen.advance(count). Element i of the result, in row-major order
//   of its shape, reads the four words w[0..3] = Philox4x32::generate(gen.seed(), base + i), and:
//   - rand     float32:  Philox4x32::to_float(w[0])               (24 bits, k * 2^-24)
//              float64:  Philox4x32::to_double(w[0], w[1])        (53 bits)
//              float16:  (w[0] >> 21) * 2^-11,  bfloat16: (w[0] >> 24) * 2^-8  (exact in the type, so < 1)
//   - randn    u1 = 1 - to_double(w[0], w[1]) in (0, 1], u2 = to_double(w[2], w[3]);
//              z = sqrt(-2 log u1) * cos(2 pi u2) in double, then rounded to the dtype (the sine half
//              of Box-Muller is dropped so that element i depends on counter base + i only). The CUDA
//              kernel evaluates the same formula with CUDA's log/cos: float64 values agree with the CPU's
//              to about an ulp (most bit-identical), narrower dtypes are bit-identical but for rare ties.
//              All other draws below are bit-identical on every device.
//   - randint  low + (((uint64(w[0]) << 32) | w[1]) mod (high - low))
//   - bernoulli to_double(w[0], w[1]) < p ? 1 : 0
//   count = numel for all of these. Two further, inherently sequential draws (CPU only):
//   - randperm(n): count = n; start from [0, 1, ..., n-1]; for i = n-1 down to 1, with words of counter
//              base + i, j = ((w[0] << 32) | w[1]) mod (i + 1) and swap(p[i], p[j]) (Fisher-Yates).
//   - multinomial: count = number of rows; row r draws u = to_double(w[0], w[1]) * row_sum from counter
//              base + r and picks the first index whose running sum exceeds u (zero weights never win).
#pragma once
#include <cstdint>
#include <mutex>

#include "flexgrad/tensor/tensor.h"

namespace fg {

class Generator {
 public:
  explicit Generator(uint64_t seed = 0x5eed) : seed_(seed) {}
  void manual_seed(uint64_t seed) { std::lock_guard l(mu_); seed_ = seed; offset_ = 0; }
  uint64_t seed() const { return seed_; }
  uint64_t offset() const { return offset_; }
  void set_offset(uint64_t o) { std::lock_guard l(mu_); offset_ = o; }
  // Reserves n counters; returns the first.
  uint64_t advance(uint64_t n) { std::lock_guard l(mu_); uint64_t o = offset_; offset_ += n; return o; }

 private:
  std::mutex mu_;
  uint64_t seed_;
  uint64_t offset_ = 0;
};

Generator& default_generator();
void manual_seed(uint64_t seed);  // seeds the default generator

// Uniform [0, 1), standard normal (Box-Muller), integers in [low, high), Bernoulli(p) as the tensor's dtype.
Tensor rand(const Shape& sizes, TensorOptions options = {}, Generator* gen = nullptr);
Tensor randn(const Shape& sizes, TensorOptions options = {}, Generator* gen = nullptr);
Tensor randint(int64_t low, int64_t high, const Shape& sizes, TensorOptions options = kInt64, Generator* gen = nullptr);
Tensor bernoulli(const Shape& sizes, double p, TensorOptions options = {}, Generator* gen = nullptr);
Tensor rand_like(const Tensor& t, Generator* gen = nullptr);
Tensor randn_like(const Tensor& t, Generator* gen = nullptr);
// A random permutation of [0, n) (int64).
Tensor randperm(int64_t n, TensorOptions options = kInt64, Generator* gen = nullptr);
// Samples one index per row of non-negative weights `probs` [..., n] (int64 [...]).
Tensor multinomial(const Tensor& probs, Generator* gen = nullptr);

}  // namespace fg
