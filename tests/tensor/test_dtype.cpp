// dtype promotion and the half / bfloat16 conversions (checked against IEEE bit patterns).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "flexgrad/tensor/dtype.h"

namespace fg {
namespace {

TEST(DType, PromotionFollowsBoolIntFloatOrder) {
  EXPECT_EQ(promote_types(kBool, kInt32), kInt32);
  EXPECT_EQ(promote_types(kInt32, kInt64), kInt64);
  EXPECT_EQ(promote_types(kInt64, kFloat16), kFloat16);
  EXPECT_EQ(promote_types(kInt64, kBFloat16), kBFloat16);
  EXPECT_EQ(promote_types(kFloat16, kFloat32), kFloat32);
  EXPECT_EQ(promote_types(kBFloat16, kFloat64), kFloat64);
  EXPECT_EQ(promote_types(kFloat32, kFloat64), kFloat64);
  EXPECT_EQ(promote_types(kBool, kBool), kBool);
}

TEST(DType, HalfAndBFloat16PromoteToFloat32) {
  EXPECT_EQ(promote_types(kFloat16, kBFloat16), kFloat32);
  EXPECT_EQ(promote_types(kBFloat16, kFloat16), kFloat32);
}

TEST(DType, PromotionIsSymmetric) {
  const DType all[] = {kBool, kInt32, kInt64, kFloat16, kBFloat16, kFloat32, kFloat64};
  for (DType a : all) for (DType b : all) EXPECT_EQ(promote_types(a, b), promote_types(b, a)) << dtype_name(a) << " " << dtype_name(b);
}

TEST(DType, NamesSizesAndCategories) {
  EXPECT_STREQ(dtype_name(kBFloat16), "bfloat16");
  EXPECT_EQ(fmt::format("{}", kFloat64), "float64");
  EXPECT_EQ(element_size(kFloat16), 2u);
  EXPECT_EQ(element_size(kInt64), 8u);
  EXPECT_TRUE(is_floating(kBFloat16));
  EXPECT_FALSE(is_floating(kInt32));
  EXPECT_FALSE(is_integral(kBool));
  EXPECT_TRUE(is_integral(kBool, /*include_bool=*/true));
}

uint16_t hbits(float f) { return Half(f).bits; }
uint16_t bbits(float f) { return BFloat16(f).bits; }
float from_bits32(uint32_t b) { return std::bit_cast<float>(b); }

TEST(Half, ExactValues) {
  EXPECT_EQ(hbits(1.0f), 0x3C00);
  EXPECT_EQ(hbits(-2.5f), 0xC100);
  EXPECT_EQ(hbits(0.0f), 0x0000);
  EXPECT_EQ(hbits(-0.0f), 0x8000);
  EXPECT_EQ(hbits(65504.0f), 0x7BFF);  // largest finite half
  EXPECT_EQ(hbits(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(hbits(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
}

TEST(Half, OverflowAndInfinities) {
  EXPECT_EQ(hbits(65519.0f), 0x7BFF);  // below the midpoint to 2^16: stays finite
  EXPECT_EQ(hbits(65520.0f), 0x7C00);  // the midpoint rounds (to even) to infinity
  EXPECT_EQ(hbits(1e6f), 0x7C00);
  EXPECT_EQ(hbits(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(hbits(-std::numeric_limits<float>::infinity()), 0xFC00);
  EXPECT_TRUE(std::isinf(static_cast<float>(Half::from_bits(0xFC00))));
}

TEST(Half, TiesRoundToEven) {
  EXPECT_EQ(hbits(1.0f + std::ldexp(1.0f, -11)), 0x3C00);      // halfway 1.0 | 1+2^-10: even is 1.0
  EXPECT_EQ(hbits(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3C02);  // halfway 0x3C01 | 0x3C02: even is 0x3C02
  EXPECT_EQ(hbits(std::ldexp(1.0f, -25)), 0x0000);             // half the smallest subnormal: to zero
  EXPECT_EQ(hbits(3 * std::ldexp(1.0f, -25)), 0x0002);         // 1.5 subnormal ulps: to 2
  EXPECT_EQ(hbits(std::ldexp(1.0f, -25) * 1.0001f), 0x0001);   // just above the tie rounds up
}

TEST(Half, NaNStaysNaN) {
  uint16_t b = hbits(std::numeric_limits<float>::quiet_NaN());
  EXPECT_EQ(b & 0x7C00, 0x7C00);
  EXPECT_NE(b & 0x03FF, 0);
  EXPECT_TRUE(std::isnan(static_cast<float>(Half::from_bits(0x7E00))));
}

TEST(Half, ToFloat) {
  EXPECT_EQ(static_cast<float>(Half::from_bits(0x0001)), std::ldexp(1.0f, -24));
  EXPECT_EQ(static_cast<float>(Half::from_bits(0x7BFF)), 65504.0f);
  EXPECT_EQ(static_cast<float>(Half::from_bits(0xC100)), -2.5f);
  EXPECT_EQ(static_cast<float>(Half::from_bits(0x3555)), 0.333251953125f);
  for (uint32_t b = 0; b < 0x7C00; ++b) {  // every finite half survives the round trip through float
    ASSERT_EQ(hbits(static_cast<float>(Half::from_bits(static_cast<uint16_t>(b)))), b);
  }
}

TEST(BFloat16, RoundingTiesToEven) {
  EXPECT_EQ(bbits(1.0f), 0x3F80);
  EXPECT_EQ(bbits(-2.5f), 0xC020);
  EXPECT_EQ(bbits(from_bits32(0x3F808000)), 0x3F80);  // tie, 0x3F80 is even
  EXPECT_EQ(bbits(from_bits32(0x3F818000)), 0x3F82);  // tie, 0x3F81 is odd: up to 0x3F82
  EXPECT_EQ(bbits(from_bits32(0x3F808001)), 0x3F81);  // above the tie
  EXPECT_EQ(bbits(from_bits32(0x3F807FFF)), 0x3F80);  // below the tie
}

TEST(BFloat16, SpecialValues) {
  EXPECT_EQ(bbits(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(bbits(-std::numeric_limits<float>::infinity()), 0xFF80);
  EXPECT_TRUE(std::isnan(static_cast<float>(BFloat16(std::numeric_limits<float>::quiet_NaN()))));
  // A NaN whose payload lives only in the low 16 bits must not turn into infinity.
  EXPECT_TRUE(std::isnan(static_cast<float>(BFloat16(from_bits32(0x7F800001)))));
  EXPECT_EQ(static_cast<float>(BFloat16::from_bits(0x3F81)), 1.0078125f);
}

}  // namespace
}  // namespace fg
