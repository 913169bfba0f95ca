// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3"): a counter-based generator.
// Element i of a random tensor is a pure function of (seed, offset + i), so the same seed gives the same
// values on the CPU and the GPU and whatever shape later work takes. Usable from host and device code.
#pragma once
#include <cstdint>

#include "flexgrad/tensor/host_device.h"

namespace fg {

struct Philox4x32 {
  static FG_HOST_DEVICE inline void round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
    uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
  }
  // Random123's philox4x32_10: a 128-bit counter and a 64-bit key to four words (tests/tensor hold it to
  // Random123's published known-answer vectors).
  static FG_HOST_DEVICE inline void block(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3], k0 = key[0], k1 = key[1];
    for (int i = 0; i < 10; ++i) {
      round(c0, c1, c2, c3, k0, k1);
      k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
  }
  // Four 32-bit random words for counter `ctr` (the low 64 bits of the block's counter) under key `seed`.
  static FG_HOST_DEVICE inline void generate(uint64_t seed, uint64_t ctr, uint32_t out[4]) {
    const uint32_t c[4] = {static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0, 0};
    const uint32_t k[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
    block(c, k, out);
  }
  // Uniform in [0, 1) with 24 random bits (float) or 53 (double).
  static FG_HOST_DEVICE inline float to_float(uint32_t x) { return static_cast<float>(x >> 8) * (1.0f / 16777216.0f); }
  static FG_HOST_DEVICE inline double to_double(uint32_t a, uint32_t b) {
    uint64_t v = (static_cast<uint64_t>(a) << 21) ^ static_cast<uint64_t>(b >> 11);
    return static_cast<double>(v & ((uint64_t{1} << 53) - 1)) * (1.0 / 9007199254740992.0);
  }
};

}  // namespace fg
