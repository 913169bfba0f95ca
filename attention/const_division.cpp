// exact_reciprocal, double_reciprocal and corrected_reciprocal (see const_division.h).
#include "flexgrad/attention/const_division.h"

#include <bit>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <unordered_map>

namespace fg {

std::optional<float> exact_reciprocal(float c) {
  const float a = std::fabs(c);
  if (!(a >= 0x1p-126f && a <= 0x1p126f)) return std::nullopt;  // also 0, infinities and NaN
  if ((std::bit_cast<uint32_t>(c) & 0x7fffffu) != 0) return std::nullopt;  // a normal float: 2^k iff no mantissa bits
  return 1.f / c;  // exact
}

namespace {

// check(key)'s answer, computed once per key (thread-safe; the checks take milliseconds to tens of them).
template <class Check>
bool memoised(std::unordered_map<uint32_t, bool>& memo, std::mutex& mu, uint32_t key, Check check) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = memo.find(key);
  return it != memo.end() ? it->second : memo.emplace(key, check()).first->second;
}

}  // namespace

bool double_product_rounds_every_tie(float c) {
  if (!std::isfinite(c) || c == 0.f) return true;
  // c = C 2^g, C odd: significand and exponent of |c| as integers.
  int e = 0;
  const double m = std::frexp(std::fabs(static_cast<double>(c)), &e);  // |c| = m 2^e, m in [0.5, 1)
  auto C = static_cast<uint64_t>(std::ldexp(m, 53));                    // |c| = C 2^(e - 53), exact
  int g = e - 53;
  while ((C & 1) == 0) C >>= 1, ++g;
  if (g < 1 || C == 1) return true;  // no subnormal midpoint is a quotient (or c is 2^k: exact_reciprocal's)
  const double r = 1.0 / static_cast<double>(c);
  // Host float arithmetic rounds once per operation (SSE, no flush to zero), as IEEE division on the GPU does.
  for (uint64_t b = 1; b * C < (uint64_t{1} << 24); b += 2) {
    const float x = static_cast<float>(std::ldexp(static_cast<double>(b * C), g - 150));  // exact: b C < 2^24
    if (static_cast<float>(static_cast<double>(x) * r) != x / c) return false;
  }
  return true;
}

std::optional<double> double_reciprocal(float c) {
  if (!std::isfinite(c) || c == 0.f || exact_reciprocal(c)) return std::nullopt;
  static std::mutex mu;
  static std::unordered_map<uint32_t, bool> checked;  // by |c|'s bits: RN is symmetric, c and -c together
  if (!memoised(checked, mu, std::bit_cast<uint32_t>(std::fabs(c)), [c] { return double_product_rounds_every_tie(c); }))
    return std::nullopt;
  return 1.0 / static_cast<double>(c);
}

// The reference quotient is the double quotient rounded to float: double rounding is harmless for division when the
// wider format has at least 2p + 2 bits (53 >= 50). Host float arithmetic rounds each operation once (SSE; this
// library is built with -ffp-contract=off); std::fmaf is correctly rounded with or without a hardware FMA.
bool corrected_division_is_exact(float c, float r) {
  bool exact = true;
#pragma omp parallel for reduction(&& : exact) schedule(static)
  for (int32_t i = 0; i < (1 << 23); ++i) {
    const float x = std::bit_cast<float>(0x3f800000u | static_cast<uint32_t>(i));
    const float q = x * r;
    const float e = std::fmaf(q, c, -x);
    const float q2 = std::fmaf(-e, r, q);
    exact = exact && std::bit_cast<uint32_t>(q2) ==
                         std::bit_cast<uint32_t>(static_cast<float>(static_cast<double>(x) / static_cast<double>(c)));
  }
  return exact;
}

std::optional<float> corrected_reciprocal(float c) {
  const float a = std::fabs(c);
  if (!(a >= 0x1p-16f && a <= 0x1p16f) || exact_reciprocal(c)) return std::nullopt;  // also 0, infinities and NaN
  const uint32_t mantissa = std::bit_cast<uint32_t>(c) & 0x7fffffu;
  static std::mutex mu;
  static std::unordered_map<uint32_t, bool> proven;  // by mantissa: c and c 2^k (either sign) are proven together
  const bool ok = memoised(proven, mu, mantissa, [mantissa] {
    const float c1 = std::bit_cast<float>(0x3f800000u | mantissa);  // c's mantissa with exponent 0
    return corrected_division_is_exact(c1, static_cast<float>(1.0 / static_cast<double>(c1)));
  });
  if (!ok) return std::nullopt;
  return static_cast<float>(1.0 / static_cast<double>(c));  // RN(1 / c): double rounding harmless, as above
}

}  // namespace fg
