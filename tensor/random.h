// Seeded random factories. A Generator is (seed, offset): each draw of n elements uses counters
// [offset, offset + n) and then advances offset, so results depend only on the seed and the order of
// draws, never on threads or devices (the same values on CPU and CUDA).
#pragma once
#include <cstdint>
#include <mutex>

#include "tensor/tensor.h"

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
