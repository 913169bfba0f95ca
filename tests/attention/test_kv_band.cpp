// KvBand (attention/kv_band.h): which mask programs have one kept kv interval per row, hand-checked
// intervals, and agreement with the scalar evaluator of the program on every (q, kv) of a grid, so a band the
// CPU kernels use in place of the interpreter keeps exactly what the mask_mod keeps.
#include <gtest/gtest.h>

#include <limits>

#include "flexgrad/attention/kv_band.h"
#include "flexgrad/ops/ops.h"

namespace fg {
namespace {

ModProgram mask_of(const MaskMod& m) { return trace_mask_mod(m); }

// Every (q, kv) in [0, n)^2: the band's interval against the program's own scalar evaluation.
void expect_band_matches_program(const ModProgram& p, int64_t n) {
  const std::optional<KvBand> band = kv_band(&p);
  ASSERT_TRUE(band.has_value()) << p.to_string();
  for (int64_t q = 0; q < n; ++q) {
    int64_t lo, hi;
    band->row(q, lo, hi);
    for (int64_t kv = 0; kv < n; ++kv) {
      const bool kept = p.evaluate(0, 0, q, kv) != 0;
      ASSERT_EQ(kept, kv >= lo && kv <= hi) << p.to_string() << " at q=" << q << " kv=" << kv;
    }
  }
}

TEST(KvBand, HandCheckedIntervals) {
  int64_t lo, hi;
  const ModProgram causal = mask_of([](Expr, Expr, Expr q, Expr kv) { return q >= kv; });
  std::optional<KvBand> b = kv_band(&causal);
  ASSERT_TRUE(b);
  b->row(5, lo, hi);
  EXPECT_LE(lo, 0);
  EXPECT_EQ(hi, 5);

  // sliding window of 256 under causal: kv in [q - 256, q]
  const ModProgram sliding = mask_of([](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv <= 256); });
  b = kv_band(&sliding);
  ASSERT_TRUE(b);
  b->row(1000, lo, hi);
  EXPECT_EQ(lo, 744);
  EXPECT_EQ(hi, 1000);

  // a strict band and a constant prefix: kv in (q - 3, q + 2) and kv < 7
  const ModProgram band = mask_of([](Expr, Expr, Expr q, Expr kv) { return (kv - q < 2) & (q - kv < 3) & (kv < 7); });
  b = kv_band(&band);
  ASSERT_TRUE(b);
  b->row(4, lo, hi);
  EXPECT_EQ(lo, 2);
  EXPECT_EQ(hi, 5);
  b->row(10, lo, hi);
  EXPECT_GT(lo, hi);  // kv would need to be >= 8 and < 7

  // a row condition: only rows q >= 2 * 3 keep anything (q * 2 >= 6 + kv - kv)
  const ModProgram rows = mask_of([](Expr, Expr, Expr q, Expr kv) { return (q * 2 >= kv + 6 - kv) & (kv == q - 1); });
  b = kv_band(&rows);
  ASSERT_TRUE(b);
  b->row(2, lo, hi);
  EXPECT_GT(lo, hi);
  b->row(3, lo, hi);
  EXPECT_EQ(lo, 2);
  EXPECT_EQ(hi, 2);
}

TEST(KvBand, AgreesWithTheProgramOnEveryIndex) {
  const std::vector<MaskMod> mods = {
      [](Expr, Expr, Expr q, Expr kv) { return q >= kv; },
      [](Expr, Expr, Expr q, Expr kv) { return q > kv; },
      [](Expr, Expr, Expr q, Expr kv) { return kv <= q; },
      [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv <= 5); },
      [](Expr, Expr, Expr q, Expr kv) { return (q - kv < 4) & (kv - q < 4); },
      [](Expr, Expr, Expr q, Expr kv) { return kv < 9; },
      [](Expr, Expr, Expr q, Expr kv) { return (kv >= 3) & (q >= 2); },
      [](Expr, Expr, Expr q, Expr kv) { return kv == q; },
      [](Expr, Expr, Expr q, Expr kv) { return -kv >= -(q + 3); },
      [](Expr, Expr, Expr q, Expr kv) { return (q * 2 - 7 >= kv) & (kv + 1 > q - 10); },
      [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q >= kv); },
      [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q < kv); },  // empty everywhere
      [](Expr, Expr, Expr q, Expr kv) { return abs(q - kv) <= 3; },
      [](Expr, Expr, Expr q, Expr kv) { return 4 > abs(kv - q + 2); },
      [](Expr, Expr, Expr q, Expr kv) { return (abs(q - kv) < 6) & (kv <= q); },
  };
  for (const MaskMod& m : mods) expect_band_matches_program(mask_of(m), 24);
}

TEST(KvBand, DeclinesWhatIsNotOneIntervalPerRow) {
  Tensor doc = zeros({16}, kInt64);
  const std::vector<MaskMod> mods = {
      [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) | (kv < 2); },          // union of two intervals
      [](Expr, Expr, Expr q, Expr kv) { return q != kv; },                       // two intervals
      [](Expr, Expr, Expr q, Expr kv) { return kv * 2 <= q; },                   // needs a division
      [](Expr, Expr, Expr q, Expr kv) { return q * kv >= 3; },                   // not affine
      [](Expr, Expr, Expr q, Expr kv) { return floor_div(q, 4) >= floor_div(kv, 4); },
      [&](Expr, Expr, Expr q, Expr kv) { return Captured(doc)[q] == Captured(doc)[kv]; },
      [](Expr b, Expr, Expr q, Expr kv) { return q - b >= kv; },                 // depends on the batch
      [](Expr, Expr h, Expr q, Expr kv) { return (q >= kv) & (h < 2); },         // and on the head
      [](Expr, Expr, Expr q, Expr kv) { return abs(q - kv) >= 3; },              // two intervals
      [](Expr, Expr, Expr q, Expr kv) { return abs(q - kv * 2) <= 3; },          // kv's coefficient 2
  };
  for (const MaskMod& m : mods) {
    const ModProgram p = mask_of(m);
    std::string why;
    EXPECT_FALSE(kv_band(&p, &why).has_value()) << p.to_string();
    EXPECT_NE(why.find("mask_mod: "), std::string::npos) << why;  // the reason names what is not a band
  }
  EXPECT_FALSE(kv_band(nullptr).has_value());
  // Constants too large for an exact affine form (INT64_MIN has no absolute value: checked by comparisons).
  for (int64_t c : {std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), int64_t{1} << 50}) {
    const ModProgram p = mask_of([c](Expr, Expr, Expr q, Expr kv) { return q - kv >= c; });
    EXPECT_FALSE(kv_band(&p).has_value()) << p.to_string();
  }
}

}  // namespace
}  // namespace fg
