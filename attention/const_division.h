// Float division by a constant, with the bits of a division and without its branch.
//
// The op table spells float division as __fdiv_rn (RN(x / c)). By a constant ptxas compiles it to five FFMA, a range
// test (FCHK) and a branch to a slow-path subroutine, and that branch ends the element's straight-line code: an
// H100's exact softcap forward (`20 tanh(s / 20)`) takes 1.85-1.89 ms against 1.15-1.17 ms with `s * 0.05`
// (session 40). The CUDA generator (mod_codegen.cpp) spells x / c, with the same result bit for bit for every x
// (zeros, subnormals, infinities and NaN included), as
//
//   x * (1 / c)  where c is 2^k (|c| in [2^-126, 2^126]): 1 / c is exact, so the product is RN(x / c)
//                (exact_reciprocal);
//   float(double(x) * R), R = RN53(1 / c)  for other finite nonzero c, unless a tie below rules c out
//                (double_reciprocal): a conversion, a double multiply and a rounding conversion, no branch;
//   Markstein's corrected form (corrected_reciprocal, below)  in fg_score_elem_fast / fg_score_elem_dscore_fast,
//                which the kernels call for a thread's entries only when every dividend among them is in its range
//                (mod_codegen.h's FG_SCORE_ELEM_FAST): a multiply and two FMAs.
// On an H100 (session 43, bench_flex_cuda --backend fused, three alternating rounds) the exact softcap's forward took
// 1.83-1.95 ms with __fdiv_rn, 1.54-1.56 with the double product alone, 1.375-1.378 with the corrected form where it
// applies; its backward 3.94-4.01, 3.17-3.18 and 2.81-2.82 ms (`s * 0.05`: 1.14-1.16 and 2.51-2.65 ms).
//
// Why the double product rounds like the division. Write x = X 2^a and c = C 2^g with X, C integers, C odd and
// |X|, C < 2^24, and let b = B 2^h (B odd) be any point where rounding to float changes its answer: a midpoint of two
// floats (B < 2^25), or the overflow threshold (2^25 - 1) 2^103. If t = x / c is not b, |t - b| >= 2^-49 |t|: the
// numerator of t - b = (X 2^a - B C 2^(g+h)) / (C 2^g) is a nonzero multiple of 2^min(a, g+h). The product is
// t (1 + d) with |d| < 2^-51.9 (R and the product each rounded once in double), so it rounds to float like t.
// t = b (a tie, settled to even) happens only where the quotient is subnormal: b = B 2^-150 with B C < 2^24 and
// x = B C 2^(g-150) a float, i.e. g >= 1, c an even integer. There the product may miss b by an ulp of double and
// round the wrong way (c = 98 does, at some x), so for an even integer c every such x is checked once (under 2^22
// of them) and c keeps __fdiv_rn if any fails. double_reciprocal's test checks every float x for a set of
// constants; the GPU test compares the kernels with the host's division.
#pragma once

#include <optional>

namespace fg {

// 1 / c where c is a power of two in [2^-126, 2^126] (either sign); nullopt otherwise (0, infinities, NaN, others).
std::optional<float> exact_reciprocal(float c);

// RN53(1 / c) where float(RN53(double(x) * it)) == RN(x / c) for every float x (above); nullopt for zero, infinities,
// NaN, powers of two (exact_reciprocal's) and an even integer c with a misrounded tie. Thread-safe; the tie check
// (a few ms at most) is memoised per c.
std::optional<double> double_reciprocal(float c);

// Markstein's corrected form q = RN(x r), RN(fma(-RN(fma(q, c, -x)), r, q)) with r = RN(1 / c), c > 0 (a multiply and
// two FMAs; x / -c is spelled -(x / c)): RN(x / c) for every x with |x| in [2^-64, 2^64] and for zeros (their sign
// too: the residual is negated once more), where c passed the check below; not for every tiny x (the residual
// underflows), nor for infinities or a quotient that overflows. Used with a per-element range test it was slower
// than __fdiv_rn (session 40: a second branch an element); the kernels take it for a thread's entries only when every
// dividend among them is in that range (one test a thread and sub-tile), else the double product.
// RN(1 / c) where the form is proven for c: |c| in [2^-16, 2^16], not a power of two, and the form gives RN(x / c) for
// every x in [1, 2) (all 2^23 mantissas, checked once per mantissa of c, tens of ms; in that range of x every value the
// form computes is normal and scales exactly with x's power of two, likewise with c's). nullopt otherwise.
std::optional<float> corrected_reciprocal(float c);
// The check alone: whether the form with reciprocal r gives RN(x / c) for every float x in [1, 2).
bool corrected_division_is_exact(float c, float r);

// The tie check alone: whether float(RN53(double(x) * RN53(1 / c))) == RN(x / c) for every float x whose quotient is
// a subnormal midpoint (true where there is none).
bool double_product_rounds_every_tie(float c);

}  // namespace fg
