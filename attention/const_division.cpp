// exact_reciprocal (see const_division.h).
#include "flexgrad/attention/const_division.h"

#include <bit>
#include <cmath>
#include <cstdint>

namespace fg {

std::optional<float> exact_reciprocal(float c) {
  const float a = std::fabs(c);
  if (!(a >= 0x1p-126f && a <= 0x1p126f)) return std::nullopt;  // also 0, infinities and NaN
  if ((std::bit_cast<uint32_t>(c) & 0x7fffffu) != 0) return std::nullopt;  // a normal float: 2^k iff no mantissa bits
  return 1.f / c;  // exact
}

}  // namespace fg
