// KvBand: a mask_mod whose kept kv indices form one interval per query row, found on its program.
//
// Causal, sliding window, band, prefix and "q >= kv + 3" style masks are conjunctions (And) of integer
// comparisons between affine forms of q_idx and kv_idx (kv's coefficient -1, 0 or 1; q's any small integer;
// integer constants), `abs(A) <= B` counting as A <= B and -A <= B. For such a program the kv indices it keeps in row q are exactly
// [max_i(lower_i(q)), min_j(upper_j(q))] when every row condition holds (empty otherwise), so a tile's mask is
// two integers per row instead of the interpreter's pass per instruction over every score. The CPU kernels
// use it on partial blocks (attention/cpu/flex_cpu.cpp); the cuDNN lowering reads cuDNN's diagonal band from it
// (attention/cudnn_lowering.cpp).
//
// Sound by construction: the form is taken only when each value of the program is an exact affine function
// of (q, kv) for every q, kv in [0, 2^31) (coefficients and offsets bounded so that no int64 operation of the
// op table's semantics can wrap), and each instruction is read with the op table's meaning (comparisons of
// ints, And of bools, wrap-free Add / Sub / Neg / Mul by a constant). Anything else (captures, b or h,
// floats, Or, Not, Ne, division, ...) gives no form and the interpreter runs.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "flexgrad/attention/mod_program.h"

namespace fg {

// One constraint `kv >= q_coef * q + offset` (lower) or `kv <= q_coef * q + offset` (upper), or, for a row
// condition, `q_coef * q + offset >= 0`.
struct AffineBound {
  int64_t q_coef = 0, offset = 0;
  int64_t at(int64_t q) const { return q_coef * q + offset; }
};

struct KvBand {
  std::vector<AffineBound> lower, upper, row_conditions;
  bool never = false;  // a constant false conjunct: no kv is kept in any row

  // The kept kv indices of row q as [lo, hi] (lo > hi: none).
  void row(int64_t q, int64_t& lo, int64_t& hi) const;
};

// The band form of a mask program (output of kind Bool), or nullopt when it is not one (and then, when `why` is
// given, the reason, naming the first instruction that is not a band constraint).
std::optional<KvBand> kv_band(const ModProgram* mask, std::string* why = nullptr);

}  // namespace fg
