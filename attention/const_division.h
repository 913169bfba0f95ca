// Float division by a power of two, as a multiplication with the same result.
//
// The op table spells float division as __fdiv_rn (RN(x / c)). By a constant ptxas compiles it to five FFMA, a range
// test (FCHK) and a branch to a slow-path subroutine, and that branch ends the element's straight-line code: an
// H100's exact softcap forward (`20 tanh(s / 20)`) takes 1.85-1.89 ms against 1.15-1.17 ms with `s * 0.05`
// (session 40). Where c is 2^k (|c| in [2^-126, 2^126]) 1 / c is exact, so x * (1 / c) is the exact quotient rounded
// once, RN(x / c), for every x (zeros, subnormals, infinities and NaN included): the CUDA generator
// (mod_codegen.cpp) spells such a division `__fmul_rn(x, 1 / c)`.
//
// Other constants keep __fdiv_rn. The corrected form q = RN(x r), RN(fma(RN(fma(-q, c, x)), r, q)) with r = RN(1 / c)
// gives RN(x / c) for |x| >= 2^-64 (proven per constant by checking every mantissa), but not for every tiny x, and
// its range test made a second branch an element: session 40 measured it slower than __fdiv_rn (the exact softcap's
// forward 2.05-2.10 ms against 1.85-1.89; docs/flex_cuda_notes.md; the code is on the branch corrected-division).
#pragma once

#include <optional>

namespace fg {

// 1 / c where c is a power of two in [2^-126, 2^126] (either sign); nullopt otherwise (0, infinities, NaN, others).
std::optional<float> exact_reciprocal(float c);

}  // namespace fg
