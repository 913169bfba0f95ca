// Integer value ranges of a ModProgram's instructions by interval arithmetic. Two users:
//  - the CUDA code generator (mod_codegen.cpp) spells an integer add / sub / mul / neg in 32 bits where the
//    exact result provably fits (same value, one instruction), with b, h, q_idx, kv_idx bounded only by
//    int32;
//  - a CUDA launch proves, from the call's actual extents, that no captured read of a program can leave its
//    tensor and no integer op can fail (can_fail below): then the kernel gets no error flag and the call
//    needs no synchronising read-back of it (decoding steps through PagedAttention's tables).
// Ranges are sound: every value the op table's semantics (attention/op_semantics.h) can produce for
// inputs in the bounds lies in [lo, hi]; "unknown" is always allowed. The analysis bounds the leaves (constants,
// the index inputs, captured reads) and bools; every other instruction gets its op table row's rule
// (OpInfo::int_range), so an op's interval rule lives beside the rest of its meaning.
#pragma once
#include <climits>
#include <cstdint>
#include <vector>

#include "flexgrad/attention/mod_program.h"
#include "flexgrad/attention/value_ranges.h"

namespace fg {

// Exclusive upper bounds of the index inputs (each input is >= 0). The default: any non-negative int32.
struct IndexBounds {
  int64_t batch = int64_t{INT32_MAX} + 1, head = int64_t{INT32_MAX} + 1;
  int64_t q = int64_t{INT32_MAX} + 1, kv = int64_t{INT32_MAX} + 1;
};

// The range of every instruction of kind Int or Bool (Float instructions stay unknown). Int32 and bool
// captures bound what they read; int64 captures do not.
std::vector<IntRange> int_ranges(const ModProgram& p, const IndexBounds& bounds = {});

// The operands of `in` (an instruction of `p`) as the op table's interval rules see them (OperandRanges): their
// kinds, their ranges in `ints` and, where `floats` is given, in it (else unknown).
OperandRanges operand_ranges(const ModProgram& p, const Instr& in, const std::vector<IntRange>& ints,
                             const std::vector<FloatRange>* floats = nullptr);

// Whether evaluating `p` with inputs in `bounds` might raise: a captured read whose index is not proven
// inside [-n, n) of its dim, an integer floor division or modulo whose divisor may be 0, an integer power
// whose exponent may be negative. False means it provably cannot (null programs cannot fail).
bool can_fail(const ModProgram* p, const IndexBounds& bounds);

}  // namespace fg
