// Interval arithmetic over ModPrograms (attention/int_ranges.h): hand-checked ranges, the call-time proof
// that a program cannot fail, and a fuzz check of soundness against the scalar evaluator (a program proven
// safe never raises over its bounds; every int output lies in its range).
#include <gtest/gtest.h>

#include "flexgrad/attention/int_ranges.h"
#include "flexgrad/ops/ops.h"
#include "random_mods.h"

namespace fg {
namespace {

ModProgram mask_of(const MaskMod& m) { return trace_mask_mod(m); }
ModProgram score_of(const ScoreMod& m) { return trace_score_mod(m); }

TEST(IntRanges, HandCheckedRanges) {
  // kv // 64 over kv in [0, 1000): [0, 15]; kv % 64: [0, 63]; (q % 10) - 5: [-5, 4]; abs(h - 3), h < 8: [0, 4].
  ModProgram p = score_of([](Expr s, Expr, Expr h, Expr q, Expr kv) {
    return s + floor_div(kv, 64) + kv % 64 + ((q % 10) - 5) + abs(h - 3);
  });
  const std::vector<IntRange> r = int_ranges(p, IndexBounds{1, 8, 100, 1000});
  std::vector<std::pair<int64_t, int64_t>> ints;
  for (size_t i = 0; i < p.size(); ++i)
    if (p.instrs()[i].kind == ValueKind::Int && r[i].known) ints.emplace_back(r[i].lo, r[i].hi);
  auto has = [&](int64_t lo, int64_t hi) { return std::count(ints.begin(), ints.end(), std::make_pair(lo, hi)) > 0; };
  EXPECT_TRUE(has(0, 15));
  EXPECT_TRUE(has(0, 63));
  EXPECT_TRUE(has(-5, 4));
  EXPECT_TRUE(has(0, 4));
  EXPECT_TRUE(has(0, 999));  // kv itself
}

TEST(IntRanges, CanFailFollowsTheCallsExtents) {
  Tensor bias = zeros({8});
  ModProgram p = score_of([&](Expr s, Expr, Expr h, Expr, Expr) { return s + Captured(bias)[h]; });
  EXPECT_FALSE(can_fail(&p, IndexBounds{2, 8, 16, 16}));
  EXPECT_TRUE(can_fail(&p, IndexBounds{2, 9, 16, 16}));  // h = 8 would read past bias
  EXPECT_TRUE(can_fail(&p, IndexBounds{}));               // compile time: any int32 h
  EXPECT_FALSE(can_fail(nullptr, IndexBounds{}));

  // A page-table style read: table[b, kv // 64], table [4, 16].
  Tensor table = zeros({4, 16}, kInt64);
  ModProgram t = mask_of([&](Expr b, Expr, Expr, Expr kv) { return Captured(table)({b, floor_div(kv, 64)}) >= 0; });
  EXPECT_FALSE(can_fail(&t, IndexBounds{4, 1, 1, 1024}));
  EXPECT_TRUE(can_fail(&t, IndexBounds{4, 1, 1, 1025}));
  EXPECT_TRUE(can_fail(&t, IndexBounds{5, 1, 1, 1024}));

  // An index read from an int64 tensor is unbounded unless clamped.
  Tensor slots = zeros({4}, kInt64);
  ModProgram raw = mask_of([&](Expr b, Expr, Expr, Expr kv) {
    return Captured(table)({Expr(Captured(slots)[b]), floor_div(kv, 64)}) >= 0;
  });
  ModProgram clamped = mask_of([&](Expr b, Expr, Expr, Expr kv) {
    return Captured(table)({clamp(Captured(slots)[b], 0, 3), floor_div(kv, 64)}) >= 0;
  });
  EXPECT_TRUE(can_fail(&raw, IndexBounds{4, 1, 1, 1024}));
  EXPECT_FALSE(can_fail(&clamped, IndexBounds{4, 1, 1, 1024}));

  // Negative indices wrap (Python rules): table[-1 - b] is in range for b < 4.
  Tensor v = zeros({4});
  ModProgram neg = score_of([&](Expr s, Expr b, Expr, Expr, Expr) { return s + Captured(v)[Expr(-1) - b]; });
  EXPECT_FALSE(can_fail(&neg, IndexBounds{4, 1, 1, 1}));
  EXPECT_TRUE(can_fail(&neg, IndexBounds{5, 1, 1, 1}));

  // Integer division: by kv may divide by 0, by kv + 1 may not; int power: exponent h >= 0, h - 1 may be < 0.
  ModProgram div0 = score_of([](Expr s, Expr, Expr, Expr q, Expr kv) { return s + floor_div(q, kv); });
  ModProgram div1 = score_of([](Expr s, Expr, Expr, Expr q, Expr kv) { return s + q % (kv + 1); });
  ModProgram pw0 = score_of([](Expr s, Expr, Expr h, Expr q, Expr) { return s + pow(q, h); });
  ModProgram pw1 = score_of([](Expr s, Expr, Expr h, Expr q, Expr) { return s + pow(q, h - 1); });
  const IndexBounds small{1, 4, 8, 8};
  EXPECT_TRUE(can_fail(&div0, small));
  EXPECT_FALSE(can_fail(&div1, small));
  EXPECT_FALSE(can_fail(&pw0, small));
  EXPECT_TRUE(can_fail(&pw1, small));
}

// Soundness: over every (b, h, q, kv) in small bounds, a program proven safe evaluates without raising, and
// every int value of every instruction lies inside its computed range. Random programs mix raw (possibly
// failing) and safe forms.
TEST(IntRanges, FuzzProvenSafeProgramsNeverRaise) {
  const IndexBounds bounds{2, 3, 4, 5};
  int proven = 0;
  int64_t checked = 0;
  for (uint64_t seed = 1; seed <= 300; ++seed) {
    testing::ModGenerator gen(seed, {.steps = 16, .errors = seed % 2 == 0});
    testing::RandomMod m;
    try {
      m = gen.make();
    } catch (const Error&) {
      continue;  // constant parts folded to an error while tracing
    }
    for (const ModProgram* p : {&m.score, &m.mask}) {
      if (can_fail(p, bounds)) continue;
      ++proven;
      const std::vector<IntRange> r = int_ranges(*p, bounds);
      for (int64_t b = 0; b < bounds.batch; ++b)
        for (int64_t h = 0; h < bounds.head; ++h)
          for (int64_t q = 0; q < bounds.q; ++q)
            for (int64_t kv = 0; kv < bounds.kv; ++kv) {
              testing::RecordingVisitor v{*p, b, h, q, kv};
              ASSERT_NO_THROW(p->evaluate_with(v)) << "seed " << seed << "\n" << p->to_string();
              ASSERT_EQ(v.bad_indices, 0) << "a captured read left its tensor; seed " << seed << "\n" << p->to_string();
              ASSERT_EQ(v.seen.size(), p->size());
              for (size_t i = 0; i < p->size(); ++i) {
                if (p->instrs()[i].kind == ValueKind::Float || !r[i].known) continue;
                ++checked;
                ASSERT_TRUE(v.seen[i].i >= r[i].lo && v.seen[i].i <= r[i].hi)
                    << "seed " << seed << " instruction " << i << " = " << v.seen[i].i << " outside [" << r[i].lo
                    << ", " << r[i].hi << "]\n" << p->to_string();
              }
            }
    }
  }
  EXPECT_GT(proven, 100);  // the safe forms (x % 2n - n, |x| + 1) must be provable, or this proves nothing
  EXPECT_GT(checked, 10000);
}

}  // namespace
}  // namespace fg
