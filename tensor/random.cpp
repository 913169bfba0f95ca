// Seeded random factories on Philox4x32-10. Every value is a pure function of (seed, counter); the
// element -> counter mapping is documented in tensor/random.h and must not change (saved seeds and the
// CUDA fill kernel, tensor/cuda/random_cuda.cu, depend on it). rand/randn/randint/bernoulli fill on the
// target device through random_fill_stub; randperm and multinomial are sequential, run on the CPU and copy.
#include "flexgrad/tensor/random.h"

#include <cmath>
#include <numbers>
#include <numeric>

#include "flexgrad/tensor/philox.h"
#include "flexgrad/tensor/random_kernels.h"

namespace fg {
namespace {

Generator& pick(Generator* gen) { return gen ? *gen : default_generator(); }

void check_sizes(const Shape& sizes, const char* op) {
  for (int64_t s : sizes) FG_CHECK(s >= 0, ShapeError, "{}: negative size {} in shape {}", op, s, shape_str(sizes));
}

// Moves a freshly generated contiguous CPU tensor to the requested device and applies requires_grad.
Tensor finish(Tensor cpu, const TensorOptions& o) {
  Tensor out = cpu;
  if (!o.device_.is_cpu()) {
    out = empty(cpu.sizes(), TensorOptions().dtype(cpu.dtype()).device(o.device_));
    device_backend(o.device_).copy_bytes(out.data_ptr(), o.device_, cpu.data_ptr(), kCPU,
                                         static_cast<size_t>(cpu.numel()) * cpu.element_size());
  }
  if (o.requires_grad_) out.requires_grad_(true);
  return out;
}

uint64_t words64(const uint32_t w[4]) { return (static_cast<uint64_t>(w[0]) << 32) | w[1]; }

// Fills element i of a contiguous CPU tensor of dtype T with value(i, words of counter base + i), in
// parallel for big tensors. Each element only reads its own counter, so threads cannot change results.
template <class T, class ValueFn>
void fill_counters(T* p, int64_t n, uint64_t seed, uint64_t base, ValueFn value) {
#pragma omp parallel for if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    uint32_t w[4];
    Philox4x32::generate(seed, base + static_cast<uint64_t>(i), w);
    p[i] = value(w);
  }
}

// Stores a double in T (bool: nonzero), rounding through T's compute type.
template <class T> T store(double v) {
  if constexpr (std::is_same_v<T, bool>) return v != 0.0;
  else return static_cast<T>(static_cast<compute_t<T>>(v));
}

}  // namespace

Generator& default_generator() {
  static Generator gen;
  return gen;
}

void manual_seed(uint64_t seed) { default_generator().manual_seed(seed); }

// ---------------------------------------------------------------- CPU fill kernel

namespace {

// The CPU kernel of random_fill_stub: the reference mapping of tensor/random.h.
void random_fill_cpu(void* out, const RandomFill& f) {
  const int64_t n = f.n;
  const uint64_t seed = f.seed, base = f.base;
  switch (f.kind) {
    case RandomKind::Uniform:
      FG_DISPATCH_FLOATING_TYPES(f.dtype, "rand", [&]<class T>() {
        fill_counters(static_cast<T*>(out), n, seed, base, [](const uint32_t w[4]) -> T {
          // Half types take only as many bits as they can hold exactly, so rounding never produces 1.0.
          if constexpr (std::is_same_v<T, double>) return Philox4x32::to_double(w[0], w[1]);
          else if constexpr (std::is_same_v<T, float>) return Philox4x32::to_float(w[0]);
          else if constexpr (std::is_same_v<T, Half>) return T(static_cast<float>(w[0] >> 21) * (1.0f / 2048.0f));
          else return T(static_cast<float>(w[0] >> 24) * (1.0f / 256.0f));
        });
      });
      return;
    case RandomKind::Normal:
      FG_DISPATCH_FLOATING_TYPES(f.dtype, "randn", [&]<class T>() {
        fill_counters(static_cast<T*>(out), n, seed, base, [](const uint32_t w[4]) -> T {
          double u1 = 1.0 - Philox4x32::to_double(w[0], w[1]);  // (0, 1]: log(u1) stays finite
          double u2 = Philox4x32::to_double(w[2], w[3]);
          return store<T>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::numbers::pi * u2));
        });
      });
      return;
    case RandomKind::Int: {
      const uint64_t low = static_cast<uint64_t>(f.low), range = f.range;
      FG_DISPATCH_ALL_TYPES(f.dtype, "randint", [&]<class T>() {
        fill_counters(static_cast<T*>(out), n, seed, base, [&](const uint32_t w[4]) -> T {
          // Modulo bias is below range / 2^64, negligible for any range a tensor can index.
          int64_t v = static_cast<int64_t>(low + words64(w) % range);
          if constexpr (std::is_same_v<T, bool>) return v != 0;
          else if constexpr (std::is_integral_v<T>) return static_cast<T>(v);
          else return store<T>(static_cast<double>(v));
        });
      });
      return;
    }
    case RandomKind::Bernoulli: {
      const double p = f.p;
      FG_DISPATCH_ALL_TYPES(f.dtype, "bernoulli", [&]<class T>() {
        fill_counters(static_cast<T*>(out), n, seed, base, [&](const uint32_t w[4]) -> T {
          return store<T>(Philox4x32::to_double(w[0], w[1]) < p ? 1.0 : 0.0);
        });
      });
      return;
    }
  }
}

