// Branch-free float exp / exp2 / tanh / sigmoid that the compiler can vectorise inside the tile
// evaluator's loops (libm's expf/tanhf are scalar calls and made `20 * tanh(s / 20)` cost ~15 ns per
// score). Cephes-style: range reduction to 2^n * e^r with |r| <= ln2/2 and a degree-6 polynomial,
// accurate to about 2 ulp over the float range; inf, -inf and NaN behave as in libm; results that would
// be subnormal flush to 0 (irrelevant for attention scores). Double keeps libm (accuracy first).
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>

namespace fg::vec {

// 2^n for integral n in [-126, 127], as the float exponent field.
inline float pow2i(float n) {
  return std::bit_cast<float>(static_cast<int32_t>((static_cast<int32_t>(n) + 127) << 23));
}

// e^r for |r| <= ln2/2 (Cephes expf polynomial).
inline float exp_reduced(float r) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// Round to nearest integer for |t| < 2^22 (1.5 * 2^23 trick; SSE2 has no vector nearbyint).
inline float round_int(float t) { return (t + 12582912.0f) - 12582912.0f; }

inline float expf(float x) {
  const float xc = x < -87.33654f ? -87.33654f : (x > 88.72283f ? 88.72283f : x);
  float n = round_int(xc * 1.44269504088896341f);
  n = n > 127.0f ? 127.0f : n;  // near overflow r grows to ~ln2: a few ulp, still finite
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  const float y = exp_reduced(r) * pow2i(n);
  return x != x ? x : (x > 88.72283f ? INFINITY : (x < -87.33654f ? 0.0f : y));
}

inline float exp2f(float x) {
  const float xc = x < -126.0f ? -126.0f : (x > 127.99f ? 127.99f : x);
  float n = round_int(xc);
  n = n > 127.0f ? 127.0f : n;
  const float y = exp_reduced((xc - n) * 0.693147180559945309f) * pow2i(n);
  return x != x ? x : (x >= 128.0f ? INFINITY : (x < -126.0f ? 0.0f : y));
}

inline float tanhf(float x) {
  const float ax = std::fabs(x);
  // small |x|: odd polynomial (Cephes tanhf), avoids the cancellation of 1 - 2/(e^2x + 1)
  const float z = x * x;
  float p = -5.70498872745e-3f;
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const float small = p * z * x + x;
  const float e = expf(2.0f * (ax > 10.0f ? 10.0f : ax));
  const float big = 1.0f - 2.0f / (e + 1.0f);
  const float large = x < 0 ? -big : big;
  return x != x ? x : (ax < 0.625f ? small : large);
}

inline float sigmoidf(float x) { return 1.0f / (1.0f + expf(-x)); }

// Dispatch by type: float uses the vectorisable versions, double libm.
template <class T> inline T exp(T x) { if constexpr (sizeof(T) == 4) return expf(x); else return std::exp(x); }
template <class T> inline T exp2(T x) { if constexpr (sizeof(T) == 4) return exp2f(x); else return std::exp2(x); }
template <class T> inline T tanh(T x) { if constexpr (sizeof(T) == 4) return tanhf(x); else return std::tanh(x); }
template <class T> inline T sigmoid(T x) {
  if constexpr (sizeof(T) == 4) return sigmoidf(x); else return T(1) / (T(1) + std::exp(-x));
}

}  // namespace fg::vec