// Draws `f` (its counters reserved from `gen`) into a new tensor on the requested device, filled there
// by that device's kernel.
Tensor draw(const Shape& sizes, const TensorOptions& o, Generator* gen, RandomFill f) {
  Tensor out = empty(sizes, TensorOptions().dtype(o.dtype_).device(o.device_));
  f.dtype = o.dtype_;
  f.n = out.numel();
  Generator& g = pick(gen);
  f.base = g.advance(static_cast<uint64_t>(f.n));
  f.seed = g.seed();
  if (f.n > 0) random_fill_stub(out.device(), out.data_ptr(), f);
  if (o.requires_grad_) out.requires_grad_(true);
  return out;
}

}  // namespace

FG_DEFINE_STUB(RandomFillFn, random_fill_stub);
FG_REGISTER_KERNEL(random_fill_stub, CPU, random_fill_cpu);

Tensor rand(const Shape& sizes, TensorOptions o, Generator* gen) {
  check_sizes(sizes, "rand");
  FG_CHECK(is_floating(o.dtype_), DTypeError, "rand: expected a floating dtype, got {}", o.dtype_);
  return draw(sizes, o, gen, RandomFill{.kind = RandomKind::Uniform});
}

Tensor randn(const Shape& sizes, TensorOptions o, Generator* gen) {
  check_sizes(sizes, "randn");
  FG_CHECK(is_floating(o.dtype_), DTypeError, "randn: expected a floating dtype, got {}", o.dtype_);
  return draw(sizes, o, gen, RandomFill{.kind = RandomKind::Normal});
}

Tensor randint(int64_t low, int64_t high, const Shape& sizes, TensorOptions o, Generator* gen) {
  check_sizes(sizes, "randint");
  FG_CHECK(low < high, ValueError, "randint: expected low < high, got low={} high={}", low, high);
  FG_CHECK(o.dtype_ != kBool || (low >= 0 && high <= 2), ValueError,
           "randint: range [{}, {}) does not fit dtype bool", low, high);
  RandomFill f{.kind = RandomKind::Int};
  f.low = low;
  f.range = static_cast<uint64_t>(high) - static_cast<uint64_t>(low);
  return draw(sizes, o, gen, f);
}

Tensor bernoulli(const Shape& sizes, double p, TensorOptions o, Generator* gen) {
  check_sizes(sizes, "bernoulli");
  FG_CHECK(p >= 0.0 && p <= 1.0, ValueError, "bernoulli: expected 0 <= p <= 1, got p={}", p);
  RandomFill f{.kind = RandomKind::Bernoulli};
  f.p = p;
  return draw(sizes, o, gen, f);
}

Tensor rand_like(const Tensor& t, Generator* gen) {
  FG_CHECK(t.defined(), ValueError, "rand_like: the tensor is undefined");
  return rand(t.sizes(), t.options(), gen);
}

Tensor randn_like(const Tensor& t, Generator* gen) {
  FG_CHECK(t.defined(), ValueError, "randn_like: the tensor is undefined");
  return randn(t.sizes(), t.options(), gen);
}

Tensor randperm(int64_t n, TensorOptions o, Generator* gen) {
  FG_CHECK(n >= 0, ValueError, "randperm: n must be non-negative, got {}", n);
  FG_CHECK(o.dtype_ != kBool, DTypeError, "randperm: dtype bool cannot hold a permutation");
  // Largest n whose values 0..n-1 the dtype holds exactly (floats: 2^(significand bits)).
  int64_t limit = o.dtype_ == kInt32     ? int64_t{1} << 31
                  : o.dtype_ == kFloat16  ? int64_t{1} << 11
                  : o.dtype_ == kBFloat16 ? int64_t{1} << 8
                  : o.dtype_ == kFloat32  ? int64_t{1} << 24
                  : o.dtype_ == kFloat64  ? int64_t{1} << 53
                                          : INT64_MAX;
  FG_CHECK(n <= limit, DTypeError, "randperm: dtype {} cannot hold the values 0..{} exactly", o.dtype_, n - 1);
  std::vector<int64_t> perm(static_cast<size_t>(n));
  std::iota(perm.begin(), perm.end(), int64_t{0});
  Generator& g = pick(gen);
  uint64_t base = g.advance(static_cast<uint64_t>(n));
  uint64_t seed = g.seed();
  // Fisher-Yates is sequential: step i needs the array after steps n-1..i+1. Its randomness is still
  // counter-addressed (step i reads counter base + i), so the result depends on the seed only.
  for (int64_t i = n - 1; i >= 1; --i) {
    uint32_t w[4];
    Philox4x32::generate(seed, base + static_cast<uint64_t>(i), w);
    auto j = static_cast<int64_t>(words64(w) % static_cast<uint64_t>(i + 1));
    std::swap(perm[i], perm[j]);
  }
  Tensor cpu = empty({n}, TensorOptions().dtype(o.dtype_));
  FG_DISPATCH_NUMERIC_TYPES(o.dtype_, "randperm", [&]<class T>() {
    T* p = cpu.data<T>();
    for (int64_t i = 0; i < n; ++i) p[i] = store<T>(static_cast<double>(perm[i]));
  });
  return finish(cpu, o.requires_grad(false));
}

Tensor multinomial(const Tensor& probs, Generator* gen) {
  FG_CHECK(probs.defined(), ValueError, "multinomial: probs is undefined");
  FG_CHECK(probs.dim() >= 1, ShapeError, "multinomial: probs must have at least 1 dimension, got shape {}",
           shape_str(probs.sizes()));
  FG_CHECK(probs.dtype() != kBool, DTypeError, "multinomial: probs must be numeric, got dtype {}", probs.dtype());
  int64_t n = probs.size(-1);
  FG_CHECK(n > 0, ShapeError, "multinomial: the last dimension of probs (shape {}) must be non-empty",
           shape_str(probs.sizes()));
  Shape out_sizes(probs.sizes().begin(), probs.sizes().end() - 1);
  int64_t rows = shape_numel(out_sizes);
  std::vector<double> w = probs.to_vector();  // row-major, any device or layout
  for (int64_t r = 0; r < rows; ++r) {
    double total = 0;
    for (int64_t k = 0; k < n; ++k) {
      double v = w[r * n + k];
      FG_CHECK(std::isfinite(v) && v >= 0, ValueError,
               "multinomial: probs must be finite and non-negative, got {} at row {} index {}", v, r, k);
      total += v;
    }
    FG_CHECK(total > 0, ValueError, "multinomial: row {} of probs sums to zero", r);
  }
  Generator& g = pick(gen);
  uint64_t base = g.advance(static_cast<uint64_t>(rows));
  uint64_t seed = g.seed();
  Tensor cpu = empty(out_sizes, TensorOptions().dtype(kInt64));
  int64_t* out = cpu.data<int64_t>();
#pragma omp parallel for if (rows * n > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const double* row = w.data() + r * n;
    double total = 0;
    for (int64_t k = 0; k < n; ++k) total += row[k];
    uint32_t words[4];
    Philox4x32::generate(seed, base + static_cast<uint64_t>(r), words);
    double u = Philox4x32::to_double(words[0], words[1]) * total;
    int64_t pick_k = -1, last_positive = 0;
    double run = 0;
    for (int64_t k = 0; k < n; ++k) {
      if (row[k] <= 0) continue;
      last_positive = k;
      run += row[k];
      if (run > u) { pick_k = k; break; }
    }
    // Rounding in the running sum can leave u just above it; the last positive weight then wins.
    out[r] = pick_k >= 0 ? pick_k : last_positive;
  }
  return finish(cpu, TensorOptions().dtype(kInt64).device(probs.device()));
}

}  // namespace fg
